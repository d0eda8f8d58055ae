"""A run's orbax checkpoints: the train state as it lives on the mesh, and each process's data.

Orbax writes every step into a temporary directory and renames it when complete, so a save cut
off by preemption leaves no step behind. The train state is saved as the global (replicated)
arrays it is; each process writes its part and nothing is gathered, and it restores onto
whatever devices the resumed run has. Beside it each process saves its input pipeline's state
(`process_I-of-N.json`) and process 0 the run's description (`meta`) and `checksums.json`: the
shape, dtype and CRC-32 of every array of the state and of `meta`, CRC-protected itself.

A step is resumed from only when everything in it is intact: orbax's metadata agrees with
checksums.json, every restored array has its CRC (each process checks its own copy), and each
process's data state has its CRC. Any damage - a flipped byte, a deleted or truncated file, a
data state of the wrong shape - sets the step aside as `STEP.corrupt` (kept for inspection)
with a warning, and the one before it is tried, every process the same. Only an intact step
whose arrays have other shapes than this run's is "another model or configuration". When every
step is damaged the run stops, naming what was set aside: starting over is the user's choice.
"""

from __future__ import annotations

import json
import logging
import os
import zlib
from pathlib import Path
from typing import Any

import jax
import numpy as np
import orbax.checkpoint as ocp
from jax.experimental import multihost_utils
from orbax.checkpoint.handlers import DefaultCheckpointHandlerRegistry, JsonCheckpointHandler

from dpn_jax.errors import ConfigError, OutputError, WeightsError, first_line
from dpn_jax.runtime.runner import Runner
from dpn_jax.system.files import remove_failed_write
from dpn_jax.system.orbax_io import ignore_failure_aftermath, os_error_of, quiet_about
from dpn_jax.train.state import TrainState

log = logging.getLogger(__name__)

CORRUPT_SUFFIX = ".corrupt"
CHECKSUMS_ITEM, CHECKSUMS_FILE = "checksums", "checksums.json"
_ORBAX_TMP_MARK = ".orbax-checkpoint-tmp"


class DamagedCheckpoint(Exception):
    """A part of a checkpoint step is missing, unreadable or not what was saved."""


