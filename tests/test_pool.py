"""The stem's max pool against PyTorch's `max_pool2d`: values and gradients bit for bit, ties
included (after a ReLU most windows hold several equal maxima), and the plain `reduce_window`
when nothing differentiates it (what the exports lower)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch

from dpn_jax.ops.pool import max_pool


def tied_activations(shape: tuple[int, ...]) -> np.ndarray:
    """ReLU'd values on a coarse grid: many windows hold a tie, at zero and above."""
    x = np.random.default_rng(0).standard_normal(shape).astype(np.float32)
    return np.round(np.maximum(x, 0) * 4) / 4


@pytest.mark.parametrize(
    "shape, window, stride, padding",
    [
        ((2, 16, 16, 5), 3, 2, 1),  # the DPN stem's pool
        ((2, 15, 17, 3), 3, 2, 1),  # odd sizes: the last window overhangs
        ((1, 9, 9, 4), 3, 1, 1),  # overlapping by two
        ((1, 8, 8, 2), 2, 2, 0),  # no overlap, no padding
    ],
)
def test_values_and_gradients_equal_pytorch(shape, window, stride, padding):
    x = tied_activations(shape)
    y, vjp = jax.vjp(lambda x: max_pool(x, window, stride, padding), jnp.asarray(x))
    grad = np.random.default_rng(1).standard_normal(y.shape).astype(np.float32)

    x_torch = torch.tensor(x).permute(0, 3, 1, 2).requires_grad_()
    y_torch = torch.nn.functional.max_pool2d(x_torch, window, stride, padding)
    y_torch.backward(torch.tensor(grad).permute(0, 3, 1, 2))

    np.testing.assert_array_equal(np.asarray(y), y_torch.detach().permute(0, 2, 3, 1).numpy())
    (grad_x,) = vjp(jnp.asarray(grad))
    np.testing.assert_array_equal(np.asarray(grad_x), x_torch.grad.permute(0, 2, 3, 1).numpy())


def test_without_differentiation_it_is_one_reduce_window():
    jaxpr = jax.make_jaxpr(lambda x: max_pool(x, 3, 2, 1))(jnp.zeros((1, 8, 8, 2)))
    assert "reduce_window_max" in str(jaxpr)
