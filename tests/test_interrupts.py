"""Ctrl-C at a command's start (dpn_jax.system.interrupts): held until the command reports it and
never raised inside an import, where it turned into a swallowed ImportError (CI saw train.py
train to the end after a Ctrl-C), a traceback or a crash; train.py's own start is tested in
test_train_cli.py."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

import pytest
from runs import ROOT, wait_until_catching

INTERRUPT_SELF = """
import os, signal, time
os.kill(os.getpid(), signal.SIGINT)
deadline = time.monotonic() + 0.5
while time.monotonic() < deadline:  # Python code, where the handler runs
    pass
"""

INTERRUPT_DURING_AN_IMPORT = """
import signal, sys, time
from dpn_jax.system.interrupts import SignalInterrupt, hold_interrupts, release_interrupts
hold_interrupts(signal.SIGINT)
release_interrupts()
try:
    import interrupted_while_imported
    time.sleep(10)
    print("not interrupted")
except SignalInterrupt:
    print("interrupted after the import:", "interrupted_while_imported" in sys.modules)
"""


def run_python(script: str, *paths) -> subprocess.CompletedProcess:
    """`script` run with dpn_jax and `paths` importable."""
    return subprocess.run(
        [sys.executable, "-c", script],
        env={**os.environ, "PYTHONPATH": os.pathsep.join(map(str, (ROOT, *paths)))},
        capture_output=True,
        text=True,
        timeout=60,
    )


def test_an_interrupt_during_an_import_is_raised_after_it(tmp_path):
    (tmp_path / "interrupted_while_imported.py").write_text(INTERRUPT_SELF)
    result = run_python(INTERRUPT_DURING_AN_IMPORT, tmp_path)
    assert result.stdout.strip() == "interrupted after the import: True", result.stderr


HELD_UNTIL_RELEASED = (
    """
import signal
from dpn_jax.system.interrupts import SignalInterrupt, hold_interrupts, release_interrupts
hold_interrupts(signal.SIGINT)
"""
    + INTERRUPT_SELF
    + """
print("held")
release_interrupts()
try:
    time.sleep(10)
except SignalInterrupt:
    print("raised after the release")
"""
)


def test_an_interrupt_before_the_release_is_held_and_raised_after_it():
    result = run_python(HELD_UNTIL_RELEASED)
    assert result.stdout.split("\n") == ["held", "raised after the release", ""], result.stderr


@pytest.mark.parametrize(
    "signum, delay_s",
    [(signal.SIGINT, 0.0), (signal.SIGINT, 0.1), (signal.SIGINT, 0.3), (signal.SIGINT, 1.0)]
    + [(signal.SIGTERM, 0.1)],
)
def test_an_interrupt_at_any_moment_of_a_commands_start_is_one_line(tmp_path, signum, delay_s):
    """From the handler's installation on, through JAX's import, to the command's own work:
    dpn-convert reading a FIFO waits for a writer forever, so only the signal ends it."""
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
    try:
        wait_until_catching(proc, signal.SIGTERM)
        time.sleep(delay_s)
        proc.send_signal(signum)
        _, err = proc.communicate(timeout=60)
    finally:
        proc.kill()
    assert proc.returncode == 128 + signum, err[-3000:]
    assert err.splitlines() == ["dpn-convert: interrupted"], err[-3000:]
    assert os.listdir(tmp_path) == ["weights.pth"]


def test_every_console_script_installs_the_handler_before_importing_its_command():
    import tomllib

    scripts = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["scripts"]
    for name, target in scripts.items():
        # dpn-train runs train.py, which installs the handler on its first lines
        expected = "dpn_jax.cli.train:main" if name == "dpn-train" else "dpn_jax.cli.launch:"
        assert target.startswith(expected), (name, target)
