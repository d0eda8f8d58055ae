"""`create_model`: a DPN and its variables, fresh or from weights.

It sits above the model and the weights layers because it needs both: the models know nothing of
files, hubs or conversion (timm's `_builder.py` plays the same part for timm's models).
"""
from __future__ import annotations

import os
from typing import Any

import jax
import jax.numpy as jnp

from dpn_jax.models.dpn import DPN, MODEL_ARGS
from dpn_jax.models.registry import Variables, init_variables, split_model_name
from dpn_jax.weights.pretrained import load_pretrained


def create_model(name: str, *, num_classes: int = 1000, pretrained: bool | str | os.PathLike = False,
                 dtype: Any = jnp.float32, drop_rate: float = 0.0, global_pool: str = "avg",
                 rng: jax.Array | None = None, **overrides: Any) -> tuple[DPN, Variables]:
    """Build a DPN by architecture (`dpn92`) or tag (`dpn92.mx_in1k`) and its variables.

    `pretrained=True` loads the tag's converted timm weights (downloaded and cached once);
    a path loads a `convert_weights.py` / trainer output directory. Other keyword arguments
    override `DPN` fields (`features_only`, `head_act`, `axis_name`, `remat`, ...).
    """
    arch, tag = split_model_name(name)
    model = DPN(**{**MODEL_ARGS[arch], "num_classes": num_classes, "dtype": dtype,
                   "drop_rate": drop_rate, "global_pool": global_pool, **overrides})
    if pretrained:
        return model, load_pretrained(model, tag, pretrained, rng=rng)
    return model, init_variables(model, rng)
