"""Dual Path Networks (Chen et al. 2017), computing exactly what timm's `dpn.py` computes.

Submodule names follow timm's state dict (`features/conv3_1/c3x3_b/conv/kernel` is
`features.conv3_1.c3x3_b.conv.weight`), so weight conversion is a mechanical rename. Each block
carries the residual and the dense path as one concatenated tensor: channels [:bw] are the
residual path, the rest the densely growing path.
"""

from __future__ import annotations

import dataclasses
import numbers
from collections.abc import Sequence
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from dpn_jax.errors import ConfigError, is_positive_int
from dpn_jax.models.layers import ACTIVATIONS, BnAct, BnActConv2d, Conv2d, ConvBnAct, kernel_init
from dpn_jax.ops.pool import max_pool

Dtype = Any


@dataclasses.dataclass(frozen=True)
class DPNConfig:
    """The architecture of a DPN: what the weights' shapes (and activations) depend on.

    One value shared by `DPN` and `DPNFeatures`; variants are rows of `MODEL_CONFIGS` (timm's
    `model_args`). Fields are checked on construction, so a bad value fails here with its name
    instead of deep inside a trace. Lists are accepted and kept as tuples (JSON has no tuples).
    """

    k_sec: tuple[int, ...] = (3, 4, 20, 3)  # blocks per stage
    inc_sec: tuple[int, ...] = (16, 32, 24, 128)  # dense growth per block, per stage
    k_r: int = 96  # bottleneck width of stage 1 (doubles per stage)
    groups: int = 32  # groups of the 3x3 convolutions
    small: bool = False  # 3x3 stem and 1x residual widths (dpn48b/68/68b) instead of 7x7 and 4x
    num_init_features: int = 64  # stem width
    b: bool = False  # `c1x1_c` as BN-act and two convs (the 'b' variants)
    act: str = "relu"  # stem and final BN-act (timm's `act_layer` reaches only these two)
    head_act: str | None = (
        None  # final BN-act; None: same as `act` (timm today), 'elu': timm <= 0.6
    )
    block_act: str = "relu"  # inside the dual path blocks (timm: always ReLU)

    def __post_init__(self) -> None:
        for name in ("k_sec", "inc_sec"):
            value = getattr(self, name)
            if (
                isinstance(value, (str, bytes))
                or not isinstance(value, Sequence)
                or len(value) != 4
                or not all(is_positive_int(v) for v in value)
            ):
                raise ConfigError(
                    f"{name} must be 4 positive integers (one per stage), got {value!r}"
                )
            object.__setattr__(self, name, tuple(int(v) for v in value))
        for name in ("k_r", "groups", "num_init_features"):
            if not is_positive_int(getattr(self, name)):
                raise ConfigError(f"{name} must be a positive integer, got {getattr(self, name)!r}")
        for name in ("small", "b"):
            if not isinstance(getattr(self, name), bool):
                raise ConfigError(f"{name} must be true or false, got {getattr(self, name)!r}")
        for name in ("act", "head_act", "block_act"):
            value = getattr(self, name)
            if not (value in ACTIVATIONS or (name == "head_act" and value is None)):
                raise ConfigError(f"{name} must be one of {sorted(ACTIVATIONS)}, got {value!r}")
        if self.k_r % self.groups:
            raise ConfigError(
                f"k_r={self.k_r} must be divisible by groups={self.groups} "
                "(the grouped 3x3 convolutions split k_r channels)"
            )

    def replace(self, **overrides: Any) -> DPNConfig:
        """This config with some fields changed; an unknown field is named."""
        unknown = sorted(set(overrides) - set(CONFIG_FIELDS))
        if unknown:
            raise ConfigError(
                f"unknown architecture field {unknown[0]!r}; fields: {', '.join(CONFIG_FIELDS)}"
            )
        return dataclasses.replace(self, **overrides)

    def overrides_from(self, base: DPNConfig) -> dict[str, Any]:
        """The fields in which this config differs from `base` (an architecture's row)."""
        return {
            name: getattr(self, name)
            for name in CONFIG_FIELDS
            if getattr(self, name) != getattr(base, name)
        }


