"""WORKDIR/metrics.jsonl on resume: later steps dropped, a damaged tail set aside (never lost)."""

from __future__ import annotations

import json
import logging

from dpn_jax.train.logger import METRICS_FILE, MetricsLogger


def write_records(workdir, steps, tail: bytes = b"") -> bytes:
    text = "".join(json.dumps({"step": s, "train_loss": 1.0 / s}) + "\n" for s in steps)
    (workdir / METRICS_FILE).write_bytes(text.encode() + tail)
    return tail


def steps_in(workdir) -> list[int]:
    return [json.loads(line)["step"] for line in (workdir / METRICS_FILE).read_text().splitlines()]


def test_resume_drops_the_records_of_later_steps(tmp_path):
    write_records(tmp_path, [1, 2, 3, 4])
    MetricsLogger(tmp_path, resume_step=2).close()
    assert steps_in(tmp_path) == [1, 2]


def test_a_damaged_tail_is_set_aside_and_the_run_resumes(tmp_path, caplog):
    cut = write_records(tmp_path, [1, 2, 3], b'{"step": 4, "train_lo')  # a cut last line
    with caplog.at_level(logging.WARNING):
        logger = MetricsLogger(tmp_path, resume_step=3)
    logger.write(4, {"train_loss": 0.25})
    logger.close()
    assert steps_in(tmp_path) == [1, 2, 3, 4]
    assert (tmp_path / f"{METRICS_FILE}.damaged-1").read_bytes() == cut
    [warning] = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert warning == (
        f"{tmp_path / METRICS_FILE}: line 4 on is damaged; kept the 3 records before it and "
        f"moved the rest to {tmp_path / METRICS_FILE}.damaged-1"
    )


def test_records_of_the_wrong_shape_are_damage_too_and_never_overwritten(tmp_path):
    (tmp_path / f"{METRICS_FILE}.damaged-1").write_text("kept from before\n")
    tail = write_records(tmp_path, [1], b'[1, 2]\n{"step": 2}\n\xff\xfe\n')
    MetricsLogger(tmp_path, resume_step=2).close()
    assert steps_in(tmp_path) == [1]
    assert (tmp_path / f"{METRICS_FILE}.damaged-1").read_text() == "kept from before\n"
    assert (tmp_path / f"{METRICS_FILE}.damaged-2").read_bytes() == tail
