"""convert_weights.py / dpn-convert and create_model(pretrained=...) against the real timm.

State dicts come from randomly initialised timm DPNs (depth-reduced: the conversion is the same
per block, and XLA compiles a one-block-per-stage DPN in seconds); nothing is downloaded.
"""

from __future__ import annotations

import errno
import functools
import os
import pickle
import shutil
import socket
import subprocess
import sys
import time
import warnings
from pathlib import Path

import jax
import numpy as np
import pytest
import timm
import torch
from safetensors.numpy import save_file
from safetensors.torch import load_file as load_torch_safetensors
from timm_reference import numpy_state_dict, random_timm_dpn, relative_error, run_timm

import dpn_jax
from dpn_jax.cli import convert as convert_cli
from dpn_jax.errors import WeightsError
from dpn_jax.models.dpn import MODEL_CONFIGS
from dpn_jax.weights.convert import detect_architecture, detect_variant, timm_to_flax
from dpn_jax.weights.model_dir import ModelDir

REPO_ROOT = Path(__file__).resolve().parents[1]
TINY = {"k_sec": (1, 1, 1, 1)}
NUM_CLASSES = 12
PLAIN_AND_B = ["dpn68", "dpn68b"]
ALL_VARIANTS = ["dpn48b", "dpn68", "dpn68b", "dpn92", "dpn98", "dpn107", "dpn131"]


@functools.partial(jax.jit, static_argnums=0)
def forward(model, variables, x):
    return model.apply(variables, x)


def image_batch(seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).standard_normal((2, 32, 32, 3)).astype(np.float32)


@functools.cache
def reference(arch: str, seed: int = 0) -> torch.nn.Module:
    return random_timm_dpn(arch, seed, num_classes=NUM_CLASSES, **TINY)


def torch_state_dict(arch: str, seed: int = 0) -> dict[str, torch.Tensor]:
    return {k: v.clone() for k, v in reference(arch, seed).state_dict().items()}


def logits_error(model_dir: Path, arch: str, seed: int = 0) -> float:
    """Relative logits difference between `create_model(pretrained=model_dir)` and timm."""
    model, variables = dpn_jax.create_model(
        arch, num_classes=NUM_CLASSES, pretrained=model_dir, **TINY
    )
    x = image_batch()
    return relative_error(forward(model, variables, x), run_timm(reference(arch, seed), x))


def run_cli(*argv: str | Path) -> int:
    return convert_cli.main([str(a) for a in argv])


def run_convert_weights(
    src: str, output: Path, env: dict, timeout: float = 300
) -> subprocess.CompletedProcess:
    """`python convert_weights.py SRC --output OUTPUT` in a fresh process (the hub's state and
    environment are per process)."""
    return subprocess.run(
        [sys.executable, "convert_weights.py", src, "--output", str(output)],
        check=False,
        cwd=REPO_ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=timeout,
    )


# --- every source kind, for a plain and a `b` variant -------------------------------------------


def write_safetensors(arch: str, path: Path) -> None:
    save_file(numpy_state_dict(reference(arch)), path / "model.safetensors")


def write_pth(arch: str, path: Path) -> None:
    torch.save(torch_state_dict(arch), path / "model.pth")


def write_training_checkpoint(arch: str, path: Path) -> None:
    """timm train.py's layout: DDP-prefixed weights under `state_dict`, plus optimizer and args."""
    import argparse

    torch.save(
        {
            "epoch": 7,
            "arch": arch,
            "args": argparse.Namespace(lr=0.1, model=arch),
            "optimizer": {"state": {}, "param_groups": [{"lr": 0.1}]},
            "state_dict": {f"module.{k}": v for k, v in torch_state_dict(arch).items()},
            "state_dict_ema": torch_state_dict(arch, seed=1),
        },
        path / "model.pth.tar",
    )


def write_cadene(arch: str, path: Path) -> None:
    """Cadene `pretrainedmodels` names the 1x1-conv classifier `last_linear` and has no counters."""
    state_dict = {
        k.replace("classifier.", "last_linear."): v
        for k, v in torch_state_dict(arch).items()
        if not k.endswith("num_batches_tracked")
    }
    torch.save(state_dict, path / "dpn_cadene.pth")


SOURCE_WRITERS = {
    "safetensors": write_safetensors,
    "pth": write_pth,
    "training": write_training_checkpoint,
    "cadene": write_cadene,
}


