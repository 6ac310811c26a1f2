"""The output folder of a training run, the same for pretraining and fine-tuning.

- One run at a time: rank 0 holds an exclusive ``flock`` on ``<output>/.lock`` for the whole run.
  A second run pointed at the folder refuses, naming the holder's pid and host, instead of
  interleaving its metrics and checkpoints with the first's. The kernel drops the lock when the
  process dies, so a killed run leaves no stale lock (the file stays; only its lock counts).
- Resume checked before anything is built: ``check_resume`` finds the checkpoint, verifies its
  files (``train.checkpoint.verify_checkpoint``) and compares what identifies the run (preset,
  layout, task, model config) with what the checkpoint recorded. A run writes ``run_config.json``
  and its metrics only after these checks, so a refused resume leaves the folder as it was.

Each check runs on every rank and fails on all of them together: a rank that raised alone would
leave the others waiting in their next collective until the timeout.
"""
from __future__ import annotations

import fcntl
import json
import os
import socket
import time
import warnings
from typing import Any, Callable, Optional

from ..errors import UserError
from ..files import atomic_write_bytes
from .checkpoint import CheckpointError, latest_checkpoint, verify_checkpoint
from .distributed import DistInfo, all_reduce_flag

LOCK_FILE = ".lock"


class RunDirError(UserError):
    pass


class OutputLock:
    """An exclusive lock on a run folder, held until ``release`` or the process ends."""

    def __init__(self, output: str):
        os.makedirs(output, exist_ok=True)
        self.path = os.path.join(output, LOCK_FILE)
        self.fd: Optional[int] = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(self.fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.read(self.fd, 512).decode(errors="replace").strip() or "holder unknown"
            self._close()
            raise RunDirError(f"{output} is in use by another run ({holder}); wait for it to finish or "
                              f"give another --output") from None
        except OSError as e:  # a filesystem without locks: run unguarded rather than not at all
            self._close()
            warnings.warn(f"{output}: cannot lock {LOCK_FILE} ({e.strerror}); a second run on this folder "
                          f"would not be stopped", UserWarning, stacklevel=2)
            return
        os.ftruncate(self.fd, 0)
        os.write(self.fd, f"pid {os.getpid()} on host {socket.gethostname()}, since "
                          f"{time.strftime('%Y-%m-%d %H:%M:%S')}".encode())

    @property
    def held(self) -> bool:
        return self.fd is not None

    def _close(self) -> None:
        if self.fd is not None:
            os.close(self.fd)
            self.fd = None

    def release(self) -> None:
        if self.fd is not None:
            os.ftruncate(self.fd, 0)
            self._close()


def on_every_rank(dist: DistInfo, check: Callable[[], Any]) -> Any:
    """``check()`` on this rank; if it raised a user error on any rank, raise on every rank."""
    result, error = None, None
    try:
        result = check()
    except UserError as e:
        error = e
    if all_reduce_flag(error is not None, dist):
        raise error or RunDirError("another rank refused to go on (see its message)")
    return result


def lock_output(output: str, dist: DistInfo) -> Optional[OutputLock]:
    """Rank 0 takes the folder's lock; every rank fails if it is held by another run."""
    return on_every_rank(dist, lambda: OutputLock(output) if dist.is_main else None)


def find_checkpoint(ckpt_dir: str, resume: Optional[str]) -> Optional[str]:
    """The checkpoint ``--resume`` names ("auto": the newest complete one), or None."""
    if resume is None:
        return None
    return latest_checkpoint(ckpt_dir) if resume == "auto" else resume


def differences(saved: dict, current: dict, prefix: str = "") -> list[str]:
    """``key: <saved> in the checkpoint, <current> now`` for every key of ``current`` that the
    checkpoint recorded with another value (nested dicts field by field; keys it did not record
    are not compared)."""
    current = json.loads(json.dumps(current, default=str))  # tuples as the marker stores them
    out = []
    for key, now in current.items():
        if key not in saved:
            continue
        then = saved[key]
        if isinstance(now, dict) and isinstance(then, dict):
            out += differences(then, now, f"{prefix}{key}.")
        elif then != now:
            out.append(f"{prefix}{key} {then!r} in the checkpoint, {now!r} now")
    return out


def check_same_run(path: str, meta: dict, identity: dict) -> None:
    diffs = differences(meta, identity)
    if diffs:
        more = f" (and {len(diffs) - 6} more)" if len(diffs) > 6 else ""
        raise CheckpointError(f"cannot resume from {path}: it belongs to another run: {'; '.join(diffs[:6])}{more}; "
                              f"resume with the settings it was written with, or give another --output")


def check_resume(path: str, dist: DistInfo, identity: dict, allow_pickle: bool = False) -> dict:
    """The checkpoint's metadata, once its files are verified and ``identity`` matches it."""
    def check():
        meta = verify_checkpoint(path, dist.rank, allow_pickle)
        check_same_run(path, meta, identity)
        return meta
    return on_every_rank(dist, check)


def write_run_config(output: str, info: dict) -> None:
    """``run_config.json``, replaced atomically (a resumed run's settings replace the last ones)."""
    atomic_write_bytes(os.path.join(output, "run_config.json"), json.dumps(info, indent=1, default=str).encode())
