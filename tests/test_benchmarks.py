"""benchmarks/benchmark.py's FLOP counts: the reference agrees with timm's published GMACs, a
training step counts forward + two gradients, XLA's count of a compiled step is read; and
benchmarks/peak_flops.py's matmul rates.

benchmarks/ is not a package: the script is loaded from its file, as its workers run it.
"""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
# timm's benchmark CSV, /work/shared/reference/timm-dpn-facts.md ("GMACs at 224").
TIMM_GMACS_224 = {"dpn68": 2.35, "dpn92": 6.54}


@pytest.fixture(scope="module")
def benchmark():
    spec = importlib.util.spec_from_file_location("benchmark", ROOT / "benchmarks/benchmark.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # its dataclasses look their module up
    spec.loader.exec_module(module)
    return module


@pytest.mark.parametrize("model", sorted(TIMM_GMACS_224))
def test_reference_flops_give_timms_gmacs(benchmark, model):
    gmacs = benchmark.reference_flops(model, 224, "infer") / 2e9
    assert gmacs == pytest.approx(TIMM_GMACS_224[model], rel=0.03)


def test_training_flops_are_the_forward_and_two_gradients(benchmark):
    """Each convolution's input and weight gradients cost its forward again (less the stem's
    input gradient, which the image does not need): torch's own formula counts the grouped
    convolutions' weight gradients 32x over and gives ~7.2x."""
    forward = benchmark.reference_flops("dpn68", 224, "infer")
    train = benchmark.reference_flops("dpn68", 224, "train")
    assert 2.99 < train / forward < 3.0


def test_xla_flops_per_image(benchmark):
    """XLA's count of a matmul is its arithmetic (2 FLOPs per multiply-add), per image; a dpn_jax
    model's count is read as well."""
    import jax
    import jax.numpy as jnp

    import dpn_jax

    images, weights = jnp.zeros((4, 64)), jnp.zeros((64, 32))
    matmul = jax.jit(jnp.dot).lower(images, weights).compile()
    assert benchmark.xla_flops_per_image(matmul, 4) == 2 * 64 * 32

    model, variables = dpn_jax.create_model("dpn68", num_classes=10, k_sec=(1, 1, 1, 1))
    apply = jax.jit(lambda v, x: model.apply(v, x, train=False))
    compiled = apply.lower(variables, jnp.zeros((2, 32, 32, 3))).compile()
    assert benchmark.xla_flops_per_image(compiled, 2) > 0


def test_table_and_json_carry_gflop_per_s(benchmark, capsys):
    result = benchmark.Result("timm_compile", "infer", "dpn68", 16, 224, img_per_s=40.0)
    benchmark._add_flops([result], {"infer": 4.65e9, "train": 14e9})
    assert result.gflop_per_s == pytest.approx(186.0)
    benchmark.print_table([result])
    row = capsys.readouterr().out.splitlines()[-1]
    assert row.split()[-3:] == ["4.65", "-", "186.0"]


@pytest.fixture(scope="module")
def peak_flops(benchmark):
    """Loaded after `benchmark`, which it imports by that name."""
    spec = importlib.util.spec_from_file_location("peak_flops", ROOT / "benchmarks/peak_flops.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.parametrize("engine", ["jax_dot", "torch_mm"])
def test_peak_flops_times_rounds_of_matmuls(peak_flops, engine):
    rates = peak_flops.measure(engine, 128, rounds=2, round_seconds=0.01)
    assert len(rates) == 2 and all(rate > 0.1 for rate in rates)  # GFLOP/s, not FLOP/s


def test_peak_flops_table(peak_flops, capsys):
    row = dict(engine="torch_mm", cores=2, size=4096, gflop_per_s=190.0, gflop_per_s_per_core=95.0)
    peak_flops.print_table([row], dict(model_name="cpu", cpus=2, mhz=2500.0), 32)
    assert capsys.readouterr().out.splitlines()[3].split() == [
        "torch_mm",
        "2",
        "4096",
        "190.0",
        "95.0",
        "160.0",  # 2.5 GHz x 32 FLOPs per cycle x 2 cores
    ]
