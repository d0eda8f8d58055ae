"""Input pipeline throughput (img/s): dpn_jax (grain) vs its old tf.data pipeline vs timm.

    python benchmarks/input_pipeline.py [--num-images 1024] [--image-size 224] [--batch-size 64]
        [--rounds 3] [--json results.json] [--augmentations | --decoding | --scaling | --feeder]

Writes a folder dataset of ImageNet-like JPEGs (500x375 and 375x500, ~100 KB: scikit-learn's
sample photos with sensor-like noise, quality 95) to a temporary directory, then times, per CPU
core (the process pinned to one core) and with all of this process's cores:
  train: dpn_jax `train_batches` (Pillow decode, timm's random-resized crop + flip, uint8 out);
         the tf.data pipeline dpn_jax had before (fused JPEG decode-and-crop, TF bicubic resize,
         flip, float32 normalised out; copied below from git a437895, it is nowhere else now);
         timm's `create_transform(is_training=True)` in a torch DataLoader, without and with
         its default ColorJitter(0.4) (dpn_jax's off by default; see --augmentations);
  eval:  dpn_jax `eval_batches` (timm's eval transform, uint8 out); the old tf.data eval
         (the same Pillow transform inside tf.data, float32 out); timm's eval transform.
All cores: dpn_jax with its threads in the process and with grain worker processes
(`num_workers` = cores), tf.data with its thread pool, timm with `num_workers` = cores.
With `--augmentations`, only dpn_jax's training pipeline on one core, per CPU-second, with each
host augmentation of timm's train transform in turn (AUGMENTATIONS: crop + flip, + colour
jitter, + RandAugment, + AutoAugment), and the cores one H200 needs for each.
With `--decoding` (`--photo-scale 2`: on 1000x750 JPEGs), dpn_jax's train (crop + flip, and
+ RandAugment) and eval pipelines on one core, per CPU-second, on four sources of the same
images: the original JPEGs, the original JPEGs with `reduced_decode` (DCT-scaled decoding where
the crop allows), and the JPEGs as `dpn-prepare-data --resize-shorter 256 --quality 90` (and
75) re-encodes them (`data.resized`); and the
cores one H200 needs. With `--scaling`, training (crop + flip) on all cores, wall clock, with
`num_workers` 0 (threads), 1, 2, ... up to the cores. With `--feeder`, the trainer's
`BatchFeeder` alone (the thread that puts each batch on the devices) on ready-made batches of
--batch-size: its wall and CPU milliseconds per batch.
Each measurement is its own process; rounds interleave the configurations and the table shows
each one's median. Start-up is not timed (the first batch, or each worker process's first).
"""

from __future__ import annotations

import argparse
import io
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time

import numpy as np

MEAN, STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)
CROP_PCT = 0.875
# One H200 trains at these rates (bf16, batch 256; BENCHMARKS.md "NVIDIA H200").
GPU_TRAIN_RATES = {"dpn68": 5500, "dpn92": 1700}
UNITS = ("img/s wall", "img/CPU-s")
# --augmentations: engine -> (label, train_batches keywords)
AUGMENTATIONS = {
    "dpn_jax": ("crop + flip", {}),
    "dpn_jax_jitter": ("+ color_jitter=0.4", {"color_jitter": 0.4}),
    "dpn_jax_ra": ("+ aa=rand-m9-mstd0.5-inc1", {"aa": "rand-m9-mstd0.5-inc1"}),
    "dpn_jax_aa": ("+ aa=original", {"aa": "original"}),
}

RANDAUGMENT = {"aa": "rand-m9-mstd0.5-inc1"}
# --decoding: source -> (label, (shorter side, quality) of the pre-resized copy or None for the
# original JPEGs, pipeline keywords)
DECODINGS = {
    "orig": ("original JPEGs", None, {}),
    "reduced": ("original JPEGs, reduced_decode", None, {"reduced_decode": True}),
    "prepared": ("pre-resized: shorter side 256, quality 90", (256, 90), {}),
    "prepared_q75": ("pre-resized: shorter side 256, quality 75", (256, 75), {}),
}


def folder_name(prepared: tuple[int, int] | None) -> str:
    return "jpeg" if prepared is None else "shorter{}_q{}".format(*prepared)


