"""Ctrl-C at a command's start (dpn_jax.system.interrupts): never raised inside an import, where
it turned into a swallowed ImportError (CI saw train.py train to the end after a Ctrl-C), a
traceback or a crash; train.py's own start is tested in test_train_cli.py."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

import pytest
from runs import ROOT

MODULE_INTERRUPTED_WHILE_IMPORTED = """
import os, signal, time
os.kill(os.getpid(), signal.SIGINT)
deadline = time.monotonic() + 0.5
while time.monotonic() < deadline:  # Python code, where the handler runs
    pass
finished = True
"""

INTERRUPT_DURING_AN_IMPORT = """
import sys, time
from dpn_jax.system.interrupts import SignalInterrupt, raise_outside_imports
raise_outside_imports()
try:
    import interrupted_while_imported
    time.sleep(10)
    print("not interrupted")
except SignalInterrupt:
    print("interrupted after the import:", "interrupted_while_imported" in sys.modules)
"""


def test_an_interrupt_during_an_import_is_raised_after_it(tmp_path):
    (tmp_path / "interrupted_while_imported.py").write_text(MODULE_INTERRUPTED_WHILE_IMPORTED)
    result = subprocess.run(
        [sys.executable, "-c", INTERRUPT_DURING_AN_IMPORT],
        env={**os.environ, "PYTHONPATH": f"{ROOT}:{tmp_path}"},
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.stdout.strip() == "interrupted after the import: True", result.stderr


@pytest.mark.parametrize("delay_s", [0.1, 0.2, 0.4, 1.0])  # from JAX's import to the command
def test_ctrl_c_at_any_moment_of_a_commands_start_is_one_line(tmp_path, delay_s):
    """dpn-convert reading a FIFO waits for a writer forever: only the interrupt ends it."""
    fifo = tmp_path / "weights.pth"
    os.mkfifo(fifo)
    proc = subprocess.Popen(
        [sys.executable, "convert_weights.py", str(fifo), "--output", str(tmp_path / "out")],
        cwd=ROOT,
        env={**os.environ, "JAX_PLATFORMS": "cpu", "DPN_JAX_COMPILATION_CACHE": "off"},
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    time.sleep(delay_s)
    proc.send_signal(signal.SIGINT)
    try:
        _, err = proc.communicate(timeout=60)
    finally:
        proc.kill()
    assert proc.returncode == 130, err[-3000:]
    assert err.splitlines() == ["dpn-convert: interrupted"], err[-3000:]


def test_every_console_script_installs_the_handler_before_importing_its_command():
    import tomllib

    scripts = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["scripts"]
    for name, target in scripts.items():
        # dpn-train runs train.py, which installs the handler on its first lines
        expected = "dpn_jax.cli.train:main" if name == "dpn-train" else "dpn_jax.cli.launch:"
        assert target.startswith(expected), (name, target)
