"""The NNX model (`dpn_jax.nnx`) against the Linen one and timm; timm's research API on both."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
import torch
from flax import nnx
from jax.sharding import Mesh
from jax.sharding import PartitionSpec as P
from test_parity import ALL_VARIANTS, SHALLOW, image_batch
from timm_reference import numpy_state_dict, random_timm_dpn, relative_error, run_timm

import dpn_jax
from dpn_jax import nnx as dpn_nnx
from dpn_jax.errors import ConfigError
from dpn_jax.weights.convert import timm_to_flax

TINY = {"k_sec": (1, 1, 1, 1), "num_classes": 10}


def nnx_from_timm(name: str, reference: torch.nn.Module, **kwargs) -> dpn_nnx.DPN:
    """The NNX model holding `reference`'s weights (`kwargs`: its architecture overrides)."""
    arch = {k: v for k, v in kwargs.items() if k in dpn_jax.DPNConfig.__dataclass_fields__}
    module, _ = dpn_jax.create_model(name, **kwargs)
    variables = timm_to_flax(numpy_state_dict(reference), name, **arch)
    return dpn_nnx.DPN(module, variables, architecture=name)


def bits_equal(a, b) -> bool:
    return all(
        x.dtype == y.dtype and np.array_equal(np.asarray(x), np.asarray(y))
        for x, y in zip(jax.tree_util.tree_leaves(a), jax.tree_util.tree_leaves(b), strict=True)
    )


# --- the same numbers as Linen and timm -----------------------------------------------------


@pytest.mark.parametrize("name", ALL_VARIANTS)
def test_nnx_logits_are_linen_bits_and_match_timm(name):
    """Every variant's widths, groups, growth and activations, with one block per stage kind
    (SHALLOW; test_parity covers full depth on Linen, which the NNX forward runs, and the slow
    test below dpn68 at 224): the jitted NNX logits are the jitted Linen logits bit for bit,
    and timm's to 1e-4, at an odd size."""
    reference = random_timm_dpn(name, num_classes=10, **SHALLOW)
    model = nnx_from_timm(name, reference, num_classes=10, **SHALLOW)
    linen, variables = model.to_linen()
    nnx_forward = nnx.jit(lambda m, x: m(x))
    linen_forward = jax.jit(lambda v, x: linen.apply(v, x))
    x = image_batch((1, 67, 45, 3))
    logits = nnx_forward(model, x)
    assert bits_equal(logits, linen_forward(variables, x))
    assert relative_error(logits, run_timm(reference, x)) <= 1e-4


@pytest.mark.slow
def test_full_depth_nnx_logits_at_224_are_linen_bits_and_match_timm():
    reference = random_timm_dpn("dpn68", num_classes=1000)
    model = nnx_from_timm("dpn68", reference)
    linen, variables = model.to_linen()
    for shape in [(1, 224, 224, 3), (1, 193, 161, 3)]:
        x = image_batch(shape)
        logits = nnx.jit(lambda m, x: m(x))(model, x)
        assert bits_equal(logits, jax.jit(linen.apply)(variables, x)), shape
        assert relative_error(logits, run_timm(reference, x)) <= 1e-4, shape


@pytest.mark.parametrize("name", ["dpn68b"])  # test_parity: more variants on Linen
def test_train_mode_outputs_and_running_stats_match_timm(name):
    """model.train(): batch statistics in the forward and PyTorch's running-stat update,
    written back into the NNX state; model.eval() then uses them."""
    reference = random_timm_dpn(name, num_classes=10, **SHALLOW)
    model = nnx_from_timm(name, reference, num_classes=10, **SHALLOW)
    x = image_batch((4, 64, 64, 3))
    model.train()
    logits = model(x)
    reference.train()
    assert relative_error(logits, run_timm(reference, x)) <= 1e-4
    expected = timm_to_flax(numpy_state_dict(reference), name, **SHALLOW)["batch_stats"]
    actual = model.linen_variables()["batch_stats"]
    for (path, a), b in zip(
        jax.tree_util.tree_flatten_with_path(actual)[0], jax.tree_util.tree_leaves(expected)
    ):
        np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-5, err_msg=str(path))
    model.eval()
    reference.eval()
    assert relative_error(model(x), run_timm(reference, x)) <= 1e-4


# --- interop: Linen variables, ModelDir, NNX state ------------------------------------------


