"""Numerical parity with timm's DPN: logits, intermediate feature maps, train-mode BatchNorm."""

from __future__ import annotations

import jax
import jax.ad_checkpoint
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from timm_reference import numpy_state_dict, random_timm_dpn, relative_error, run_timm

import dpn_jax
from dpn_jax.ops.cpu_kernels import cpu_kernels_available
from dpn_jax.weights.convert import ConversionError, flax_to_timm, timm_to_flax

TIMM_PARAM_COUNTS = {
    "dpn48b": 9_126_226,
    "dpn68": 12_611_602,
    "dpn68b": 12_611_602,
    "dpn92": 37_668_392,
    "dpn98": 61_570_728,
    "dpn107": 86_917_800,
    "dpn131": 79_254_504,
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


def test_public_names_resolve_from_the_lazy_package():
    """`dpn_jax.__init__` loads its modules on first use; every listed name must exist."""
    for name in dpn_jax.__all__:
        assert getattr(dpn_jax, name) is not None, name
    with pytest.raises(AttributeError, match="no_such_name"):
        _ = dpn_jax.no_such_name


@pytest.mark.parametrize("name", ALL_VARIANTS)
def test_param_count_equals_timm(name):
    import timm

    timm_count = sum(p.numel() for p in timm.create_model(name).parameters())
    assert timm_count == TIMM_PARAM_COUNTS[name]
    model = dpn_jax.DPN(config=dpn_jax.MODEL_CONFIGS[name])
    shapes = jax.eval_shape(
        lambda x: model.init(jax.random.PRNGKey(0), x),
        jax.ShapeDtypeStruct((1, 64, 64, 3), jnp.float32),
    )
    assert (
        sum(int(np.prod(p.shape)) for p in jax.tree_util.tree_leaves(shapes["params"]))
        == timm_count
    )


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


@pytest.mark.parametrize("name", ALL_VARIANTS)
def test_feature_info_matches_timm(name):
    import timm

    timm_info = timm.create_model(name, features_only=True).feature_info
    assert [i["num_chs"] for i in dpn_jax.feature_info(name)] == timm_info.channels()
    assert [i["reduction"] for i in dpn_jax.feature_info(name)] == timm_info.reduction()


@pytest.mark.parametrize("name", ["dpn68"])
def test_feature_maps_and_pooled_features_match_timm(name):
    """The five taps (jax-resnet style intermediate checks) and `num_classes=0` pooled features."""
    reference = random_timm_dpn(name, num_classes=0)
    variables = timm_to_flax(numpy_state_dict(reference), name)
    x = image_batch((2, 96, 80, 3))

    pooled_model, _ = dpn_jax.create_model(name, num_classes=0)
    assert relative_error(pooled_model.apply(variables, x), run_timm(reference, x)) <= 1e-4

    features_model, _ = dpn_jax.create_model(name, num_classes=0, features_only=True)
    maps = features_model.apply(variables, x)
    timm_features = random_timm_dpn(name, features_only=True)
    renamed = {k.replace("features.", "features_", 1): v for k, v in reference.state_dict().items()}
    wanted_keys = timm_features.state_dict().keys()
    timm_features.load_state_dict(
        {k: v for k, v in renamed.items() if k in wanted_keys}, strict=True
    )
    expected = run_timm(timm_features, x)
    assert [m.shape[-1] for m in maps] == [info["num_chs"] for info in dpn_jax.feature_info(name)]
    for i, (actual, wanted) in enumerate(zip(maps, expected)):
        assert actual.shape == wanted.shape, i
        assert relative_error(actual, wanted) <= 1e-4, i

    final_map = pooled_model.apply(variables, x, method=pooled_model.forward_features)
    assert relative_error(final_map, run_timm_forward_features(reference, x)) <= 1e-4


def run_timm_forward_features(model, x_nhwc):
    with torch.no_grad():
        out = model.forward_features(torch.from_numpy(x_nhwc.transpose(0, 3, 1, 2).copy()))
    return out.numpy().transpose(0, 2, 3, 1)


SHALLOW = {"k_sec": (1, 2, 1, 1)}  # every block type, a fraction of the compile time


@pytest.mark.parametrize("name", ["dpn68b", "dpn48b", "dpn92"])
def test_train_mode_matches_timm_outputs_and_running_stats(name):
    """Batch statistics in the forward, PyTorch's momentum-0.1 unbiased running-stat update."""
    reference = random_timm_dpn(name, num_classes=10, **SHALLOW)
    variables = timm_to_flax(numpy_state_dict(reference), name, **SHALLOW)
    model, _ = dpn_jax.create_model(name, num_classes=10, **SHALLOW)
    x = image_batch((4, 64, 64, 3))

    logits, updated = model.apply(variables, x, train=True, mutable=["batch_stats"])
    reference.train()
    expected_logits = run_timm(reference, x)
    assert relative_error(logits, expected_logits) <= 1e-4

    expected_stats = timm_to_flax(numpy_state_dict(reference), name, **SHALLOW)["batch_stats"]
    for (path, actual), wanted in zip(
        jax.tree_util.tree_flatten_with_path(updated["batch_stats"])[0],
        jax.tree_util.tree_leaves(expected_stats),
    ):
        np.testing.assert_allclose(actual, wanted, rtol=1e-4, atol=1e-5, err_msg=str(path))


def test_train_mode_gradients_match_timm_in_float32():
    """The float32 gradients of a train-mode forward, within float32 rounding of timm's autograd
    in float64. On CPU this is a training step's path, BatchNorm's channel sums in dpn_jax's
    kernel where it is built (test_torch_parity.py compares whole steps in float64, which
    reduce with XLA). timm's own float32 gradients land 3e-2 from its float64 ones here."""
    reference = random_timm_dpn("dpn68b", num_classes=10, **SHALLOW)
    variables = timm_to_flax(numpy_state_dict(reference), "dpn68b", **SHALLOW)
    model, _ = dpn_jax.create_model("dpn68b", num_classes=10, **SHALLOW)
    x = image_batch((4, 64, 64, 3))
    weights = np.random.default_rng(1).standard_normal((4, 10)).astype(np.float32)

    def loss(params):
        logits, _ = model.apply(
            {**variables, "params": params}, x, train=True, mutable=["batch_stats"]
        )
        return jnp.sum(logits * weights)

    grad_fn = jax.jit(jax.grad(loss))
    if cpu_kernels_available():
        assert "dpn_channel_sums" in grad_fn.lower(variables["params"]).compile().as_text()
    grads = grad_fn(variables["params"])

    reference.double().train()
    x_nchw = torch.from_numpy(np.ascontiguousarray(x.transpose(0, 3, 1, 2))).double()
    (reference(x_nchw) * torch.from_numpy(weights).double()).sum().backward()
    torch_grads = {name: p.grad.numpy() for name, p in reference.named_parameters()}
    expected = timm_to_flax({**numpy_state_dict(reference), **torch_grads}, "dpn68b", **SHALLOW)
    for (path, actual), wanted in zip(
        jax.tree_util.tree_flatten_with_path(grads)[0],
        jax.tree_util.tree_leaves(expected["params"]),
    ):
        assert relative_error(actual, wanted) <= 1e-3, jax.tree_util.keystr(path)


def test_bfloat16_forward_is_close_to_float32():
    """bf16 compute with float32 params/statistics; measured: ~1e-2 of the logit range."""
    reference = random_timm_dpn("dpn68", num_classes=100, **SHALLOW)
    variables = timm_to_flax(numpy_state_dict(reference), "dpn68", **SHALLOW)
    x = image_batch((4, 96, 96, 3))
    fp32_model, _ = dpn_jax.create_model("dpn68", num_classes=100, **SHALLOW)
    bf16_model, _ = dpn_jax.create_model("dpn68", num_classes=100, dtype=jnp.bfloat16, **SHALLOW)
    fp32 = fp32_model.apply(variables, x)
    bf16 = bf16_model.apply(variables, x)
    assert bf16.dtype == jnp.float32  # logits are returned in float32
    assert relative_error(bf16, fp32) <= 5e-2
    _, stats = bf16_model.apply(variables, x, train=True, mutable=["batch_stats"])
    assert all(leaf.dtype == jnp.float32 for leaf in jax.tree_util.tree_leaves(stats))


def test_bfloat16_backward_saves_no_float32_activations(capsys):
    """Mixed precision saves bf16 activations for the backward pass: a float32 copy kept per
    BatchNorm made dpn92's bf16 train step peak 16% higher on an H100 (BENCHMARKS.md)."""
    model, variables = dpn_jax.create_model("dpn68", num_classes=10, dtype=jnp.bfloat16, **SHALLOW)
    x = image_batch((2, 64, 64, 3))

    def loss(params):
        logits, _ = model.apply(
            dict(variables, params=params), x, train=True, mutable=["batch_stats"]
        )
        return logits.sum()

    jax.ad_checkpoint.print_saved_residuals(loss, variables["params"])
    saved = capsys.readouterr().out.splitlines()
    assert any(line.startswith("bf16[2,") for line in saved), saved[:5]
    float32_activations = [line for line in saved if line.startswith("f32[2,")]
    assert not float32_activations, float32_activations[:3]


def test_elu_head_matches_timm_with_elu_final_activation():
    """`head_act='elu'` reproduces timm <= 0.6.13's head, which dpn68b.ra_in1k was trained with."""
    reference = random_timm_dpn("dpn68b", num_classes=10, **SHALLOW)
    reference.features.conv5_bn_ac.bn.act = torch.nn.ELU()
    variables = timm_to_flax(numpy_state_dict(reference), "dpn68b", **SHALLOW)
    model, _ = dpn_jax.create_model("dpn68b", num_classes=10, head_act="elu", **SHALLOW)
    x = image_batch((2, 64, 64, 3))
    assert relative_error(model.apply(variables, x), run_timm(reference, x)) <= 1e-4
    default_model, _ = dpn_jax.create_model("dpn68b", num_classes=10, **SHALLOW)
    assert relative_error(default_model.apply(variables, x), run_timm(reference, x)) > 1e-3


@pytest.mark.parametrize("name", ["dpn68b", "dpn92"])
def test_state_dict_round_trip_is_bit_identical(name):
    reference = random_timm_dpn(name)
    original = numpy_state_dict(reference)
    back = flax_to_timm(timm_to_flax(original, name), name)
    assert back.keys() == original.keys()
    for key, value in original.items():
        if not key.endswith("num_batches_tracked"):
            assert back[key].dtype == value.dtype and np.array_equal(back[key], value), key
    import timm

    timm.create_model(name).load_state_dict(
        {k: torch.from_numpy(v) for k, v in back.items()}, strict=True
    )


def test_conversion_errors_name_the_tensor_and_shapes():
    state_dict = numpy_state_dict(random_timm_dpn("dpn68", num_classes=10))
    missing = dict(state_dict)
    del missing["features.conv3_1.c3x3_b.conv.weight"]
    with pytest.raises(
        ConversionError, match=r"missing tensor features\.conv3_1\.c3x3_b\.conv\.weight"
    ):
        timm_to_flax(missing, "dpn68")
    with pytest.raises(ConversionError, match=r"unexpected tensor features\.extra\.weight"):
        timm_to_flax({**state_dict, "features.extra.weight": np.zeros(3)}, "dpn68")
    with pytest.raises(
        ConversionError,
        match=r"tensor features\.conv1_1\.\S+ has shape \(10, ?\S*\), "
        r"dpn92 expects \(64,",
    ):
        timm_to_flax(state_dict, "dpn92")
    without_counters = {
        k: v for k, v in state_dict.items() if not k.endswith("num_batches_tracked")
    }
    timm_to_flax(without_counters, "dpn68")  # num_batches_tracked is optional
