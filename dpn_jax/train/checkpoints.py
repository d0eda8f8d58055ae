"""A run's orbax checkpoints: the train state as it lives on the mesh, and each process's data.

Orbax writes every step into a temporary directory and renames it when complete, so a save cut
off by preemption leaves no step behind. The train state is saved as the global (replicated)
arrays it is; each process writes its part and nothing is gathered, and it restores onto
whatever devices the resumed run has. Beside it each process saves its input pipeline's state
(`process_I-of-N.json`) and process 0 the run's description (`meta`).
"""

from __future__ import annotations

import logging
import os
import shutil
from pathlib import Path
from typing import Any

import jax
import orbax.checkpoint as ocp
from jax.experimental import multihost_utils
from orbax.checkpoint.handlers import DefaultCheckpointHandlerRegistry, JsonCheckpointHandler

from dpn_jax.errors import ConfigError, OutputError
from dpn_jax.errors import first_line as _first_line
from dpn_jax.runtime.orbax_io import ignore_failure_aftermath, os_error_of, quiet_about
from dpn_jax.runtime.runner import Runner
from dpn_jax.train.state import TrainState

log = logging.getLogger(__name__)

CORRUPT_SUFFIX = ".corrupt"
_ORBAX_TMP_MARK = ".orbax-checkpoint-tmp"


class Checkpoints:
    """WORKDIR/checkpoints: save every so often, resume from the newest intact step."""

    def __init__(self, workdir: str | os.PathLike, *, keep: int):
        self.directory = Path(workdir).absolute() / "checkpoints"
        data_state = JsonCheckpointHandler(
            filename=f"process_{jax.process_index()}-of-{jax.process_count()}.json",
            multiprocessing_options=ocp.options.MultiprocessingOptions(primary_host=None),
        )
        registry = DefaultCheckpointHandlerRegistry()
        for args in (ocp.args.JsonSave, ocp.args.JsonRestore):
            registry.add("data", args, data_state)
            registry.add("meta", args)
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
        """(state, this process's data state) of the newest intact step, or None without one.

        `target` gives the state's structure, shapes and shardings (`Runner.abstract_state`).
        A step whose files are damaged is renamed `STEP.corrupt` (kept for inspection) with a
        warning, and the one before it is tried. Checkpoints of another model or configuration
        are a ConfigError: they are not damaged, the run is pointed at the wrong workdir.
        """
        for step in sorted(self._manager.all_steps(), reverse=True):
            try:
                self._check_structure(step, target)
                restored = self._manager.restore(
                    step,
                    args=ocp.args.Composite(
                        state=ocp.args.StandardRestore(target), data=ocp.args.JsonRestore()
                    ),
                )
            except ConfigError:
                raise
            except Exception as error:  # orbax and tensorstore raise many types for bad files
                ignore_failure_aftermath()
                log.warning(
                    "checkpoint step %d in %s cannot be read (%s); trying the one before",
                    step,
                    self.directory,
                    _first_line(error),
                )
                self._set_aside(step)
                continue
            return restored.state, restored.data
        return None

    def _check_structure(self, step: int, target: Any) -> None:
        saved_shapes = _leaf_shapes(self._manager.item_metadata(step)["state"])
        wanted = _leaf_shapes(target)
        if saved_shapes != wanted:
            differing = sorted(set(saved_shapes.items()) ^ set(wanted.items()))[0][0]
            raise ConfigError(
                f"{self.directory} holds checkpoints of another model or configuration (first "
                f"difference: {differing}); resume with the same config or use another --workdir"
            )

    def _set_aside(self, step: int) -> None:
        if jax.process_index() == 0:
            path = self.directory / str(step)
            path.rename(path.with_name(f"{step}{CORRUPT_SUFFIX}"))
        if jax.process_count() > 1:
            multihost_utils.sync_global_devices(f"dpn_jax set aside checkpoint {step}")
        self._manager.reload()

    def save(self, state: TrainState, data_state: dict, meta: dict) -> None:
        """Start an asynchronous save of `state` (global arrays) at its step.

        A save the disk refuses (this one or the previous asynchronous one) ends the run with
        one line; earlier checkpoints stay intact and the unfinished step's temporary directory
        is removed. (The train step never applies a NaN/Inf update, so the state is finite.)
        """
        step = int(Runner.value(state.step))
        args = ocp.args.Composite(
            state=ocp.args.StandardSave(state),
            data=ocp.args.JsonSave(data_state),
            meta=ocp.args.JsonSave(meta),
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
                    shutil.rmtree(entry, ignore_errors=True)


def _leaf_shapes(tree: Any) -> dict[str, tuple[int, ...]]:
    """'opt_state/1/0/trace/classifier/bias' -> shape, for a tree or orbax's metadata of one
    (which spells dataclass fields and tuple entries as dict keys)."""

    def name(key: Any) -> str:
        for attribute in ("key", "name", "idx"):
            if hasattr(key, attribute):
                return str(getattr(key, attribute))
        return str(key)

    return {
        "/".join(map(name, path)): tuple(leaf.shape)
        for path, leaf in jax.tree_util.tree_flatten_with_path(tree)[0]
    }