class Checkpoints:
    """WORKDIR/checkpoints: save every so often, resume from the newest intact step."""

    def __init__(self, workdir: str | os.PathLike, *, keep: int):
        self.directory = Path(workdir).absolute() / "checkpoints"
        data_state = JsonCheckpointHandler(
            filename=f"process_{jax.process_index()}-of-{jax.process_count()}.json",
            multiprocessing_options=ocp.options.MultiprocessingOptions(primary_host=None),
        )
        registry = DefaultCheckpointHandlerRegistry()
        checksums = JsonCheckpointHandler(filename=CHECKSUMS_FILE)
        for args in (ocp.args.JsonSave, ocp.args.JsonRestore):
            registry.add("data", args, data_state)
            registry.add("meta", args)
            registry.add(CHECKSUMS_ITEM, args, checksums)
        for args in (ocp.args.StandardSave, ocp.args.StandardRestore):
            registry.add("state", args)
        options = ocp.CheckpointManagerOptions(
            max_to_keep=keep,
            create=True,
            enable_async_checkpointing=True,
            cleanup_tmp_directories=True,
        )
        self._manager = ocp.CheckpointManager(
            self.directory, options=options, handler_registry=registry
        )
        self._quiet = quiet_about(self.directory)  # asynchronous saves report failures late
        self._quiet.__enter__()

    def restore_latest(self, target: Any) -> tuple[TrainState, dict | None] | None:
        """(state, this process's data state) of the newest intact step, or None without any.

        `target` gives the state's structure, shapes and shardings (`Runner.abstract_state`).
        A damaged step is set aside (`STEP.corrupt`) with a warning and the one before it
        tried. Checkpoints of another model or configuration are a ConfigError (they are not
        damaged, the run is pointed at the wrong workdir); a directory whose steps are all set
        aside is a WeightsError listing them.
        """
        for step in sorted(self._manager.all_steps(), reverse=True):
            try:
                restored, damage = self._restore_verified(step, target), None
            except ConfigError:
                raise
            except Exception as error:  # orbax and tensorstore raise many types for bad files
                ignore_failure_aftermath()
                restored, damage = None, first_line(error)
            if _on_every_process(damage is None):
                return restored
            log.warning(
                "checkpoint step %d in %s cannot be read (%s); set aside as %s, trying the "
                "one before",
                step,
                self.directory,
                damage or "damaged on another process",
                self._set_aside(step),
            )
        set_aside = sorted(self.directory.glob(f"*{CORRUPT_SUFFIX}*"))
        if set_aside:
            raise WeightsError(
                f"no intact checkpoint in {self.directory}: every step is damaged and set aside "
                f"({', '.join(map(str, set_aside))}); to start over, use another --workdir or "
                "move those out of checkpoints/ (dpn_jax deletes none of them)"
            )
        return None

    def _restore_verified(self, step: int, target: Any) -> tuple[TrainState, Any]:
        """Restore `step` and check it against its checksums; DamagedCheckpoint (or orbax's
        error) if a part of it is not what was saved, ConfigError if an intact step does not
        fit `target`."""
        record = self._checksums(step)
        metadata = self._manager.item_metadata(step).get("state")
        if metadata is None:
            raise DamagedCheckpoint("state/_METADATA is missing or unreadable")
        saved = _leaf_shapes(metadata)
        if record is not None and saved != {
            name: tuple(entry["shape"]) for name, entry in record["state"].items()
        }:
            raise DamagedCheckpoint(f"state/_METADATA disagrees with {CHECKSUMS_FILE}")
        self._check_structure(saved, _leaf_shapes(target))
        items = {"state": ocp.args.StandardRestore(target), "data": ocp.args.JsonRestore()}
        if record is not None:
            items["meta"] = ocp.args.JsonRestore()
        restored = self._manager.restore(step, args=ocp.args.Composite(**items))
        if record is None:  # written before checksums were, or they were deleted
            if isinstance(restored.data, dict) and "crc32" in restored.data:
                raise DamagedCheckpoint(f"{CHECKSUMS_ITEM}/{CHECKSUMS_FILE} is missing")
            return restored.state, restored.data
        _verify(_checksums_of(restored.state, restored.meta), record)
        return restored.state, _checked_data_state(restored.data)

    def _checksums(self, step: int) -> dict[str, Any] | None:
        """The step's checksums.json (`_checksums_of`; None for a step written before them);
        it must be intact itself."""
        path = self.directory / str(step) / CHECKSUMS_ITEM / CHECKSUMS_FILE
        if not path.parent.is_dir():
            return None
        try:
            record = json.loads(path.read_bytes())
            checksums = record["checksums"]
            intact = record["crc32"] == _crc32_json(checksums)
        except (OSError, ValueError, KeyError, TypeError) as error:
            raise DamagedCheckpoint(f"{CHECKSUMS_FILE}: {first_line(error)}") from None
        if not intact:
            raise DamagedCheckpoint(f"{CHECKSUMS_FILE} does not match its own checksum")
        return checksums

    def _check_structure(self, saved: dict, wanted: dict) -> None:
        if saved != wanted:
            differing = sorted(set(saved.items()) ^ set(wanted.items()))[0][0]
            raise ConfigError(
                f"{self.directory} holds checkpoints of another model or configuration (first "
                f"difference: {differing}); resume with the same config or use another --workdir"
            )

    def _set_aside(self, step: int) -> Path:
        """Rename `step` to STEP.corrupt (STEP.corrupt-2, ... if that was taken before)."""
        path = self.directory / str(step)
        aside, number = path.with_name(f"{step}{CORRUPT_SUFFIX}"), 1
        while os.path.lexists(aside):
            number += 1
            aside = path.with_name(f"{step}{CORRUPT_SUFFIX}-{number}")
        self._sync(f"dpn_jax setting aside checkpoint {step}")  # every process named the same
        if jax.process_index() == 0:
            path.rename(aside)
        self._sync(f"dpn_jax set aside checkpoint {step}")
        self._manager.reload()
        return aside

    @staticmethod
    def _sync(name: str) -> None:
        if jax.process_count() > 1:
            multihost_utils.sync_global_devices(name)

    def save(self, state: TrainState, data_state: dict, meta: dict) -> None:
        """Start an asynchronous save of `state` (global arrays) at its step.

        A save the disk refuses (this one or the previous asynchronous one) ends the run with
        one line; earlier checkpoints stay intact and the unfinished step's temporary directory
        is removed. (The train step never applies a NaN/Inf update, so the state is finite.)
        """
        step = int(Runner.value(state.step))
        checksums = _checksums_of(state, meta)
        args = ocp.args.Composite(
            state=ocp.args.StandardSave(state),
            data=ocp.args.JsonSave({"data_state": data_state, "crc32": _crc32_json(data_state)}),
            meta=ocp.args.JsonSave(meta),
            **{
                CHECKSUMS_ITEM: ocp.args.JsonSave(
                    {"checksums": checksums, "crc32": _crc32_json(checksums)}
                )
            },
        )
        self._guard(lambda: self._manager.save(step, args=args, force=True))

    def meta(self, step: int) -> dict:
        """The run description saved with `step` (process 0's `meta`)."""
        return self._manager.restore(
            step, args=ocp.args.Composite(meta=ocp.args.JsonRestore())
        ).meta

    def wait(self) -> None:
        """Block until pending saves are complete (raising as `save` does if one failed)."""
        self._guard(self._manager.wait_until_finished)

    def close(self) -> None:
        try:
            self._guard(self._manager.close)
        finally:
            self._quiet.__exit__(None, None, None)

    def _guard(self, operation) -> None:
        """Run an orbax operation; a write the system refused becomes one line (OutputError)."""
        try:
            operation()
        except (OSError, ValueError) as error:
            refused = os_error_of(error, self.directory)
            if refused is None:
                raise
            self._remove_unfinished()
            raise OutputError(
                f"saving a checkpoint in {self.directory} failed: {refused.strerror}"
            ) from None

    def _remove_unfinished(self) -> None:
        """Orbax's temporary step directories (never a finished step: those have no tmp mark)."""
        if jax.process_index() == 0 and self.directory.is_dir():
            for entry in self.directory.iterdir():
                if _ORBAX_TMP_MARK in entry.name:
                    remove_failed_write(entry)


