"""Dual Path Networks in JAX/Flax, numerically identical to timm."""
from dpn_jax.convert import flax_to_timm, timm_to_flax
from dpn_jax.dpn import DPN, MODEL_ARGS, PRETRAINED_CFGS, DualPathBlock, feature_info
from dpn_jax.grouped_conv import conv2d
from dpn_jax.pretrained import load_model_dir, save_model_dir
from dpn_jax.registry import create_model, init_variables, list_models, pretrained_cfg

__version__ = "0.1.0"

__all__ = [
    "DPN", "DualPathBlock", "MODEL_ARGS", "PRETRAINED_CFGS", "Predictor", "conv2d", "create_model",
    "feature_info", "flax_to_timm", "init_variables", "list_models", "load_model_dir",
    "pretrained_cfg", "save_model_dir", "timm_to_flax",
]


def __getattr__(name: str):
    # Imported on first use so `python -m dpn_jax.predict` does not import itself twice.
    if name == "Predictor":
        from dpn_jax.predict import Predictor
        return Predictor
    raise AttributeError(f"module 'dpn_jax' has no attribute {name!r}")
