"""The output folder of a training run, the same for pretraining and fine-tuning.

- One run at a time: rank 0 holds an exclusive ``flock`` on ``<output>/.lock`` for the whole run.
  A second run pointed at the folder refuses, naming the holder's pid and host, instead of
  interleaving its metrics and checkpoints with the first's. The kernel drops the lock when the
  process dies, so a killed run leaves no stale lock (the file stays; only its lock counts).
- A finished run is never overwritten: a folder that holds a run (``run_contents``: a complete
  checkpoint, ``final/``, ``best/``, tokenizer weights, ``run_config.json``, ``metrics.jsonl``) is
  continued (``--resume``) or refused naming what it holds (``check_run_folder``), unless
  ``--overwrite`` is given: then its files are moved into ``<output>/replaced-<time>/``
  (``move_aside``) before the new run writes anything. Moved, not deleted: a rename is instant
  whatever the run's size (a giant run keeps ~90 GB of checkpoints), and an ``--overwrite`` given by
  mistake (a reused command line, a wrong ``--output``) loses nothing but the disk space until the
  folder is deleted. ``--resume auto`` in a folder without a complete checkpoint starts fresh (the
  run before was stopped before its first one) unless the folder holds weights: ``final/`` and a
  tokenizer's are written after a checkpoint, so its checkpoints were removed, and starting over
  would replace the weights (``best/`` comes just before the first checkpoint: a fine-tuning run
  killed while writing it is refused too, and ``--overwrite`` starts it again).
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

from beit3.core.errors import UserError
from beit3.core.files import atomic_write_bytes, current_dir
from beit3.trainer.checkpoint import CheckpointError, complete_checkpoints, latest_checkpoint, verify_checkpoint
from beit3.trainer.distributed import DistInfo, all_reduce_flag

LOCK_FILE = ".lock"
REPLACED = "replaced-"  # <output>/replaced-<time>/: a run moved aside by --overwrite
WEIGHT_DIRS = ("final", "best")  # pretraining's and fine-tuning's weights
WEIGHT_FILES = ("model.safetensors", "tokenizer.pth")  # a tokenizer's (tokenizer.pth: older versions')
RUN_FILES = ("run_config.json", "metrics.jsonl")


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


def run_contents(output: str) -> tuple[list[str], list[str]]:
    """(complete checkpoints, other run files) in ``output``: the newest checkpoint's path relative to
    ``output`` (and how many older), then the weights and run files there, by name."""
    found = complete_checkpoints(os.path.join(output, "checkpoints"))
    checkpoints = []
    if found:
        older = f" and {len(found) - 1} older" if len(found) > 1 else ""
        checkpoints = [f"checkpoint {os.path.relpath(found[-1][1], output)}{older}"]
    weights = [f"{name}/" for name in WEIGHT_DIRS if current_dir(os.path.join(output, name))]  # .old after a kill too
    files = [name for name in WEIGHT_FILES + RUN_FILES if os.path.isfile(os.path.join(output, name))]
    return checkpoints, weights + files


def check_run_folder(output: str, resume: Optional[str], overwrite: bool) -> list[str]:
    """What ``output`` holds of a run (empty: nothing), once it is clear that this run may go on
    there: it continues the run (``--resume``) or replaces it (``--overwrite``); else RunDirError."""
    if overwrite and resume is not None:
        raise RunDirError(f"--overwrite replaces the run in {output} and --resume {resume} continues it: give one")
    checkpoints, files = run_contents(output)
    held = checkpoints + files
    if not held or overwrite:
        return held
    if resume is None:
        raise RunDirError(f"{output} holds a run ({', '.join(held)}); continue it with --resume auto, give "
                          f"another --output, or replace it with --overwrite (its files are moved into "
                          f"{output}/{REPLACED}<time>/)")
    weights = [name for name in files if name not in RUN_FILES]
    if resume == "auto" and not checkpoints and weights:
        raise RunDirError(f"--resume auto: {output} holds {', '.join(weights)} but no complete checkpoint to continue "
                          f"from; give another --output, or replace the run with --overwrite (its files are moved into "
                          f"{output}/{REPLACED}<time>/)")
    return held


def move_aside(output: str) -> str:
    """Move everything in ``output`` but its lock and earlier replaced runs into a new
    ``<output>/replaced-<time>/``; returns that folder. Only the folder's lock holder calls it."""
    stamp = time.strftime("%Y%m%d-%H%M%S")
    dest, n = os.path.join(output, REPLACED + stamp), 1
    while os.path.lexists(dest):
        n += 1
        dest = os.path.join(output, f"{REPLACED}{stamp}-{n}")
    try:
        os.mkdir(dest)
        for name in sorted(os.listdir(output)):
            if name != LOCK_FILE and not name.startswith(REPLACED):
                os.replace(os.path.join(output, name), os.path.join(dest, name))
    except OSError as e:
        raise RunDirError(f"--overwrite: could not move the run in {output} into {dest} ({e.strerror or e}); "
                          f"what was moved is there, the rest in {output}") from None
    return dest


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
        meta = verify_checkpoint(path, dist.rank, allow_pickle, dist.world_size)
        check_same_run(path, meta, identity)
        return meta
    return on_every_rank(dist, check)


def write_run_config(output: str, info: dict) -> None:
    """``run_config.json``, replaced atomically (a resumed run's settings replace the last ones)."""
    atomic_write_bytes(os.path.join(output, "run_config.json"), json.dumps(info, indent=1, default=str).encode())