CONFIG_FIELDS: tuple[str, ...] = tuple(f.name for f in dataclasses.fields(DPNConfig))

# Variants are data, as timm's `model_args`.
MODEL_CONFIGS: dict[str, DPNConfig] = {
    "dpn48b": DPNConfig(
        small=True,
        num_init_features=10,
        k_r=128,
        groups=32,
        b=True,
        k_sec=(3, 4, 6, 3),
        inc_sec=(16, 32, 32, 64),
        act="silu",
    ),
    "dpn68": DPNConfig(
        small=True,
        num_init_features=10,
        k_r=128,
        groups=32,
        k_sec=(3, 4, 12, 3),
        inc_sec=(16, 32, 32, 64),
    ),
    "dpn68b": DPNConfig(
        small=True,
        num_init_features=10,
        k_r=128,
        groups=32,
        b=True,
        k_sec=(3, 4, 12, 3),
        inc_sec=(16, 32, 32, 64),
    ),
    "dpn92": DPNConfig(
        num_init_features=64, k_r=96, groups=32, k_sec=(3, 4, 20, 3), inc_sec=(16, 32, 24, 128)
    ),
    "dpn98": DPNConfig(
        num_init_features=96, k_r=160, groups=40, k_sec=(3, 6, 20, 3), inc_sec=(16, 32, 32, 128)
    ),
    "dpn131": DPNConfig(
        num_init_features=128, k_r=160, groups=40, k_sec=(4, 8, 28, 3), inc_sec=(16, 32, 32, 128)
    ),
    "dpn107": DPNConfig(
        num_init_features=128, k_r=200, groups=50, k_sec=(4, 8, 20, 3), inc_sec=(20, 64, 64, 128)
    ),
}

IMAGENET_DPN_MEAN = (124 / 255, 117 / 255, 104 / 255)
IMAGENET_DPN_STD = (1 / (0.0167 * 255),) * 3
IMAGENET_DEFAULT_MEAN = (0.485, 0.456, 0.406)
IMAGENET_DEFAULT_STD = (0.229, 0.224, 0.225)


def _cfg(tag: str, **overrides: Any) -> dict[str, Any]:
    cfg = {
        "num_classes": 1000,
        "input_size": (224, 224),
        "crop_pct": 0.875,
        "interpolation": "bicubic",
        "mean": IMAGENET_DPN_MEAN,
        "std": IMAGENET_DPN_STD,
        "hf_hub_id": f"timm/{tag}",
        "test_input_size": None,
        "test_crop_pct": None,
    }
    cfg.update(overrides)
    return cfg


# timm's `default_cfgs`, keyed by `arch.tag`. `hf_hub_id` None: no published weights.
PRETRAINED_CFGS: dict[str, dict[str, Any]] = {
    "dpn48b.untrained": _cfg(
        "dpn48b.untrained", hf_hub_id=None, mean=IMAGENET_DEFAULT_MEAN, std=IMAGENET_DEFAULT_STD
    ),
    "dpn68.mx_in1k": _cfg("dpn68.mx_in1k"),
    "dpn68b.ra_in1k": _cfg(
        "dpn68b.ra_in1k",
        mean=IMAGENET_DEFAULT_MEAN,
        std=IMAGENET_DEFAULT_STD,
        crop_pct=0.95,
        test_input_size=(288, 288),
        test_crop_pct=1.0,
    ),
    "dpn68b.mx_in1k": _cfg("dpn68b.mx_in1k"),
    "dpn92.mx_in1k": _cfg("dpn92.mx_in1k"),
    "dpn98.mx_in1k": _cfg("dpn98.mx_in1k"),
    "dpn131.mx_in1k": _cfg("dpn131.mx_in1k"),
    "dpn107.mx_in1k": _cfg("dpn107.mx_in1k"),
}


