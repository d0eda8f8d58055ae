"""Loss, top-1 and top-5 of a DPN over a dataset: one evaluation for the trainer and dpn-evaluate.

Every device runs `make_eval_step`'s per-device step under the runner and the sums are added
over devices (`sum_over_devices`) and batches; each example is counted exactly once (the
pipeline pads the last batches and masks the padding). Metrics are fractions; percent is only
for people to read.
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Callable, Iterable, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import optax
from jax import lax
from tqdm import tqdm

from dpn_jax.data import pipeline
from dpn_jax.data.preprocessing import Preprocessing
from dpn_jax.data.transforms import normalize
from dpn_jax.errors import DataError
from dpn_jax.models.dpn import DPN
from dpn_jax.runtime.runner import REPLICATED, SHARDED, Runner, sum_over_devices


def top_k_correct(logits: jax.Array, labels: jax.Array, k: int) -> jax.Array:
    """1.0 where the label is among the k highest logits, per example."""
    k = min(k, logits.shape[-1])
    return jnp.any(lax.top_k(logits, k)[1] == labels[:, None], axis=-1).astype(jnp.float32)


def make_eval_step(model: DPN, mean: Sequence[float], std: Sequence[float]) -> Callable:
    """Sums of loss / top-1 / top-5 / count over real (mask True) examples, over all devices.

    Takes uint8 images and normalises them on the device.
    """

    def eval_step(variables: dict, batch: dict) -> dict:
        images = normalize(batch["image"], mean, std, model.dtype)
        logits = model.apply(variables, images, train=False)
        mask = batch["mask"].astype(jnp.float32)
        losses = optax.softmax_cross_entropy_with_integer_labels(logits, batch["label"])
        sums = {
            "loss": jnp.sum(losses * mask),
            "top1": jnp.sum(top_k_correct(logits, batch["label"], 1) * mask),
            "top5": jnp.sum(top_k_correct(logits, batch["label"], 5) * mask),
            "count": jnp.sum(mask),
        }
        return sum_over_devices(sums)

    return eval_step


@dataclasses.dataclass(frozen=True)
class EvalResult:
    loss: float  # mean cross-entropy
    top1: float  # fraction of examples whose label is the top logit
    top5: float
    count: int  # examples evaluated
    img_per_sec: float  # after the first batch (which includes compilation)
    seconds: float
    prepared: str = ""  # how the dataset's images were prepared, if not the originals

    def metrics(self, suffix: str = "") -> dict[str, float]:
        """The trainer's record of this evaluation: eval_loss{suffix}, eval_top1{suffix}, ..."""
        return {
            f"eval_loss{suffix}": self.loss,
            f"eval_top1{suffix}": self.top1,
            f"eval_top5{suffix}": self.top5,
            f"eval_examples{suffix}": self.count,
        }


def compile_eval_step(
    runner: Runner, model: DPN, mean: Sequence[float], std: Sequence[float]
) -> Callable:
    """`make_eval_step` over the runner's devices: (replicated variables, sharded batch) -> sums."""
    return runner.compile(
        make_eval_step(model, mean, std), in_specs=(REPLICATED, SHARDED), out_specs=REPLICATED
    )


def run_evaluation(
    runner: Runner,
    eval_step: Callable,
    variables: Any,
    batches: Iterable[dict],
    *,
    progress: tqdm | None = None,
) -> EvalResult:
    """Evaluate `variables` (replicated) over this process's `batches`; sums stay on the devices
    until the end, so the loop never waits for a batch to finish."""
    start = time.perf_counter()
    totals, first_done = None, None
    for batch in batches:
        sums = eval_step(variables, runner.put_batch(batch))
        totals = sums if totals is None else jax.tree.map(jnp.add, totals, sums)
        if first_done is None:
            jax.block_until_ready(totals)
            first_done = (time.perf_counter(), float(Runner.value(totals["count"])))
        if progress is not None:
            progress.update(1)
    jax.block_until_ready(totals)  # the rate counts the batches still computing
    end = time.perf_counter()
    if totals is None:
        raise DataError("the evaluation split has no examples")
    total = Runner.value(totals)
    count = float(total["count"])
    if count == 0:
        raise DataError("no evaluation example could be decoded")
    timed = count - first_done[1]
    rate = timed / (end - first_done[0]) if timed and end > first_done[0] else count / (end - start)
    return EvalResult(
        loss=float(total["loss"]) / count,
        top1=float(total["top1"]) / count,
        top5=float(total["top5"]) / count,
        count=int(count),
        img_per_sec=rate,
        seconds=end - start,
    )


def evaluate_dataset(
    model: DPN,
    variables: Any,
    dataset: str,
    preprocessing: Preprocessing,
    *,
    batch_size: int = 256,
    data_dir: str | None = None,
    manual_dir: str | None = None,
    split: str | None = None,
    parallelism: str = "shard_map",
    progress: bool = True,
) -> tuple[EvalResult, int]:
    """(result, images skipped as undecodable) of `model` on a dataset spec's evaluation split,
    fed as `preprocessing` says (resolved: `Preprocessing.resolve`).

    `batch_size` is global: split over processes, then over each process's devices.
    """
    runner = Runner(parallelism)
    per_process = runner.check_batch_size(batch_size, "batch size")
    info = pipeline.dataset_info(
        dataset, data_dir=data_dir, eval_split=split, manual_dir=manual_dir
    )
    if info.num_classes != model.num_classes:
        raise DataError(
            f"dataset {dataset} has {info.num_classes} classes, the model {model.num_classes}"
        )
    batches = pipeline.eval_batches(
        dataset,
        batch_size=per_process,
        image_size=preprocessing.image_size,
        crop_pct=preprocessing.crop_pct,
        interpolation=preprocessing.interpolation,
        data_dir=data_dir,
        manual_dir=manual_dir,
        eval_split=split,
    )
    bar = tqdm(
        total=-(-info.num_eval_examples // batch_size),
        unit="batch",
        disable=not progress or jax.process_index() != 0,
    )
    with bar:
        result = run_evaluation(
            runner,
            compile_eval_step(runner, model, preprocessing.mean, preprocessing.std),
            runner.replicate(variables),
            batches,
            progress=bar,
        )
    result = dataclasses.replace(result, prepared=info.prepared)
    return result, info.num_eval_examples - result.count
