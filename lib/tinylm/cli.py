"""What every workflow script and command shares: logging, the --params JSON, and errors and Ctrl-C
without tracebacks.

parser = argparse.ArgumentParser(description=__doc__.split("\\n\\n")[0])
parser.add_argument("--params", required=True)   # a JSON object, parsed into a dict
if __name__ == "__main__":
    run_script(main, parser)
"""

from __future__ import annotations

import argparse
import atexit
import contextlib
import errno
import json
import logging
import os
import signal
import sys
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path

from .errors import TinyLMError
from .io import TMP_NAME, setup_logging


def positive_int(text: str) -> int:
    """argparse type: an integer >= 1 (a count), refused with the option's name otherwise."""
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"{value} is not >= 1")
    return value


def non_negative_int(text: str) -> int:
    """argparse type: an integer >= 0."""
    value = int(text)
    if value < 0:
        raise argparse.ArgumentTypeError(f"{value} is not >= 0")
    return value


def parse_params(text: str, parser: argparse.ArgumentParser, flag: str = "--params") -> dict:
    """`flag` (--params: the rule's config values): one JSON object; anything else is a usage error."""
    try:
        value = json.loads(text)
    except json.JSONDecodeError as e:
        parser.error(f"{flag} is not valid JSON ({e}): {text[:200]!r}")
    if not isinstance(value, dict):
        parser.error(f"{flag} must be a JSON object, got {text[:200]!r}")
    return value


def run_script(
    main: Callable[[argparse.Namespace], int | None],
    parser: argparse.ArgumentParser,
    argv: Sequence[str] | None = None,
) -> None:
    """Parse argv, turn a string `params` into a dict, run `main`; TinyLMError -> `error: ...`, exit 1.

    A file the system refuses (read-only filesystem, no permission) -> one line naming it, exit 1. Other
    exceptions keep their traceback: they are bugs, not bad input. Ctrl-C ends with one line, then
    the process ends by SIGINT as Python would. An int returned by `main` becomes the exit status.
    """
    setup_logging()
    args = parser.parse_args(argv)
    if isinstance(getattr(args, "params", None), str):
        args.params = parse_params(args.params, parser)
    # Ctrl-C: outputs are written whole (temp file, then rename) or not at all
    with ctrl_c_ends_quietly("interrupted (Ctrl-C); run it again to finish"):
        try:
            status = main(args)
        except TinyLMError as e:
            print(f"error: {e}", file=sys.stderr)
            sys.exit(1)
        except OSError as e:
            if (line := refused_by_the_system(e)) is None:
                raise
            print(f"error: {line}", file=sys.stderr)
            sys.exit(1)
    sys.exit(status or 0)


def refused_by_the_system(e: OSError) -> str | None:
    """One line for a file the system refuses (a read-only filesystem, no permission): the environment's
    to fix, not a bug, so no traceback. None for anything else, or where no file is named."""
    if e.errno not in (errno.EROFS, errno.EACCES, errno.EPERM) or not e.filename:
        return None
    path = Path(os.fsdecode(e.filename))
    if m := TMP_NAME.fullmatch(path.name):  # an output's temporary file (io.atomic_path): name the output
        path = path.with_name(m[2])
    if e.errno == errno.EROFS:
        return (f"{path}: {e.strerror}; a folder this job writes to cannot be written: make it writable (or "
                "give results_dir a writable place), then run again")
    return (f"{path}: {e.strerror}; a folder this job writes to cannot be written or a file it reads cannot "
            "be read: make it accessible to this user, then run again")


@contextlib.contextmanager
def ctrl_c_ends_quietly(message: str = "interrupted (Ctrl-C)") -> Iterator[None]:
    """Around a command's whole run: Ctrl-C prints `message` instead of a traceback.

    Python then ends as it does on Ctrl-C by itself, without the traceback: the cleanup at exit (worker
    pools' semaphores, or the resource tracker warns of leaks), then killed by SIGINT, so that a shell
    loop around the command stops too (_end_by_sigint sees to that last step).
    """
    _end_by_sigint_at_exit()
    try:
        yield
    except KeyboardInterrupt as interrupt:
        print(message, file=sys.stderr)
        sys.excepthook = _quiet_for(interrupt, sys.excepthook)
        raise


def ctrl_c_ends_quietly_from_here(message: str = "interrupted (Ctrl-C)") -> None:
    """For a module run as `python -m`, called before its imports: a Ctrl-C that comes before the module
    reaches its ctrl_c_ends_quietly (while it imports torch, seconds) ends as one inside it does, with
    `message` instead of a traceback, and Python ending by SIGINT (it still does for an uncaught
    KeyboardInterrupt; only what it prints changes)."""
    _end_by_sigint_at_exit()
    hook = sys.excepthook

    def excepthook(kind, value, tb) -> None:
        if issubclass(kind, KeyboardInterrupt):
            print(message, file=sys.stderr)
            _ended_by_ctrl_c.append(value)
        else:
            hook(kind, value, tb)

    sys.excepthook = excepthook


def _quiet_for(interrupt: BaseException, hook: Callable) -> Callable:
    """A sys.excepthook that prints nothing for `interrupt` (ctrl_c_ends_quietly has said it was interrupted)
    and hands anything else to `hook`, the one before it."""

    def excepthook(kind, value, tb) -> None:
        if value is not interrupt:
            hook(kind, value, tb)
        else:
            _ended_by_ctrl_c.append(value)

    return excepthook


# The KeyboardInterrupt that ended the program, once sys.excepthook has seen it uncaught (the hooks above).
_ended_by_ctrl_c: list[BaseException] = []
_at_exit = False  # _end_by_sigint is registered


def _end_by_sigint_at_exit() -> None:
    """Have _end_by_sigint run at exit, registered once, when a command starts: exit handlers run the last
    registered first, so it runs after those of what the command goes on to import (torch's, the worker
    pools')."""
    global _at_exit
    if not _at_exit:
        atexit.register(_end_by_sigint)
        _at_exit = True


def _end_by_sigint() -> None:
    """At exit, after a Ctrl-C ended the program: end it by SIGINT here, as Python would after its clean-up.

    Python does so only if no exit handler ran exec() on a string in between: one does (torch._dynamo's,
    imported by the benchmark and by compiling, imports tabulate, whose namedtuples do), and Python then
    forgot the interrupt and exited with status 1, which a shell loop takes for an error and runs on. The
    exit handlers registered before this one (logging's) and the rest of Python's clean-up would come
    after it: logging's is run here, and the output flushed, before the signal."""
    if not _ended_by_ctrl_c:
        return
    logging.shutdown()
    for stream in (sys.stdout, sys.stderr):
        with contextlib.suppress(OSError, ValueError):  # a reader gone, a stream closed
            stream.flush()
    signal.signal(signal.SIGINT, signal.SIG_DFL)
    os.kill(os.getpid(), signal.SIGINT)
