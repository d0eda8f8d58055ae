"""Every DPN as a Flax NNX module: the Linen definition's weights as NNX state.

    from dpn_jax import nnx as dpn_nnx
    model = dpn_nnx.create_model("dpn92.mx_in1k", pretrained=True)   # an nnx.Module
    logits = model(images)                                          # eval mode by default
    model.train(); optimizer = nnx.Optimizer(model, optax.sgd(0.1), wrt=nnx.Param)

Design: a bridge, not a second definition. `DPN` holds the Linen model (`dpn_jax.models.dpn.DPN`,
a static attribute) and its variables as NNX state (`nnx.Param` for "params", `nnx.BatchStat`
for "batch_stats", converted by `flax.nnx.bridge`'s own `linen_vars_to_nnx_attrs`); each call
applies the Linen module to that state. Why not native `nnx.Conv`/`nnx.BatchNorm` modules:
- one definition: the architecture (blocks, widths, taps, variants as data in `MODEL_CONFIGS`)
  is written once, in `dpn_jax.models`; a native NNX copy would have to be kept in step with it;
- same numbers: the NNX forward is the Linen program itself, so logits, BatchNorm statistics and
  gradients are bit-identical to Linen's (PyTorch-exact BatchNorm, not `nnx.BatchNorm`);
- same speed: every convolution is still `dpn_jax.ops.conv.conv2d` (the CPU FFI kernels);
- timm's names: state paths are the Linen tree without the collection
  (`features/conv3_1/c3x3_b/conv/kernel`, timm's `features.conv3_1.c3x3_b.conv.weight`).
It is a real NNX module rather than `nnx.bridge.ToNNX` because NNX users expect `model.train()` /
`model.eval()` (the `use_running_average`/`deterministic` attributes they set), BatchNorm updates
written back in train mode, dropout keys from `nnx.Rngs`, and timm's research methods; ToNNX needs
`lazy_init`, a `mutable` argument per call and has no train/eval switch.

Its state is ~600 graph nodes (nested dicts of variables): in hot loops `nnx.jit(...,
graph=False)` (tree mode) saves graph mode's per-call Python walk of them (BENCHMARKS.md,
"Flax NNX").
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from typing import Any

import jax
from flax import nnx
from flax.nnx.bridge import variables as bridge_variables

from dpn_jax.data.preprocessing import Preprocessing
from dpn_jax.errors import ConfigError
from dpn_jax.factory import create_model as create_linen_model
from dpn_jax.models import dpn as linen_dpn
from dpn_jax.models.registry import Variables, split_model_name
from dpn_jax.weights.model_dir import ModelDir
from dpn_jax.weights.pretrained import create_pretrained, load_model, replace_head

COLLECTIONS = {"params": nnx.Param, "batch_stats": nnx.BatchStat}


class DPN(nnx.Module):
    """A Dual Path Network as an NNX module (see the module docstring for the design).

    `module` is the Linen `DPN` (architecture and how it runs: dtype, axis_name, remat, ...),
    `variables` its {"params", "batch_stats"}; `architecture` ('dpn68', ...) and `preprocessing`
    are what a saved `ModelDir` records. Starts in eval mode, as Linen's `train=False` default;
    `model.train()` switches BatchNorm to batch statistics (updating the running ones) and
    enables dropout, drawing keys from `rngs`' "dropout" stream.
    """

    def __init__(
        self,
        module: linen_dpn.DPN,
        variables: Variables,
        *,
        architecture: str,
        preprocessing: Preprocessing | None = None,
        rngs: nnx.Rngs | None = None,
    ):
        self.module = module
        self.architecture = split_model_name(architecture)[0]
        self.preprocessing = preprocessing or Preprocessing.of_model(architecture)
        for name, value in linen_variables_to_attributes(variables).items():
            setattr(self, name, nnx.data(value))
        self.rngs = rngs if rngs is not None else nnx.Rngs(dropout=0)
        self.use_running_average = True
        self.deterministic = True

    # --- Linen interop ------------------------------------------------------------------------

    def linen_variables(self) -> Variables:
        """The Linen variables {"params", "batch_stats"} (the same arrays, not copies)."""
        return {
            collection: nnx.to_pure_dict(nnx.state(self, kind))
            for collection, kind in COLLECTIONS.items()
        }

    def to_linen(self) -> tuple[linen_dpn.DPN, Variables]:
        return self.module, self.linen_variables()

    def to_model_dir(self, **fields: Any) -> ModelDir:
        """A `ModelDir` of this model (`.save(path)` writes it for every dpn_jax tool); `fields`
        are further ModelDir fields (class_names, source, ...)."""
        config = self.module.config
        return ModelDir(
            architecture=self.architecture,
            num_classes=self.module.num_classes,
            preprocessing=self.preprocessing,
            variables=jax.device_get(self.linen_variables()),
            model_kwargs=config.overrides_from(linen_dpn.MODEL_CONFIGS[self.architecture]),
            **fields,
        )

    # --- forward ------------------------------------------------------------------------------

    @property
    def training(self) -> bool:
        if self.use_running_average != self.deterministic:
            raise ConfigError(
                "use_running_average and deterministic differ: the Linen DPN switches BatchNorm "
                "and dropout together; use model.train() / model.eval()"
            )
        return not self.use_running_average

    def _run(self, method: str, *args: Any, **kwargs: Any) -> Any:
        """`method` of the Linen module on this state; in train mode the updated BatchNorm
        statistics are written back and dropout draws a key."""
        variables = self.linen_variables()
        if not self.training:
            return self.module.apply(variables, *args, method=method, train=False, **kwargs)
        rngs = {"dropout": self.rngs.dropout()} if self.module.drop_rate > 0 else {}
        out, updates = self.module.apply(
            variables,
            *args,
            method=method,
            train=True,
            rngs=rngs,
            mutable=["batch_stats"],
            **kwargs,
        )
        stats = nnx.state(self, nnx.BatchStat)
        nnx.replace_by_pure_dict(stats, updates["batch_stats"])
        nnx.update(self, stats)
        return out

    def __call__(self, x: jax.Array) -> jax.Array | list[jax.Array]:
        return self._run("__call__", x)

    def forward_features(self, x: jax.Array) -> jax.Array:
        return self._run("forward_features", x)

    def forward_head(self, x: jax.Array, pre_logits: bool = False) -> jax.Array:
        return self._run("forward_head", x, pre_logits=pre_logits)

    def forward_intermediates(
        self,
        x: jax.Array,
        indices: int | Sequence[int] | None = None,
        norm: bool = False,
        stop_early: bool = False,
        output_fmt: str = "NHWC",
        intermediates_only: bool = False,
    ) -> list[jax.Array] | tuple[jax.Array, list[jax.Array]]:
        """timm's `forward_intermediates`: see `dpn_jax.models.dpn.DPN.forward_intermediates`."""
        return self._run(
            "forward_intermediates",
            x,
            indices=indices,
            norm=norm,
            stop_early=stop_early,
            output_fmt=output_fmt,
            intermediates_only=intermediates_only,
        )

    # --- timm's model surgery -----------------------------------------------------------------

    @property
    def feature_info(self) -> list[dict[str, Any]]:
        return linen_dpn.feature_info(self.module.config)

    @property
    def num_classes(self) -> int:
        return self.module.num_classes

    def reset_classifier(
        self, num_classes: int, global_pool: str | None = None, rng: jax.Array | None = None
    ) -> None:
        """timm's `reset_classifier`: a fresh classifier for `num_classes` (0: none, the model
        returns pooled features), initialised as a new model's."""
        module = self.module.reset_classifier(num_classes, global_pool)
        in_features = self.features["conv5_bn_ac"]["bn"]["mean"].shape[0]
        if module.global_pool == "catavgmax":  # average and max concatenated
            in_features *= 2
        variables = replace_head(self.linen_variables(), num_classes, rng, in_features)
        if hasattr(self, "classifier"):
            del self.classifier
        if num_classes:
            self.classifier = nnx.data(linen_variables_to_attributes(variables)["classifier"])
        self.module = module

    def set_grad_checkpointing(self, enable: bool = True) -> None:
        """timm's `set_grad_checkpointing`: rematerialise each block (the Linen `remat`)."""
        self.module = self.module.set_grad_checkpointing(enable)


