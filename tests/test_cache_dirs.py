"""Where the caches live: one user cache directory (XDG), weights and XLA side by side."""

from __future__ import annotations

from pathlib import Path

import pytest

from dpn_jax.system import cache_dirs

ENV = (
    "XDG_CACHE_HOME",
    "DPN_JAX_WEIGHTS_CACHE",
    "DPN_JAX_COMPILATION_CACHE",
    "DPN_JAX_CACHE",
    "DPN_JAX_CACHE_DIR",
)


@pytest.fixture(autouse=True)
def clean_env(monkeypatch):
    for name in ENV:
        monkeypatch.delenv(name, raising=False)


def test_defaults_are_siblings_under_xdg_cache_home(monkeypatch, tmp_path):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    assert cache_dirs.weights_cache_dir() == tmp_path / "dpn_jax" / "weights"
    assert cache_dirs.compilation_cache_dir() == tmp_path / "dpn_jax" / "xla"
    monkeypatch.delenv("XDG_CACHE_HOME")
    assert cache_dirs.weights_cache_dir() == Path("~/.cache/dpn_jax/weights").expanduser()


def test_each_cache_moves_with_its_own_variable(monkeypatch, tmp_path):
    monkeypatch.setenv("DPN_JAX_WEIGHTS_CACHE", str(tmp_path / "w"))
    monkeypatch.setenv("DPN_JAX_COMPILATION_CACHE", str(tmp_path / "x"))
    assert cache_dirs.weights_cache_dir() == tmp_path / "w"
    assert cache_dirs.compilation_cache_dir() == tmp_path / "x"
    for off in ("off", "0", "", "none"):
        monkeypatch.setenv("DPN_JAX_COMPILATION_CACHE", off)
        assert cache_dirs.compilation_cache_dir() is None


def test_former_names_still_work_with_a_warning(monkeypatch, tmp_path):
    monkeypatch.setenv("DPN_JAX_CACHE", str(tmp_path / "w"))
    monkeypatch.setenv("DPN_JAX_CACHE_DIR", "off")
    with pytest.warns(FutureWarning, match=r"\$DPN_JAX_CACHE is now \$DPN_JAX_WEIGHTS_CACHE"):
        assert cache_dirs.weights_cache_dir() == tmp_path / "w"
    with pytest.warns(FutureWarning, match=r"\$DPN_JAX_CACHE_DIR is now"):
        assert cache_dirs.compilation_cache_dir() is None
