"""Dual Path Networks in JAX/Flax, numerically identical to timm.

The public names load their modules on first use: `import dpn_jax` alone does not import JAX,
so a command can restart itself (`dpn_jax.huge_pages`) before paying for that, and
`python -m dpn_jax.predict` does not import itself twice.
"""
from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

__version__ = "0.1.0"

# public name -> the module that defines it
_EXPORTS = {
    "flax_to_timm": "dpn_jax.convert", "timm_to_flax": "dpn_jax.convert",
    "DPN": "dpn_jax.dpn", "DualPathBlock": "dpn_jax.dpn", "MODEL_ARGS": "dpn_jax.dpn",
    "PRETRAINED_CFGS": "dpn_jax.dpn", "feature_info": "dpn_jax.dpn",
    "conv2d": "dpn_jax.grouped_conv",
    "load_model_dir": "dpn_jax.pretrained", "save_model_dir": "dpn_jax.pretrained",
    "create_model": "dpn_jax.registry", "init_variables": "dpn_jax.registry",
    "list_models": "dpn_jax.registry", "pretrained_cfg": "dpn_jax.registry",
    "Predictor": "dpn_jax.predict",
}

__all__ = sorted(_EXPORTS)

if TYPE_CHECKING:
    from dpn_jax.convert import flax_to_timm, timm_to_flax
    from dpn_jax.dpn import DPN, MODEL_ARGS, PRETRAINED_CFGS, DualPathBlock, feature_info
    from dpn_jax.grouped_conv import conv2d
    from dpn_jax.predict import Predictor
    from dpn_jax.pretrained import load_model_dir, save_model_dir
    from dpn_jax.registry import create_model, init_variables, list_models, pretrained_cfg


def __getattr__(name: str) -> Any:
    if name not in _EXPORTS:
        raise AttributeError(f"module 'dpn_jax' has no attribute {name!r}")
    value = getattr(importlib.import_module(_EXPORTS[name]), name)
    globals()[name] = value  # later lookups skip this function
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_EXPORTS))