def test_state_paths_carry_timm_names_and_split_merge_round_trips():
    model = dpn_nnx.create_model("dpn68b", **TINY)
    params = nnx.to_pure_dict(nnx.state(model, nnx.Param))
    assert params["features"]["conv3_1"]["c3x3_b"]["conv"]["kernel"].shape == (3, 3, 8, 256)
    assert set(nnx.to_pure_dict(nnx.state(model, nnx.BatchStat))["features"]["conv1_1"]["bn"]) == {
        "mean",
        "var",
    }
    x = image_batch((2, 32, 32, 3))
    graphdef, state = nnx.split(model)
    assert bits_equal(nnx.merge(graphdef, state)(x), model(x))


def test_linen_nnx_model_dir_linen_round_trip_is_bit_identical(tmp_path):
    """Linen -> NNX -> ModelDir on disk -> Linen (and back into NNX, by directory or by
    create_model's `pretrained=`), every array bit for bit; the NNX model's directory is
    what train.py writes and every tool reads (ModelDir.load checks it)."""
    linen, variables = dpn_jax.create_model("dpn68", rng=jax.random.PRNGKey(3), **TINY)
    variables = jax.tree_util.tree_map(  # non-trivial statistics
        lambda v: v + np.float32(0.25), variables
    )
    model = dpn_nnx.DPN(linen, variables, architecture="dpn68.mx_in1k")
    assert bits_equal(model.linen_variables(), variables)
    path = model.to_model_dir(class_names=tuple("abcdefghij")).save(tmp_path / "model")
    loaded = dpn_jax.ModelDir.load(path)
    assert loaded.model_kwargs == {"k_sec": (1, 1, 1, 1)} and loaded.num_classes == 10
    assert bits_equal(loaded.variables, variables)
    _, from_create = dpn_jax.create_model("dpn68", pretrained=path, **TINY)
    assert bits_equal(from_create, variables)
    for back in (
        dpn_nnx.load_model_dir(path),
        dpn_nnx.create_model("dpn68", pretrained=path, **TINY),
    ):
        assert bits_equal(back.linen_variables(), variables)
        assert back.module.config == linen.config
        assert back.preprocessing == loaded.preprocessing


def test_create_model_gives_the_linen_weights_and_names_bad_arguments():
    model = dpn_nnx.create_model("dpn48b", rng=jax.random.PRNGKey(5), **TINY)
    _, variables = dpn_jax.create_model("dpn48b", rng=jax.random.PRNGKey(5), **TINY)
    assert bits_equal(model.linen_variables(), variables)
    assert model.module.config.act == "silu"
    with pytest.raises(ConfigError, match="unknown model argument 'depth'"):
        dpn_nnx.create_model("dpn68", depth=3)
    with pytest.raises(ConfigError, match="unknown variable collection 'cache'"):
        dpn_nnx.DPN(model.module, {**variables, "cache": {}}, architecture="dpn48b")


# --- training as NNX users write it ----------------------------------------------------------


def cross_entropy(logits, labels):
    return optax.softmax_cross_entropy_with_integer_labels(logits, labels).mean()


def test_nnx_sgd_steps_equal_the_linen_steps():
    """nnx.Optimizer + nnx.jit in train mode (BatchNorm statistics, dropout keys from nnx.Rngs)
    against a Linen step with the same optax SGD, batches and dropout keys."""
    kwargs = dict(TINY, drop_rate=0.5)
    model = dpn_nnx.create_model("dpn68", rngs=nnx.Rngs(dropout=7), **kwargs)
    linen, variables = dpn_jax.create_model("dpn68", **kwargs)
    tx = optax.sgd(0.05, momentum=0.9)
    rng = np.random.default_rng(0)
    batches = [
        (rng.standard_normal((4, 32, 32, 3), np.float32), rng.integers(0, 10, 4)) for _ in range(3)
    ]

    model.train()
    optimizer = nnx.Optimizer(model, tx, wrt=nnx.Param)

    @nnx.jit
    def nnx_step(model, optimizer, x, y):
        loss, grads = nnx.value_and_grad(lambda m: cross_entropy(m(x), y))(model)
        optimizer.update(model, grads)
        return loss

    @jax.jit
    def linen_step(params, stats, opt_state, x, y, key):
        def loss_fn(params):
            logits, updates = linen.apply(
                {"params": params, "batch_stats": stats},
                x,
                train=True,
                rngs={"dropout": key},
                mutable=["batch_stats"],
            )
            return cross_entropy(logits, y), updates["batch_stats"]

        (loss, stats), grads = jax.value_and_grad(loss_fn, has_aux=True)(params)
        updates, opt_state = tx.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), stats, opt_state, loss

    params, stats = variables["params"], variables["batch_stats"]
    opt_state = tx.init(params)
    keys = nnx.Rngs(dropout=7)  # the stream the NNX model draws from
    for x, y in batches:
        nnx_loss = nnx_step(model, optimizer, x, y)
        params, stats, opt_state, loss = linen_step(params, stats, opt_state, x, y, keys.dropout())
        np.testing.assert_allclose(nnx_loss, loss, rtol=1e-6)
    trained = model.linen_variables()
    assert not bits_equal(trained["params"], variables["params"])  # it did train
    linen_trained = {"params": params, "batch_stats": stats}
    for a, b in zip(jax.tree_util.tree_leaves(trained), jax.tree_util.tree_leaves(linen_trained)):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)


