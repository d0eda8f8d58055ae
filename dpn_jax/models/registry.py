"""timm-style model registry: architecture names, pretrained tags and fresh variables."""

from __future__ import annotations

import fnmatch
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from dpn_jax.errors import ConfigError
from dpn_jax.models.dpn import CONFIG_FIELDS, DPN, MODEL_CONFIGS, MODULE_FIELDS, PRETRAINED_CFGS
from dpn_jax.models.layers import kernel_init_std

Variables = dict[str, Any]


def list_models(pattern: str = "*", pretrained: bool = False) -> list[str]:
    """Architectures matching `pattern`, or with `pretrained=True` the tags that have weights."""
    names = (
        [tag for tag, cfg in PRETRAINED_CFGS.items() if cfg["hf_hub_id"]]
        if pretrained
        else list(MODEL_CONFIGS)
    )
    return sorted(fnmatch.filter(names, pattern))


def split_model_name(name: str) -> tuple[str, str]:
    """'dpn68b' -> ('dpn68b', 'dpn68b.ra_in1k') (timm's default tag); 'dpn92.mx_in1k' as given."""
    arch, _, tag = name.partition(".")
    if arch not in MODEL_CONFIGS:
        raise ConfigError(f"unknown model {name!r}; available: {', '.join(MODEL_CONFIGS)}")
    if tag:
        full = f"{arch}.{tag}"
        if full not in PRETRAINED_CFGS:
            known = [t for t in PRETRAINED_CFGS if t.startswith(arch + ".")]
            raise ConfigError(f"unknown pretrained tag {name!r}; {arch} has: {', '.join(known)}")
        return arch, full
    return arch, next(t for t in PRETRAINED_CFGS if t.partition(".")[0] == arch)


def pretrained_cfg(name: str) -> dict[str, Any]:
    """Preprocessing and source of a tag (or an architecture's default tag), as in timm."""
    arch, tag = split_model_name(name)
    return dict(PRETRAINED_CFGS[tag], architecture=arch, tag=tag)


def build_dpn(name: str, **kwargs: Any) -> DPN:
    """The `DPN` of an architecture or tag, with keyword overrides of either kind.

    A keyword is an architecture field (`DPNConfig`: k_sec, head_act, ...), applied to the
    variant's row of `MODEL_CONFIGS`, or a `DPN` field (num_classes, dtype, axis_name, remat,
    features_only, ...). Anything else is a ConfigError naming it.
    """
    arch, _ = split_model_name(name)
    unknown = sorted(set(kwargs) - set(CONFIG_FIELDS) - set(MODULE_FIELDS))
    if unknown:
        raise ConfigError(
            f"unknown model argument {unknown[0]!r} for {name}; architecture fields: "
            f"{', '.join(CONFIG_FIELDS)}; model fields: {', '.join(MODULE_FIELDS)}"
        )
    config = MODEL_CONFIGS[arch].replace(**{k: v for k, v in kwargs.items() if k in CONFIG_FIELDS})
    return DPN(config=config, **{k: v for k, v in kwargs.items() if k in MODULE_FIELDS})


def init_variables(model: nn.Module, rng: jax.Array | None = None) -> Variables:
    """Fresh variables with the distributions the modules declare, as `model.init` draws them.

    `jit(model.init)` compiles one random initializer per parameter (the threefry fusions), and
    even one jitted draw sliced over all kernels compiles a slice, reshape and scale per kernel.
    So one standard-normal draw runs on the device and is sliced in NumPy: kernels get
    `kernel_init_std` (He fan-out for convs, LeCun fan-in for the classifier), BatchNorm starts
    at the identity, biases at zero. tests/test_models.py ties the result to `model.init`;
    BENCHMARKS.md ("Start-up and compilation cache") has the times.
    """
    rng = jax.random.PRNGKey(0) if rng is None else rng
    dummy = jax.ShapeDtypeStruct((1, 64, 64, 3), jnp.float32)
    abstract = jax.eval_shape(lambda r, x: model.init(r, x, train=False), rng, dummy)
    paths_and_leaves = jax.tree_util.tree_flatten_with_path(abstract)[0]
    kernel_sizes = [leaf.size for path, leaf in paths_and_leaves if path[-1].key == "kernel"]
    noise = np.asarray(jax.random.normal(rng, (sum(kernel_sizes),), jnp.float32))
    offset = 0

    def draw(path, leaf):
        nonlocal offset
        name = path[-1].key
        if name == "kernel":
            values = noise[offset : offset + leaf.size].reshape(leaf.shape)
            offset += leaf.size
            return (values * np.float32(kernel_init_std(leaf.shape))).astype(leaf.dtype)
        if name in ("scale", "var"):
            return np.ones(leaf.shape, leaf.dtype)
        return np.zeros(leaf.shape, leaf.dtype)

    return jax.device_put(jax.tree_util.tree_map_with_path(draw, abstract))
