"""How far float32 training lands from float64, in dpn_jax and in PyTorch (BENCHMARKS.md).

    JAX_ENABLE_X64=1 python benchmarks/float32_drift.py [CASE]

Runs one configuration of tests/test_torch_parity.py (default momentum_cosine_ema: SGD
momentum, warm-up + cosine, EMA; 8 steps of batch 4 at 32 px on a tiny converted timm DPN) in
float64 and in float32 on both sides, and prints each float32 run's distance from PyTorch's
float64 run: the largest relative loss difference over the steps, and max |diff| / max |ref|
of the final weights (worst tensor) and of the final eval logits.
"""

import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
import test_torch_parity as parity  # noqa: E402


def worst(ours: dict, reference: dict) -> float:
    return max(parity.relative(ours[k], v) for k, v in reference.items() if "num_batches" not in k)


def main(case: str = "momentum_cosine_ema") -> None:
    double, single = parity.run_case(case, "float64"), parity.run_case(case, "float32")
    reference = double["torch"]
    exact = worst(double["jax"]["final"], reference["final"])
    print(f"{case}: jax float64 vs torch float64, weights {exact:.1e}")
    for side in ("jax", "torch"):
        run = single[side]
        loss = np.max(np.abs(np.asarray(run["losses"]) / reference["losses"] - 1))
        print(
            f"{side} float32 vs torch float64: loss {loss:.3f}, weights "
            f"{worst(run['final'], reference['final']):.3f}, "
            f"logits {parity.relative(run['logits'], reference['logits']):.3f}"
        )


if __name__ == "__main__":
    main(*sys.argv[1:])
