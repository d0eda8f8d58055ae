"""Atomic outputs (`dpn_jax.system.files`): only what dpn_jax wrote is replaced, nothing is left
behind after success, failure or a full disk, and a killed run's leftovers are cleaned or kept."""

from __future__ import annotations

import dataclasses
import errno
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from dpn_jax.errors import OutputError
from dpn_jax.system import files
from dpn_jax.system.files import OutputExistsError, atomic_output, check_output

OURS = "ours.txt"  # the marker our stand-in writer leaves: what `replaceable` recognises


def is_ours(path: Path) -> bool:
    return path.is_dir() and sorted(os.listdir(path)) == [OURS]


def write(path: Path, content: str, *, overwrite: bool = False) -> None:
    with atomic_output(
        path, overwrite=overwrite, replaceable=is_ours, what="our output", directory=True
    ) as staging:
        (staging / OURS).write_text(content)


def listing(folder: Path) -> list[str]:
    return sorted(str(p.relative_to(folder)) for p in folder.rglob("*"))


@pytest.fixture(params=["renameat2", "fallback"])
def rename_mode(request, monkeypatch) -> str:
    """Both ways of replacing: Linux's RENAME_EXCHANGE and the rename-aside fallback."""
    if request.param == "fallback":
        monkeypatch.setattr(files, "_libc_renameat2", lambda: None)
    else:
        assert files._libc_renameat2() is not None  # glibc on the test machines
    return request.param


def test_writes_and_replaces_leaving_only_the_output(tmp_path, rename_mode, monkeypatch):
    renames = []  # (flags, done) of each renameat2 call
    original = files._renameat2
    monkeypatch.setattr(
        files,
        "_renameat2",
        lambda *args: renames.append((args[2], result := original(*args))) or result,
    )
    out = tmp_path / "deep" / "out"
    write(out, "one")
    assert (out / OURS).read_text() == "one"
    write(out, "two", overwrite=True)
    assert (out / OURS).read_text() == "two"
    assert listing(tmp_path) == ["deep", "deep/out", f"deep/out/{OURS}"]
    exchanged = (files._RENAME_EXCHANGE, True) in renames
    assert exchanged == (rename_mode == "renameat2"), renames


def test_existing_output_needs_overwrite(tmp_path):
    write(tmp_path / "out", "one")
    with pytest.raises(OutputExistsError, match=r"out already exists; pass --overwrite"):
        write(tmp_path / "out", "two")
    assert (tmp_path / "out" / OURS).read_text() == "one"


@pytest.mark.parametrize(
    "make, description",
    [
        (
            lambda p: (p.mkdir(), (p / "notes.txt").write_text("mine"), (p / "src").mkdir()),
            "it holds notes.txt, src",
        ),
        (lambda p: p.write_text("a user's file"), "a file"),
        (lambda p: p.mkdir(), "an empty directory"),
        (
            lambda p: (p.mkdir(), (p / OURS).write_text("x"), (p / "extra").write_text("y")),
            "it holds extra, ours.txt",
        ),
    ],
)
def test_what_is_not_ours_is_refused_even_with_overwrite(make, description, tmp_path, rename_mode):
    make(tmp_path / "out")
    before = {p: p.read_bytes() if p.is_file() else None for p in tmp_path.rglob("*")}
    with pytest.raises(
        OutputError,
        match=rf"refusing to replace {re.escape(str(tmp_path))}/out: "
        rf"it is not our output \({description}\)",
    ) as error:
        write(tmp_path / "out", "new", overwrite=True)
    assert "\n" not in str(error.value)
    assert {p: p.read_bytes() if p.is_file() else None for p in tmp_path.rglob("*")} == before


def test_current_directory_is_refused(tmp_path, monkeypatch):
    (tmp_path / "notes.txt").write_text("mine")
    monkeypatch.chdir(tmp_path)
    with pytest.raises(
        OutputError,
        match=rf"refusing to replace {re.escape(str(tmp_path))}: "
        r".*holds notes.txt",
    ):
        write(Path("."), "new", overwrite=True)
    assert listing(tmp_path) == ["notes.txt"]


def test_symlink_is_refused(tmp_path):
    write(tmp_path / "real", "one")
    (tmp_path / "link").symlink_to(tmp_path / "real")
    with pytest.raises(OutputError, match="a symbolic link"):
        write(tmp_path / "link", "two", overwrite=True)
    assert (tmp_path / "real" / OURS).read_text() == "one"


def test_parent_that_is_a_file(tmp_path):
    (tmp_path / "a_file").write_text("x")
    with pytest.raises(
        OutputError,
        match=rf"cannot write .*: {re.escape(str(tmp_path))}/a_file is "
        r"not a directory",
    ):
        check_output(tmp_path / "a_file" / "out", overwrite=False, replaceable=is_ours, what="x")