def test_shard_map_sgd_step_averages_batch_norm_over_the_mesh_axis():
    """An SGD step under nnx.shard_map over 4 devices, the batch split, `axis_name` the mesh
    axis: loss, parameters and running statistics are those of the whole batch on one device
    (cross-replica BatchNorm, gradients averaged with pmean)."""
    mesh = Mesh(np.asarray(jax.devices()[:4]), ("batch",))
    sharded = dpn_nnx.create_model("dpn68", axis_name="batch", **TINY)
    single = dpn_nnx.create_model("dpn68", **TINY)
    rng = np.random.default_rng(1)
    x, y = rng.standard_normal((8, 32, 32, 3), np.float32), rng.integers(0, 10, 8)
    losses = []
    for model, parallel in ((sharded, True), (single, False)):
        model.train()
        optimizer = nnx.Optimizer(model, optax.sgd(0.1), wrt=nnx.Param)

        def step(model, optimizer, x, y, parallel=parallel):
            loss, grads = nnx.value_and_grad(lambda m: cross_entropy(m(x), y))(model)
            if parallel:
                loss, grads = jax.lax.pmean((loss, grads), "batch")
            optimizer.update(model, grads)
            return loss

        if parallel:  # check_vma=False: per-device gradients until the pmean
            step = nnx.shard_map(
                step,
                mesh=mesh,
                in_specs=(P(), P(), P("batch"), P("batch")),
                out_specs=P(),
                check_vma=False,
            )
        losses.append(nnx.jit(step)(model, optimizer, x, y))
    np.testing.assert_allclose(*losses, rtol=1e-5)
    for a, b in zip(
        jax.tree_util.tree_leaves(sharded.linen_variables()),
        jax.tree_util.tree_leaves(single.linen_variables()),
    ):
        np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-5)


def test_train_and_eval_switch_batch_norm_and_dropout():
    model = dpn_nnx.create_model("dpn68", drop_rate=0.5, **TINY)
    x = image_batch((2, 32, 32, 3))
    before = jax.device_get(model.linen_variables()["batch_stats"])  # a copy: state mutates
    assert bits_equal(model(x), model(x))  # eval by default: deterministic, stats untouched
    assert bits_equal(model.linen_variables()["batch_stats"], before)
    model.train()
    assert not bits_equal(model(x), model(x))  # a new dropout key per call
    assert not bits_equal(model.linen_variables()["batch_stats"], before)
    model.eval()
    assert bits_equal(model(x), model(x))
    model.set_attributes(deterministic=False)
    with pytest.raises(ConfigError, match="use_running_average and deterministic differ"):
        model(x)


# --- timm's research API -----------------------------------------------------------------------


@pytest.fixture(scope="module")
def timm_pair():
    reference = random_timm_dpn("dpn68b", num_classes=10, **SHALLOW)
    return reference, nnx_from_timm("dpn68b", reference, num_classes=10, **SHALLOW)


def to_nchw(x):
    return torch.from_numpy(np.ascontiguousarray(np.asarray(x).transpose(0, 3, 1, 2)))


def test_forward_features_and_head_match_timm(timm_pair):
    reference, model = timm_pair
    x = image_batch((2, 64, 48, 3))
    features = model.forward_features(x)
    with torch.no_grad():
        timm_features = reference.forward_features(to_nchw(x))
        timm_pooled = reference.forward_head(timm_features, pre_logits=True).numpy()
        timm_logits = reference.forward_head(timm_features).numpy()
    assert relative_error(features, timm_features.numpy().transpose(0, 2, 3, 1)) <= 1e-4
    assert relative_error(model.forward_head(features, pre_logits=True), timm_pooled) <= 1e-4
    assert relative_error(model.forward_head(features), timm_logits) <= 1e-4
    linen, variables = model.to_linen()  # the same methods on the Linen module
    assert bits_equal(linen.apply(variables, x, method=linen.forward_features), features)