@pytest.mark.parametrize("arch", PLAIN_AND_B)
@pytest.mark.parametrize("kind", sorted(SOURCE_WRITERS))
def test_source_converts_to_timm_logits(kind, arch, tmp_path, capsys):
    SOURCE_WRITERS[kind](arch, tmp_path)
    (src,) = [p for p in tmp_path.iterdir() if p.is_file()]
    # A one-block-per-stage dpn68b looks exactly like such a dpn48b (only the activation differs).
    model_flag = ["--model", arch] if arch.endswith("b") else []
    assert run_cli(src, "--output", tmp_path / "out", *model_flag) == 0
    out = capsys.readouterr().out
    assert f"{arch} k_sec=(1, 1, 1, 1), {NUM_CLASSES} classes" in out and "wrote" in out
    model_dir = ModelDir.load(tmp_path / "out")
    assert model_dir.architecture == arch and model_dir.model_kwargs == TINY
    preprocessing = model_dir.preprocessing.as_dict()
    assert preprocessing == {k: dpn_jax.pretrained_cfg(arch)[k] for k in preprocessing}
    assert len(model_dir.sha256) == 64 and model_dir.dpn_jax_version == dpn_jax.__version__
    assert logits_error(tmp_path / "out", arch) <= 1e-4


def test_ema_flag_picks_the_ema_weights(tmp_path):
    write_training_checkpoint("dpn68", tmp_path)
    assert run_cli(tmp_path / "model.pth.tar", "--ema", "--output", tmp_path / "ema") == 0
    assert logits_error(tmp_path / "ema", "dpn68", seed=1) <= 1e-4
    assert logits_error(tmp_path / "ema", "dpn68", seed=0) > 1e-2  # not the plain weights


def test_model_key_and_torch_compile_prefixes_are_unwrapped(tmp_path):
    """Other trainers save {"model": ...}; torch.compile adds `_orig_mod.` (also inside DDP)."""
    state_dict = {f"module._orig_mod.{k}": v for k, v in torch_state_dict("dpn68").items()}
    torch.save({"model": state_dict, "epoch": 3}, tmp_path / "checkpoint.pt")
    assert run_cli(tmp_path / "checkpoint.pt", "--output", tmp_path / "out") == 0
    variables = ModelDir.load(tmp_path / "out").variables
    expected = timm_to_flax(numpy_state_dict(reference("dpn68")), "dpn68", **TINY)
    jax.tree_util.tree_map(np.testing.assert_array_equal, variables, expected)


def populate_hub_cache(hf_home: Path, repo: str, files: dict[str, bytes]) -> None:
    """The layout huggingface_hub's downloads leave: blobs, a snapshot of symlinks, refs/main."""
    import hashlib

    storage = hf_home / "hub" / f"models--{repo.replace('/', '--')}"
    revision = "0123456789abcdef0123456789abcdef01234567"
    snapshot = storage / "snapshots" / revision
    for folder in (storage / "refs", storage / "blobs", snapshot):
        folder.mkdir(parents=True)
    (storage / "refs" / "main").write_text(revision)
    for name, data in files.items():
        blob = storage / "blobs" / hashlib.sha256(data).hexdigest()
        blob.write_bytes(data)
        (snapshot / name).symlink_to(os.path.relpath(blob, snapshot))


def offline_env(hf_home: Path, **extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("HF_", "HUGGINGFACE_"))}
    return {**env, "HF_HOME": str(hf_home), "HF_HUB_OFFLINE": "1", **extra}


@pytest.mark.parametrize("arch", PLAIN_AND_B)
def test_hub_reference_from_offline_cache(arch, tmp_path):
    """`python convert_weights.py timm/<tag>` with HF_HUB_OFFLINE=1 reads huggingface_hub's cache.

    dpn68's repo also caches a garbage pytorch_model.bin (model.safetensors must be preferred);
    dpn68b's has only pytorch_model.bin (the fallback).
    """
    tag = f"{arch}.mx_in1k"
    pth = tmp_path / "model.pth"
    torch.save(torch_state_dict(arch), pth)
    if arch == "dpn68":
        write_safetensors(arch, tmp_path)
        files = {
            "model.safetensors": (tmp_path / "model.safetensors").read_bytes(),
            "pytorch_model.bin": RANDOM_BYTES,
        }
        src, expected_file = f"timm/{tag}", "model.safetensors"
    else:
        files = {"pytorch_model.bin": pth.read_bytes()}
        src, expected_file = f"hf-hub:timm/{tag}", "pytorch_model.bin"
    populate_hub_cache(tmp_path / "hf", f"timm/{tag}", files)
    result = run_convert_weights(src, tmp_path / "out", offline_env(tmp_path / "hf"))
    assert result.returncode == 0, result.stderr
    model_dir = ModelDir.load(tmp_path / "out")
    assert model_dir.source == f"hf-hub:timm/{tag}/{expected_file}"
    assert model_dir.preprocessing.mean == dpn_jax.pretrained_cfg(tag)["mean"]
    assert logits_error(tmp_path / "out", arch) <= 1e-4


