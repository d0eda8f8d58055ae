"""`create_model`: a DPN and its variables, fresh or from weights.

It sits above the model and the weights layers because it needs both: the models know nothing of
files, hubs or conversion (timm's `_builder.py` plays the same part for timm's models).
"""

from __future__ import annotations

import os
from typing import Any

import jax

from dpn_jax.models.dpn import DPN
from dpn_jax.models.registry import Variables, build_dpn, init_variables
from dpn_jax.weights.pretrained import create_pretrained


def create_model(
    name: str,
    *,
    pretrained: bool | str | os.PathLike = False,
    rng: jax.Array | None = None,
    **kwargs: Any,
) -> tuple[DPN, Variables]:
    """Build a DPN by architecture (`dpn92`) or tag (`dpn92.mx_in1k`) and its variables.

    Keywords are architecture overrides (`DPNConfig` fields: k_sec, head_act, ...) or `DPN`
    fields (num_classes, dtype, drop_rate, global_pool, features_only, axis_name, remat, ...);
    an unknown one is a ConfigError naming it. `pretrained=True` loads the tag's converted timm
    weights (downloaded and cached once); a path loads a model directory (`dpn-convert` or
    trainer output), which describes itself: its architecture fields and head are the defaults
    (a different `num_classes` gets a fresh head; a different architecture field is an error).
    Both are read by `dpn_jax.load_model`.
    """
    if pretrained:
        model, variables, _ = create_pretrained(name, pretrained, rng, **kwargs)
        return model, variables
    model = build_dpn(name, **kwargs)
    return model, init_variables(model, rng)