def write_prepared_folder(source: str, target: str, shorter: int, quality: int) -> float:
    """The folder `source` with each JPEG as `dpn-prepare-data --resize-shorter SHORTER
    --quality QUALITY` writes it; returns the mean size."""
    from dpn_jax.data.resized import resized_jpeg

    sizes = []
    for directory, _, names in os.walk(source):
        for name in names:
            path = os.path.join(directory, name)
            with open(path, "rb") as file:
                image = resized_jpeg(file.read(), path, shorter, quality)
            out = os.path.join(target, os.path.relpath(path, source))
            os.makedirs(os.path.dirname(out), exist_ok=True)
            with open(out, "wb") as file:
                file.write(image)
            sizes.append(len(image))
    return float(np.mean(sizes))


def write_jpeg_folder(root: str, num_images: int, scale: int = 1) -> float:
    """`num_images` JPEGs in train/ and the same in val/, two classes; returns the mean size.
    `scale` 2 makes them 1000x750 (the photos upscaled first; the noise is per pixel)."""
    import sklearn.datasets
    from PIL import Image

    photos = [
        np.asarray(Image.fromarray(p).resize((p.shape[1] * scale, p.shape[0] * scale)), np.float32)
        for p in sklearn.datasets.load_sample_images().images
    ]
    rng = np.random.default_rng(0)
    sizes = []
    for split in ("train", "val"):
        for i in range(num_images):
            photo = photos[i % 2]
            width, height = (500 * scale, 375 * scale) if i % 3 else (375 * scale, 500 * scale)
            if height > photo.shape[0]:  # portrait: rotate the landscape photo
                photo = photo.transpose(1, 0, 2)
            top = rng.integers(0, photo.shape[0] - height + 1)
            left = rng.integers(0, photo.shape[1] - width + 1)
            pixels = photo[top : top + height, left : left + width]
            pixels = pixels + rng.normal(0, 6, pixels.shape)  # ImageNet-like JPEG sizes
            buffer = io.BytesIO()
            Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8)).save(
                buffer, "JPEG", quality=95
            )
            path = os.path.join(root, split, f"class{i % 2}", f"{i:05d}.jpg")
            os.makedirs(os.path.dirname(path), exist_ok=True)
            with open(path, "wb") as file:
                file.write(buffer.getvalue())
            sizes.append(len(buffer.getvalue()))
    return float(np.mean(sizes))


# ------------------------------------------------------------------------------------- workers


def images_per_second(batches, num_batches: int, count, num_workers: int = 0) -> dict[str, float]:
    """Images per wall-clock second and per CPU-second of this process (all its threads, not
    its worker processes), timed after the start-up: the first batch of each worker process
    (or the first batch) is not timed."""
    iterator = iter(batches)
    warmup = max(1, num_workers)
    for _ in range(warmup):
        next(iterator)
    wall, cpu, images = time.perf_counter(), time.process_time(), 0
    for _, batch in zip(range(num_batches - warmup + 1), iterator):
        images += count(batch)
    return {
        "wall": images / (time.perf_counter() - wall),
        "cpu": images / (time.process_time() - cpu),
    }


def run_feeder(args) -> dict[str, float]:
    """Wall and CPU milliseconds per batch of `BatchFeeder` putting ready-made uint8 batches
    (and int32 labels) on this process's devices, the consumer taking each at once."""
    from dpn_jax.runtime.runner import Runner
    from dpn_jax.train.feed import BatchFeeder

    rng = np.random.default_rng(0)
    shape = (args.batch_size, args.image_size, args.image_size, 3)
    batch = {
        "image": rng.integers(0, 256, shape, dtype=np.uint8),
        "label": np.zeros(args.batch_size, np.int32),
    }

    class Ready:
        def __init__(self, count: int):
            self.left = count

        def __iter__(self):
            return self

        def __next__(self):
            if not self.left:
                raise StopIteration
            self.left -= 1
            return dict(batch)

        def get_state(self):
            return {"next_batch": self.left}

    count = max(args.num_batches, 20)
    with BatchFeeder(Ready(count + 1), Runner()) as feeder:
        feeder.next().batch["image"].block_until_ready()  # start-up not timed
        wall, cpu = time.perf_counter(), time.process_time()
        for _ in range(count):
            feeder.next().batch["image"].block_until_ready()
        wall, cpu = time.perf_counter() - wall, time.process_time() - cpu
    return {"wall": 1000 * wall / count, "cpu": 1000 * cpu / count}