def _leaves(tree: Any) -> dict[str, Any]:
    """'opt_state/1/0/trace/classifier/bias' -> leaf, for a tree or orbax's metadata of one
    (which spells dataclass fields and tuple entries as dict keys)."""

    def name(key: Any) -> str:
        for attribute in ("key", "name", "idx"):
            if hasattr(key, attribute):
                return str(getattr(key, attribute))
        return str(key)

    return {
        "/".join(map(name, path)): leaf
        for path, leaf in jax.tree_util.tree_flatten_with_path(tree)[0]
    }


def _leaf_shapes(tree: Any) -> dict[str, tuple[int, ...]]:
    return {name: tuple(leaf.shape) for name, leaf in _leaves(tree).items()}


# --- checksums ----------------------------------------------------------------------------------
# CRC-32 finds every error burst up to 32 bits (a flipped byte, a few) and random damage with
# probability 1 - 2^-32; it protects against damage, not against someone forging a checkpoint.


def _crc32_json(value: Any) -> int:
    return zlib.crc32(json.dumps(value, sort_keys=True).encode())


def _checksums_of(state: TrainState, meta: Any) -> dict[str, Any]:
    """{"state": {name: {"shape", "dtype", "crc32"}} of each global array of `state` (the CRC
    of this process's copy), "meta": CRC of `meta`}."""
    arrays = {}
    for name, leaf in _leaves(state).items():
        local = np.ascontiguousarray(Runner.value(leaf))
        arrays[name] = {
            "shape": list(leaf.shape),
            "dtype": str(leaf.dtype),
            "crc32": zlib.crc32(local.reshape(-1).view(np.uint8)),
        }
    return {"state": arrays, "meta": _crc32_json(meta)}


def _verify(restored: dict[str, Any], saved: dict[str, Any]) -> None:
    """DamagedCheckpoint naming the first restored part whose checksum is not the saved one."""
    if restored["meta"] != saved["meta"]:
        raise DamagedCheckpoint("meta is not what was saved (checksum mismatch)")
    for name, entry in restored["state"].items():
        if saved["state"].get(name) != entry:
            raise DamagedCheckpoint(f"state {name} is not what was saved (checksum mismatch)")


def _checked_data_state(saved: Any) -> dict:
    """The data state out of its checksummed wrapper; DamagedCheckpoint if it is not intact."""
    if not (isinstance(saved, dict) and set(saved) == {"data_state", "crc32"}):
        raise DamagedCheckpoint("the data state is not the object dpn_jax writes")
    if saved["crc32"] != _crc32_json(saved["data_state"]):
        raise DamagedCheckpoint("the data state is not what was saved (checksum mismatch)")
    return saved["data_state"]


def _on_every_process(ok: bool) -> bool:
    """Whether `ok` holds on every process (each checks what it restored; all must agree)."""
    if jax.process_count() == 1:
        return ok
    return bool(np.all(multihost_utils.process_allgather(np.array(ok))))
