"""Freed host memory kept for reuse by XLA's CPU steps (dpn_jax/system/host_memory.py)."""

import os
import subprocess
import sys

import pytest

from dpn_jax.system import host_memory

pytestmark = pytest.mark.skipif(
    not host_memory.reuse_applies(), reason="needs Linux with glibc and JAX on the CPU"
)

# What XLA's CPU runtime does each step, reduced to malloc: a worker thread allocates a large
# block, touches it and frees it, twice; prints the page faults of the second round.
SCRIPT = """import ctypes, resource, sys, threading
if sys.argv[1] == "import":
    import dpn_jax  # noqa: F401
libc = ctypes.CDLL(None)
libc.malloc.restype = ctypes.c_void_p
libc.free.argtypes = [ctypes.c_void_p]
SIZE = 256 << 20
faults = []

def step():
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    block = libc.malloc(SIZE)
    ctypes.memset(block, 1, SIZE)
    libc.free(block)
    faults.append(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)

worker = threading.Thread(target=lambda: (step(), step()))
worker.start()
worker.join()
print(faults[1])
"""
PAGES = (256 << 20) // os.sysconf("SC_PAGE_SIZE")


def _second_round_faults(how: str, **env: str) -> int:
    environment = {**os.environ, **env}
    environment.pop("JAX_PLATFORMS", None)
    result = subprocess.run(
        [sys.executable, "-c", SCRIPT, how],
        env=environment,
        capture_output=True,
        text=True,
        check=True,
        timeout=120,
    )
    return int(result.stdout.split()[-1])


def test_import_dpn_jax_makes_a_threads_freed_block_reused_without_faults():
    assert _second_round_faults("import") < PAGES // 16
    # the same without dpn_jax, or switched off: every round faults the block back in
    assert _second_round_faults("plain") > PAGES // 2
    off = {host_memory.REUSE_HOST_MEMORY_ENV: "0"}
    assert _second_round_faults("import", **off) > PAGES // 2


def test_applies_only_to_jax_on_the_cpu_and_can_be_switched_off(monkeypatch):
    monkeypatch.delenv(host_memory.REUSE_HOST_MEMORY_ENV, raising=False)
    monkeypatch.setenv("JAX_PLATFORMS", "cpu")
    assert host_memory.reuse_applies()
    monkeypatch.setenv("JAX_PLATFORMS", "cuda,cpu")  # the first is the default backend
    assert not host_memory.reuse_applies()
    monkeypatch.setenv("JAX_PLATFORMS", "cpu")
    for off in ("0", "off", "false"):
        monkeypatch.setenv(host_memory.REUSE_HOST_MEMORY_ENV, off)
        assert not host_memory.reuse_applies()


def test_import_dpn_jax_does_not_import_jax():
    """The set-up must precede JAX's start, so `import dpn_jax` itself must not import JAX."""
    check = "import sys, dpn_jax; assert 'jax' not in sys.modules, 'jax imported'"
    subprocess.run([sys.executable, "-c", check], check=True, timeout=120)
