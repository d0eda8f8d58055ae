"""Training records: WORKDIR/metrics.jsonl, TensorBoard scalars and a PNG of the curves.

Only process 0 writes. A resumed run continues the same records from the step it resumed at:
lines of later steps (written by the interrupted run after its last checkpoint) are dropped
from metrics.jsonl, and TensorBoard is told to discard them (`purge_step`), so no step is
recorded twice. A damaged metrics.jsonl (a line cut by a crash, or not a record) keeps the
records before the first damaged line; that line and the rest are moved, as they were, to
`metrics.jsonl.damaged-N` beside it with a warning, and the run goes on. TensorBoard events are
written with tensorboardX (no TensorFlow needed).
"""

from __future__ import annotations

import itertools
import json
import logging
import numbers
import os
from pathlib import Path
from typing import Any

import jax

from dpn_jax.errors import OutputError

log = logging.getLogger(__name__)

METRICS_FILE = "metrics.jsonl"
DAMAGED_SUFFIX = ".damaged-"


class MetricsLogger:
    def __init__(self, workdir: str | os.PathLike, *, resume_step: int = 0):
        self.workdir = Path(workdir)
        self.enabled = jax.process_index() == 0
        self._writer = None
        if self.enabled:
            from tensorboardX import SummaryWriter

            self._keep_records_up_to(resume_step)
            self._writer = SummaryWriter(
                str(self.workdir / "tensorboard"),
                purge_step=resume_step + 1 if resume_step else None,
            )

    @property
    def jsonl_path(self) -> Path:
        return self.workdir / METRICS_FILE

    def _read(self) -> tuple[list[dict[str, Any]], tuple[int, bytes] | None, bool]:
        """(the records before the first damaged line, (its number, the bytes from it on) or
        None, whether the file ends with a newline). A record is a JSON object with an integer
        "step"."""
        try:
            content = self.jsonl_path.read_bytes()
        except FileNotFoundError:
            return [], None, True
        records, offset = [], 0
        for number, line in enumerate(content.splitlines(keepends=True), 1):
            if line.strip():
                try:
                    record = json.loads(line)
                except ValueError:  # (UnicodeDecodeError included)
                    record = None
                step = record.get("step") if isinstance(record, dict) else None
                if not isinstance(step, numbers.Integral) or isinstance(step, bool):
                    return records, (number, content[offset:]), True
                records.append(record)
            offset += len(line)
        return records, None, content.endswith(b"\n") or not content

    def _keep_records_up_to(self, step: int) -> None:
        """Rewrite metrics.jsonl (atomically) without the records of steps after `step`, or a
        damaged tail (set aside first)."""
        records, damaged, complete = self._read()
        if damaged:
            self._set_aside(*damaged, intact=len(records))
        kept = [r for r in records if r["step"] <= step]
        if len(kept) == len(records) and not damaged and complete:
            return
        staging = self.jsonl_path.with_name(f".{METRICS_FILE}.{os.getpid()}.tmp")
        try:
            staging.write_text("".join(json.dumps(r) + "\n" for r in kept))
            os.replace(staging, self.jsonl_path)
        except OSError as error:
            staging.unlink(missing_ok=True)
            raise OutputError(f"cannot rewrite {self.jsonl_path}: {error.strerror}") from None

    def _set_aside(self, line: int, damaged: bytes, *, intact: int) -> None:
        """Write `damaged` (from `line` on) to the first free metrics.jsonl.damaged-N."""
        for number in itertools.count(1):
            path = self.jsonl_path.with_name(f"{METRICS_FILE}{DAMAGED_SUFFIX}{number}")
            try:
                with open(path, "xb") as file:
                    file.write(damaged)
                break
            except FileExistsError:
                continue
            except OSError as error:
                raise OutputError(f"cannot write {path}: {error.strerror}") from None
        log.warning(
            "%s: line %d on is damaged; kept the %d records before it and moved the rest to %s",
            self.jsonl_path,
            line,
            intact,
            path,
        )

    def write(self, step: int, scalars: dict[str, Any], **context: Any) -> None:
        """One JSON line {"step", **context, **scalars} and one TensorBoard scalar per entry."""
        if not self.enabled:
            return
        scalars = {k: v if isinstance(v, int) else float(v) for k, v in scalars.items()}
        try:
            with open(self.jsonl_path, "a") as f:
                f.write(json.dumps({"step": int(step), **context, **scalars}) + "\n")
            for name, value in scalars.items():
                self._writer.add_scalar(name, value, int(step))
            self._writer.flush()
        except OSError as error:
            raise OutputError(
                f"cannot write the training records in {self.workdir}: {error.strerror}"
            ) from None

    def plot_curves(self) -> Path | None:
        """Loss, top-1 and learning rate against step, from the whole metrics.jsonl, as a PNG."""
        records = self._read()[0] if self.enabled else []
        if not records:
            return None
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        panels = (
            ("loss", ("train_loss", "eval_loss", "eval_loss_ema")),
            ("top-1", ("train_top1", "eval_top1", "eval_top1_ema")),
            ("learning rate", ("lr",)),
            ("input wait (fraction of the step)", ("data_wait",)),
        )
        fig, axes = plt.subplots(1, len(panels), figsize=(5 * len(panels), 4))
        for ax, (title, keys) in zip(axes, panels):
            for key in keys:
                points = [(r["step"], r[key]) for r in records if key in r]
                if points:
                    ax.plot(
                        *zip(*points), marker="." if key.startswith("eval") else None, label=key
                    )
            ax.set_title(title)
            ax.set_xlabel("step")
            ax.legend()
        fig.tight_layout()
        path = self.workdir / "training_curves.png"
        fig.savefig(path, dpi=100)
        plt.close(fig)
        return path

    def close(self) -> None:
        if self._writer is not None:
            self._writer.close()
