"""Input pipeline throughput (img/s) on JPEGs, against timm's transforms in a torch DataLoader.

    python benchmarks/pipeline.py [--num-images 512] [--image-size 224] [--batch-size 64]

Writes a folder dataset of ImageNet-sized JPEGs (500x375 / 375x500, quality 90, cut from
scikit-learn's sample photos) to a temporary directory, then times:
  train: dpn_jax random-resized-crop + flip (fused JPEG decode-and-crop, tf.data) vs
         timm's `create_transform(is_training=True)` in a torch DataLoader;
  eval:  dpn_jax eval iterator (Pillow inside tf.data) vs timm's eval transform in a DataLoader.
Both sides use every CPU of the process. Also reports how far TensorFlow's bicubic resize is
from Pillow's (the reason evaluation uses Pillow).
"""
from __future__ import annotations

import argparse
import os
import tempfile
import time

import numpy as np
import sklearn.datasets
from PIL import Image

try:  # torchvision (triton) must load before TensorFlow
    import timm.data
    import torch
    import torchvision
except ImportError:
    timm = None

from dpn_jax.data import pipeline  # noqa: E402  (after torch, see above)

MEAN, STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)
CPUS = len(os.sched_getaffinity(0))


def write_jpeg_folder(root: str, num_images: int) -> None:
    """`num_images` JPEGs in train/ and the same in val/, two classes."""
    photos = [Image.fromarray(p) for p in sklearn.datasets.load_sample_images().images]
    rng = np.random.default_rng(0)
    for split in ("train", "val"):
        for i in range(num_images):
            photo = photos[i % 2]
            width, height = (500, 375) if i % 3 else (375, 500)
            left, top = rng.integers(0, photo.width - 300), rng.integers(0, photo.height - 300)
            image = photo.crop((left, top, left + 300, top + 300)).resize((width, height))
            path = os.path.join(root, split, f"class{i % 2}", f"{i:05d}.jpg")
            os.makedirs(os.path.dirname(path), exist_ok=True)
            image.save(path, quality=90)


def images_per_second(batches, num_batches: int, batch_size_of) -> float:
    """Throughput after the first batch (which includes pipeline start-up)."""
    iterator = iter(batches)
    next(iterator)
    start, count = time.perf_counter(), 0
    for _, batch in zip(range(num_batches), iterator):
        count += batch_size_of(batch)
    return count / (time.perf_counter() - start)


def timm_loader(root: str, split: str, batch_size: int, image_size: int, training: bool):
    transform = timm.data.create_transform(
        input_size=(3, image_size, image_size), is_training=training, crop_pct=0.875,
        interpolation="bicubic", mean=MEAN, std=STD)
    dataset = torchvision.datasets.ImageFolder(os.path.join(root, split), transform=transform)
    sampler = torch.utils.data.RandomSampler(dataset, replacement=True, num_samples=10 ** 9) \
        if training else None
    return torch.utils.data.DataLoader(dataset, batch_size=batch_size, sampler=sampler,
                                       num_workers=CPUS, multiprocessing_context="forkserver")


def tf_vs_pil_bicubic() -> tuple[float, float]:
    """Max and mean |TF - Pillow| (8-bit levels) resizing the sample photos' shorter side to 256."""
    import tensorflow as tf
    diffs = []
    for pixels in sklearn.datasets.load_sample_images().images:
        height, width = 256, int(256 * pixels.shape[1] / pixels.shape[0])
        pil = np.asarray(Image.fromarray(pixels).resize((width, height), Image.Resampling.BICUBIC))
        tf_out = tf.image.resize(pixels, (height, width), method="bicubic", antialias=True)
        tf_out = np.clip(np.rint(tf_out.numpy()), 0, 255)
        diffs.append(np.abs(tf_out - pil.astype(np.float64)))
    return max(d.max() for d in diffs), float(np.mean([d.mean() for d in diffs]))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--num-images", type=int, default=512)
    parser.add_argument("--image-size", type=int, default=224)
    parser.add_argument("--batch-size", type=int, default=64)
    args = parser.parse_args()
    size, batch = args.image_size, args.batch_size
    num_batches = args.num_images // batch - 1
    with tempfile.TemporaryDirectory() as root:
        write_jpeg_folder(root, args.num_images)
        spec = f"folder:{root}"
        print(f"{args.num_images} JPEGs 500x375, {size}px, batch {batch}, {CPUS} CPUs, "
              f"load average {os.getloadavg()[0]:.1f} at start")
        results = {}
        train = pipeline.create_train_iterator(
            spec, per_process_batch_size=batch, image_size=size, mean=MEAN, std=STD,
            num_local_devices=1)
        results["dpn_jax train"] = images_per_second(train, num_batches,
                                                     lambda b: b["label"].size)
        evaluation = pipeline.create_eval_iterator(
            spec, per_process_batch_size=batch, image_size=size, crop_pct=0.875,
            interpolation="bicubic", mean=MEAN, std=STD, num_local_devices=1)
        results["dpn_jax eval"] = images_per_second(evaluation, num_batches,
                                                    lambda b: int(b["mask"].sum()))
        if timm is not None:
            for name, training in (("timm train", True), ("timm eval", False)):
                loader = timm_loader(root, "train" if training else "val", batch, size, training)
                results[name] = images_per_second(loader, num_batches, lambda b: len(b[1]))
        for name, rate in results.items():
            print(f"{name:>14}: {rate:8.1f} img/s")
        worst, mean = tf_vs_pil_bicubic()
        print(f"TF bicubic (antialias) vs Pillow, 8-bit levels: max {worst:.0f}, mean {mean:.3f}")


if __name__ == "__main__":
    main()
