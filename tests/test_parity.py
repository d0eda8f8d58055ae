"""Numerical parity with timm's DPN: logits, intermediate feature maps, train-mode BatchNorm."""
from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch

import dpn_jax
from dpn_jax.convert import ConversionError, flax_to_timm, timm_to_flax
from timm_reference import numpy_state_dict, random_timm_dpn, relative_error, run_timm

TIMM_PARAM_COUNTS = {
    "dpn48b": 9_126_226, "dpn68": 12_611_602, "dpn68b": 12_611_602, "dpn92": 37_668_392,
    "dpn98": 61_570_728, "dpn107": 86_917_800, "dpn131": 79_254_504,
}
ALL_VARIANTS = sorted(TIMM_PARAM_COUNTS)


def image_batch(shape, seed=0) -> np.ndarray:
    return np.random.default_rng(seed).standard_normal(shape).astype(np.float32)


def test_registry_lists_every_variant_and_tag():
    assert dpn_jax.list_models() == ALL_VARIANTS
    assert "dpn68b.ra_in1k" in dpn_jax.list_models(pretrained=True)
    assert "dpn48b.untrained" not in dpn_jax.list_models(pretrained=True)
    assert dpn_jax.list_models("dpn68*") == ["dpn68", "dpn68b"]
    cfg = dpn_jax.pretrained_cfg("dpn68b")  # default tag, as timm
    assert cfg["tag"] == "dpn68b.ra_in1k" and cfg["test_input_size"] == (288, 288)


@pytest.mark.parametrize("name", ALL_VARIANTS)
def test_param_count_equals_timm(name):
    import timm
    timm_count = sum(p.numel() for p in timm.create_model(name).parameters())
    assert timm_count == TIMM_PARAM_COUNTS[name]
    model = dpn_jax.DPN(**dpn_jax.MODEL_ARGS[name])
    shapes = jax.eval_shape(lambda x: model.init(jax.random.PRNGKey(0), x),
                            jax.ShapeDtypeStruct((1, 64, 64, 3), jnp.float32))
    assert sum(int(np.prod(p.shape)) for p in jax.tree_util.tree_leaves(shapes["params"])) == timm_count


@pytest.mark.slow
@pytest.mark.parametrize("name", ALL_VARIANTS)
def test_logits_match_timm(name):
    """Eval-mode logits at 224x224 and at an odd non-square size (exercises padding/pooling)."""
    reference = random_timm_dpn(name, num_classes=1000)
    model, _ = dpn_jax.create_model(name)
    variables = timm_to_flax(numpy_state_dict(reference), name)
    forward = jax.jit(lambda v, x: model.apply(v, x))
    for shape in [(2, 224, 224, 3), (2, 193, 161, 3)]:
        x = image_batch(shape)
        assert relative_error(forward(variables, x), run_timm(reference, x)) <= 1e-4, shape