@pytest.mark.parametrize("code", [errno.ENOSPC, errno.EACCES, errno.EDQUOT])
def test_disk_errors_become_one_line_and_leave_nothing(code, tmp_path, rename_mode):
    write(tmp_path / "out", "old")
    before = listing(tmp_path)
    with (
        pytest.raises(OutputError) as error,
        atomic_output(
            tmp_path / "out", overwrite=True, replaceable=is_ours, what="x", directory=True
        ) as staging,
    ):
        (staging / "half").write_bytes(b"partial")
        raise OSError(code, os.strerror(code), str(staging / "half"))
    message = str(error.value)
    assert message.startswith(f"cannot write {tmp_path / 'out'}: {os.strerror(code)}")
    assert "\n" not in message
    assert listing(tmp_path) == before and (tmp_path / "out" / OURS).read_text() == "old"


def test_failure_removes_the_staging_entry_and_created_parents(tmp_path):
    # Not an OS error of the user's: propagates unchanged.
    with (
        pytest.raises(KeyError),
        atomic_output(
            tmp_path / "a" / "b" / "out",
            overwrite=False,
            replaceable=is_ours,
            what="x",
            directory=True,
        ) as staging,
    ):
        (staging / "half").write_text("x")
        raise KeyError("a bug")
    assert listing(tmp_path) == []


def test_a_failed_writers_late_thread_leaves_nothing_behind(tmp_path, monkeypatch):
    """orbax's tensorstore threads may recreate directories in the staging entry for a few
    milliseconds after the write's error reached us (seen in CI): removed again."""
    real_remove, removed = files._remove, []

    def remove_then_a_late_write(entry: Path) -> None:
        real_remove(entry)
        if not removed:
            (entry / "ocdbt.process_0" / "d").mkdir(parents=True)
        removed.append(entry)

    monkeypatch.setattr(files, "_remove", remove_then_a_late_write)
    with (
        pytest.raises(OutputError, match="No space left"),
        atomic_output(
            tmp_path / "out", overwrite=False, replaceable=is_ours, what="x", directory=True
        ),
    ):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
    assert listing(tmp_path) == [] and len(removed) == 2


def test_other_os_errors_keep_their_type(tmp_path):
    with (
        pytest.raises(OSError) as error,
        atomic_output(
            tmp_path / "out", overwrite=False, replaceable=is_ours, what="x", directory=False
        ),
    ):
        raise OSError(errno.EBADF, "Bad file descriptor")
    assert not isinstance(error.value, OutputError)
    assert listing(tmp_path) == []


def test_file_output(tmp_path, rename_mode):
    def write_file(content: str, overwrite: bool) -> None:
        with atomic_output(
            tmp_path / "out.bin",
            overwrite=overwrite,
            what="an export of ours",
            replaceable=lambda p: p.read_text().startswith("ours"),
            directory=False,
        ) as staging:
            staging.write_text(content)

    write_file("ours 1", overwrite=False)
    write_file("ours 2", overwrite=True)
    assert (tmp_path / "out.bin").read_text() == "ours 2"
    (tmp_path / "out.bin").write_text("the user's")
    with pytest.raises(OutputError, match="it is not an export of ours"):
        write_file("ours 3", overwrite=True)
    assert (tmp_path / "out.bin").read_text() == "the user's"
    assert listing(tmp_path) == ["out.bin"]


# --- leftovers of killed runs ---------------------------------------------------------------


@pytest.fixture(scope="module")
def dead_pid() -> int:
    """The id of a process that has exited (and that nothing else has taken since)."""
    process = subprocess.Popen([sys.executable, "-c", "pass"])
    process.wait()
    return process.pid


def leftover(
    path: Path, kind: str, pid: int, host: str = files._HOST, token: str = "0123abcd"
) -> Path:
    return path.with_name(f".{path.name}.dpn_jax-{kind}-{host}-{pid}-{token}")


def test_leftovers_of_dead_runs_on_this_host_are_removed_others_kept(tmp_path, dead_pid):
    out = tmp_path / "out"
    dead_tmp = leftover(out, "tmp", dead_pid)
    dead_tmp.mkdir()
    (dead_tmp / OURS).write_text("half written")
    dead_file = leftover(out, "tmp", dead_pid, token="4567cdef")  # a staged file
    dead_file.write_text("half written")
    alive = leftover(out, "tmp", os.getppid())  # a running process (pytest's parent)
    other_host = leftover(out, "tmp", dead_pid, host="00000000")
    lookalike = tmp_path / f".out.dpn_jax-tmp-{files._HOST}-{dead_pid}-not-ours"
    for entry in (alive, other_host, lookalike):
        entry.mkdir()
    write(out, "new")
    assert not dead_tmp.exists() and not dead_file.exists()
    assert alive.exists() and other_host.exists() and lookalike.exists()


