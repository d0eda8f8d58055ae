"""Model construction by keyword (`DPNConfig`, `create_model`), the fast initialiser against
`model.init`, and rematerialisation against the plain model."""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import dpn_jax
from dpn_jax.errors import ConfigError
from dpn_jax.models.dpn import DPNFeatures
from dpn_jax.models.registry import init_variables

TINY = {"k_sec": (1, 1, 1, 1)}
# These tests compare semantics, not speed: unoptimised XLA compiles the initialisers and
# gradients several times faster.
FAST_COMPILE = {"xla_backend_optimization_level": 0}


# --- one architecture config, construction by keyword ------------------------------------


def test_config_is_shared_by_dpn_and_features_and_accepts_json_lists():
    config = dpn_jax.MODEL_CONFIGS["dpn68"].replace(k_sec=[1, 1, 1, 1], inc_sec=[8, 8, 8, 8])
    assert config.k_sec == (1, 1, 1, 1) and config.inc_sec == (8, 8, 8, 8)  # tuples: hashable
    assert hash(config) == hash(dataclasses.replace(config))
    model = dpn_jax.DPN(config=config, num_classes=3)
    x = jnp.zeros((1, 32, 32, 3))
    shapes = jax.eval_shape(lambda: model.init(jax.random.key(0), x))
    features = DPNFeatures(config=config)
    feature_shapes = jax.eval_shape(lambda: features.init(jax.random.key(0), x))
    assert jax.tree_util.tree_structure(
        shapes["params"]["features"]
    ) == jax.tree_util.tree_structure(feature_shapes["params"])
    assert config.overrides_from(dpn_jax.MODEL_CONFIGS["dpn68"]) == {
        "k_sec": (1, 1, 1, 1),
        "inc_sec": (8, 8, 8, 8),
    }


@pytest.mark.parametrize(
    "overrides, message",
    [
        ({"k_sec": (1, 1, 1)}, "k_sec must be 4 positive integers"),
        ({"inc_sec": (8, 8, 0, 8)}, "inc_sec must be 4 positive integers"),
        ({"k_r": 12.5}, "k_r must be a positive integer"),
        ({"small": "yes"}, "small must be true or false"),
        ({"act": "tanh"}, "act must be one of"),
        ({"head_act": "softmax"}, "head_act must be one of"),
        ({"groups": 7}, "k_r=128 must be divisible by groups=7"),
        ({"k_secs": (1, 1, 1, 1)}, "unknown architecture field 'k_secs'"),
    ],
)
def test_bad_architecture_fields_are_named(overrides, message):
    with pytest.raises(ConfigError, match=message) as error:
        dpn_jax.MODEL_CONFIGS["dpn68"].replace(**overrides)
    assert "\n" not in str(error.value)


def test_create_model_takes_architecture_and_module_fields_and_names_unknown_ones():
    model, _ = dpn_jax.create_model(
        "dpn68b",
        num_classes=5,
        head_act="elu",
        remat=True,
        dtype=jnp.bfloat16,
        axis_name="batch",
        **TINY,
    )
    assert model.config == dpn_jax.MODEL_CONFIGS["dpn68b"].replace(head_act="elu", **TINY)
    assert (model.num_classes, model.remat, model.dtype, model.axis_name) == (
        5,
        True,
        jnp.bfloat16,
        "batch",
    )
    with pytest.raises(
        ConfigError,
        match="unknown model argument 'num_class' for dpn68; "
        "architecture fields: k_sec, .*; model fields: "
        "num_classes, ",
    ) as error:
        dpn_jax.create_model("dpn68", num_class=5)
    assert "\n" not in str(error.value)
    with pytest.raises(ConfigError, match="unknown model 'dpn69'"):
        dpn_jax.create_model("dpn69")


def test_dpn_needs_its_config_by_keyword():
    with pytest.raises(TypeError):
        dpn_jax.DPN()  # no silent default architecture


# --- init_variables is model.init in tree and distribution ---------------------------------

