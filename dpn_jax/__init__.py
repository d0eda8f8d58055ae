"""Dual Path Networks in JAX/Flax, numerically identical to timm."""
from dpn_jax.dpn import DPN, MODEL_ARGS, PRETRAINED_CFGS, DualPathBlock, feature_info
from dpn_jax.grouped_conv import conv2d
from dpn_jax.registry import create_model, init_variables, list_models, pretrained_cfg

__version__ = "0.1.0"

__all__ = [
    "DPN", "DualPathBlock", "MODEL_ARGS", "PRETRAINED_CFGS", "conv2d", "create_model",
    "feature_info", "init_variables", "list_models", "pretrained_cfg",
]