def run_dpn_jax(
    root: str, mode: str, args, num_workers: int, augment: dict | None = None
) -> dict[str, float]:
    from dpn_jax.data import pipeline

    common = dict(
        batch_size=args.batch_size,
        image_size=args.image_size,
        interpolation="bicubic",
        process_index=0,
        process_count=1,
        num_workers=num_workers,
    )
    if mode == "train":
        batches = pipeline.train_batches(
            f"folder:{root}", seed=0, mean=MEAN, **(augment or {}), **common
        )
        return images_per_second(batches, args.num_batches, lambda b: len(b["label"]), num_workers)
    batches = pipeline.eval_batches(
        f"folder:{root}",
        crop_pct=CROP_PCT,
        reduced_decode=(augment or {}).get("reduced_decode", False),
        **common,
    )
    return images_per_second(batches, args.num_batches, lambda b: int(b["mask"].sum()), num_workers)


def run_timm(
    root: str, mode: str, args, num_workers: int, color_jitter: float | None
) -> dict[str, float]:
    import timm.data
    import torch
    import torchvision

    torch.set_num_threads(1)  # ToTensor / Normalize in the main process: this core only
    training = mode == "train"
    transform = timm.data.create_transform(
        input_size=(3, args.image_size, args.image_size),
        is_training=training,
        crop_pct=CROP_PCT,
        interpolation="bicubic",
        mean=MEAN,
        std=STD,
        **({"color_jitter": color_jitter} if training else {}),
    )
    dataset = torchvision.datasets.ImageFolder(
        os.path.join(root, mode if training else "val"), transform=transform
    )
    sampler = (
        torch.utils.data.RandomSampler(dataset, replacement=True, num_samples=10**9)
        if training
        else None
    )
    loader = torch.utils.data.DataLoader(
        dataset,
        batch_size=args.batch_size,
        sampler=sampler,
        num_workers=num_workers,
        multiprocessing_context="forkserver" if num_workers else None,
    )
    return images_per_second(loader, args.num_batches, lambda b: len(b[1]), num_workers)


def run_tf_data(root: str, mode: str, args) -> dict[str, float]:
    import tensorflow as tf

    tf.config.set_visible_devices([], "GPU")
    from dpn_jax.data.folder import FolderDataset

    records = FolderDataset(root).records("train" if mode == "train" else "val")
    paths = tf.constant(records.paths)
    labels = tf.constant(records.labels, tf.int32)
    if mode == "train":
        dataset = old_tf_train_dataset(
            paths, labels, batch_size=args.batch_size, image_size=args.image_size
        )
    else:
        dataset = old_tf_eval_dataset(
            paths, labels, batch_size=args.batch_size, image_size=args.image_size
        )
    return images_per_second(
        dataset.as_numpy_iterator(), args.num_batches, lambda b: len(b["label"])
    )


# The tf.data pipeline of dpn_jax before grain (git a437895, dpn_jax/data/pipeline.py), reduced to
# a folder shard (file paths shuffled whole, read with tf.io.read_file) and kept only to compare.