def linen_variables_to_attributes(variables: Variables) -> dict[str, Any]:
    """{"params": ..., "batch_stats": ...} -> NNX variables by path (flax's own bridge), as
    device arrays (NumPy ones, e.g. from `timm_to_flax`, would be read-only state)."""
    unknown = sorted(set(variables) - set(COLLECTIONS))
    if unknown:
        raise ConfigError(
            f"unknown variable collection {unknown[0]!r}; expected {list(COLLECTIONS)}"
        )
    return bridge_variables.linen_vars_to_nnx_attrs(jax.device_put(dict(variables)))


def create_model(
    name: str,
    *,
    pretrained: bool | str | os.PathLike = False,
    rng: jax.Array | None = None,
    rngs: nnx.Rngs | None = None,
    **kwargs: Any,
) -> DPN:
    """`dpn_jax.create_model` as an NNX module: the same names, keywords and `pretrained=`
    (True: the tag's timm weights through the weights cache; a path: a model directory), the
    same weights for the same `rng`. `rngs` holds the "dropout" stream."""
    if pretrained:
        module, variables, model_dir = create_pretrained(name, pretrained, rng, **kwargs)
        preprocessing = model_dir.preprocessing
    else:
        module, variables = create_linen_model(name, rng=rng, **kwargs)
        preprocessing = None
    return DPN(module, variables, architecture=name, preprocessing=preprocessing, rngs=rngs)


def load_model_dir(
    source: str | os.PathLike, *, rngs: nnx.Rngs | None = None, **fields: Any
) -> DPN:
    """A model (`dpn_jax.load_model`: a model directory, pretrained tag or hub id) as an NNX
    module, with the architecture it records; `fields` set how it runs (dtype, axis_name,
    remat, ...)."""
    model_dir = load_model(source)
    return DPN(
        model_dir.build_model(**fields),
        model_dir.variables,
        architecture=model_dir.architecture,
        preprocessing=model_dir.preprocessing,
        rngs=rngs,
    )