class DualPathBlock(nn.Module):
    """One DPN block: a ResNeXt-style bottleneck whose output feeds both paths."""

    num_1x1_a: int
    num_3x3_b: int
    num_1x1_c: int  # residual width `bw`
    inc: int  # dense growth per block
    groups: int
    block_type: str = "normal"  # 'proj' (stage 1 entry), 'down' (stride-2 entry) or 'normal'
    b: bool = False
    act: str = "relu"
    dtype: Dtype = jnp.float32
    axis_name: str | None = None

    @nn.compact
    def __call__(self, x: jax.Array, train: bool = False) -> jax.Array:
        unit = {"act": self.act, "dtype": self.dtype, "axis_name": self.axis_name}
        stride = 2 if self.block_type == "down" else 1
        bw = self.num_1x1_c
        if self.block_type == "normal":
            x_s = x
        else:
            name = "c1x1_w_s2" if stride == 2 else "c1x1_w_s1"
            x_s = BnActConv2d(
                features=bw + 2 * self.inc, kernel_size=1, stride=stride, **unit, name=name
            )(x, train)
        resid, dense = x_s[..., :bw], x_s[..., bw:]

        x = BnActConv2d(features=self.num_1x1_a, kernel_size=1, **unit, name="c1x1_a")(x, train)
        x = BnActConv2d(
            features=self.num_3x3_b,
            kernel_size=3,
            stride=stride,
            groups=self.groups,
            **unit,
            name="c3x3_b",
        )(x, train)
        if self.b:
            x = BnAct(**unit, name="c1x1_c")(x, train)
            out_resid = Conv2d(features=bw, dtype=self.dtype, name="c1x1_c1")(x)
            out_dense = Conv2d(features=self.inc, dtype=self.dtype, name="c1x1_c2")(x)
        else:
            x = BnActConv2d(features=bw + self.inc, kernel_size=1, **unit, name="c1x1_c")(x, train)
            out_resid, out_dense = x[..., :bw], x[..., bw:]
        return jnp.concatenate([resid + out_resid, dense, out_dense], axis=-1)


def stage_widths(small: bool, k_r: int, stage: int) -> tuple[int, int]:
    """Residual width `bw` and bottleneck width `r` of stage 0..3."""
    bw_base = 64 << stage
    return bw_base * (1 if small else 4), k_r * bw_base // 64


class DPNFeatures(nn.Module):
    """timm's `model.features`: stem, four stages and the final BN-act.

    Returns the final map and the five feature taps (strides 2, 4, 8, 16, 32): the stem
    conv's output and each stage's last block, as timm's `feature_info`.
    """

    config: DPNConfig
    dtype: Dtype = jnp.float32
    axis_name: str | None = None
    remat: bool = False

    @nn.compact
    def __call__(
        self, x: jax.Array, train: bool = False, final_norm: bool = True, last_tap: int = 4
    ) -> tuple[jax.Array, list[jax.Array]]:
        """`last_tap` < 4 stops after that tap (timm's `stop_early`); the final BN-act runs only
        after the last stage."""
        cfg = self.config
        unit = {"dtype": self.dtype, "axis_name": self.axis_name}
        block_cls = nn.remat(DualPathBlock, static_argnums=(2,)) if self.remat else DualPathBlock

        # Stem: conv -> BN -> act (post-activation), then a 3x3/2 max pool padded with -inf.
        x = ConvBnAct(
            features=cfg.num_init_features,
            kernel_size=3 if cfg.small else 7,
            stride=2,
            act=cfg.act,
            **unit,
            name="conv1_1",
        )(x, train)
        taps = [x]
        x = max_pool(x, window=3, stride=2, padding=1)

        for i, (depth, inc) in enumerate(zip(cfg.k_sec[:last_tap], cfg.inc_sec)):
            bw, r = stage_widths(cfg.small, cfg.k_r, i)
            for j in range(1, depth + 1):
                block_type = "normal" if j > 1 else ("proj" if i == 0 else "down")
                x = block_cls(
                    num_1x1_a=r,
                    num_3x3_b=r,
                    num_1x1_c=bw,
                    inc=inc,
                    groups=cfg.groups,
                    block_type=block_type,
                    b=cfg.b,
                    act=cfg.block_act,
                    **unit,
                    name=f"conv{i + 2}_{j}",
                )(x, train)
            taps.append(x)

        if final_norm and last_tap == NUM_TAPS - 1:
            x = BnAct(act=cfg.head_act or cfg.act, **unit, name="conv5_bn_ac")(x, train)
        return x, taps