def old_tf_train_dataset(paths, labels, *, batch_size: int, image_size: int, seed: int = 0):
    import tensorflow as tf

    num_examples = len(paths)
    base_seed = tf.constant([seed, 0], tf.int64)
    examples = tf.data.Dataset.from_tensor_slices({"image": paths, "label": labels})

    def epoch(index):
        order_seed = tf.random.experimental.stateless_fold_in(base_seed, index)[0]
        shuffled = examples.shuffle(num_examples, seed=order_seed, reshuffle_each_iteration=False)
        numbered = shuffled.enumerate(start=index * num_examples)
        return numbered.map(lambda number, example: {**example, "number": number})

    def augment(example):
        example_seed = tf.random.experimental.stateless_fold_in(base_seed, example["number"])
        crop_seed, flip_seed = tf.unstack(tf.random.experimental.stateless_split(example_seed, 2))
        image = _old_decode_random_crop(example["image"], crop_seed)
        image = tf.image.resize(image, (image_size, image_size), method="bicubic", antialias=True)
        image = tf.image.stateless_random_flip_left_right(
            tf.clip_by_value(image, 0.0, 255.0), flip_seed
        )
        image = (image / 255.0 - tf.constant(MEAN, tf.float32)) / tf.constant(STD, tf.float32)
        return {"image": image, "label": example["label"]}

    stream = tf.data.Dataset.range(0, np.iinfo(np.int64).max).flat_map(epoch)
    stream = stream.map(
        lambda ex: {**ex, "image": tf.io.read_file(ex["image"])},
        num_parallel_calls=tf.data.AUTOTUNE,
    )
    dataset = (
        stream.map(augment, num_parallel_calls=tf.data.AUTOTUNE)
        .ignore_errors(log_warning=True)
        .batch(batch_size, drop_remainder=True)
        .prefetch(tf.data.AUTOTUNE)
    )
    return dataset.with_options(_old_data_options())


def old_tf_eval_dataset(paths, labels, *, batch_size: int, image_size: int):
    import tensorflow as tf

    from dpn_jax.data.transforms import decode_image, eval_transform

    def transform(encoded: bytes, name: bytes) -> np.ndarray:
        return eval_transform(
            decode_image(encoded, name.decode()),
            image_size=image_size,
            crop_pct=CROP_PCT,
            interpolation="bicubic",
            mean=MEAN,
            std=STD,
        )

    def preprocess(example):
        image = tf.numpy_function(
            transform, [example["image"], example["name"]], tf.float32, stateful=False
        )
        return {
            "image": tf.ensure_shape(image, (image_size, image_size, 3)),
            "label": example["label"],
        }

    examples = tf.data.Dataset.from_tensor_slices({"name": paths, "label": labels})
    examples = examples.map(
        lambda ex: {**ex, "image": tf.io.read_file(ex["name"])}, num_parallel_calls=tf.data.AUTOTUNE
    )
    dataset = (
        examples.map(preprocess, num_parallel_calls=tf.data.AUTOTUNE)
        .batch(batch_size)
        .prefetch(tf.data.AUTOTUNE)
    )
    return dataset.with_options(_old_data_options())


def _old_decode_random_crop(encoded, seed):
    import tensorflow as tf

    def jpeg():
        return tf.io.decode_and_crop_jpeg(
            encoded, _old_random_crop_window(tf.io.extract_jpeg_shape(encoded), seed), channels=3
        )

    def other():
        image = tf.io.decode_image(encoded, channels=3, expand_animations=False)
        top, left, height, width = tf.unstack(_old_random_crop_window(tf.shape(image), seed))
        return image[top : top + height, left : left + width]

    return tf.cond(tf.strings.substr(encoded, 0, 3) == b"\xff\xd8\xff", jpeg, other)


def _old_random_crop_window(shape, seed, scale=(0.08, 1.0), ratio=(3 / 4, 4 / 3), attempts=10):
    import math

    import tensorflow as tf

    height, width = tf.cast(shape[0], tf.float32), tf.cast(shape[1], tf.float32)
    area_seed, ratio_seed, place_seed = tf.unstack(tf.random.experimental.stateless_split(seed, 3))
    area = tf.random.stateless_uniform([attempts], area_seed, *scale) * height * width
    aspect = tf.exp(
        tf.random.stateless_uniform([attempts], ratio_seed, math.log(ratio[0]), math.log(ratio[1]))
    )
    crop_w, crop_h = tf.round(tf.sqrt(area * aspect)), tf.round(tf.sqrt(area / aspect))
    fits = (crop_w <= width) & (crop_h <= height)
    first = tf.argmax(tf.cast(fits, tf.int32))
    found = tf.reduce_any(fits)
    in_ratio = width / height
    crop_w = tf.where(
        found, crop_w[first], tf.where(in_ratio > ratio[1], tf.round(height * ratio[1]), width)
    )
    crop_h = tf.where(
        found, crop_h[first], tf.where(in_ratio < ratio[0], tf.round(width / ratio[0]), height)
    )
    crop_w, crop_h = tf.maximum(crop_w, 1.0), tf.maximum(crop_h, 1.0)
    place = tf.random.stateless_uniform([2], place_seed)
    top = tf.where(
        found, tf.floor(place[0] * (height - crop_h + 1)), tf.floor((height - crop_h) / 2)
    )
    left = tf.where(
        found, tf.floor(place[1] * (width - crop_w + 1)), tf.floor((width - crop_w) / 2)
    )
    return tf.cast(tf.stack([top, left, crop_h, crop_w]), tf.int32)


