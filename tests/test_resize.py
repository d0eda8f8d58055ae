"""`dpn_jax.ops.resize` against Pillow itself: the same bytes as `crop(box).resize(size, filter)`
from both builds of the kernel library, and Pillow's own result where it falls back."""

import numpy as np
import pytest
from PIL import Image

from dpn_jax.ops import cpu_kernels, resize

FILTERS = (Image.Resampling.BILINEAR, Image.Resampling.BICUBIC)


def _libraries() -> dict[str, str]:
    """The builds this machine can run: {name: path}."""
    baseline = cpu_kernels.built_library(cpu_kernels.BASELINE_LIBRARY)
    if baseline is None:
        return {}
    found = {"baseline": baseline}
    avx2 = cpu_kernels.built_library(cpu_kernels.AVX2_LIBRARY)
    if avx2 is not None and cpu_kernels.cpu_supports_avx2_fma(baseline):
        found["avx2"] = avx2
    return found


LIBRARIES = _libraries()
needs_library = pytest.mark.skipif(not LIBRARIES, reason="needs the kernel library built")


def _pillow(image, window, size, resample) -> np.ndarray:
    top, left, crop_h, crop_w = window
    height, width = size
    box = (left, top, left + crop_w, top + crop_h)
    return np.asarray(image.crop(box).resize((width, height), resample))


def _image(rng, height, width) -> Image.Image:
    """Noise with smooth structure, so that both the clipping and the rounding matter."""
    noise = rng.integers(0, 256, (height, width, 3), dtype=np.uint8)
    ramp = np.linspace(0, 255, width, dtype=np.float64)[None, :, None]
    mixed = np.where(rng.random((height, width, 1)) < 0.5, noise, ramp.astype(np.uint8))
    return Image.fromarray(np.ascontiguousarray(mixed.astype(np.uint8)))


def _cases(seed: int, count: int):
    """(image, window, size, filter): random sizes 1..600 (mostly small), up- and downscaling,
    extreme aspect ratios, 1-pixel windows and windows touching the image's edges."""
    rng = np.random.default_rng(seed)
    for index in range(count):
        limit = 600 if index % 10 == 0 else 80
        height, width = (int(n) for n in rng.integers(1, limit + 1, 2))
        image = _image(rng, height, width)
        crop_h, crop_w = (int(rng.integers(1, n + 1)) for n in (height, width))
        if index % 7 == 0:
            crop_h, crop_w = 1, int(rng.integers(1, width + 1))
        top = int(rng.integers(0, height - crop_h + 1))
        left = int(rng.integers(0, width - crop_w + 1))
        if index % 3 == 0:  # touching the bottom-right corner: the vector loads' overhang
            top, left = height - crop_h, width - crop_w
        size = tuple(int(n) for n in rng.integers(1, 2 * limit + 1, 2))
        if index % 5 == 0:
            size = (size[0], 1) if index % 2 else (1, size[1])
        yield image, (top, left, crop_h, crop_w), size, FILTERS[index % 2]


@needs_library
@pytest.mark.parametrize("build", sorted(LIBRARIES))
def test_both_builds_give_pillows_bytes(build):
    function = resize.library_resize(LIBRARIES[build])
    for image, window, size, resample in _cases(seed=len(build), count=400):
        got = resize.resize_window(image, window, size, resample, function)
        expected = _pillow(image, window, size, resample)
        assert got.dtype == np.uint8 and got.shape == expected.shape
        np.testing.assert_array_equal(got, expected, err_msg=f"{image.size} {window} {size}")


@needs_library
@pytest.mark.parametrize("build", sorted(LIBRARIES))
def test_the_pass_order_is_pillows(build):
    """Pillow >= 13 resizes vertically first when the height loses over twice the pixels the
    width does, earlier versions always horizontally first; the orders give other bytes here
    (the test checks that they do)."""
    function = resize.library_resize(LIBRARIES[build])
    rng = np.random.default_rng(0)
    image = _image(rng, 96, 30)
    whole = (0, 0, 96, 30)
    for (height, width), resample in [((50, 10), FILTERS[0]), ((60, 25), FILTERS[1])]:
        horizontal_first = image.resize((width, 96), resample).resize((width, height), resample)
        vertical_first = image.resize((30, height), resample).resize((width, height), resample)
        assert not np.array_equal(np.asarray(horizontal_first), np.asarray(vertical_first))
        for pillow_13, expected in [(False, horizontal_first), (True, vertical_first)]:
            got = resize.resize_window(image, whole, (height, width), resample, function, pillow_13)
            np.testing.assert_array_equal(got, np.asarray(expected))
        if resize.PILLOW_13:
            np.testing.assert_array_equal(
                np.asarray(vertical_first), _pillow(image, whole, (height, width), resample)
            )


@needs_library
def test_the_library_rejects_windows_outside_the_image():
    function = resize.library_resize(next(iter(LIBRARIES.values())))
    pixels = np.zeros((8, 8, 3), np.uint8)
    out = np.empty((4, 4, 3), np.uint8)
    for window in [(0, 0, 9, 8), (1, 0, 8, 8), (0, -1, 4, 4), (0, 0, 0, 4)]:
        assert function(pixels.ctypes.data, 8, 8, *window, out.ctypes.data, 4, 4, 3, 1) == 1
    lanczos = int(Image.Resampling.LANCZOS)
    assert function(pixels.ctypes.data, 8, 8, 0, 0, 8, 8, out.ctypes.data, 4, 4, lanczos, 1) == 1


def test_the_fallback_is_pillow(monkeypatch):
    """Switched off (or not built), and for other filters, modes and windows: Pillow itself."""
    monkeypatch.setenv(cpu_kernels.CPU_KERNELS_ENV, "off")
    resize.chosen_resize.cache_clear()
    try:
        assert resize.chosen_resize() is None
        for image, window, size, resample in _cases(seed=3, count=20):
            got = resize.resize_window(image, window, size, resample)
            np.testing.assert_array_equal(got, _pillow(image, window, size, resample))
    finally:
        resize.chosen_resize.cache_clear()
    rng = np.random.default_rng(4)
    image = _image(rng, 30, 40)
    outside = (25, 30, 10, 12)  # Pillow pads a crop past the edges with black
    for subject, window, resample in [
        (image, (2, 3, 20, 30), Image.Resampling.LANCZOS),
        (image.convert("L"), (2, 3, 20, 30), FILTERS[1]),
        (image, outside, FILTERS[1]),
    ]:
        got = resize.resize_window(subject, window, (17, 23), resample)
        np.testing.assert_array_equal(got, _pillow(subject, window, (17, 23), resample))


@needs_library
def test_the_library_is_used_only_where_it_gives_the_installed_pillows_bytes(monkeypatch):
    function = resize.library_resize(next(iter(LIBRARIES.values())))
    assert resize.agrees_with_pillow(function)
    # the probes see a change of Pillow's pass order (as 13 made)
    assert not resize.agrees_with_pillow(function, pillow_13=not resize.PILLOW_13)
    monkeypatch.setattr(resize, "agrees_with_pillow", lambda function: False)
    resize.chosen_resize.cache_clear()
    try:
        with pytest.warns(UserWarning, match="does not match the installed Pillow"):
            assert resize.chosen_resize() is None
    finally:
        resize.chosen_resize.cache_clear()