def test_forward_intermediates_match_timm_features_only_and_ours(timm_pair):
    reference, model = timm_pair
    x = image_batch((2, 64, 48, 3))
    timm_features = random_timm_dpn("dpn68b", features_only=True, **SHALLOW)
    renamed = {k.replace("features.", "features_", 1): v for k, v in reference.state_dict().items()}
    wanted = timm_features.state_dict().keys()
    timm_features.load_state_dict({k: v for k, v in renamed.items() if k in wanted}, strict=True)
    with torch.no_grad():
        expected = [t.numpy() for t in timm_features(to_nchw(x))]  # NCHW, timm's layout

    final, taps = model.forward_intermediates(x, output_fmt="NCHW")
    assert [t.shape[1] for t in taps] == [i["num_chs"] for i in model.feature_info]
    for i, (actual, wanted_map) in enumerate(zip(taps, expected, strict=True)):
        assert relative_error(actual, wanted_map) <= 1e-4, i
    assert bits_equal(final, model.forward_features(x))

    linen, variables = model.to_linen()
    features_only = linen.clone(features_only=True, out_indices=(1, 3))
    ours = features_only.apply(variables, x)
    picked = model.forward_intermediates(x, indices=[1, -2], intermediates_only=True)
    assert bits_equal(picked, ours)
    last_two = model.forward_intermediates(x, indices=2, intermediates_only=True)
    assert bits_equal(last_two[0], ours[1])

    early_final, early = model.forward_intermediates(x, indices=[2], stop_early=True)
    assert bits_equal(early[0], taps_nhwc(taps)[2]) and bits_equal(early_final, early[0])
    normed = model.forward_intermediates(x, indices=[4], norm=True, intermediates_only=True)
    assert bits_equal(normed[0], final)
    with pytest.raises(ConfigError, match="feature index 5 out of range"):
        model.forward_intermediates(x, indices=[5])
    with pytest.raises(ConfigError, match="output_fmt='NCWH'"):
        model.forward_intermediates(x, output_fmt="NCWH")


def taps_nhwc(taps):
    return [jnp.transpose(t, (0, 2, 3, 1)) for t in taps]


def test_reset_classifier_matches_timm():
    reference = random_timm_dpn("dpn68", num_classes=10, **SHALLOW)
    model = nnx_from_timm("dpn68", reference, num_classes=10, **SHALLOW)
    x = image_batch((2, 64, 64, 3))
    width = model.feature_info[-1]["num_chs"]
    model.reset_classifier(0)
    reference.reset_classifier(0)
    assert model(x).shape == (2, width) and "classifier" not in nnx.to_pure_dict(nnx.state(model))
    assert relative_error(model(x), run_timm(reference, x)) <= 1e-4

    model.reset_classifier(7)
    reference.reset_classifier(7)
    assert model.num_classes == 7 and model(x).shape == (2, 7)
    kernel = model.classifier["kernel"][...]
    assert kernel.shape == (width, 7)
    assert abs(float(kernel.std()) * width**0.5 - 1) < 0.2  # LeCun normal, as a fresh model's
    weight = reference.classifier.weight.detach().numpy()[:, :, 0, 0]  # timm's head: a 1x1 conv
    model.classifier["kernel"][...] = weight.T
    model.classifier["bias"][...] = reference.classifier.bias.detach().numpy()
    assert relative_error(model(x), run_timm(reference, x)) <= 1e-4


def test_grad_checkpointing_is_remat():
    """set_grad_checkpointing() puts each block under jax.checkpoint in the gradient
    (test_models checks remat's gradients against the plain model's)."""
    model = dpn_nnx.create_model("dpn68", **TINY)
    x = image_batch((2, 32, 32, 3))

    def remat_count(model):
        jaxpr = jax.make_jaxpr(lambda m: nnx.grad(lambda m: m(x).sum())(m))(model)
        return str(jaxpr).count("= remat2[")  # jax.checkpoint in a jaxpr

    plain = remat_count(model)
    model.set_grad_checkpointing()
    assert plain == 0 and model.module.remat and remat_count(model) == 4  # one per block
    linen = dpn_jax.create_model("dpn68", **TINY)[0]
    assert linen.set_grad_checkpointing().remat and not linen.remat  # a new Linen module