def _old_data_options():
    import tensorflow as tf

    options = tf.data.Options()
    options.deterministic = True
    options.threading.private_threadpool_size = len(os.sched_getaffinity(0))
    options.threading.max_intra_op_parallelism = 1
    return options


def worker(args) -> None:
    """One measurement in this process: pinned to the first `--cores` CPUs, prints img/s."""
    cpus = sorted(os.sched_getaffinity(0))[: args.cores]
    os.sched_setaffinity(0, cpus)  # before any library sizes a thread pool
    engine, mode = args.worker.split(":")
    all_cores = len(cpus)
    jpeg_root = os.path.join(args.root, "jpeg")
    if engine in AUGMENTATIONS:
        rate = run_dpn_jax(jpeg_root, mode, args, num_workers=0, augment=AUGMENTATIONS[engine][1])
    elif engine.startswith("decode/"):  # decode/SOURCE or decode/SOURCE/ra
        _, source, *ra = engine.split("/")
        _, prepared, keywords = DECODINGS[source]
        root = os.path.join(args.root, folder_name(prepared))
        rate = run_dpn_jax(root, mode, args, 0, {**keywords, **(RANDAUGMENT if ra else {})})
    elif engine.startswith("workers/"):
        rate = run_dpn_jax(jpeg_root, mode, args, int(engine[8:]))
    elif engine == "feeder":
        rate = run_feeder(args)
    elif engine == "dpn_jax_workers":
        rate = run_dpn_jax(jpeg_root, mode, args, num_workers=all_cores)
    elif engine == "tf_data":
        rate = run_tf_data(jpeg_root, mode, args)
    elif engine in ("timm", "timm_jitter"):
        rate = run_timm(
            jpeg_root,
            mode,
            args,
            num_workers=0 if all_cores == 1 else all_cores,
            color_jitter=0.4 if engine == "timm_jitter" else None,
        )
    else:
        raise SystemExit(f"unknown engine {engine}")
    print(json.dumps(rate))


# ---------------------------------------------------------------------------------- the driver

LABELS = {
    "dpn_jax": "dpn_jax grain (threads)",
    "dpn_jax_workers": "dpn_jax grain (worker processes)",
    "tf_data": "old tf.data pipeline",
    "timm": "timm DataLoader",
    "timm_jitter": "timm DataLoader + ColorJitter(0.4)",
    **{engine: f"dpn_jax grain {label}" for engine, (label, _) in AUGMENTATIONS.items()},
    **{f"decode/{source}": label for source, (label, _, _) in DECODINGS.items()},
    **{f"decode/{source}/ra": f"{label}, + RA" for source, (label, _, _) in DECODINGS.items()},
    **{f"workers/{n}": f"num_workers={n}" for n in range(65)},
    "feeder": "BatchFeeder (ms per batch)",
}


def configurations(all_cores: int, study: str | None) -> list[tuple[str, str, int]]:
    """(engine, mode, cores): every engine on one core, then on all cores; or the study's
    (see the module docstring)."""
    if study == "augmentations":
        return [(engine, "train", 1) for engine in AUGMENTATIONS]
    if study == "decoding":
        train = [(f"decode/{s}{ra}", "train", 1) for ra in ("", "/ra") for s in DECODINGS]
        return train + [(f"decode/{source}", "eval", 1) for source in DECODINGS]
    if study == "scaling":
        return [(f"workers/{n}", "train", all_cores) for n in range(all_cores + 1)]
    if study == "feeder":
        return [("feeder", "train", all_cores)]
    configs = []
    for mode in ("train", "eval"):
        engines = ["dpn_jax", "tf_data", "timm"] + (["timm_jitter"] if mode == "train" else [])
        configs += [(engine, mode, 1) for engine in engines]
        if all_cores > 1:
            configs += [(engine, mode, all_cores) for engine in engines + ["dpn_jax_workers"]]
    return configs


