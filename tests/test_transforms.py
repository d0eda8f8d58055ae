"""The transforms against Pillow and the real timm: eval (bit for bit), the on-device
normalisation, the training crop (timm's windows and torchvision's resized crop, exactly)."""

import io
import random

import numpy as np
import pytest
import sklearn.datasets
from PIL import Image

from dpn_jax.data.transforms import (
    UndecodableImage,
    eval_crop,
    eval_transform,
    load_image,
    normalize,
    random_resized_crop_window,
    resized_crop,
    train_crop,
)

timm_data = pytest.importorskip("timm.data")

# Measured: 0.0 (bit-identical) for every photo and config of the NumPy eval transform; up to
# 7.2e-7 (3 float32 ulps of values near 2.6) for `normalize` under XLA, whose float32 division
# rounds differently from torch's. Far below one 8-bit level (~0.017 after normalising).
TOLERANCE = 1e-6

DPN_MEAN = (124 / 255, 117 / 255, 104 / 255)
DPN_STD = (1 / (0.0167 * 255),) * 3
IMAGENET_MEAN, IMAGENET_STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)


def sample_photos():
    """scikit-learn's two real photos (427x640), plus portrait versions of them."""
    photos = [Image.fromarray(pixels) for pixels in sklearn.datasets.load_sample_images().images]
    return photos + [photo.transpose(Image.Transpose.TRANSPOSE) for photo in photos]


def timm_eval(image, *, image_size, crop_pct, interpolation, mean, std):
    transform = timm_data.create_transform(
        input_size=(3, *np.broadcast_to(image_size, 2)),
        crop_pct=crop_pct,
        interpolation=interpolation,
        mean=mean,
        std=std,
        is_training=False,
    )
    return transform(image).numpy().transpose(1, 2, 0)


@pytest.mark.parametrize(
    "config",
    [
        dict(image_size=224, crop_pct=0.875, interpolation="bicubic", mean=DPN_MEAN, std=DPN_STD),
        dict(
            image_size=288,
            crop_pct=1.0,
            interpolation="bicubic",
            mean=IMAGENET_MEAN,
            std=IMAGENET_STD,
        ),
        dict(
            image_size=(160, 224),
            crop_pct=0.9,
            interpolation="bilinear",
            mean=IMAGENET_MEAN,
            std=IMAGENET_STD,
        ),
        dict(
            image_size=(35, 47),
            crop_pct=0.95,
            interpolation="lanczos",
            mean=IMAGENET_MEAN,
            std=IMAGENET_STD,
        ),
    ],
)
def test_eval_transform_matches_timm_on_photos(config):
    for photo in sample_photos():
        expected = timm_eval(photo, **config)
        got = eval_transform(photo, **config)
        assert got.dtype == np.float32 and got.shape == expected.shape
        np.testing.assert_allclose(got, expected, rtol=0, atol=TOLERANCE)


def test_eval_transform_matches_timm_dpn68_config_from_jpeg_file(tmp_path):
    """The whole inference path: JPEG on disk -> load_image -> eval_transform, vs timm's own
    data config for dpn68 applied to `Image.open(path).convert('RGB')`."""
    timm = pytest.importorskip("timm")
    config = timm_data.resolve_data_config({}, model=timm.create_model("dpn68", pretrained=False))
    path = tmp_path / "photo.jpg"
    sample_photos()[1].save(path, quality=90)
    expected = timm_data.create_transform(**config)(Image.open(path).convert("RGB"))
    got = eval_transform(
        load_image(path),
        image_size=config["input_size"][1:],
        crop_pct=config["crop_pct"],
        interpolation=config["interpolation"],
        mean=config["mean"],
        std=config["std"],
    )
    np.testing.assert_allclose(got, expected.numpy().transpose(1, 2, 0), rtol=0, atol=TOLERANCE)