POOL_TYPES = ("avg", "max", "avgmax", "catavgmax", "")
NUM_TAPS = 5  # feature taps: the stem and the four stages
OUTPUT_FORMATS = ("NHWC", "NCHW")


def feature_take_indices(num_features: int, indices: int | Sequence[int] | None) -> list[int]:
    """timm's `feature_take_indices`: None takes all, an int the last n, a sequence those indices
    (negative ones count from the end)."""
    if indices is None:
        indices = num_features
    if isinstance(indices, numbers.Integral):
        if not 0 < indices <= num_features:
            raise ConfigError(f"last-n indices={indices} out of range (1 to {num_features})")
        return list(range(num_features - indices, num_features))
    taken = [num_features + i if i < 0 else i for i in indices]
    bad = [i for i, t in zip(indices, taken) if not 0 <= t < num_features]
    if bad or not taken:
        raise ConfigError(
            f"feature index {bad[0] if bad else indices!r} out of range (0 to {num_features - 1})"
        )
    return taken


def global_pool(x: jax.Array, pool_type: str) -> jax.Array:
    """timm's `SelectAdaptivePool2d` over NHWC; '' keeps the spatial map (head: a 1x1 conv)."""
    if pool_type == "":
        return x
    x32 = x.astype(jnp.promote_types(x.dtype, jnp.float32))  # float64 stays float64
    avg, mx = jnp.mean(x32, axis=(1, 2)), jnp.max(x32, axis=(1, 2))
    pooled = {
        "avg": avg,
        "max": mx,
        "avgmax": 0.5 * (avg + mx),
        "catavgmax": jnp.concatenate([avg, mx], axis=-1),
    }[pool_type]
    return pooled.astype(x.dtype)


