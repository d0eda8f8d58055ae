"""The errors dpn_jax reports to a user as one line: a bad setting, dataset, file or output path.

Command-line tools catch `DpnJaxError` and print its message; any other exception is a bug in
dpn_jax and keeps its traceback. Messages name what is wrong (the file, the key, the value, the
shape) and what would be accepted. Each class also derives from the built-in error it refines,
so code that catches `ValueError` or `OSError` keeps working.
"""


class DpnJaxError(Exception):
    """A problem with what the user gave dpn_jax, described in one line."""


class ConfigError(DpnJaxError, ValueError):
    """A setting that is unknown, out of range or inconsistent with another one."""


class DataError(DpnJaxError, ValueError):
    """A dataset that cannot be found, read or used for the task asked."""


class WeightsError(DpnJaxError, ValueError):
    """A checkpoint file, hub repository or model directory that cannot be used."""


class OutputError(DpnJaxError, OSError):
    """An output that cannot be written: it exists and is not ours to replace, or the disk
    refused."""