def test_normalize_on_device_equals_timm_to_tensor_normalize():
    """uint8 eval crops normalised by `normalize` (the jitted step's input) are timm's
    ToTensor + Normalize output to float32 rounding, on real photos."""
    jax = pytest.importorskip("jax")
    config = dict(image_size=224, crop_pct=0.875, interpolation="bicubic")
    photos = sample_photos()
    crops = np.stack([eval_crop(photo, **config) for photo in photos])
    assert crops.dtype == np.uint8 and crops.shape == (len(photos), 224, 224, 3)
    for mean, std in ((DPN_MEAN, DPN_STD), (IMAGENET_MEAN, IMAGENET_STD)):
        got = np.asarray(jax.jit(normalize, static_argnums=(1, 2))(crops, mean, std))
        expected = np.stack([timm_eval(photo, mean=mean, std=std, **config) for photo in photos])
        assert got.dtype == np.float32
        np.testing.assert_allclose(got, expected, rtol=0, atol=TOLERANCE)
        bf16 = normalize(crops, mean, std, jax.numpy.bfloat16)
        assert bf16.dtype == jax.numpy.bfloat16  # float32 math, then the cast: bf16's 8 bits
        np.testing.assert_allclose(np.asarray(bf16, np.float32), got, rtol=2**-8, atol=1e-6)


class PythonRandom:
    """The `np.random.Generator` calls the window draws, answered by Python's `random` the way
    timm draws them (random.uniform; random.randint(a, b) for integers(a, b + 1))."""

    @staticmethod
    def uniform(low, high):
        return random.uniform(low, high)

    @staticmethod
    def integers(low, high):
        return random.randint(low, high - 1)


@pytest.mark.parametrize(
    "height, width", [(375, 500), (500, 375), (427, 640), (500, 60), (40, 500), (9, 7)]
)
def test_random_resized_crop_is_timms_window_and_resize(height, width):
    """With the same random draws, window and pixels equal timm's
    RandomResizedCropAndInterpolation (incl. the centre fallback of extreme aspect ratios)."""
    transforms = pytest.importorskip("timm.data.transforms")
    photo = sample_photos()[0].resize((width, height))
    timm_crop = transforms.RandomResizedCropAndInterpolation(
        (24, 32), scale=(0.08, 1.0), ratio=(3 / 4, 4 / 3), interpolation="bicubic"
    )
    fallbacks = 0
    for seed in range(40):
        random.seed(seed)
        expected_window = timm_crop.get_params(photo, timm_crop.scale, timm_crop.ratio)
        random.seed(seed)
        window = random_resized_crop_window(height, width, PythonRandom())
        assert window == expected_window
        random.seed(seed)
        expected = np.asarray(timm_crop(photo))
        np.testing.assert_array_equal(resized_crop(photo, window, (24, 32), "bicubic"), expected)
        np.testing.assert_array_equal(
            resized_crop(photo, window, (24, 32), "bicubic", flip=True), expected[:, ::-1]
        )
        fallbacks += window[2:] in (
            (height, width),
            (height, round(height * 4 / 3)),
            (round(width * 4 / 3), width),
        )
    if width / height > 4:
        assert fallbacks > 10  # the fallback path was exercised


def test_train_crop_draws_from_the_generator():
    photo = sample_photos()[1]
    crops = [
        train_crop(photo, image_size=32, interpolation="bilinear", rng=np.random.default_rng(seed))
        for seed in range(64)
    ]
    assert all(c.dtype == np.uint8 and c.shape == (32, 32, 3) for c in crops)
    again = train_crop(photo, image_size=32, interpolation="bilinear", rng=np.random.default_rng(5))
    np.testing.assert_array_equal(again, crops[5])
    assert len({c.tobytes() for c in crops}) == 64
    # flips: a crop equals the mirror of the unflipped crop of the same window
    rng = np.random.default_rng(7)
    window = random_resized_crop_window(photo.height, photo.width, rng)
    flipped = rng.random() < 0.5
    np.testing.assert_array_equal(
        train_crop(photo, image_size=32, interpolation="bilinear", rng=np.random.default_rng(7)),
        resized_crop(photo, window, 32, "bilinear", flip=flipped),
    )
    flips = sum(np.random.default_rng(seed).random() < 0.5 for seed in range(64))  # as drawn
    assert 20 < flips < 44


def test_eval_transform_rejects_bad_arguments():
    photo = sample_photos()[0]
    with pytest.raises(ValueError, match="interpolation"):
        eval_transform(photo, image_size=32, crop_pct=0.9, interpolation="cubic")
    with pytest.raises(ValueError, match="crop_pct"):
        eval_transform(photo, image_size=32, crop_pct=1.5)