def test_a_run_killed_between_the_fallback_renames_gets_its_old_version_back(tmp_path, dead_pid):
    """Only the rename-aside fallback can be interrupted with no version at the path; the next
    write restores the old one (and, without overwrite, keeps it)."""
    out = tmp_path / "out"
    old = leftover(out, "old", dead_pid)
    old.mkdir()
    (old / OURS).write_text("previous")
    with pytest.raises(OutputExistsError):
        write(out, "new")
    assert (out / OURS).read_text() == "previous" and listing(tmp_path) == ["out", f"out/{OURS}"]


def test_training_refuses_a_workdir_model_holding_a_users_files(tmp_path):
    """train.py exports to WORKDIR/model at the end; a user's files there used to be deleted."""
    from train_worker import tiny_config

    from dpn_jax.train.trainer import train_and_evaluate

    (tmp_path / "model").mkdir()
    (tmp_path / "model" / "notes.txt").write_text("mine")
    refusal = (
        rf"refusing to replace {re.escape(str(tmp_path))}/model: it is not a dpn_jax model "
        r"directory \(it holds notes.txt, which dpn_jax does not write\)"
    )
    with pytest.raises(OutputError, match=refusal):
        train_and_evaluate(tiny_config(num_train_steps=1), tmp_path)
    assert listing(tmp_path) == ["model", "model/notes.txt"]  # refused before any work


# --- model directories: ours at every depth -------------------------------------------------


@pytest.fixture(scope="module")
def model_dir_files(tmp_path_factory) -> Path:
    """A model directory as ModelDir.save writes it (a tiny dpn68)."""
    import jax

    import dpn_jax
    from dpn_jax.data.preprocessing import Preprocessing
    from dpn_jax.weights.model_dir import ModelDir

    tiny = {"k_sec": (1, 1, 1, 1), "groups": 4}
    variables = jax.device_get(dpn_jax.create_model("dpn68", num_classes=2, **tiny)[1])
    return ModelDir(
        architecture="dpn68",
        num_classes=2,
        model_kwargs=tiny,
        preprocessing=Preprocessing.from_cfg(dpn_jax.pretrained_cfg("dpn68")),
        variables=variables,
        source="first",
    ).save(tmp_path_factory.mktemp("model_dir") / "md")


def snapshot(folder: Path) -> dict[str, bytes | None]:
    return {
        str(p.relative_to(folder)): p.read_bytes() if p.is_file() and not p.is_symlink() else None
        for p in sorted(folder.rglob("*"))
    }


@pytest.mark.parametrize(
    "add, unexpected",
    [
        (lambda md: (md / "variables" / "NOTES.txt").write_text("mine"), "variables/NOTES.txt"),
        (lambda md: (md / "variables" / "mystuff").mkdir(), "variables/mystuff/"),
        (
            lambda md: (md / "variables" / "ocdbt.process_0" / "d" / "notes").write_text("x"),
            "variables/ocdbt.process_0/d/notes",
        ),
        (
            lambda md: (md / "variables" / "d" / ("ab" * 16)).symlink_to(md.parent / "victim"),
            f"variables/d/{'ab' * 16} (a symbolic link)",
        ),
    ],
)
def test_a_model_directory_holding_a_users_file_at_any_depth_is_refused(
    add, unexpected, model_dir_files, tmp_path
):
    """dpn-convert --overwrite and train.py's WORKDIR/model used to delete these."""
    from dpn_jax.weights.model_dir import ModelDir

    (tmp_path / "victim").write_text("the user's")
    md = tmp_path / "md"
    shutil.copytree(model_dir_files, md)
    add(md)
    before = snapshot(tmp_path)
    message = (
        f"refusing to replace {md}: it is not a dpn_jax model directory (it holds {unexpected}, "
        "which dpn_jax does not write); dpn_jax replaces only what it wrote; move it away or "
        "choose another output"
    )
    with pytest.raises(OutputError) as error:
        ModelDir.check_output(md, overwrite=True)
    assert str(error.value) == message
    with pytest.raises(OutputError) as error:
        ModelDir.load(model_dir_files).save(md, overwrite=True)
    assert str(error.value) == message
    assert snapshot(tmp_path) == before


def test_a_model_directory_of_ours_is_replaced(model_dir_files, tmp_path):
    from dpn_jax.weights.model_dir import ModelDir

    md = tmp_path / "md"
    shutil.copytree(model_dir_files, md)
    replacement = dataclasses.replace(ModelDir.load(model_dir_files), source="second")
    replacement.save(md, overwrite=True)
    assert ModelDir.load(md).source == "second"
