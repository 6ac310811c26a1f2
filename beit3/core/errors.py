"""Problems the user must fix, and how a command reports them: one line, no traceback.

A message names the path, what is there (its size, or that it is missing or a directory) and what
is wrong, e.g. ``runs/x/best/model.safetensors (0 bytes): not a safetensors file (empty)``. Every
command catches :class:`UserError` at its entry point and prints ``beit3 <command>: error: ...``
with a non-zero exit code. :class:`BadFileError` is also a ``ValueError``, so code that already
treats bad values as the user's problem treats bad files the same way.
"""
from __future__ import annotations

import os
import stat
import sys


class UserError(Exception):
    """A bad input, path or environment (a full disk): the message says what and where."""


class BadFileError(UserError, ValueError):
    """A file that exists but cannot be used: empty, truncated, of another format."""

    def __init__(self, path: str | os.PathLike, problem: str):
        self.path = os.fspath(path)
        super().__init__(f"{describe(path)}: {problem}")


class OutputError(UserError):
    """An output path that cannot be written (a file where a folder is wanted, read-only, full)."""


def describe(path: str | os.PathLike) -> str:
    """``path`` with what is there: ``x.pth (1,024 bytes)``, ``(a directory)``, ``(does not exist)``."""
    path = os.fspath(path)
    try:
        st = os.stat(path)
    except FileNotFoundError:
        return f"{path} (does not exist)"
    except OSError as e:
        return f"{path} ({e.strerror})"
    if stat.S_ISDIR(st.st_mode):
        return f"{path} (a directory)"
    return f"{path} ({st.st_size:,} bytes)"


def first_line(text: object, limit: int = 300) -> str:
    """The first non-empty line of a library's message (torch's and DeepSpeed's span many)."""
    lines = [line.strip() for line in str(text).splitlines() if line.strip()]
    line = lines[0] if lines else type(text).__name__
    return line if len(line) <= limit else line[:limit - 3] + "..."


def report(prog: str, error: BaseException, code: int) -> int:
    """Print ``<prog>: error: <message>`` to stderr and return ``code`` (the exit code)."""
    print(f"{prog}: error: {error}", file=sys.stderr, flush=True)
    return code