INIT_CASES = {
    "dpn68 with a head": ("dpn68", {"num_classes": 10}),
    "dpn48b features_only": ("dpn48b", {"features_only": True}),
    "dpn92 num_classes=0": ("dpn92", {"num_classes": 0}),
}


def _leaves(tree) -> dict[str, np.ndarray]:
    return {
        jax.tree_util.keystr(path): np.asarray(leaf)
        for path, leaf in jax.tree_util.tree_flatten_with_path(tree)[0]
    }


@pytest.mark.parametrize("case", sorted(INIT_CASES))
def test_init_variables_equals_model_init_in_tree_and_distribution(case):
    arch, fields = INIT_CASES[case]
    model = dpn_jax.create_model(arch, **TINY, **fields)[0]
    fast = _leaves(init_variables(model, jax.random.key(1)))
    model_init = jax.jit(
        lambda r: model.init(r, jnp.zeros((1, 32, 32, 3))), compiler_options=FAST_COMPILE
    )
    slow = _leaves(model_init(jax.random.key(2)))

    assert list(fast) == list(slow)  # the same paths, in the same order
    assert {k: (v.shape, v.dtype) for k, v in fast.items()} == {
        k: (v.shape, v.dtype) for k, v in slow.items()
    }
    assert any("classifier" in k for k in fast) == (
        fields.get("num_classes", 1000) > 0 and not fields.get("features_only", False)
    )
    kernels = 0
    for name, value in fast.items():
        reference = slow[name]
        if not name.endswith("['kernel']"):  # BatchNorm scale/var ones, bias/mean zeros
            np.testing.assert_array_equal(value, reference, err_msg=name)
            assert np.all(value == (1 if name.endswith(("['scale']", "['var']")) else 0)), name
            continue
        kernels += 1
        # Same zero-mean normal: the sample stds of n draws each agree within ~5 / sqrt(n).
        n = value.size
        assert abs(np.std(value) / np.std(reference) - 1) < 5 / np.sqrt(n), name
        assert abs(np.mean(value)) < 5 * np.std(reference) / np.sqrt(n), name
        assert not np.array_equal(value, reference), name
    assert kernels >= 10


def test_init_variables_is_reproducible_per_key():
    model = dpn_jax.create_model("dpn68", num_classes=4, **TINY)[0]
    first, again, other = (
        _leaves(init_variables(model, jax.random.key(seed))) for seed in (0, 0, 1)
    )
    for name, value in first.items():
        np.testing.assert_array_equal(value, again[name], err_msg=name)
    assert not np.array_equal(
        first["['params']['classifier']['kernel']"], other["['params']['classifier']['kernel']"]
    )


# --- remat -----------------------------------------------------------------------------------


def test_remat_gives_the_same_outputs_statistics_and_gradients():
    plain, variables = dpn_jax.create_model("dpn68", num_classes=10, k_sec=(1, 2, 1, 1))
    remat = dpn_jax.create_model("dpn68", num_classes=10, k_sec=(1, 2, 1, 1), remat=True)[0]
    x = np.random.default_rng(0).standard_normal((2, 32, 32, 3)).astype(np.float32)

    def loss_and_grads(model):
        def loss(params):
            logits, updated = model.apply(
                {**variables, "params": params}, x, train=True, mutable=["batch_stats"]
            )
            return jnp.sum(logits * jnp.arange(10)), (logits, updated)

        return jax.value_and_grad(loss, has_aux=True)

    def remat_calls(model) -> int:
        return str(jax.make_jaxpr(loss_and_grads(model))(variables["params"])).count("remat")

    assert remat_calls(remat) > remat_calls(plain)  # remat=True puts the blocks under it
    results = [
        jax.jit(loss_and_grads(model), compiler_options=FAST_COMPILE)(variables["params"])
        for model in (plain, remat)
    ]
    expected, actual = (_leaves(r) for r in results)
    assert list(actual) == list(expected)
    for name, value in expected.items():
        np.testing.assert_allclose(actual[name], value, rtol=1e-5, atol=1e-6, err_msg=name)