def test_hub_reference_missing_from_offline_cache(tmp_path):
    result = run_convert_weights(
        "timm/dpn92.mx_in1k", tmp_path / "out", offline_env(tmp_path / "hf")
    )
    assert result.returncode == 1
    assert "timm/dpn92.mx_in1k" in result.stderr and "cache" in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1
    assert not (tmp_path / "out").exists()


def test_create_model_pretrained_true_downloads_converts_and_caches(tmp_path, monkeypatch):
    """create_model(tag, pretrained=True): hub cache -> converted dpn_jax cache; then the
    converted cache alone suffices (the Hugging Face cache is gone)."""
    from huggingface_hub import constants

    write_safetensors("dpn68", tmp_path)
    populate_hub_cache(
        tmp_path / "hf",
        "timm/dpn68.mx_in1k",
        {"model.safetensors": (tmp_path / "model.safetensors").read_bytes()},
    )
    # huggingface_hub reads these environment variables at import; patch what it read.
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "hf" / "hub"))
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setenv("DPN_JAX_WEIGHTS_CACHE", str(tmp_path / "dpn_jax_cache"))
    x = image_batch()
    expected = run_timm(reference("dpn68"), x)
    model, variables = dpn_jax.create_model(
        "dpn68.mx_in1k", num_classes=NUM_CLASSES, pretrained=True, **TINY
    )
    assert relative_error(forward(model, variables, x), expected) <= 1e-4
    assert (tmp_path / "dpn_jax_cache" / "dpn68.mx_in1k" / "metadata.json").is_file()

    shutil.rmtree(tmp_path / "hf")
    model, variables = dpn_jax.create_model(
        "dpn68.mx_in1k", num_classes=NUM_CLASSES, pretrained=True, **TINY
    )
    assert relative_error(forward(model, variables, x), expected) <= 1e-4


# --- export back to timm, fine-tuning heads ----------------------------------------------------


@pytest.mark.parametrize("arch", PLAIN_AND_B)
def test_to_torch_export_loads_strictly_into_timm(arch, tmp_path, capsys):
    write_safetensors(arch, tmp_path)
    assert (
        run_cli(tmp_path / "model.safetensors", "--model", arch, "--output", tmp_path / "jax") == 0
    )
    assert run_cli(tmp_path / "jax", "--to-torch", tmp_path / "back.safetensors") == 0
    assert "load_state_dict" in capsys.readouterr().out
    exported = load_torch_safetensors(tmp_path / "back.safetensors")
    rebuilt = timm.create_model(arch, num_classes=NUM_CLASSES, **TINY).eval()
    rebuilt.load_state_dict(exported, strict=True)
    original = reference(arch).state_dict()
    for key, value in original.items():  # weights and BN statistics round-trip bit for bit
        if not key.endswith("num_batches_tracked"):
            assert torch.equal(exported[key], value), key
    x = image_batch()
    np.testing.assert_array_equal(run_timm(rebuilt, x), run_timm(reference(arch), x))


def test_num_classes_gives_a_fresh_head_that_exports_to_timm(tmp_path, capsys):
    write_pth("dpn68", tmp_path)
    assert run_cli(tmp_path / "model.pth", "--num-classes", "5", "--output", tmp_path / "ft") == 0
    assert (
        "classifier replaced: checkpoint has 12 classes, new head for 5 classes"
        in capsys.readouterr().out
    )
    model_dir = ModelDir.load(tmp_path / "ft")
    variables = model_dir.variables
    head = variables["params"].pop("classifier")
    assert model_dir.num_classes == 5 and head["kernel"].shape == (704, 5)
    np.testing.assert_array_equal(head["bias"], np.zeros(5))
    assert 0.01 < np.std(head["kernel"]) < 0.1  # LeCun normal: 1 / sqrt(704) = 0.038

    # The backbone is timm's, bit for bit.
    backbone = timm_to_flax(numpy_state_dict(reference("dpn68")), "dpn68", **TINY)
    del backbone["params"]["classifier"]
    jax.tree_util.tree_map(np.testing.assert_array_equal, variables, backbone)

    # The fine-tuning model goes back to PyTorch with the same logits.
    model, variables = dpn_jax.create_model(
        "dpn68", num_classes=5, pretrained=tmp_path / "ft", **TINY
    )
    assert run_cli(tmp_path / "ft", "--to-torch", tmp_path / "ft.safetensors") == 0
    rebuilt = timm.create_model("dpn68", num_classes=5, **TINY).eval()
    rebuilt.load_state_dict(load_torch_safetensors(tmp_path / "ft.safetensors"), strict=True)
    x = image_batch()
    assert relative_error(forward(model, variables, x), run_timm(rebuilt, x)) <= 1e-4


