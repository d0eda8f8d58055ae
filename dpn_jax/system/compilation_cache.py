"""JAX's persistent compilation cache, on by default for the command-line tools.

A DPN train step takes long to compile on CPU; with the cache a second run of the same command
loads the executable from disk instead. Where it lives: `dpn_jax.system.cache_dirs`
(`DPN_JAX_COMPILATION_CACHE`, `off` to disable).
"""

from __future__ import annotations

import os
from pathlib import Path

import jax

from dpn_jax.system.cache_dirs import compilation_cache_dir
from dpn_jax.system.env_switches import switched_off


def enable_compilation_cache(cache_dir: str | os.PathLike | None = None) -> Path | None:
    """Point JAX's persistent cache at `cache_dir` (default: `compilation_cache_dir()`, which may
    say off); returns the directory, or None when the cache is off.

    Only executables that took at least a second to compile are stored, so small helper
    functions do not litter the directory.
    """
    if cache_dir is None:
        path = compilation_cache_dir()
    else:
        path = None if switched_off(os.fspath(cache_dir)) else Path(cache_dir).expanduser()
    if path is None:
        jax.config.update("jax_enable_compilation_cache", False)
        return None
    path.mkdir(parents=True, exist_ok=True)
    jax.config.update("jax_enable_compilation_cache", True)
    jax.config.update("jax_compilation_cache_dir", str(path))
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 1.0)
    return path
