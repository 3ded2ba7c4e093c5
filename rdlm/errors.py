"""The error every rdlm failure a user can fix is raised as, and the guard every command line runs under.

Each error's message names what is wrong (the key, the file, the tensor, the value) and the valid choice,
so a CLI prints it as one line, `error: ...`, plus an optional `hint: ...`, and exits 1; no traceback.
"""

from __future__ import annotations

import argparse
import functools
import sys
from typing import Callable, NoReturn


class RdlmError(Exception):
    """Base of the errors a user can act on; `hint` (optional) says what to do about it."""

    def __init__(self, message: str, *, hint: str | None = None):
        super().__init__(message)
        self.hint = hint


def cli(main: Callable[..., int | None]) -> Callable[..., int]:
    """Wrap a command's `main(argv) -> exit code`: an RdlmError or OSError becomes one `error:` line
    (and a `hint:` line) on stderr with exit code 1; Ctrl-C exits 130 without a traceback."""

    @functools.wraps(main)
    def guarded(*args, **kwargs) -> int:
        try:
            return main(*args, **kwargs) or 0
        except RdlmError as e:
            print(f"error: {e}", file=sys.stderr)
            if e.hint:
                print(f"hint: {e.hint}", file=sys.stderr)
        except OSError as e:  # a file the user named cannot be read or written: errno text and the path
            where = f" {e.filename!r}" if e.filename else ""
            print(f"error: {e.strerror or e}{':' + where if where else ''}", file=sys.stderr)
        except KeyboardInterrupt:
            print("interrupted", file=sys.stderr)
            return 130
        return 1

    return guarded


class UsageError(RdlmError):
    """A command-line argument is missing or invalid."""


class ArgumentParser(argparse.ArgumentParser):
    """argparse with its errors raised as UsageError: under `cli`, one `error:` line and exit 1, as for
    every other error (argparse itself prints the usage block and exits 2)."""

    def error(self, message: str) -> NoReturn:
        raise UsageError(message, hint=f"{self.prog} --help lists the arguments")
