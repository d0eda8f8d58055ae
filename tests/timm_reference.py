"""The real timm DPN as the reference: randomly initialised, with BatchNorm made non-trivial."""

from __future__ import annotations

import numpy as np
import timm
import torch


def random_timm_dpn(name: str, seed: int = 0, **kwargs) -> torch.nn.Module:
    """timm model in eval mode whose BatchNorms are not identities (random stats and affine)."""
    torch.manual_seed(seed)
    model = timm.create_model(name, **kwargs)
    norms = [m for m in model.modules() if isinstance(m, torch.nn.BatchNorm2d)]
    # Every running_var in the state dict belongs to a norm randomised here (else the parity
    # tests would compare identity BatchNorms, e.g. if timm changed its norm classes).
    assert len(norms) == sum(k.endswith("running_var") for k in model.state_dict()), name
    for module in norms:
        module.weight.data.uniform_(0.5, 1.5)
        module.bias.data.normal_(0.0, 0.2)
        module.running_mean.data.normal_(0.0, 0.2)
        module.running_var.data.uniform_(0.5, 1.5)
        module.num_batches_tracked.fill_(int(torch.randint(1, 1000, ())))
    return model.eval()


def numpy_state_dict(model: torch.nn.Module) -> dict[str, np.ndarray]:
    return {k: v.detach().cpu().numpy() for k, v in model.state_dict().items()}


def run_timm(model: torch.nn.Module, x_nhwc: np.ndarray):
    """Forward an NHWC batch through timm; outputs come back NHWC (maps) or (N, C)."""
    with torch.no_grad():
        out = model(torch.from_numpy(np.ascontiguousarray(x_nhwc.transpose(0, 3, 1, 2))))
    to_numpy = lambda t: t.numpy().transpose(0, 2, 3, 1) if t.ndim == 4 else t.numpy()
    return [to_numpy(t) for t in out] if isinstance(out, (list, tuple)) else to_numpy(out)


def relative_error(actual: np.ndarray, expected: np.ndarray) -> float:
    """max |diff| / max |expected|: the issue's parity metric."""
    return float(
        np.max(np.abs(np.asarray(actual, np.float64) - expected)) / np.max(np.abs(expected))
    )
