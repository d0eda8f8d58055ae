"""Run a per-device step data-parallel, with `jax.pmap` or with `jax.shard_map` over a Mesh.

Steps are written for one device and communicate through collectives over `AXIS` (gradient
`pmean`, BatchNorm statistics). Both runners feed them the same layout: every array carries a
leading device axis (the input pipeline's [devices, per_device, ...] batches; the state stacked
once per device), so switching `config.parallelism` changes nothing else and gives the same
numbers. Each process feeds its own devices; the collectives span every process.
"""
from __future__ import annotations

import collections
import itertools
from typing import Any, Callable, Iterator, Sequence

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

AXIS = "batch"
PARALLELISMS = ("pmap", "shard_map")


class Runner:
    """Compiles per-device steps and moves host trees to and from the stacked device layout."""

    def __init__(self, parallelism: str, devices: Sequence[jax.Device] | None = None):
        """`devices` defaults to the local ones for pmap, to all processes' for shard_map."""
        if parallelism not in PARALLELISMS:
            raise ValueError(f"parallelism={parallelism!r}; choose from {PARALLELISMS}")
        self.parallelism = parallelism
        self._pmap_devices = devices  # None: pmap's default, every process's devices
        if devices is None:
            devices = jax.local_devices() if parallelism == "pmap" else jax.devices()
        self.mesh = Mesh(np.asarray(devices), (AXIS,))
        self.num_local_devices = sum(d.process_index == jax.process_index() for d in devices)
        self._sharding = NamedSharding(self.mesh, P(AXIS))

    def compile(self, step: Callable, donate_first: bool = False) -> Callable:
        """`step(*per_device_args)` -> a function of stacked arguments returning stacked results."""
        donate = (0,) if donate_first else ()
        if self.parallelism == "pmap":
            return jax.pmap(step, axis_name=AXIS, donate_argnums=donate,
                            devices=self._pmap_devices)

        def per_shard(*args):  # each shard is one device's slice with a leading axis of 1
            out = step(*jax.tree.map(lambda x: x[0], args))
            return jax.tree.map(lambda x: x[None], out)

        return jax.jit(jax.shard_map(per_shard, mesh=self.mesh, in_specs=P(AXIS),
                                     out_specs=P(AXIS)), donate_argnums=donate)

    def put(self, tree: Any) -> Any:
        """This process's [local_devices, ...] numpy tree -> device arrays (global for shard_map)."""
        return jax.tree.map(
            lambda x: jax.make_array_from_process_local_data(self._sharding, np.asarray(x)), tree)

    def replicate(self, tree: Any) -> Any:
        """One host copy -> one copy per device, stacked."""
        n = self.num_local_devices
        return self.put(jax.tree.map(lambda x: np.broadcast_to(x, (n, *np.shape(x))), tree))

    @staticmethod
    def first(tree: Any) -> Any:
        """The first local device's copy as numpy (no cross-device gather)."""
        return jax.tree.map(lambda x: np.asarray(x.addressable_shards[0].data)[0], tree)

    def prefetch(self, batches: Iterator[Any], size: int = 2) -> Iterator[Any]:
        """Keep `size` batches transferred ahead of the consumer."""
        queue = collections.deque(self.put(b) for b in itertools.islice(batches, size))
        while queue:
            yield queue.popleft()
            queue.extend(self.put(b) for b in itertools.islice(batches, 1))
