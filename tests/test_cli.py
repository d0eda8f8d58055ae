"""The commands' shared error boundary (dpn_jax.cli.common): a user's error is one escaped line
and exit 1; a bug in dpn_jax keeps its traceback; OS errors on user paths name the path."""

from __future__ import annotations

import errno
import os
from pathlib import Path

import numpy as np
import pytest
from safetensors.numpy import save_file

from dpn_jax.cli import common
from dpn_jax.cli import convert as convert_cli
from dpn_jax.cli import evaluate as evaluate_cli
from dpn_jax.cli import predict as predict_cli
from dpn_jax.errors import ConfigError, DataError, OutputError, WeightsError
from dpn_jax.weights import sources
from dpn_jax.weights.convert import ConversionError
from dpn_jax.weights.sources import SourceError

HOSTILE = "\x1b]0;owned\x07"


def test_weights_errors_are_dpn_jax_errors():
    assert issubclass(SourceError, WeightsError) and issubclass(ConversionError, WeightsError)


def test_printable_escapes_controls_and_keeps_other_text():
    assert common.printable(f"a{HOSTILE}b") == "a\\x1b]0;owned\\x07b"
    assert common.printable("x\u202ey\nz\t") == "x\\u202ey\\nz\\t"
    assert common.printable("tabby, tabby cat; Käfer; 猫") == "tabby, tabby cat; Käfer; 猫"


# Each command, with the function its body calls first replaced by `fail`.
COMMANDS = {
    "dpn-convert": (convert_cli, "convert_source", ["model.pth", "--output", "out"]),
    "dpn-predict": (predict_cli, "load_model", ["--checkpoint", "model", "cat.jpg"]),
    "dpn-evaluate": (evaluate_cli, "load_from_arguments", ["--checkpoint", "model"]),
}


@pytest.mark.parametrize("command", sorted(COMMANDS))
@pytest.mark.parametrize("error", [ConfigError, WeightsError, DataError, OutputError, SourceError])
def test_user_errors_are_one_escaped_line(command, error, monkeypatch, capsys):
    module, target, argv = COMMANDS[command]

    def fail(*args, **kwargs):
        raise error(f"model/metadata.json: class {HOSTILE}\nsecond line")

    monkeypatch.setattr(module, target, fail)
    assert module.main(argv) == 1
    out, err = capsys.readouterr()
    assert out == ""
    assert err == (
        f"{command}: error: model/metadata.json: class \\x1b]0;owned\\x07\\nsecond line\n"
    )


@pytest.mark.parametrize("command", sorted(COMMANDS))
@pytest.mark.parametrize("bug", [ValueError, OSError, KeyError])
def test_bugs_keep_their_traceback(command, bug, monkeypatch):
    """The boundaries used to catch every ValueError and OSError, hiding dpn_jax's own bugs."""
    module, target, argv = COMMANDS[command]

    def fail(*args, **kwargs):
        raise bug("a bug in dpn_jax")

    monkeypatch.setattr(module, target, fail)
    with pytest.raises(bug, match="a bug in dpn_jax"):
        module.main(argv)


def test_interrupt_exits_130_quietly(monkeypatch, capsys):
    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(convert_cli, "convert_source", interrupted)
    assert convert_cli.main(["model.pth", "--output", "out"]) == 130
    assert capsys.readouterr().err == "dpn-convert: interrupted\n"


def test_tensor_names_from_a_file_are_printed_escaped(tmp_path, capsys):
    evil = tmp_path / "evil.safetensors"
    save_file({f"features.{HOSTILE}.weight": np.zeros(3, np.float32)}, evil)
    assert convert_cli.main([str(evil), "--output", str(tmp_path / "o")]) == 1
    err = capsys.readouterr().err
    assert "\x1b" not in err and "\x07" not in err and "features.\\x1b]0;owned\\x07.weight" in err
    assert err.count("\n") == 1


def test_unreadable_source_names_the_file(tmp_path, monkeypatch, capsys):
    (tmp_path / "model.safetensors").write_bytes(b"x")

    def denied(path, *args, **kwargs):  # tests run as root, where chmod does not deny reading
        raise PermissionError(errno.EACCES, os.strerror(errno.EACCES), str(path))

    monkeypatch.setattr(sources, "open", denied, raising=False)
    source = tmp_path / "model.safetensors"
    assert convert_cli.main([str(source), "--output", str(tmp_path / "o")]) == 1
    assert capsys.readouterr().err == (
        f"dpn-convert: error: {source}: cannot be read (Permission denied)\n"
    )


def test_unwritable_output_names_the_path(tmp_path, monkeypatch, capsys):
    from timm_reference import numpy_state_dict, random_timm_dpn

    save_file(
        numpy_state_dict(random_timm_dpn("dpn68", num_classes=3, k_sec=(1, 1, 1, 1))),
        tmp_path / "model.safetensors",
    )
    (tmp_path / "locked").mkdir()
    mkdir = Path.mkdir

    def denied(self, *args, **kwargs):  # tests run as root, where chmod does not deny writing
        if self.parent == tmp_path / "locked":
            raise PermissionError(errno.EACCES, os.strerror(errno.EACCES), str(self))
        return mkdir(self, *args, **kwargs)

    monkeypatch.setattr(Path, "mkdir", denied)
    out = tmp_path / "locked" / "out"
    assert convert_cli.main([str(tmp_path / "model.safetensors"), "--output", str(out)]) == 1
    err = capsys.readouterr().err
    assert err.startswith(f"dpn-convert: error: cannot write {out}: Permission denied (")
    assert err.count("\n") == 1 and os.listdir(tmp_path / "locked") == []