def test_create_model_with_other_num_classes_warns_and_fits_a_head(tmp_path):
    write_safetensors("dpn68", tmp_path)
    assert run_cli(tmp_path / "model.safetensors", "--output", tmp_path / "jax") == 0
    with pytest.warns(
        UserWarning, match="checkpoint has 12 classes, the model 5: the classifier is freshly"
    ):
        model, variables = dpn_jax.create_model(
            "dpn68", num_classes=5, pretrained=tmp_path / "jax", **TINY
        )
    assert forward(model, variables, image_batch()).shape == (2, 5)


def test_create_model_from_a_model_directory_builds_the_saved_architecture(tmp_path):
    """A model directory describes itself: no architecture fields or num_classes to repeat."""
    write_safetensors("dpn68", tmp_path)
    assert run_cli(tmp_path / "model.safetensors", "--output", tmp_path / "jax") == 0
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no "freshly initialised" head
        model, variables = dpn_jax.create_model("dpn68", pretrained=tmp_path / "jax")
    assert model.config == MODEL_CONFIGS["dpn68"].replace(**TINY)
    assert model.num_classes == NUM_CLASSES
    x = image_batch()
    expected = run_timm(reference("dpn68"), x)
    assert relative_error(forward(model, variables, x), expected) <= 1e-4
    with pytest.raises(
        WeightsError,
        match="holds a dpn68 with {'k_sec': \\(1, 1, 1, 1\\)}; create_model was given ",
    ):
        dpn_jax.create_model("dpn68", pretrained=tmp_path / "jax", k_sec=(1, 2, 1, 1))


# --- variant detection --------------------------------------------------------------------------


def meta_state_dict(arch: str, **kwargs) -> dict[str, torch.Tensor]:
    """timm's state dict shapes without allocating or initialising anything."""
    with torch.device("meta"):
        return timm.create_model(arch, **kwargs).state_dict()


@pytest.mark.parametrize("arch", ALL_VARIANTS)
def test_detects_every_variant_from_shapes(arch):
    assert detect_variant(meta_state_dict(arch)) == arch
    depth = {"k_sec": (2, 1, 3, 1)}
    assert detect_architecture(meta_state_dict(arch, **depth), arch) == (arch, depth)


def test_detection_reports_ambiguous_and_unknown_structures():
    with pytest.raises(dpn_jax.weights.convert.ConversionError, match="could be dpn48b or dpn68b"):
        detect_architecture(meta_state_dict("dpn68b", **TINY))
    with pytest.raises(dpn_jax.weights.convert.ConversionError, match="no known variant: .*k_r=64"):
        detect_variant(meta_state_dict("dpn68", k_r=64))


# --- bad input: one clear line, a non-zero exit, nothing left on disk ---------------------------


class RunsShell:
    """A pickle payload: unpickling it would run a shell command."""

    def __init__(self, command: str):
        self.command = command

    def __reduce__(self):
        return os.system, (self.command,)


class RunsExec:
    def __init__(self, code: str):
        self.code = code

    def __reduce__(self):
        return exec, (self.code,)


def _dpn_with(change) -> callable:
    def write(folder: Path) -> Path:
        state_dict = numpy_state_dict(reference("dpn68"))
        change(state_dict)
        save_file(state_dict, folder / "model.safetensors")
        return folder / "model.safetensors"

    return write


def _file(name: str, data: bytes) -> callable:
    def write(folder: Path) -> Path:
        (folder / name).write_bytes(data)
        return folder / name

    return write


def _truncated_safetensors(folder: Path) -> Path:
    path = _dpn_with(lambda sd: None)(folder)
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    return path


def _non_dpn(folder: Path) -> Path:
    torch.manual_seed(0)
    resnet = timm.create_model("resnet18", num_classes=NUM_CLASSES)
    torch.save(resnet.state_dict(), folder / "resnet18.pth")
    return folder / "resnet18.pth"


def _directory(folder: Path) -> Path:
    (folder / "weights").mkdir()
    return folder / "weights"


RANDOM_BYTES = np.random.default_rng(0).bytes(4096)
BAD_SOURCES = {
    "empty": (_file("model.pth", b""), [], "file is empty"),
    "random bytes pth": (_file("model.pth", RANDOM_BYTES), [], "not a readable PyTorch checkpoint"),
    "random bytes safetensors": (
        _file("model.safetensors", RANDOM_BYTES),
        [],
        "not a valid safetensors file",
    ),
    "truncated safetensors": (_truncated_safetensors, [], "not a valid safetensors file"),
    "unknown suffix": (_file("model.h5", b"HDF"), [], "unknown checkpoint type"),
    "non-DPN": (
        _non_dpn,
        [],
        "not a DPN state dict: no 4-d features.conv1_1.conv.weight (first keys: conv1.weight",
    ),
    "wrong --model": (
        _dpn_with(lambda sd: None),
        ["--model", "dpn92"],
        (
            "does not fit dpn92 (its shapes are those of dpn68 with "
            "{'k_sec': (1, 1, 1, 1)}): tensor features.conv1_1.bn.running_mean has "
            "shape (10,), dpn92 expects (64,)"
        ),
    ),
    "missing tensor": (
        _dpn_with(lambda sd: sd.pop("features.conv3_1.c3x3_b.bn.weight")),
        [],
        (
            "does not fit dpn68: missing tensor features.conv3_1.c3x3_b.bn.weight "
            "(expected for dpn68, shape (256,))"
        ),
    ),
    "extra tensor": (
        _dpn_with(lambda sd: sd.update({"head.fc.weight": np.ones((3, 4), np.float32)})),
        [],
        "unexpected tensor head.fc.weight with shape (3, 4) for dpn68",
    ),
    "directory": (_directory, [], "is a directory, not a checkpoint file"),
    "no EMA copy": (
        _dpn_with(lambda sd: None),
        ["--ema"],
        "--ema given but there is no state_dict_ema",
    ),
}


