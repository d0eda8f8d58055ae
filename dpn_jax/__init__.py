"""Dual Path Networks in JAX/Flax, numerically identical to timm.

The public names load their modules on first use: `import dpn_jax` alone does not import JAX,
so that it can set up host memory for XLA's CPU steps before JAX starts
(`dpn_jax.system.host_memory`), and `python -m dpn_jax.cli.predict` does not import itself twice.

The public names are what a user builds on: models and their registry, weights conversion and
model directories, prediction, evaluation, training, export, the device `Runner`, and
`conv2d` - the grouped convolution with PyTorch's padding and dpn_jax's fast CPU kernels, meant
for use in other Flax models too. A DPN's internals (`DualPathBlock`, the BN-act-conv units)
stay in `dpn_jax.models` (as timm keeps `DualPathBlock` in `timm.models.dpn`).
tests/test_public_api.py keeps `__all__`, the lazy table and the type checkers' imports equal.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

from dpn_jax.system.host_memory import reuse_freed_host_memory
from dpn_jax.version import __version__

reuse_freed_host_memory()  # before JAX's CPU threads first allocate (see the module)

# public name -> the module that defines it
_EXPORTS = {
    "flax_to_timm": "dpn_jax.weights.convert",
    "timm_to_flax": "dpn_jax.weights.convert",
    "DPN": "dpn_jax.models.dpn",
    "DPNConfig": "dpn_jax.models.dpn",
    "MODEL_CONFIGS": "dpn_jax.models.dpn",
    "PRETRAINED_CFGS": "dpn_jax.models.dpn",
    "feature_info": "dpn_jax.models.dpn",
    "conv2d": "dpn_jax.ops.conv",
    "ModelDir": "dpn_jax.weights.model_dir",
    "Preprocessing": "dpn_jax.data.preprocessing",
    "load_model": "dpn_jax.weights.pretrained",
    "create_model": "dpn_jax.factory",
    "init_variables": "dpn_jax.models.registry",
    "list_models": "dpn_jax.models.registry",
    "pretrained_cfg": "dpn_jax.models.registry",
    "Predictor": "dpn_jax.infer.predict",
    "evaluate_dataset": "dpn_jax.infer.evaluate",
    "Runner": "dpn_jax.runtime.runner",
    "train_and_evaluate": "dpn_jax.train.trainer",
    "export_model": "dpn_jax.export",
    "DpnJaxError": "dpn_jax.errors",
}

__all__ = sorted(_EXPORTS)

if TYPE_CHECKING:
    from dpn_jax.data.preprocessing import Preprocessing
    from dpn_jax.errors import DpnJaxError
    from dpn_jax.export import export_model
    from dpn_jax.factory import create_model
    from dpn_jax.infer.evaluate import evaluate_dataset
    from dpn_jax.infer.predict import Predictor
    from dpn_jax.models.dpn import (
        DPN,
        MODEL_CONFIGS,
        PRETRAINED_CFGS,
        DPNConfig,
        feature_info,
    )
    from dpn_jax.models.registry import init_variables, list_models, pretrained_cfg
    from dpn_jax.ops.conv import conv2d
    from dpn_jax.runtime.runner import Runner
    from dpn_jax.train.trainer import train_and_evaluate
    from dpn_jax.weights.convert import flax_to_timm, timm_to_flax
    from dpn_jax.weights.model_dir import ModelDir
    from dpn_jax.weights.pretrained import load_model


def __getattr__(name: str) -> Any:
    if name not in _EXPORTS:
        raise AttributeError(f"module 'dpn_jax' has no attribute {name!r}")
    value = getattr(importlib.import_module(_EXPORTS[name]), name)
    globals()[name] = value  # later lookups skip this function
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_EXPORTS))
