"""Where dpn_jax keeps what it can rebuild: converted weights and compiled XLA executables.

Both live side by side in one user cache directory, `$XDG_CACHE_HOME/dpn_jax` (by default
`~/.cache/dpn_jax`): `weights/` holds timm's pretrained weights, converted once
(`create_model(tag, pretrained=True)`, `dpn-predict --pretrained`), and `xla/` the persistent
compilation cache of the command-line tools. `DPN_JAX_WEIGHTS_CACHE` and
`DPN_JAX_COMPILATION_CACHE` move each; the latter set to `off` disables the compilation cache.
"""

from __future__ import annotations

import os
import warnings
from pathlib import Path

from dpn_jax.system.env_switches import switched_off

WEIGHTS_CACHE_ENV = "DPN_JAX_WEIGHTS_CACHE"
COMPILATION_CACHE_ENV = "DPN_JAX_COMPILATION_CACHE"
# The names dpn_jax 0.1 read (one of them for each cache, which confused them): still honoured.
_FORMER_NAMES = {WEIGHTS_CACHE_ENV: "DPN_JAX_CACHE", COMPILATION_CACHE_ENV: "DPN_JAX_CACHE_DIR"}


def _setting(name: str) -> str | None:
    if name in os.environ:
        return os.environ[name]
    former = _FORMER_NAMES[name]
    if former in os.environ:
        warnings.warn(f"${former} is now ${name}; please rename it", FutureWarning, stacklevel=3)
        return os.environ[former]
    return None


def user_cache_dir() -> Path:
    return Path(os.environ.get("XDG_CACHE_HOME") or "~/.cache").expanduser() / "dpn_jax"


def weights_cache_dir() -> Path:
    """Converted pretrained weights: `$DPN_JAX_WEIGHTS_CACHE`, else `user_cache_dir()/weights`."""
    setting = _setting(WEIGHTS_CACHE_ENV)
    return Path(setting).expanduser() if setting else user_cache_dir() / "weights"


def compilation_cache_dir() -> Path | None:
    """JAX's persistent compilation cache: `$DPN_JAX_COMPILATION_CACHE` (None when it says off),
    else `user_cache_dir()/xla`."""
    setting = _setting(COMPILATION_CACHE_ENV)
    if setting is None:
        return user_cache_dir() / "xla"
    return None if switched_off(setting) else Path(setting).expanduser()