def assert_one_line_error(rc: int, stderr: str, message: str) -> None:
    assert rc == 1
    assert len(stderr.strip().splitlines()) == 1, stderr
    assert message in stderr, stderr


@pytest.mark.parametrize("case", sorted(BAD_SOURCES))
def test_bad_source_is_refused_cleanly(case, tmp_path, capsys):
    write, flags, message = BAD_SOURCES[case]
    src = write(tmp_path)
    before = sorted(tmp_path.rglob("*"))
    rc = run_cli(src, "--output", tmp_path / "out", *flags)
    assert_one_line_error(rc, capsys.readouterr().err, message)
    assert sorted(tmp_path.rglob("*")) == before  # no output, no temporary directory


def test_unwritable_output_location(tmp_path, capsys):
    write_safetensors("dpn68", tmp_path)
    (tmp_path / "a_file").write_text("not a directory")
    before = sorted(tmp_path.rglob("*"))
    rc = run_cli(tmp_path / "model.safetensors", "--output", tmp_path / "a_file" / "out")
    assert_one_line_error(rc, capsys.readouterr().err, f"{tmp_path / 'a_file'} is not a directory")
    assert sorted(tmp_path.rglob("*")) == before


def snapshot(folder: Path) -> dict[str, bytes | None]:
    """Every entry under `folder` (hidden ones too) with its content: nothing lost, nothing left."""
    return {
        str(p.relative_to(folder)): p.read_bytes() if p.is_file() else None
        for p in sorted(folder.rglob("*"))
    }


def test_existing_output_is_kept_unless_overwrite(tmp_path, capsys):
    write_safetensors("dpn68", tmp_path)
    src = tmp_path / "model.safetensors"
    assert run_cli(src, "--output", tmp_path / "out", "--model", "dpn68") == 0
    before = snapshot(tmp_path)
    rc = run_cli(src, "--output", tmp_path / "out")
    assert_one_line_error(rc, capsys.readouterr().err, "out already exists; pass --overwrite")
    assert snapshot(tmp_path) == before
    assert run_cli(src, "--output", tmp_path / "out", "--overwrite") == 0  # ours: replaced
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model.safetensors", "out"]
    assert ModelDir.load(tmp_path / "out").model_kwargs == TINY
    assert logits_error(tmp_path / "out", "dpn68") <= 1e-4


@pytest.mark.parametrize(
    "target",
    ["current directory", "workdir", "model dir with notes", "a file", "an empty directory"],
)
def test_overwrite_never_replaces_what_dpn_jax_did_not_write(target, tmp_path, monkeypatch, capsys):
    """`dpn-convert SRC --output . --overwrite` in a project used to delete the project."""
    write_safetensors("dpn68", tmp_path)
    project = tmp_path / "project"
    (project / "src").mkdir(parents=True)
    (project / "notes.txt").write_text("my notes")
    (project / "src" / "main.py").write_text("print('mine')")
    if target == "current directory":
        monkeypatch.chdir(project)
        output = "."
    elif target == "workdir":  # a training workdir: checkpoints, logs
        output = project
    elif target == "model dir with notes":  # a converted directory a user added a file to
        assert run_cli(tmp_path / "model.safetensors", "--output", project / "model") == 0
        (project / "model" / "README.txt").write_text("my notes on this model")
        output = project / "model"
    elif target == "a file":
        output = project / "notes.txt"
    else:
        (project / "empty").mkdir()
        output = project / "empty"
    capsys.readouterr()
    before = snapshot(tmp_path)
    rc = run_cli(tmp_path / "model.safetensors", "--output", output, "--overwrite")
    assert_one_line_error(rc, capsys.readouterr().err, "refusing to replace ")
    assert snapshot(tmp_path) == before  # nothing replaced, no .old / .tmp entry left


