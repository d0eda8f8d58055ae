"""`dpn-train`: train.py as an installed command, same flags (pyproject.toml's entry point run the
way pip's console-script wrapper runs it: import the function, call it)."""

from __future__ import annotations

import importlib
import subprocess
import sys
import tomllib

import pytest
from runs import ROOT, subprocess_env

from dpn_jax.cli import train as train_command

SCRIPTS = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["scripts"]


def dpn_train(tmp_path, *flags):
    module, _, function = SCRIPTS["dpn-train"].partition(":")
    wrapper = (  # what pip writes into bin/dpn-train
        f"import sys; sys.argv[0] = 'dpn-train'; from {module} import {function}; "
        f"sys.exit({function}())"
    )
    return subprocess.run(
        [sys.executable, "-c", wrapper, "--workdir", str(tmp_path / "run"), *flags],
        env=subprocess_env(tmp_path / "cache"),
        cwd=tmp_path,  # not the checkout: the command finds train.py and configs/ itself
        capture_output=True,
        text=True,
        timeout=120,
    )


@pytest.mark.parametrize("script", sorted(SCRIPTS))
def test_every_entry_point_exists(script):
    module, _, function = SCRIPTS[script].partition(":")
    assert callable(getattr(importlib.import_module(module), function))


def test_help_is_train_py_help(tmp_path):
    result = dpn_train(tmp_path, "--help")
    assert result.returncode == 0, result.stderr
    reference = subprocess.run(
        [sys.executable, "train.py", "--help"],
        env=subprocess_env(tmp_path / "cache"),
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert "  --config.batch_size=64  global, over all devices and processes" in result.stdout
    # the same text, but for the path absl names the flags' module by
    assert result.stdout.replace(str(ROOT / "train.py"), "train.py") == reference.stdout


def test_a_mistyped_key_is_one_line(tmp_path):
    result = dpn_train(tmp_path, "--config.learnig_rate=0.1")
    assert result.returncode == 1
    assert result.stderr == (
        "train.py: error: --config.learnig_rate: no such key "
        "(did you mean --config.learning_rate?)\n"
    )
    assert not (tmp_path / "run").exists()


def test_without_a_checkout_it_says_so(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(train_command, "TRAIN_PY", tmp_path / "train.py")
    with pytest.raises(SystemExit) as exit:
        train_command.main()
    assert exit.value.code == 1
    error = capsys.readouterr().err
    assert error.startswith(f"dpn-train: error: no {tmp_path}/train.py: dpn-train runs the ")
    assert error.count("\n") == 1
