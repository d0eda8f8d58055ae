"""WORKDIR/train.lock: one run per workdir; a lock path that is not ours is refused untouched."""

from __future__ import annotations

import json
import os

import pytest

from dpn_jax.errors import ConfigError
from dpn_jax.train.workdir import LOCK_FILE, WorkdirLock


def test_lock_records_the_holder_and_a_second_lock_is_refused(tmp_path):
    with WorkdirLock(tmp_path):
        record = json.loads((tmp_path / LOCK_FILE).read_text())
        assert record["pid"] == os.getpid()
        with pytest.raises(ConfigError, match=rf"in use by another train.py \(pid {os.getpid()} "):
            WorkdirLock(tmp_path).__enter__()
    with WorkdirLock(tmp_path):  # released: taken again, the record rewritten
        assert json.loads((tmp_path / LOCK_FILE).read_text())["pid"] == os.getpid()


def test_a_symbolic_link_is_refused_and_its_target_untouched(tmp_path):
    victim = tmp_path / "victim.txt"
    victim.write_text("the user's notes\n")
    workdir = tmp_path / "run"
    workdir.mkdir()
    (workdir / LOCK_FILE).symlink_to(victim)
    with pytest.raises(ConfigError) as error:
        WorkdirLock(workdir).__enter__()
    assert str(error.value) == (
        f"{workdir / LOCK_FILE} is a symbolic link; train.py keeps its lock there (following "
        "no link, overwriting only its own lock file): move it away or use another --workdir"
    )
    assert victim.read_text() == "the user's notes\n"


@pytest.mark.parametrize(
    "make, kind",
    [
        (lambda p: os.mkfifo(p), "a FIFO"),
        (lambda p: p.mkdir(), "a directory"),
        (lambda p: os.link(p.parent.parent / "victim.txt", p), "a file with another name"),
        (lambda p: p.write_text("the user's notes\n"), "a file train.py did not write"),
    ],
)
def test_anything_but_our_own_lock_file_is_refused_untouched(make, kind, tmp_path):
    victim = tmp_path / "victim.txt"
    victim.write_text("the user's notes\n")
    workdir = tmp_path / "run"
    workdir.mkdir()
    make(workdir / LOCK_FILE)
    with pytest.raises(ConfigError, match=rf"^{workdir / LOCK_FILE} is {kind}; "):
        WorkdirLock(workdir).__enter__()
    assert victim.read_text() == "the user's notes\n"
    if (workdir / LOCK_FILE).is_file():
        assert (workdir / LOCK_FILE).read_text() == "the user's notes\n"


def test_an_empty_lock_file_is_ours(tmp_path):
    """Created by a run killed before it wrote its record."""
    (tmp_path / LOCK_FILE).touch()
    with WorkdirLock(tmp_path):
        assert json.loads((tmp_path / LOCK_FILE).read_text())["pid"] == os.getpid()
