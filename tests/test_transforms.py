"""`load_image` and `eval_transform` against Pillow and the real timm eval transform."""
import io

import numpy as np
import pytest
import sklearn.datasets
from PIL import Image

from dpn_jax.data.transforms import eval_transform, load_image

timm_data = pytest.importorskip("timm.data")

# Measured: 0.0 (bit-identical) for every photo and config below; the bound leaves room only
# for float32 rounding differences between numpy and torch, far below one 8-bit level (~0.017).
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
        input_size=(3, *np.broadcast_to(image_size, 2)), crop_pct=crop_pct,
        interpolation=interpolation, mean=mean, std=std, is_training=False)
    return transform(image).numpy().transpose(1, 2, 0)


@pytest.mark.parametrize("config", [
    dict(image_size=224, crop_pct=0.875, interpolation="bicubic", mean=DPN_MEAN, std=DPN_STD),
    dict(image_size=288, crop_pct=1.0, interpolation="bicubic", mean=IMAGENET_MEAN,
         std=IMAGENET_STD),
    dict(image_size=(160, 224), crop_pct=0.9, interpolation="bilinear", mean=IMAGENET_MEAN,
         std=IMAGENET_STD),
    dict(image_size=(35, 47), crop_pct=0.95, interpolation="lanczos", mean=IMAGENET_MEAN,
         std=IMAGENET_STD),
])
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
    got = eval_transform(load_image(path), image_size=config["input_size"][1:],
                         crop_pct=config["crop_pct"], interpolation=config["interpolation"],
                         mean=config["mean"], std=config["std"])
    np.testing.assert_allclose(got, expected.numpy().transpose(1, 2, 0), rtol=0, atol=TOLERANCE)


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


@pytest.mark.parametrize("mode, format", [
    ("L", "PNG"), ("RGBA", "PNG"), ("LA", "PNG"), ("P", "PNG"), ("RGB", "WEBP"),
    ("RGB", "BMP"), ("P", "GIF"), ("CMYK", "JPEG"), ("1", "PNG"),
])
def test_load_image_converts_modes_like_pil_convert_rgb(mode, format):
    rgb = Image.fromarray(np.stack([gradient(), gradient()[::-1], 255 - gradient()], -1))
    original = rgb.convert(mode)
    file = encoded(original, format, **({"lossless": True} if format == "WEBP" else {}))
    image = load_image(file)
    assert image.mode == "RGB" and image.size == original.size
    np.testing.assert_array_equal(np.asarray(image), np.asarray(Image.open(encoded(
        original, format, **({"lossless": True} if format == "WEBP" else {}))).convert("RGB")))


def test_load_image_scales_16_bit_to_8_bit():
    pixels16 = (gradient().astype(np.uint16) * 257)  # full 16-bit range, 8-bit value * 257
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


def test_load_image_errors_name_the_file(tmp_path):
    with pytest.raises(ValueError, match="missing.jpg"):
        load_image(tmp_path / "missing.jpg")
    corrupt = tmp_path / "corrupt.jpg"
    corrupt.write_bytes(b"definitely not an image")
    with pytest.raises(ValueError, match="corrupt.jpg: not an image"):
        load_image(corrupt)
    truncated = tmp_path / "truncated.jpg"
    truncated.write_bytes(encoded(sample_photos()[0], "JPEG").getvalue()[:2000])
    with pytest.raises(ValueError, match="truncated.jpg"):
        load_image(truncated)
