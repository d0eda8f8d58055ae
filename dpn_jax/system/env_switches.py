"""How the command-line tools' environment variables say "off": one list of spellings for all."""

OFF_VALUES = ("", "off", "none", "0", "false", "no")


def switched_off(value: str) -> bool:
    """True for `DPN_JAX_COMPILATION_CACHE=off`, `DPN_JAX_REUSE_HOST_MEMORY=0` and the like."""
    return value.strip().lower() in OFF_VALUES
