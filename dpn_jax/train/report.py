"""What the trainer tells its user: what runs where, where it resumed, how it ended.

The lines are written by process 0 only (through tqdm, so they do not tear the progress bar).
A run ends in one of three ways and says which: finished (the result and where the model is),
stopped by a signal (the step reached and that the same command resumes it), or nothing to do
(the workdir already holds more steps than this config asks for).
"""

from __future__ import annotations

import json
import signal
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import jax
import numpy as np
import tqdm

from dpn_jax.errors import QUOTE_LIMIT, printable


def say(line: str, *, every_process: bool = False) -> None:
    """One line for the user from process 0 (or from each process: what each one saved),
    escaped (it may quote file and class names)."""
    if every_process or jax.process_index() == 0:
        tqdm.tqdm.write(printable(line, 5 * QUOTE_LIMIT))


def describe_run(
    *,
    arch: str,
    model_kwargs: Mapping[str, Any],
    params: Any,
    dataset: str,
    num_train: int,
    num_eval: int,
    num_classes: int,
    devices: Sequence[jax.Device],
    workdir: Path,
    prepared: str = "",
) -> str:
    """The run's first line: what is really trained, on what (`prepared`: how the images are
    read when not as timm would, `data.resized.describe_images`), where."""
    size = sum(int(np.prod(leaf.shape)) for leaf in jax.tree_util.tree_leaves(params))
    overrides = ", ".join(f"{k}={v}" for k, v in sorted(model_kwargs.items()))
    model = f"{arch} ({overrides})" if overrides else arch
    processes = jax.process_count()
    return (
        f"training {model}, {size / 1e6:.2f}M params, on {printable(dataset, QUOTE_LIMIT)} "
        f"({num_train} train / {num_eval} eval images{', ' * bool(prepared)}{prepared}, "
        f"{num_classes} classes), "
        f"{len(devices)} {devices[0].platform} device{'s' * (len(devices) > 1)} in "
        f"{processes} process{'es' * (processes > 1)}; workdir {workdir}"
    )


def resuming(step: int, total_steps: int, checkpoint: Path) -> str:
    return f"resuming from step {step} of {total_steps} ({checkpoint})"


def nothing_to_train(step: int, total_steps: int, workdir: Path) -> str:
    return (
        f"{workdir} already holds step {step}, past the {total_steps} steps this config asks "
        f"for: nothing trained (the model of step {step} is in {workdir / 'model'})"
    )


def stopped(
    signum: int | None, step: int, total_steps: int, checkpoints: Path, *, waiting: bool = False
) -> str:
    name = signal.Signals(signum).name if signum else "a signal"
    return (
        f"{name}{' while waiting for data' if waiting else ''}: saved step {step} to "
        f"{checkpoints}; stopped at step {step} of {total_steps}, resume with the same command"
    )


def finished(metrics: Mapping[str, float], model: Path) -> list[str]:
    """The result of a finished run and where its model is: the exported weights' accuracy last
    (the EMA's when there is one, after a line with the raw weights')."""
    saved = f"model saved to {model} (dpn-predict --checkpoint {model} IMAGE)"
    if not metrics:
        return [saved]
    ema = "eval_top1_ema" in metrics
    suffix = "_ema" if ema else ""
    raw = [f"raw weights top-1: {100 * metrics['eval_top1']:.2f}% (not exported)"] if ema else []
    return [
        *raw,
        f"final validation top-1 ({'EMA' if ema else 'raw'} weights, exported): "
        f"{100 * metrics['eval_top1' + suffix]:.2f}% (top-5 "
        f"{100 * metrics['eval_top5' + suffix]:.2f}%, {metrics['eval_examples']} images); " + saved,
    ]


def last_evaluation(metrics_file: Path) -> dict[str, float]:
    """The last evaluation recorded in metrics.jsonl (for a finished run started again), or {}."""
    try:
        lines = metrics_file.read_text(encoding="utf-8").splitlines()
    except (OSError, UnicodeDecodeError):
        return {}
    for line in reversed(lines):
        try:
            record = json.loads(line)
        except ValueError:
            continue
        if isinstance(record, dict) and {"eval_top1", "eval_top5", "eval_examples"} <= set(record):
            return record
    return {}


def restart_eta(progress: tqdm.tqdm, step: int) -> None:
    """Count the progress bar's rate from `step` on: the first step compiles, and an ETA from
    it reads hours. Needs `smoothing=0` (tqdm then averages since `start_t` over n - initial)."""
    if progress.disable:  # processes other than 0 show no bar (and a disabled bar has no clock)
        return
    progress.initial = step
    progress.start_t = progress.last_print_t = progress._time()
