"""Execution: the `Runner`, which runs a per-device step over the mesh of every device of
every process (`jit` + `shard_map`, or `pmap`).

The core of how training, evaluation and prediction execute, kept apart from the process and
operating-system plumbing around it (files, caches, host memory, orbax I/O: `dpn_jax.system`),
so that a reader of execution reads only execution.
"""