@pytest.mark.parametrize("existing", [False, True], ids=["new", "replacing"])
def test_full_disk_during_conversion_leaves_nothing(existing, tmp_path, monkeypatch, capsys):
    write_safetensors("dpn68", tmp_path)
    out = tmp_path / "out"
    if existing:
        assert run_cli(tmp_path / "model.safetensors", "--output", out) == 0
    before = snapshot(tmp_path)
    write_text = Path.write_text

    def disk_full_at_metadata(self, data, *args, **kwargs):  # the variables are written by then
        if self.name == "metadata.json":
            write_text(self, data[:10], *args, **kwargs)
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(self))
        return write_text(self, data, *args, **kwargs)

    monkeypatch.setattr(Path, "write_text", disk_full_at_metadata)
    capsys.readouterr()
    rc = run_cli(tmp_path / "model.safetensors", "--output", out, "--overwrite")
    assert_one_line_error(
        rc,
        capsys.readouterr().err,
        f"dpn-convert: error: cannot write {out}: No space left on device",
    )
    assert snapshot(tmp_path) == before


def test_a_real_write_failure_during_conversion_is_one_line(tmp_path):
    """The kernel refuses the write (RLIMIT_FSIZE: EFBIG, as ENOSPC would), deep in orbax's
    tensorstore writer thread: still one line naming the output, and nothing left behind."""
    write_safetensors("dpn68", tmp_path)
    # The limit is set by the child itself (a preexec_fn would fork this multithreaded process).
    limited = (
        "import resource, runpy, signal, sys; "
        "signal.signal(signal.SIGXFSZ, signal.SIG_IGN); "  # fail write(), not the process
        "resource.setrlimit(resource.RLIMIT_FSIZE, (1 << 20, 1 << 20)); "  # variables: 7.8 MB
        "sys.argv = sys.argv[1:]; runpy.run_path(sys.argv[0], run_name='__main__')"
    )
    argv = [
        sys.executable,
        "-c",
        limited,
        "convert_weights.py",
        str(tmp_path / "model.safetensors"),
        "--output",
        str(tmp_path / "out"),
    ]
    result = subprocess.run(
        argv,
        check=False,
        cwd=REPO_ROOT,
        env={**os.environ, "DPN_JAX_COMPILATION_CACHE": "off"},
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert_one_line_error(
        result.returncode,
        result.stderr,
        f"dpn-convert: error: cannot write {tmp_path / 'out'}: File too large",
    )
    assert os.listdir(tmp_path) == ["model.safetensors"]


def test_to_torch_replaces_only_its_own_export(tmp_path, monkeypatch, capsys):
    write_safetensors("dpn68", tmp_path)
    assert run_cli(tmp_path / "model.safetensors", "--output", tmp_path / "jax") == 0
    out = tmp_path / "back.safetensors"
    assert run_cli(tmp_path / "jax", "--to-torch", out) == 0
    capsys.readouterr()
    assert_one_line_error(
        run_cli(tmp_path / "jax", "--to-torch", out),
        capsys.readouterr().err,
        "back.safetensors already exists; pass --overwrite",
    )
    assert run_cli(tmp_path / "jax", "--to-torch", out, "--overwrite") == 0  # ours: replaced
    capsys.readouterr()

    before = snapshot(tmp_path)
    user_file = tmp_path / "model.safetensors"  # the user's timm checkpoint
    rc = run_cli(tmp_path / "jax", "--to-torch", user_file, "--overwrite")
    assert_one_line_error(
        rc,
        capsys.readouterr().err,
        f"refusing to replace {user_file}: it is "
        "not a safetensors file written by dpn-convert --to-torch (a file)",
    )
    assert_one_line_error(
        run_cli(tmp_path / "jax", "--to-torch", tmp_path / "x.pth"),
        capsys.readouterr().err,
        "the export is a .safetensors file",
    )

    import safetensors.numpy

    def disk_full(state_dict, filename, metadata=None):
        Path(filename).write_bytes(b"\0" * 1000)
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(filename))

    monkeypatch.setattr(safetensors.numpy, "save_file", disk_full)
    rc = run_cli(tmp_path / "jax", "--to-torch", out, "--overwrite")
    assert_one_line_error(
        rc, capsys.readouterr().err, f"cannot write {out}: No space left on device"
    )
    assert snapshot(tmp_path) == before  # the previous export intact, no staging file left


