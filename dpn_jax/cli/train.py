"""`dpn-train`: `python train.py` as an installed command, with the same flags and behaviour.

train.py at the repository's top stays the trainer's script (next to the configs/ it reads by
default, which users copy and edit); this command runs that very file as `__main__`, so the two
cannot drift, and its messages name it (`train.py: error: ...`). It therefore needs the source
checkout the README installs from (`pip install -e .`); an install without one gets a line
saying so.
"""

from __future__ import annotations

import runpy
import sys
from pathlib import Path

PROG = "dpn-train"
TRAIN_PY = Path(__file__).resolve().parents[2] / "train.py"


def main() -> None:
    if not TRAIN_PY.is_file():
        from dpn_jax.cli.common import EXIT_ERROR, report_error

        report_error(
            PROG,
            f"no {TRAIN_PY}: {PROG} runs the train.py of a source checkout installed with "
            "`pip install -e .`",
        )
        sys.exit(EXIT_ERROR)
    runpy.run_path(str(TRAIN_PY), run_name="__main__")


if __name__ == "__main__":
    main()