def encoded(image: Image.Image, format: str, **save_kwargs) -> io.BytesIO:
    buffer = io.BytesIO()
    image.save(buffer, format=format, **save_kwargs)
    buffer.seek(0)
    return buffer


def gradient(mode_size=(40, 30)) -> np.ndarray:
    width, height = mode_size
    return (np.arange(height)[:, None] * 7 + np.arange(width)[None, :] * 3).astype(np.uint8)


@pytest.mark.parametrize(
    "mode, format",
    [
        ("L", "PNG"),
        ("RGBA", "PNG"),
        ("LA", "PNG"),
        ("P", "PNG"),
        ("RGB", "WEBP"),
        ("RGB", "BMP"),
        ("P", "GIF"),
        ("CMYK", "JPEG"),
        ("1", "PNG"),
    ],
)
def test_load_image_converts_modes_like_pil_convert_rgb(mode, format):
    rgb = Image.fromarray(np.stack([gradient(), gradient()[::-1], 255 - gradient()], -1))
    original = rgb.convert(mode)
    file = encoded(original, format, **({"lossless": True} if format == "WEBP" else {}))
    image = load_image(file)
    assert image.mode == "RGB" and image.size == original.size
    np.testing.assert_array_equal(
        np.asarray(image),
        np.asarray(
            Image.open(
                encoded(original, format, **({"lossless": True} if format == "WEBP" else {}))
            ).convert("RGB")
        ),
    )


def test_load_image_scales_16_bit_to_8_bit():
    pixels16 = gradient().astype(np.uint16) * 257  # full 16-bit range, 8-bit value * 257
    image = load_image(encoded(Image.fromarray(pixels16), "PNG"))
    assert image.mode == "RGB"
    np.testing.assert_array_equal(np.asarray(image)[..., 0], gradient())


def test_load_image_applies_exif_orientation():
    pixels = np.zeros((20, 40, 3), np.uint8)
    pixels[:, :20] = 255  # left half white
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90 degrees clockwise to display
    image = load_image(encoded(Image.fromarray(pixels), "PNG", exif=exif))
    assert image.size == (20, 40)  # (width, height): now portrait
    assert np.asarray(image)[:20].mean() > 250 and np.asarray(image)[20:].mean() < 5


def test_load_image_drafts_huge_jpegs():
    photo = sample_photos()[0]  # 640x427
    image = load_image(encoded(photo, "JPEG"), max_pixels=100 * 100)
    assert image.size == (160, 107)  # libjpeg 1/4 scale: the largest one keeping >= max_pixels
    assert load_image(encoded(photo, "JPEG")).size == (640, 427)


def test_load_image_refuses_decompression_bombs_without_touching_warning_filters(monkeypatch):
    """Above Pillow's MAX_IMAGE_PIXELS (where Pillow only warns) the image is refused; the
    process's warning filters stay as they were (decoding runs in several threads)."""
    import warnings

    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 1000)
    filters = list(warnings.filters)
    file = encoded(Image.fromarray(gradient()), "PNG")  # 40x30 = 1200 pixels
    file.name = "big.png"
    with (
        pytest.warns(Image.DecompressionBombWarning),
        pytest.raises(
            UndecodableImage, match="big.png: 40x30 pixels exceeds the decompression-bomb limit"
        ),
    ):
        load_image(file)
    assert warnings.filters == filters


def test_load_image_errors_name_the_file(tmp_path):
    with pytest.raises(UndecodableImage, match="missing.jpg: no such file") as missing:
        load_image(tmp_path / "missing.jpg")
    assert missing.value.name == str(tmp_path / "missing.jpg")
    corrupt = tmp_path / "corrupt.jpg"
    corrupt.write_bytes(b"definitely not an image")
    with pytest.raises(ValueError, match="corrupt.jpg: not an image"):
        load_image(corrupt)
    truncated = tmp_path / "truncated.jpg"
    truncated.write_bytes(encoded(sample_photos()[0], "JPEG").getvalue()[:2000])
    with pytest.raises(ValueError, match="truncated.jpg"):
        load_image(truncated)
