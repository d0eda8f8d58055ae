"""The edge every dpn_jax command shares: errors reported in one line, file text printed safely.

A mistake of the user's is a `DpnJaxError` (dpn_jax.errors): printed as `PROG: error: MESSAGE`,
exit status 1. Any other exception is a bug in dpn_jax and keeps its traceback. Text that comes
from files - class names, tensor names, file names - is printed through `dpn_jax.errors.printable`
(control sequences escaped, an error line cut at MESSAGE_LIMIT characters).
"""

from __future__ import annotations

import argparse
import signal
import sys
from collections.abc import Callable

from dpn_jax.errors import QUOTE_LIMIT, DpnJaxError, printable
from dpn_jax.system.interrupts import SignalInterrupt

EXIT_ERROR = 1
MESSAGE_LIMIT = 10 * QUOTE_LIMIT  # an error line quoting a megabyte class name stays a line


def command_parser(prog: str, doc: str) -> argparse.ArgumentParser:
    """The parser of command `prog` documented by its module docstring `doc`: the first
    paragraph (less a leading "`prog`: ") is the description, the rest (examples) the epilog."""
    summary, _, examples = doc.partition("\n\n")
    summary = summary.removeprefix(f"`{prog}`: ")
    return argparse.ArgumentParser(
        prog=prog,
        description=summary[:1].upper() + summary[1:],
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog=examples or None,
    )


def echo(text: str) -> None:
    """Print a line that may hold text from files."""
    print(printable(text), flush=True)


def report_error(prog: str, message: str) -> None:
    print(f"{prog}: error: {printable(message, MESSAGE_LIMIT)}", file=sys.stderr, flush=True)


def run_command(prog: str, command: Callable[[], int]) -> int:
    """Run a command's body: its exit status, or 1 after one line for a DpnJaxError (on Ctrl-C
    or a held SIGTERM, 128 + the signal's number, as a shell reports it); anything else
    propagates with its traceback."""
    try:
        return command()
    except DpnJaxError as error:
        report_error(prog, str(error))
        return EXIT_ERROR
    except KeyboardInterrupt as interrupt:
        print(f"{prog}: interrupted", file=sys.stderr, flush=True)
        return 128 + (interrupt.signum if isinstance(interrupt, SignalInterrupt) else signal.SIGINT)
