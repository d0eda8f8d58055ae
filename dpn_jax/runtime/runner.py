"""Run a per-device step data-parallel over a device mesh: `jit` + `shard_map`, or `pmap`.

Steps are written for one device and communicate through explicit collectives over `AXIS` (the
gradient mean, cross-replica BatchNorm statistics, metric sums), which they skip on a one-device
mesh (`mean_over_devices`, `sum_over_devices`, `Runner.axis_name`): XLA CPU keeps an all-reduce
over one device, and no fusion crosses it (BENCHMARKS.md, "The trainer's step"). The runner puts
them on a `Mesh` of every device of every process: arguments are global `jax.Array`s, either
replicated (`REPLICATED`: the train state, the model variables) or split over the devices along
their first axis (`SHARDED`: batches, per-example outputs). Under the default `shard_map`
parallelism a step is `jax.jit(jax.shard_map(step))`; `pmap` is the same step under `jax.pmap`,
kept as a thin adapter because the design card names it: it sees the batch with a leading device
axis, which `put_batch` / `local` add and remove, and the state and outputs are the same
replicated global arrays. Each process feeds only its own rows of a batch.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import jax
import numpy as np
from jax import lax
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from dpn_jax.errors import ConfigError

AXIS = "batch"
PARALLELISMS = ("shard_map", "pmap")
REPLICATED = P()
SHARDED = P(AXIS)


def mean_over_devices(tree: Any) -> Any:
    """`lax.pmean` over `AXIS` inside a step; the tree itself on one device."""
    return tree if lax.axis_size(AXIS) == 1 else lax.pmean(tree, AXIS)


def sum_over_devices(tree: Any) -> Any:
    """`lax.psum` over `AXIS` inside a step; the tree itself on one device."""
    return tree if lax.axis_size(AXIS) == 1 else lax.psum(tree, AXIS)


class Runner:
    """Compiles per-device steps over a mesh and moves batches and state onto it."""

    def __init__(self, parallelism: str = "shard_map", devices: Sequence[jax.Device] | None = None):
        """`devices` defaults to every device of every process."""
        if parallelism not in PARALLELISMS:
            raise ConfigError(f"parallelism={parallelism!r}; choose from {', '.join(PARALLELISMS)}")
        self.parallelism = parallelism
        self.devices = list(jax.devices() if devices is None else devices)
        self.mesh = Mesh(np.asarray(self.devices), (AXIS,))
        self.num_devices = len(self.devices)
        self.num_local_devices = sum(d.process_index == jax.process_index() for d in self.devices)
        self._replicated = NamedSharding(self.mesh, REPLICATED)
        self._sharded = NamedSharding(self.mesh, SHARDED)

    @property
    def axis_name(self) -> str | None:
        """The `axis_name` of a model built for this runner (cross-replica BatchNorm): `AXIS`,
        or None on one device, where there is nothing to average."""
        return AXIS if self.num_devices > 1 else None

    def compile(
        self, step: Callable, in_specs: tuple, out_specs: Any, donate_argnums: tuple[int, ...] = ()
    ) -> Callable:
        """`step(*args)` for one device -> a function of global arrays.

        `in_specs` gives REPLICATED or SHARDED per argument, `out_specs` per output (prefix
        trees, as `jax.shard_map` takes them); donated arguments are updated in place.
        """
        if self.parallelism == "pmap":
            return self._pmap(step, in_specs, out_specs, donate_argnums)
        # On one device every value is replicated and the steps skip their collectives, which
        # the check that replicated outputs went through one would reject.
        mapped = jax.shard_map(
            step,
            mesh=self.mesh,
            in_specs=in_specs,
            out_specs=out_specs,
            check_vma=self.num_devices > 1,
        )
        return jax.jit(mapped, donate_argnums=donate_argnums)

    def _pmap(
        self, step: Callable, in_specs: tuple, out_specs: Any, donate_argnums: tuple[int, ...]
    ) -> Callable:
        axis = lambda spec: None if spec == REPLICATED else 0  # noqa: E731
        mapped = jax.pmap(
            step,
            axis_name=AXIS,
            in_axes=tuple(jax.tree.map(axis, in_specs)),
            out_axes=jax.tree.map(axis, out_specs),
            donate_argnums=donate_argnums,
            devices=None if self.devices == jax.devices() else self.devices,
        )
        if jax.process_count() == 1:
            return mapped
        # With several processes pmap returns its unmapped outputs as arrays of this process's
        # devices only; the same buffers make the global replicated array (no copy).
        as_global = lambda x: jax.make_array_from_single_device_arrays(  # noqa: E731
            x.shape, self._replicated, [shard.data for shard in x.addressable_shards]
        )

        def run(*args):
            outputs = mapped(*args)
            return jax.tree.map(
                lambda spec, out: jax.tree.map(as_global, out) if spec == REPLICATED else out,
                out_specs,
                outputs,
                is_leaf=lambda x: x is None or isinstance(x, P),
            )

        return run

    def replicate(self, tree: Any) -> Any:
        """A host tree (the same on every process) -> global arrays replicated on every device."""
        return jax.tree.map(
            lambda x: jax.make_array_from_process_local_data(self._replicated, np.asarray(x)), tree
        )

    def put_batch(self, tree: Any) -> Any:
        """This process's rows of a batch (numpy, first axis) -> global arrays split over devices.

        Every process passes the same number of rows, a multiple of its device count.
        """

        def put(x: np.ndarray) -> jax.Array:
            x = np.asarray(x)
            if self.parallelism == "pmap":  # pmap maps over a leading device axis
                x = x.reshape(self.num_local_devices, -1, *x.shape[1:])
            return jax.make_array_from_process_local_data(self._sharded, x)

        return jax.tree.map(put, tree)

    def local(self, tree: Any) -> Any:
        """This process's rows of sharded outputs as numpy, in batch order (no gather)."""

        def rows(x: jax.Array) -> np.ndarray:
            shards = sorted(x.addressable_shards, key=lambda s: s.index[0].start or 0)
            data = np.concatenate([np.asarray(s.data) for s in shards])
            return data.reshape(-1, *data.shape[2:]) if self.parallelism == "pmap" else data

        return jax.tree.map(rows, tree)

    @staticmethod
    def value(tree: Any) -> Any:
        """Replicated outputs as numpy: this process's own copy, no cross-device transfer."""
        return jax.tree.map(lambda x: np.asarray(x.addressable_data(0)), tree)

    def abstract_state(self, tree: Any) -> Any:
        """Shapes, dtypes and the replicated sharding of a tree of arrays (an orbax restore
        target); nothing is copied."""
        return jax.tree.map(
            lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=self._replicated),
            tree,
        )

    def check_batch_size(self, global_batch: int, what: str) -> int:
        """This process's share of a global batch; ConfigError unless every device gets as many
        rows."""
        if global_batch < 1 or global_batch % self.num_devices:
            raise ConfigError(
                f"{what}={global_batch} must be a positive multiple of the "
                f"{self.num_devices} devices"
            )
        return global_batch // self.num_devices * self.num_local_devices
