"""After a refused orbax write has been reported in one line, its aftermath stays quiet."""

from __future__ import annotations

import subprocess
import sys
import textwrap

REFUSED = "OUT_OF_RANGE: Error writing \"x/0\": File too large [os_error_code='27']"


def test_unretrieved_refusals_are_dropped_after_the_report_and_other_errors_kept():
    """Other tensorstore writers' refusals surface as asyncio "Task exception was never
    retrieved" when their tasks are collected, after the one-line report; only those go."""
    script = textwrap.dedent(
        f"""
        import asyncio, gc
        from dpn_jax.system.orbax_io import os_error_of

        async def fail(message):
            raise ValueError(message)

        def orphan(message):  # a task whose exception nobody retrieves, then collected
            loop = asyncio.new_event_loop()
            task = loop.create_task(fail(message))
            loop.run_until_complete(asyncio.sleep(0))
            loop.close()
            del task
            gc.collect()

        orphan({REFUSED!r} + " before")  # before any report: shown
        print(os_error_of(ValueError({REFUSED!r}), "/ckpt"))
        orphan({REFUSED!r} + " after")
        orphan("an unrelated bug")
        """
    )
    result = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, timeout=120
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "[Errno 27] File too large: '/ckpt'"
    assert "before" in result.stderr and "an unrelated bug" in result.stderr
    assert "after" not in result.stderr, result.stderr
