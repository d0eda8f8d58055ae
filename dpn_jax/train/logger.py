"""Training records: WORKDIR/metrics.jsonl, TensorBoard scalars and a PNG of the curves.

Only process 0 writes. `metrics.jsonl` is appended to, so a resumed run continues the same file.
TensorBoard events are written with TensorFlow's own `tf.summary.write` and the scalars plugin's
metadata: `tf.summary.scalar` would need the `tensorboard` package, which is not a dependency.
"""
from __future__ import annotations

import json
import os
from typing import Any

import jax


class MetricsLogger:
    def __init__(self, workdir: str | os.PathLike):
        self.workdir = os.fspath(workdir)
        self.enabled = jax.process_index() == 0
        self._writer = None
        if self.enabled:
            import tensorflow as tf
            from tensorflow.core.framework import summary_pb2
            self._tf = tf
            self._writer = tf.summary.create_file_writer(os.path.join(self.workdir, "tensorboard"))
            self._scalar_metadata = summary_pb2.SummaryMetadata(
                plugin_data=summary_pb2.SummaryMetadata.PluginData(plugin_name="scalars"))

    @property
    def jsonl_path(self) -> str:
        return os.path.join(self.workdir, "metrics.jsonl")

    def write(self, step: int, scalars: dict[str, Any], **context: Any) -> None:
        """One JSON line {"step", **context, **scalars} and one TensorBoard scalar per entry."""
        if not self.enabled:
            return
        scalars = {k: v if isinstance(v, int) else float(v) for k, v in scalars.items()}
        with open(self.jsonl_path, "a") as f:
            f.write(json.dumps({"step": int(step), **context, **scalars}) + "\n")
        with self._writer.as_default(step=int(step)):
            for name, value in scalars.items():
                self._tf.summary.write(name, self._tf.constant(float(value), self._tf.float32),
                                       metadata=self._scalar_metadata)
        self._writer.flush()

    def plot_curves(self, path: str | os.PathLike | None = None) -> str | None:
        """Loss, top-1 and learning rate against step, from the whole metrics.jsonl, as a PNG."""
        if not self.enabled or not os.path.exists(self.jsonl_path):
            return None
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        with open(self.jsonl_path) as f:
            records = [json.loads(line) for line in f if line.strip()]
        panels = (("loss", ("train_loss", "eval_loss", "eval_loss_ema")),
                  ("top-1", ("train_top1", "eval_top1", "eval_top1_ema")),
                  ("learning rate", ("lr",)))
        fig, axes = plt.subplots(1, 3, figsize=(15, 4))
        for ax, (title, keys) in zip(axes, panels):
            for key in keys:
                points = [(r["step"], r[key]) for r in records if key in r]
                if points:
                    ax.plot(*zip(*points), marker="." if key.startswith("eval") else None, label=key)
            ax.set_title(title)
            ax.set_xlabel("step")
            ax.legend()
        fig.tight_layout()
        path = os.fspath(path or os.path.join(self.workdir, "training_curves.png"))
        fig.savefig(path, dpi=100)
        plt.close(fig)
        return path

    def close(self) -> None:
        if self._writer is not None:
            self._writer.close()
