"""JAX's persistent compilation cache, on by default for the command-line tools.

Compiling a DPN train step takes long (BENCHMARKS.md, "Start-up and compilation cache"); with
the cache a second run of the same command loads the executable from disk instead.
`DPN_JAX_CACHE_DIR` picks the directory, and an empty value (or `off` / `none` / `0`) turns the
cache off.
"""
from __future__ import annotations

import os
from pathlib import Path

import jax

from dpn_jax.runtime.env_switches import switched_off

DEFAULT_CACHE_DIR = Path("~/.cache/dpn_jax/jax_cache")
CACHE_DIR_ENV = "DPN_JAX_CACHE_DIR"


def resolve_cache_dir(cache_dir: str | os.PathLike | None = None) -> Path | None:
    """The directory to use: the argument, else `$DPN_JAX_CACHE_DIR`, else the default; None = off."""
    if cache_dir is None:
        cache_dir = os.environ.get(CACHE_DIR_ENV, str(DEFAULT_CACHE_DIR))
    if switched_off(str(cache_dir)):
        return None
    return Path(cache_dir).expanduser()


def enable_compilation_cache(cache_dir: str | os.PathLike | None = None) -> Path | None:
    """Point JAX's persistent cache at `cache_dir` (see `resolve_cache_dir`); returns it or None.

    Only executables that took at least a second to compile are stored, so small helper
    functions do not litter the directory.
    """
    path = resolve_cache_dir(cache_dir)
    if path is None:
        jax.config.update("jax_enable_compilation_cache", False)
        return None
    path.mkdir(parents=True, exist_ok=True)
    jax.config.update("jax_enable_compilation_cache", True)
    jax.config.update("jax_compilation_cache_dir", str(path))
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 1.0)
    return path
