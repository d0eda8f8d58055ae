"""Huge pages for XLA's host buffers, on by default for the training and benchmark commands.

XLA's CPU runtime allocates every execution's temporaries afresh (a train step's are large) and
glibc maps allocations that large straight from the kernel, which faults them in one 4 KiB page
at a time, every step. glibc (>= 2.35) asks for transparent huge pages instead when
`GLIBC_TUNABLES` holds `glibc.malloc.hugetlb=1`: far fewer faults and a faster step
(BENCHMARKS.md, "Huge pages for XLA's temporaries"). glibc reads its tunables only at process
start, so a command re-executes itself once with the tunable added. `DPN_JAX_HUGE_PAGES=0`
turns this off.
"""

from __future__ import annotations

import os
import platform
import sys

from dpn_jax.system.env_switches import switched_off

HUGE_PAGES_ENV = "DPN_JAX_HUGE_PAGES"
TUNABLE = "glibc.malloc.hugetlb=1"
_THP_SETTING = "/sys/kernel/mm/transparent_hugepage/enabled"


def huge_page_malloc_applies() -> bool:
    """Linux with glibc >= 2.35, transparent huge pages not disabled, the tunable not set, and not
    opted out."""
    if switched_off(os.environ.get(HUGE_PAGES_ENV, "1")):
        return False
    if "glibc.malloc.hugetlb" in os.environ.get("GLIBC_TUNABLES", ""):
        return False  # set by the user or by our own re-execution
    libc, version = platform.libc_ver()
    if not sys.platform.startswith("linux") or libc != "glibc" or not sys.executable:
        return False
    if tuple(int(part) for part in version.split(".")[:2]) < (2, 35):
        return False  # the tunable is newer
    try:
        with open(_THP_SETTING) as f:
            return "[never]" not in f.read()
    except OSError:
        return False


def reexec_with_huge_page_malloc() -> None:
    """Restart this command with glibc's huge-page malloc where that applies; else return.

    Call it first thing in a script's `__main__` block, before anything worth keeping runs.
    """
    if not huge_page_malloc_applies():
        return
    tunables = ":".join(filter(None, (os.environ.get("GLIBC_TUNABLES"), TUNABLE)))
    sys.stdout.flush()
    sys.stderr.flush()
    os.execve(sys.executable, sys.orig_argv, {**os.environ, "GLIBC_TUNABLES": tunables})
