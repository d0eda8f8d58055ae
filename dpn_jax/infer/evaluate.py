"""Top-1 / top-5 / loss of a DPN over a dataset, on all devices: `evaluate()` behind `dpn-evaluate`.

Datasets are the input pipeline's specs (`imagenet2012`, `tfds:NAME`, `folder:PATH`, `digits`);
each validation example is counted exactly once (the pipeline pads the last batch and masks it).
"""
from __future__ import annotations

import time
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P
from tqdm import tqdm

from dpn_jax.models.dpn import DPN
from dpn_jax.infer.predict import DataConfig


def _batch_metrics(model: DPN, variables: dict[str, Any], images: jax.Array, labels: jax.Array,
                   mask: jax.Array) -> dict[str, jax.Array]:
    """Sums over the unmasked examples of a batch: correct top-1, correct top-5, loss, count."""
    logits = model.apply(variables, images, train=False)
    k = min(5, logits.shape[-1])
    top_k = jax.lax.top_k(logits, k)[1]
    hits = top_k == labels[:, None]
    loss = optax.softmax_cross_entropy_with_integer_labels(logits, labels)
    return {"correct_top1": jnp.sum(hits[:, 0] & mask, dtype=jnp.int32),
            "correct_top5": jnp.sum(jnp.any(hits, axis=-1) & mask, dtype=jnp.int32),
            "loss": jnp.sum(jnp.where(mask, loss, 0.0)),
            "count": jnp.sum(mask, dtype=jnp.int32)}


def evaluate(model: DPN, variables: dict[str, Any], dataset: str, data_config: DataConfig, *,
             batch_size: int = 256, data_dir: str | None = None, manual_dir: str | None = None,
             split: str | None = None, progress: bool = True) -> dict[str, Any]:
    """Accuracy (percent, as timm's `validate.py`) and mean cross-entropy of `model` on `dataset`.

    `batch_size` is global: split over processes, then over each process's devices. The batch
    is sharded over all devices of all processes with `jit`; sums come back replicated.
    `skipped` counts the images the pipeline could not decode (left out of every metric).
    """
    from dpn_jax.data import pipeline  # grain: imported only when there is data to read
    from dpn_jax.data.transforms import normalize

    devices = jax.devices()
    if batch_size % len(devices):
        raise ValueError(f"batch size {batch_size} is not divisible by the {len(devices)} devices")
    info = pipeline.dataset_info(dataset, data_dir=data_dir, eval_split=split,
                                       manual_dir=manual_dir)
    if info.num_classes != model.num_classes:
        raise ValueError(f"dataset {dataset} has {info.num_classes} classes, the model "
                         f"{model.num_classes}")

    mesh = Mesh(np.asarray(devices), ("batch",))
    batch_sharding, replicated = NamedSharding(mesh, P("batch")), NamedSharding(mesh, P())
    c = data_config
    step = jax.jit(lambda v, x, y, m: _batch_metrics(model, v, normalize(x, c.mean, c.std), y, m),
                   out_shardings=replicated)
    variables = jax.device_put(variables, replicated)

    def to_global(local: np.ndarray) -> jax.Array:
        """This process's [per-process batch, ...] -> one [global batch, ...] array."""
        return jax.make_array_from_process_local_data(batch_sharding, local)

    batches = pipeline.eval_batches(
        dataset, batch_size=batch_size // jax.process_count(),
        image_size=data_config.image_size, crop_pct=data_config.crop_pct,
        interpolation=data_config.interpolation, data_dir=data_dir, manual_dir=manual_dir,
        eval_split=split)
    num_steps = -(-info.num_eval_examples // batch_size)
    totals = dict.fromkeys(("correct_top1", "correct_top5", "loss", "count"), 0)
    bar = tqdm(batches, total=num_steps, unit="batch", disable=not progress or jax.process_index() != 0)
    start = time.perf_counter()
    compiled_at = compiled_count = None  # throughput is timed after the first step (compilation)
    for batch in bar:
        metrics = step(variables, to_global(batch["image"]), to_global(batch["label"]),
                       to_global(batch["mask"]))
        for key, value in metrics.items():
            totals[key] += value.addressable_data(0).item()
        if compiled_at is None:
            compiled_at, compiled_count = time.perf_counter(), totals["count"]
        bar.set_postfix(top1=f"{100 * totals['correct_top1'] / max(totals['count'], 1):.2f}")
    end = time.perf_counter()

    count = totals["count"]
    if count == 0:
        raise ValueError(f"dataset {dataset} has no evaluation examples")
    timed = count - compiled_count
    top1, top5 = 100 * totals["correct_top1"] / count, 100 * totals["correct_top5"] / count
    return {"top1": top1, "top1_err": 100 - top1, "top5": top5, "top5_err": 100 - top5,
            "loss": totals["loss"] / count, "count": count, "skipped": info.num_eval_examples - count,
            "img_per_sec": timed / (end - compiled_at) if timed else count / (end - start),
            "seconds": end - start}