def test_to_torch_onto_a_full_disk_is_one_line(tmp_path, monkeypatch, capsys):
    """safetensors reports a refused write as its own SafetensorError, not an OSError."""
    import safetensors.numpy
    from safetensors import SafetensorError

    write_safetensors("dpn68", tmp_path)
    assert run_cli(tmp_path / "model.safetensors", "--output", tmp_path / "jax") == 0
    capsys.readouterr()
    before = snapshot(tmp_path)

    def disk_full(state_dict, filename, metadata=None):
        Path(filename).write_bytes(b"\0" * 1000)
        raise SafetensorError("Error while serializing: I/O error: No space left (os error 28)")

    monkeypatch.setattr(safetensors.numpy, "save_file", disk_full)
    out = tmp_path / "back.safetensors"
    assert_one_line_error(
        run_cli(tmp_path / "jax", "--to-torch", out),
        capsys.readouterr().err,
        f"cannot write {out}: No space left on device",
    )
    assert snapshot(tmp_path) == before  # no staging file left


# --- sources: paths are never sent to the hub; an unreachable hub fails fast ----------------------


@pytest.mark.parametrize(
    "src, message",
    [
        ("files/dpn68.safetensor", "files/dpn68.safetensor: no such file"),  # a typo, files/ exists
        ("dpn68.safetensors", "dpn68.safetensors: no such file"),
        ("./dpn68", "./dpn68: no such file"),
        ("~/no/such/dpn68.pth", "~/no/such/dpn68.pth: no such file"),
        ("timm/dpn92.mx_in1k", "timm/dpn92.mx_in1k: no such file"),  # ./timm is a local folder here
        (
            "someone/dpn68",
            ("someone/dpn68: no such file (a hub repository is written hf-hub:someone/dpn68)"),
        ),
        ("hf-hub:no_slash", "hf-hub:no_slash: not a hub repository name"),
    ],
)
def test_missing_paths_fail_at_once_without_asking_the_hub(
    src, message, tmp_path, monkeypatch, capsys
):
    from dpn_jax.weights import sources

    def hub(repo):
        raise AssertionError(f"asked the hub for {repo}")

    monkeypatch.setattr(sources, "download_from_hub", hub)
    monkeypatch.chdir(tmp_path)
    (tmp_path / "files").mkdir()
    (tmp_path / "timm").mkdir()
    assert_one_line_error(
        run_cli(src, "--output", "out"), capsys.readouterr().err, f"dpn-convert: error: {message}"
    )
    assert sorted(os.listdir(tmp_path)) == ["files", "timm"]


def test_hub_sources_are_timm_repos_hf_hub_and_tags(monkeypatch):
    from dpn_jax.weights import sources

    asked = []
    monkeypatch.setattr(sources, "download_from_hub", lambda repo: asked.append(repo))
    for src in ("timm/dpn92.mx_in1k", "hf-hub:someone/my-dpn", "dpn68b.ra_in1k"):
        sources.resolve_source(src)
    assert asked == ["timm/dpn92.mx_in1k", "someone/my-dpn", "timm/dpn68b.ra_in1k"]


@pytest.fixture
def silent_endpoint():
    """A hub endpoint that accepts connections and never answers (a black-holed route)."""
    with socket.socket() as server:
        server.bind(("127.0.0.1", 0))
        server.listen(16)
        yield f"http://127.0.0.1:{server.getsockname()[1]}"


def closed_port_endpoint() -> str:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return f"http://127.0.0.1:{probe.getsockname()[1]}"  # closed when this returns


@pytest.mark.parametrize("endpoint", ["closed port", "silent", "non-routable"])
def test_unreachable_hub_fails_fast_naming_the_alternatives(endpoint, silent_endpoint, tmp_path):
    url = {
        "closed port": closed_port_endpoint(),
        "silent": silent_endpoint,
        "non-routable": "http://10.255.255.1",
    }[endpoint]
    env = {**offline_env(tmp_path / "hf", HF_ENDPOINT=url)}
    del env["HF_HUB_OFFLINE"]
    start = time.perf_counter()
    result = run_convert_weights("timm/dpn68.mx_in1k", tmp_path / "out", env, timeout=120)
    elapsed = time.perf_counter() - start
    print(f"{endpoint} hub endpoint {url}: failed after {elapsed:.1f} s (process start included)")
    assert_one_line_error(result.returncode, result.stderr, "hub repository timm/dpn68.mx_in1k: ")
    assert "HF_HUB_OFFLINE=1" in result.stderr and "local checkpoint file" in result.stderr
    assert elapsed < 20, f"{elapsed:.1f} s: hub retries?"  # a hang guard; was 47 s
    assert not (tmp_path / "out").exists()


def test_cached_hub_file_works_with_an_unreachable_hub(tmp_path):
    write_safetensors("dpn68", tmp_path)
    populate_hub_cache(
        tmp_path / "hf",
        "timm/dpn68.mx_in1k",
        {"model.safetensors": (tmp_path / "model.safetensors").read_bytes()},
    )
    env = offline_env(tmp_path / "hf", HF_ENDPOINT=closed_port_endpoint())
    del env["HF_HUB_OFFLINE"]
    result = run_convert_weights("timm/dpn68.mx_in1k", tmp_path / "out", env)
    assert result.returncode == 0, result.stderr
    assert logits_error(tmp_path / "out", "dpn68") <= 1e-4


