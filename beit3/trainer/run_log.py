"""``<output>/run.log``: the run's console output with timestamps, beside its metrics (rank 0).

Each session (a start, each resume) appends a header: the command line, the versions of beit3,
torch and DeepSpeed, the git commit, host, ranks and device. Then every line the run prints (its
logger's lines), a summary of each logged step (the values of ``metrics.jsonl``), the warnings
raised in the process and the ``beit3`` loggers' records (skipped shards, retries), and, when the
run stops on an error, that error. The console shows what it showed before; the file is a copy.
"""
from __future__ import annotations

import logging
import os
import platform
import shlex
import socket
import subprocess
import sys
import time
import warnings
from importlib import metadata
from typing import Optional

import torch

RUN_LOG = "run.log"


def git_commit() -> Optional[str]:
    try:
        return subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True, timeout=5,
                              cwd=os.path.dirname(__file__)).stdout.strip() or None
    except (OSError, subprocess.SubprocessError):
        return None


def _version(package: str) -> str:
    try:
        return metadata.version(package)  # without importing it (DeepSpeed's import takes seconds)
    except metadata.PackageNotFoundError:
        return "not installed"


def session_header(world_size: int, device: torch.device) -> list[str]:
    """The lines that open a session: what ran, with what, where."""
    return [f"---- session started: {shlex.join(sys.argv)}",
            f"beit3 {_version('beit3')}, torch {torch.__version__}, deepspeed {_version('deepspeed')}, "
            f"python {platform.python_version()}; git commit {git_commit() or 'unknown'}",
            f"host {socket.gethostname()}, pid {os.getpid()}, {world_size} rank(s) on {device.type}"]


class _Records(logging.Handler):
    """The ``beit3`` loggers' records into run.log. A handler on the logger keeps logging's last
    resort (stderr) from printing them, so it prints them there itself when nothing else would."""

    def __init__(self, run_log: "RunLog"):
        super().__init__(logging.WARNING)
        self.run_log = run_log

    def emit(self, record: logging.LogRecord) -> None:
        self.run_log.write(f"{record.levelname.lower()}: {record.getMessage()}")
        if not self._handled_elsewhere(record) and logging.lastResort is not None:
            logging.lastResort.handle(record)

    def _handled_elsewhere(self, record: logging.LogRecord) -> bool:
        logger: Optional[logging.Logger] = logging.getLogger(record.name)
        while logger is not None:
            if any(h is not self for h in logger.handlers):
                return True
            logger = logger.parent if logger.propagate else None
        return False


class RunLog:
    """The open run.log of this session (see the module docstring); ``close`` restores the hooks."""

    def __init__(self, folder: str, header: list[str]):
        os.makedirs(folder, exist_ok=True)
        self.path = os.path.join(folder, RUN_LOG)
        self.file = open(self.path, "a", buffering=1)  # line-buffered: a killed run loses no finished line
        for line in header:
            self.write(line)
        self._showwarning = warnings.showwarning
        warnings.showwarning = self._warning
        self._records = _Records(self)
        logging.getLogger("beit3").addHandler(self._records)

    def write(self, text: str) -> None:
        if self.file.closed:
            return
        stamp = time.strftime("%Y-%m-%d %H:%M:%S")
        for line in str(text).splitlines() or [""]:
            self.file.write(f"{stamp} {line}\n")

    def _warning(self, message, category, filename, lineno, file=None, line=None) -> None:
        self.write(f"warning: {category.__name__}: {message} ({os.path.basename(filename)}:{lineno})")
        self._showwarning(message, category, filename, lineno, file, line)

    def close(self) -> None:
        if warnings.showwarning == self._warning:
            warnings.showwarning = self._showwarning
        logging.getLogger("beit3").removeHandler(self._records)
        self.file.close()
