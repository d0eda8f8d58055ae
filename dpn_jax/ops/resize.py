"""Pillow's bilinear and bicubic resizing of RGB images, bit for bit, in dpn_jax's CPU kernels.

The training input pipeline resizes every random-resized crop, and Pillow's resampling is
plain scalar C: on pre-resized images it costs more than decoding the JPEG. `resize_window`
returns Pillow's bytes from `DpnResizeRgb8` (csrc/resize_cpu.cc, a port of Pillow's
Resample.c) in the kernel library `$DPN_JAX_CPU_KERNELS` selects (`cpu_kernels`), reading the
window in place (no crop copy). It falls back to Pillow itself where the library was not built
or is switched off, and for other filters, modes and windows. Pillow has changed its bytes
before (13 reordered the two passes), so the library is used only after it gave the installed
Pillow's bytes on probe windows that cover both orders (`agrees_with_pillow`).
"""

from __future__ import annotations

import ctypes
import functools
import warnings
from collections.abc import Callable

import numpy as np
import PIL
from PIL import Image

from dpn_jax.ops.cpu_kernels import selected_library

# The filters `DpnResizeRgb8` implements (it takes PIL's values for them).
RESIZE_FILTERS = (Image.Resampling.BILINEAR, Image.Resampling.BICUBIC)
# Pillow 13 changed the order of the two passes in some cases, and with it the bytes.
PILLOW_13 = int(PIL.__version__.split(".")[0]) >= 13
_OUT_OF_MEMORY = 2
# Windows (top, left, height, width) and sizes (height, width) of a 48x48 image on which the
# library must give Pillow's bytes before it is used.
_PROBES = (
    ((3, 5, 40, 20), (10, 18)),  # Pillow 13 takes the vertical pass first
    ((5, 3, 20, 40), (18, 10)),  # the horizontal pass first
    ((0, 0, 30, 20), (10, 10)),  # the tie between the two
    ((7, 2, 9, 7), (31, 29)),  # enlarging
    ((1, 1, 37, 23), (37, 41)),  # one pass
)


def library_resize(library: str) -> Callable[..., int]:
    """The `DpnResizeRgb8` function of a kernel library (a path), callable through ctypes."""
    function = ctypes.CDLL(library).DpnResizeRgb8
    function.argtypes = [
        ctypes.c_void_p,  # image, height x width x 3 uint8
        *[ctypes.c_int64] * 6,  # height, width, top, left, crop height, crop width
        ctypes.c_void_p,  # out, out height x out width x 3 uint8
        *[ctypes.c_int64] * 2,  # out height, out width
        ctypes.c_int,  # the PIL filter
        ctypes.c_int,  # Pillow >= 13's order of the passes
    ]
    function.restype = ctypes.c_int
    return function


@functools.cache
def chosen_resize() -> Callable[..., int] | None:
    """`library_resize` of the selected kernel library; None where there is none, or where it
    does not give the installed Pillow's bytes (with a warning)."""
    library, _ = selected_library()
    if library is None:
        return None
    resize = library_resize(library)
    if not agrees_with_pillow(resize):
        warnings.warn(
            f"dpn_jax's resize kernel does not match the installed Pillow {PIL.__version__}; "
            "resizing with Pillow (slower)",
            stacklevel=2,
        )
        return None
    return resize


def agrees_with_pillow(resize: Callable[..., int], pillow_13: bool = PILLOW_13) -> bool:
    """Whether `resize` (a `library_resize`, taking the passes in `pillow_13`'s order) gives
    the installed Pillow's bytes on every probe window, with both filters."""
    image = Image.fromarray(np.random.default_rng(0).integers(0, 256, (48, 48, 3), np.uint8))
    return all(
        np.array_equal(
            resize_window(image, window, size, resample, resize, pillow_13),
            pillow_resize_window(image, window, size, resample),
        )
        for window, size in _PROBES
        for resample in RESIZE_FILTERS
    )


def pillow_resize_window(
    image: Image.Image,
    window: tuple[int, int, int, int],
    size: tuple[int, int],
    resample: Image.Resampling,
) -> np.ndarray:
    """What `resize_window` returns, from Pillow itself."""
    top, left, crop_h, crop_w = window
    height, width = size
    box = (left, top, left + crop_w, top + crop_h)
    return np.asarray(image.crop(box).resize((width, height), resample))


def resize_window(
    image: Image.Image,
    window: tuple[int, int, int, int],
    size: tuple[int, int],
    resample: Image.Resampling,
    resize: Callable[..., int] | None = None,
    pillow_13: bool = PILLOW_13,
) -> np.ndarray:
    """`np.asarray(image.crop(box).resize((width, height), resample))` for the window (top,
    left, height, width) as box and size (height, width): an HWC uint8 array. `resize` is a
    `library_resize` (default `chosen_resize()`), `pillow_13` the order of the passes (default
    the installed Pillow's), both for tests."""
    top, left, crop_h, crop_w = window
    height, width = size
    resize = resize or chosen_resize()
    inside = 0 <= top <= image.height - crop_h and 0 <= left <= image.width - crop_w
    handled = inside and min(crop_h, crop_w, height, width) >= 1 and resample in RESIZE_FILTERS
    if resize is None or image.mode != "RGB" or not handled:
        return pillow_resize_window(image, window, size, resample)
    pixels = np.asarray(image)
    out = np.empty((height, width, 3), np.uint8)
    status = resize(
        pixels.ctypes.data,
        *pixels.shape[:2],
        *window,
        out.ctypes.data,
        height,
        width,
        resample,
        pillow_13,
    )
    if status == _OUT_OF_MEMORY:
        raise MemoryError(f"resizing a {crop_w}x{crop_h} window to {width}x{height}")
    if status:
        raise ValueError(f"DpnResizeRgb8 rejected window {window} of {pixels.shape}, size {size}")
    return out
