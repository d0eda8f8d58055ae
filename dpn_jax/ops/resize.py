"""Pillow's bilinear and bicubic resizing of RGB images, bit for bit, in dpn_jax's CPU kernels.

The training input pipeline resizes every random-resized crop, and Pillow's resampling is
plain scalar C: on pre-resized images it costs more than decoding the JPEG. `resize_window`
returns Pillow's bytes from `DpnResizeRgb8` (csrc/resize_cpu.cc, a port of Pillow's
Resample.c) in the kernel library `$DPN_JAX_CPU_KERNELS` selects (`cpu_kernels`), reading the
window in place (no crop copy). It falls back to Pillow itself where the library was not built
or is switched off, and for other filters, modes and windows.
"""

from __future__ import annotations

import ctypes
import functools
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
    """`library_resize` of the selected kernel library; None where there is none."""
    library, _ = selected_library()
    return None if library is None else library_resize(library)


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
        box = (left, top, left + crop_w, top + crop_h)
        return np.asarray(image.crop(box).resize((width, height), resample))
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