@pytest.mark.parametrize("payload", ["os.system", "exec"])
@pytest.mark.parametrize("container", ["torch.save", "raw pickle"])
def test_malicious_pickle_is_refused_and_does_not_run(payload, container, tmp_path, capsys):
    marker = tmp_path / "PWNED"
    bomb = (
        RunsShell(f"touch {marker}")
        if payload == "os.system"
        else RunsExec(f"open({str(marker)!r}, 'w').close()")
    )
    checkpoint = {"extra": bomb, "state_dict": torch_state_dict("dpn68")}
    src = tmp_path / "model.pth"
    if container == "torch.save":
        torch.save(checkpoint, src)
    else:  # the legacy (non-zip) format, protocol 2 as torch writes it
        src.write_bytes(pickle.dumps(checkpoint, protocol=2))
    rc = run_cli(src, "--output", tmp_path / "out")
    stderr = capsys.readouterr().err
    assert_one_line_error(rc, stderr, f"{src}: refused by torch's weights-only unpickler")
    assert f"GLOBAL {'posix.system' if payload == 'os.system' else 'exec'}" in stderr
    assert not marker.exists()
    assert not (tmp_path / "out").exists()


def test_pth_without_torch_names_the_extra(tmp_path, capsys, monkeypatch):
    write_pth("dpn68", tmp_path)
    monkeypatch.setitem(sys.modules, "torch", None)  # `import torch` now raises ImportError
    rc = run_cli(tmp_path / "model.pth", "--output", tmp_path / "out")
    assert_one_line_error(rc, capsys.readouterr().err, "needs torch (pip install 'dpn_jax[torch]')")


# --- --verify -----------------------------------------------------------------------------------


def test_verify_prints_the_difference_and_fails_above_tolerance(tmp_path, capsys, monkeypatch):
    write_safetensors("dpn68", tmp_path)
    assert run_cli(tmp_path / "model.safetensors", "--output", tmp_path / "ok", "--verify") == 0
    out = capsys.readouterr().out
    relative = float(out.split("relative ")[1].split()[0])
    assert "verify: max abs diff" in out and 0 < relative <= 1e-4

    monkeypatch.setattr(convert_cli, "VERIFY_TOLERANCE", -1.0)  # no difference passes
    assert run_cli(tmp_path / "model.safetensors", "--output", tmp_path / "strict", "--verify") == 1
    assert "above" in capsys.readouterr().err
    assert not (tmp_path / "strict").exists()


@pytest.mark.parametrize(
    "argv",
    [
        ["model.pth"],
        ["jax_dir", "--to-torch", "out.safetensors", "--output", "x"],
        ["model.pth", "--output", "x", "--num-classes", "-1"],
    ],
)
def test_usage_errors_exit_2(argv, capsys):
    with pytest.raises(SystemExit) as exit_info:
        convert_cli.main(argv)
    assert exit_info.value.code == 2 and "dpn-convert: error:" in capsys.readouterr().err


def test_an_export_of_a_non_standard_dpn_converts_back_with_normal_permissions(tmp_path):
    """The demo's shrunk dpn68 (groups=4: no variant's shapes): the export records it."""
    import jax

    from dpn_jax.data.preprocessing import Preprocessing
    from dpn_jax.models.registry import pretrained_cfg

    demo = dict(k_sec=(1, 1, 1, 1), k_r=32, groups=4, num_init_features=16, inc_sec=(8, 8, 8, 8))
    _, variables = dpn_jax.create_model("dpn68", num_classes=10, rng=jax.random.key(0), **demo)
    ModelDir(
        architecture="dpn68",
        num_classes=10,
        model_kwargs=demo,
        preprocessing=Preprocessing.from_cfg(pretrained_cfg("dpn68")),
        variables=jax.device_get(variables),
    ).save(tmp_path / "md")
    old_umask = os.umask(0o027)
    try:
        assert run_cli(tmp_path / "md", "--to-torch", tmp_path / "x.safetensors") == 0
    finally:
        os.umask(old_umask)
    assert os.stat(tmp_path / "x.safetensors").st_mode & 0o777 == 0o640  # not 0600
    assert run_cli(tmp_path / "x.safetensors", "--output", tmp_path / "back") == 0
    back = ModelDir.load(tmp_path / "back")
    assert back.architecture == "dpn68" and back.model_kwargs == demo
    jax.tree_util.tree_map(np.testing.assert_array_equal, back.variables, jax.device_get(variables))
    rebuilt = timm.create_model("dpn68", num_classes=10, **demo).eval()  # and timm loads it
    rebuilt.load_state_dict(load_torch_safetensors(tmp_path / "x.safetensors"), strict=True)
