"""Freed host memory kept for reuse, so that a CPU step does not fault its temporaries back in.

XLA's CPU runtime allocates every execution's temporaries afresh, on its worker threads (a dpn68
training step's come to about 1.4 GiB). glibc serves blocks that large with `mmap` (a worker
thread's arena cannot hold them) and unmaps them when they are freed, so every step faulted its
temporaries back in 4 KiB at a time: about a quarter of a CPU step's time went to the kernel
(BENCHMARKS.md, "Host memory for XLA's temporaries"). With one arena, no `mmap` and no trimming
(mallopt(3)), a freed block stays in the heap and the next step reuses it. The cost: the process
keeps its high-water mark of heap memory instead of returning it.

glibc fixes a thread's arena at its first allocation, so this must happen before JAX starts its
CPU backend: `import dpn_jax` does it (import dpn_jax before running JAX computations). It applies
on Linux with glibc when JAX runs on the CPU (no GPU or TPU plugin installed, or `JAX_PLATFORMS`
starting with cpu: elsewhere the temporaries live in device memory), unless
`DPN_JAX_REUSE_HOST_MEMORY=0`. It replaces glibc's huge-page malloc, which the commands used to
re-execute themselves with: on a VM that compacted memory for the huge pages, steps stalled for
seconds.
"""

from __future__ import annotations

import ctypes
import importlib.util
import os
import sys

from dpn_jax.system.env_switches import switched_off

REUSE_HOST_MEMORY_ENV = "DPN_JAX_REUSE_HOST_MEMORY"
# mallopt(3) parameters, from glibc's malloc.h
_M_TRIM_THRESHOLD, _M_MMAP_MAX, _M_ARENA_MAX = -1, -4, -8
_SETTINGS = (
    (_M_ARENA_MAX, 1),  # every thread allocates from the main arena, which can grow without bound
    (_M_MMAP_MAX, 0),  # large blocks come from that heap, not from mmap
    (_M_TRIM_THRESHOLD, -1),  # and are never returned to the kernel (-1: no trimming)
)


def jax_runs_on_cpu() -> bool:
    """Whether JAX's default backend will be the CPU: `JAX_PLATFORMS` says so, or no accelerator
    plugin (CUDA, ROCm: `jax_plugins`; TPU: `libtpu`) is installed. Decided without importing
    JAX, which this must precede."""
    platforms = os.environ.get("JAX_PLATFORMS", "").strip()
    if platforms:
        return platforms.split(",")[0].strip().lower() == "cpu"
    return not any(importlib.util.find_spec(name) for name in ("jax_plugins", "libtpu"))


def reuse_applies() -> bool:
    """Linux with glibc, JAX on the CPU, and not switched off."""
    if switched_off(os.environ.get(REUSE_HOST_MEMORY_ENV, "1")):
        return False
    if not sys.platform.startswith("linux"):
        return False
    try:
        if not os.confstr("CS_GNU_LIBC_VERSION").startswith("glibc"):
            return False
    except (ValueError, OSError):  # not glibc (musl has no such name)
        return False
    return jax_runs_on_cpu()


def reuse_freed_host_memory() -> bool:
    """Configure glibc's malloc as the module docstring says, where that applies; returns whether
    it did."""
    if not reuse_applies():
        return False
    mallopt = ctypes.CDLL(None).mallopt
    return all(mallopt(parameter, value) == 1 for parameter, value in _SETTINGS)
