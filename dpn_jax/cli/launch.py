"""The console scripts' entry points (pyproject.toml's [project.scripts]).

Each command's module imports JAX as it is imported, which takes a second or more: the entry
point installs the interrupt handler first (dpn_jax.system.interrupts says why), then imports
and runs the command, so a Ctrl-C at any moment ends it with one line and status 130 (a SIGTERM
likewise, with 143), its partial output removed as after an error.
"""

from __future__ import annotations

import importlib
import signal
from collections.abc import Callable

from dpn_jax.cli.common import run_command
from dpn_jax.system.interrupts import hold_interrupts, release_interrupts


def _entry_point(prog: str, module: str) -> Callable[[], int]:
    def run() -> int:
        hold_interrupts(signal.SIGINT, signal.SIGTERM)
        return run_command(prog, lambda: _import_and_run(module))

    run.__doc__ = f"`{prog}`: {module}.main, interruptible from its first moment."
    return run


def _import_and_run(module: str) -> int:
    release_interrupts()  # run_command reports them from here on
    return importlib.import_module(module).main()


convert = _entry_point("dpn-convert", "dpn_jax.cli.convert")
predict = _entry_point("dpn-predict", "dpn_jax.cli.predict")
evaluate = _entry_point("dpn-evaluate", "dpn_jax.cli.evaluate")
prepare_data = _entry_point("dpn-prepare-data", "dpn_jax.cli.prepare_data")
export = _entry_point("dpn-export", "dpn_jax.cli.export")