class DPN(nn.Module):
    """A Dual Path Network classifier; `features_only=True` returns the five feature maps instead.

    `config` is the architecture (`MODEL_CONFIGS[name]`, possibly `.replace(...)`d); the other
    fields say how it runs. Input is NHWC, normalised with the pretrained config's mean/std.
    Logits are float32 whatever the compute `dtype` (float64 for float64); parameters and
    BatchNorm statistics are created float32 (the trainer casts them for float64 runs).
    """

    config: DPNConfig
    num_classes: int = 1000
    drop_rate: float = 0.0
    global_pool: str = "avg"
    features_only: bool = False
    out_indices: Sequence[int] = (0, 1, 2, 3, 4)
    dtype: Dtype = jnp.float32
    axis_name: str | None = None  # set to the pmap/shard_map axis for cross-replica BatchNorm
    remat: bool = False  # rematerialise each block in the backward pass (less memory, more FLOPs)

    def setup(self) -> None:
        if self.global_pool not in POOL_TYPES:
            raise ConfigError(f"global_pool={self.global_pool!r}; choose from {POOL_TYPES}")
        self.features = DPNFeatures(
            config=self.config, dtype=self.dtype, axis_name=self.axis_name, remat=self.remat
        )
        if self.num_classes and not self.features_only:
            self.classifier = nn.Dense(
                features=self.num_classes, dtype=self.dtype, kernel_init=kernel_init
            )
        self.head_drop = nn.Dropout(rate=self.drop_rate)

    def __call__(self, x: jax.Array, train: bool = False) -> jax.Array | list[jax.Array]:
        if self.features_only:
            return self.forward_intermediates(
                x, self.out_indices, intermediates_only=True, train=train
            )
        return self.forward_head(self.forward_features(x, train), train)

    def forward_features(self, x: jax.Array, train: bool = False) -> jax.Array:
        """The unpooled final map, after `conv5_bn_ac`."""
        return self.features(x, train)[0]

    def forward_intermediates(
        self,
        x: jax.Array,
        indices: int | Sequence[int] | None = None,
        norm: bool = False,
        stop_early: bool = False,
        output_fmt: str = "NHWC",
        intermediates_only: bool = False,
        train: bool = False,
    ) -> list[jax.Array] | tuple[jax.Array, list[jax.Array]]:
        """timm's `forward_intermediates` (its ResNet/ConvNeXt semantics; timm's DPN lacks it).

        Taps (`feature_info`): 0 the stem conv (stride 2), 1-4 each stage's last block. `indices`
        as `feature_take_indices`; `norm` applies the final BN-act (`conv5_bn_ac`) to tap 4;
        `stop_early` runs no stage beyond the last tap taken. Returns the taps, or with
        `intermediates_only=False` also the final map (BN-act applied once the last stage ran).
        `output_fmt='NCHW'` transposes the taps as timm returns them.
        """
        if output_fmt not in OUTPUT_FORMATS:
            raise ConfigError(f"output_fmt={output_fmt!r}; choose from {OUTPUT_FORMATS}")
        take = feature_take_indices(NUM_TAPS, indices)
        last_tap = max(take) if stop_early else NUM_TAPS - 1
        normed_tap = norm and NUM_TAPS - 1 in take
        final_norm = normed_tap or not intermediates_only
        x, taps = self.features(x, train, final_norm=final_norm, last_tap=last_tap)
        taps = [x if normed_tap and i == NUM_TAPS - 1 else taps[i] for i in take]
        if output_fmt == "NCHW":
            taps = [jnp.transpose(t, (0, 3, 1, 2)) for t in taps]
        return taps if intermediates_only else (x, taps)

    def forward_head(
        self, x: jax.Array, train: bool = False, pre_logits: bool = False
    ) -> jax.Array:
        x = global_pool(x, self.global_pool)
        x = self.head_drop(x, deterministic=not train)
        if pre_logits or not self.num_classes:
            return x
        return self.classifier(x).astype(jnp.promote_types(self.dtype, jnp.float32))

    @nn.nowrap
    def reset_classifier(self, num_classes: int, global_pool: str | None = None) -> DPN:
        """timm's `reset_classifier`, as a new module (Linen modules are immutable): pair it with
        `dpn_jax.weights.pretrained.replace_head` for the variables (the NNX model does both)."""
        return self.clone(
            num_classes=num_classes,
            global_pool=self.global_pool if global_pool is None else global_pool,
        )

    @nn.nowrap
    def set_grad_checkpointing(self, enable: bool = True) -> DPN:
        """timm's `set_grad_checkpointing` as `remat`, as a new module (Linen is immutable)."""
        return self.clone(remat=enable)


# The `DPN` fields that say how a model runs, as opposed to its architecture (`config`).
MODULE_FIELDS: tuple[str, ...] = tuple(
    f.name for f in dataclasses.fields(DPN) if f.name not in ("config", "parent", "name")
)


def feature_info(arch: str | DPNConfig) -> list[dict[str, Any]]:
    """timm's `feature_info` for an architecture: channels and reduction of each feature tap."""
    cfg = MODEL_CONFIGS[arch] if isinstance(arch, str) else arch
    info = [{"num_chs": cfg.num_init_features, "reduction": 2, "module": "features.conv1_1"}]
    for i, (depth, inc) in enumerate(zip(cfg.k_sec, cfg.inc_sec)):
        bw, _ = stage_widths(cfg.small, cfg.k_r, i)
        info.append(
            {
                "num_chs": bw + (depth + 2) * inc,
                "reduction": 4 << i,
                "module": f"features.conv{i + 2}_{depth}",
            }
        )
    return info
