"""The commands' restart with glibc's huge-page malloc (dpn_jax/huge_pages.py)."""

import os
import platform
import subprocess
import sys

import pytest

from dpn_jax.system import huge_pages

# Prints a line before and after the restart, then what the final process sees.
SCRIPT = """import os, sys
from dpn_jax.system.huge_pages import reexec_with_huge_page_malloc
print("started", flush=True)
reexec_with_huge_page_malloc()
print("tunables", os.environ.get("GLIBC_TUNABLES", ""), "args", sys.argv[1:])
"""


@pytest.fixture
def clean_env(monkeypatch):
    for name in ("GLIBC_TUNABLES", huge_pages.HUGE_PAGES_ENV):
        monkeypatch.delenv(name, raising=False)
    return os.environ


def _run(env):
    result = subprocess.run(
        [sys.executable, "-c", SCRIPT, "two words", "--flag=1"],
        env=env,
        capture_output=True,
        text=True,
        check=True,
        timeout=120,
    )
    return result.stdout.splitlines()


def test_restarts_once_with_the_tunable_and_the_same_arguments(clean_env):
    lines = _run(dict(clean_env, GLIBC_TUNABLES="glibc.malloc.tcache_count=7"))
    # The user's own tunable stays; ours is added after it.
    if huge_pages.huge_page_malloc_applies():  # checked without GLIBC_TUNABLES set
        assert lines == [
            "started",
            "started",
            "tunables glibc.malloc.tcache_count=7:"
            f"{huge_pages.TUNABLE} args ['two words', '--flag=1']",
        ]
    else:
        assert lines == [
            "started",
            "tunables glibc.malloc.tcache_count=7 args ['two words', '--flag=1']",
        ]


def test_applies_on_linux_glibc_unless_opted_out_or_already_set(clean_env, monkeypatch):
    libc, version = platform.libc_ver()
    glibc_2_35 = libc == "glibc" and tuple(map(int, version.split(".")[:2])) >= (2, 35)
    if glibc_2_35 and os.path.exists(huge_pages._THP_SETTING):
        with open(huge_pages._THP_SETTING) as f:
            assert huge_pages.huge_page_malloc_applies() == ("[never]" not in f.read())
    monkeypatch.setenv("GLIBC_TUNABLES", huge_pages.TUNABLE)
    assert not huge_pages.huge_page_malloc_applies()
    monkeypatch.delenv("GLIBC_TUNABLES")
    monkeypatch.setenv(huge_pages.HUGE_PAGES_ENV, "0")
    assert not huge_pages.huge_page_malloc_applies()
    assert _run(os.environ) == ["started", "tunables  args ['two words', '--flag=1']"]


def test_restart_check_runs_before_jax_is_imported():
    """The commands import `dpn_jax.system.huge_pages` first: a restart must not import JAX."""
    check = "import sys, dpn_jax.system.huge_pages; assert 'jax' not in sys.modules, 'jax imported'"
    subprocess.run([sys.executable, "-c", check], check=True, timeout=120)