def print_augmentation_table(median: dict) -> None:
    """Markdown: img per CPU-second for each augmentation, and the cores per H200 it implies."""
    models = " | ".join(f"cores per H200, {m} ({r} img/s)" for m, r in GPU_TRAIN_RATES.items())
    print(f"| train transform | img per CPU-s, 1 core | vs crop + flip | {models} |")
    print("|---|---|---|" + "---|" * len(GPU_TRAIN_RATES))
    base = median[("dpn_jax", "train", 1)]["cpu"]
    for (engine, _, _), rate in median.items():
        cores = " | ".join(f"{r / rate['cpu']:.1f}" for r in GPU_TRAIN_RATES.values())
        print(
            f"| {AUGMENTATIONS[engine][0]} | {rate['cpu']:.0f} | {rate['cpu'] / base:.2f}x | "
            f"{cores} |"
        )


def print_decoding_table(median: dict) -> None:
    """Markdown: img per CPU-second per source of the images, and cores per H200 (train)."""
    models = " | ".join(f"cores per H200, {m}" for m in GPU_TRAIN_RATES)
    print(f"| transform | images | img per CPU-s, 1 core | vs original | {models} |")
    print("|---|---|---|---|" + "---|" * len(GPU_TRAIN_RATES))
    for (engine, mode, _), rate in median.items():
        base = median[(engine.replace(engine.split("/")[1], "orig"), mode, 1)]["cpu"]
        what = f"{mode}{' + RandAugment' if engine.endswith('/ra') else ''}"
        cores = (
            " | ".join(f"{r / rate['cpu']:.1f}" for r in GPU_TRAIN_RATES.values())
            if mode == "train"
            else " | ".join("-" for _ in GPU_TRAIN_RATES)
        )
        label = DECODINGS[engine.split("/")[1]][0]
        print(f"| {what} | {label} | {rate['cpu']:.0f} | {rate['cpu'] / base:.2f}x | {cores} |")


def print_tables(median: dict, all_cores: int) -> None:
    """Markdown: per core (img per CPU-second, pinned to one core), then all cores (wall)."""
    print(
        "| transform | pipeline | img/CPU-s, 1 core | vs tf.data | vs timm | img/s wall, 1 core |"
    )
    print("|---|---|---|---|---|---|")
    for (engine, mode, cores), rate in median.items():
        if cores == 1:
            print(
                f"| {mode} | {LABELS[engine]} | {rate['cpu']:.0f} | "
                f"{rate['cpu'] / median[('tf_data', mode, 1)]['cpu']:.2f}x | "
                f"{rate['cpu'] / median[('timm', mode, 1)]['cpu']:.2f}x | {rate['wall']:.0f} |"
            )
    if all_cores > 1:
        print(f"\n| transform | pipeline | img/s wall, {all_cores} cores |\n|---|---|---|")
        for (engine, mode, cores), rate in median.items():
            if cores > 1:
                print(f"| {mode} | {LABELS[engine]} | {rate['wall']:.0f} |")
    per_core = median[("dpn_jax", "train", 1)]["cpu"]
    for model, gpu_rate in GPU_TRAIN_RATES.items():
        print(
            f"{model} on one H200 ({gpu_rate} img/s) needs {gpu_rate / per_core:.1f} cores of "
            f"dpn_jax training input ({per_core:.0f} img per CPU-second)"
        )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--num-images", type=int, default=1024)
    parser.add_argument(
        "--photo-scale", type=int, default=1, help="2: 1000x750 JPEGs (default 500x375)"
    )
    parser.add_argument("--image-size", type=int, default=224)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--json", help="write the measurements here")
    studies = parser.add_mutually_exclusive_group()
    studies.add_argument(
        "--augmentations",
        action="store_const",
        const="augmentations",
        dest="study",
        help="the host cost of each augmentation only",
    )
    for study, what in (
        ("decoding", "original vs reduced_decode vs pre-resized images, one core"),
        ("scaling", "training on all cores with num_workers 0..cores"),
        ("feeder", "the BatchFeeder's cost per batch"),
    ):
        studies.add_argument(
            f"--{study}", action="store_const", const=study, dest="study", help=what
        )
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    parser.add_argument("--root", help=argparse.SUPPRESS)
    parser.add_argument("--cores", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--num-batches", type=int, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        worker(args)
        return

    all_cores = len(os.sched_getaffinity(0))
    num_batches = args.num_images // args.batch_size - 1
    configs = configurations(all_cores, args.study)
    runs: dict[tuple[str, str, int], list[dict[str, float]]] = {c: [] for c in configs}
    env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="3", JAX_PLATFORMS="cpu")
    with tempfile.TemporaryDirectory() as root:
        mean_bytes = (
            0.0
            if args.study == "feeder"  # needs no images
            else write_jpeg_folder(os.path.join(root, "jpeg"), args.num_images, args.photo_scale)
        )
        prepared_bytes = {}
        if args.study == "decoding":
            for _, prepared, _ in DECODINGS.values():
                if prepared is not None:
                    prepared_bytes[folder_name(prepared)] = write_prepared_folder(
                        os.path.join(root, "jpeg"),
                        os.path.join(root, folder_name(prepared)),
                        *prepared,
                    )
        sizes = "".join(f", {name} {size / 1024:.0f} KB" for name, size in prepared_bytes.items())
        print(
            f"{args.num_images} JPEGs per split, {500 * args.photo_scale}x{375 * args.photo_scale}"
            f" / {375 * args.photo_scale}x{500 * args.photo_scale}, mean {mean_bytes / 1024:.0f}"
            f" KB{sizes}; "
            f"{args.image_size} px, batch {args.batch_size}, {all_cores} CPUs; load "
            f"average {os.getloadavg()[0]:.1f} at start",
            flush=True,
        )
        for round_ in range(args.rounds):
            for engine, mode, cores in configs:
                command = [
                    sys.executable,
                    __file__,
                    "--worker",
                    f"{engine}:{mode}",
                    "--root",
                    root,
                    "--cores",
                    str(cores),
                    "--num-batches",
                    str(num_batches),
                    "--image-size",
                    str(args.image_size),
                    "--batch-size",
                    str(args.batch_size),
                ]
                result = subprocess.run(command, env=env, capture_output=True, text=True)
                if result.returncode:
                    raise SystemExit(
                        f"{engine} {mode} on {cores} cores failed:\n{result.stderr[-3000:]}"
                    )
                rate = json.loads(result.stdout.strip().splitlines()[-1])
                runs[(engine, mode, cores)].append(rate)
                units = ("ms/batch wall", "CPU-ms/batch") if engine == "feeder" else UNITS
                print(
                    f"round {round_ + 1}: {LABELS[engine]:>36} {mode:>5} {cores} cores: "
                    f"{rate['wall']:7.1f} {units[0]}, {rate['cpu']:7.1f} {units[1]}",
                    flush=True,
                )
    print(f"load average {os.getloadavg()[0]:.1f} at the end\n")
    median = {
        config: {key: statistics.median(run[key] for run in values) for key in ("wall", "cpu")}
        for config, values in runs.items()
    }
    if args.study == "augmentations":
        print_augmentation_table(median)
    elif args.study == "decoding":
        print_decoding_table(median)
    elif args.study in ("scaling", "feeder"):
        for (engine, _, cores), rate in median.items():
            units = ("ms/batch wall", "CPU-ms/batch") if engine == "feeder" else UNITS
            print(
                f"{LABELS[engine]}, {cores} cores: {rate['wall']:.1f} {units[0]}, "
                f"{rate['cpu']:.1f} {units[1]} (this process)"
            )
    else:
        print_tables(median, all_cores)
    if args.json:
        with open(args.json, "w") as file:
            json.dump(
                {
                    "args": vars(args),
                    "cpus": all_cores,
                    "mean_jpeg_bytes": mean_bytes,
                    "mean_prepared_bytes": prepared_bytes,
                    "load_average_end": os.getloadavg()[0],
                    "runs": {" ".join(map(str, c)): v for c, v in runs.items()},
                },
                file,
                indent=1,
            )


if __name__ == "__main__":
    main()
