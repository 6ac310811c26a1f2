"""Checkpoints that survive a kill at any moment.

Layout: ``<output>/checkpoints/step_00000200/`` holds DeepSpeed's files (model/optimizer partitions,
written by every rank), one ``rank_<r>.pt`` per rank (data stream position and RNG states, which
differ per rank) and, last, a ``COMPLETE`` marker written atomically by rank 0 after every rank
finished. ``--resume auto`` only considers directories with the marker, so a checkpoint that was
being written when the process died is never picked. Older complete checkpoints are deleted only
after a newer one is complete.
"""
from __future__ import annotations

import json
import os
import random
import re
import shutil
import time
from typing import Any, Optional

import numpy as np
import torch

from .distributed import all_reduce_flag, barrier

MARKER = "COMPLETE"
_TAG = re.compile(r"^step_(\d{8})$")


class CheckpointError(RuntimeError):
    pass


def tag_for(step: int) -> str:
    return f"step_{step:08d}"


def atomic_write_bytes(path: str, data: bytes) -> None:
    tmp = f"{path}.tmp{os.getpid()}"
    with open(tmp, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def atomic_torch_save(obj: Any, path: str) -> None:
    tmp = f"{path}.tmp{os.getpid()}"
    torch.save(obj, tmp)
    os.replace(tmp, path)


def rng_state() -> dict:
    state = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def set_rng_state(state: dict) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])


def complete_checkpoints(ckpt_dir: str) -> list[tuple[int, str]]:
    """(step, path) of every complete checkpoint, oldest first."""
    if not os.path.isdir(ckpt_dir):
        return []
    out = []
    for name in os.listdir(ckpt_dir):
        m = _TAG.match(name)
        path = os.path.join(ckpt_dir, name)
        if m and os.path.isfile(os.path.join(path, MARKER)):
            out.append((int(m.group(1)), path))
    return sorted(out)


def latest_checkpoint(ckpt_dir: str) -> Optional[str]:
    found = complete_checkpoints(ckpt_dir)
    return found[-1][1] if found else None


def save_checkpoint(engine, ckpt_dir: str, step: int, rank: int, rank_state: dict, meta: dict,
                    keep_last: int = 3) -> str:
    """Collective: every rank calls it. Returns the checkpoint directory.

    A failure on any rank (disk full, unwritable directory) raises CheckpointError on every rank,
    after removing the partial directory; earlier checkpoints are untouched.
    """
    tag = tag_for(step)
    path = os.path.join(ckpt_dir, tag)
    error = None
    try:
        os.makedirs(ckpt_dir, exist_ok=True)
        engine.save_checkpoint(ckpt_dir, tag=tag, save_latest=False)
        atomic_torch_save({**rank_state, "rng": rng_state()}, os.path.join(path, f"rank_{rank}.pt"))
    except (OSError, RuntimeError) as e:  # torch.save reports a full disk as RuntimeError
        error = e
    if all_reduce_flag(error is not None, engine.device):
        if rank == 0:
            shutil.rmtree(path, ignore_errors=True)
        barrier()
        where = f"rank {rank}: {error}" if error is not None else "another rank failed"
        raise CheckpointError(f"could not write checkpoint {path} ({where}); the previous complete "
                              f"checkpoint is kept: {latest_checkpoint(ckpt_dir)}")
    barrier()
    if rank == 0:
        info = {**meta, "step": step, "time": time.time()}
        atomic_write_bytes(os.path.join(path, MARKER), json.dumps(info, indent=1).encode())
        for _, old in complete_checkpoints(ckpt_dir)[:-keep_last] if keep_last > 0 else []:
            os.remove(os.path.join(old, MARKER))  # first un-mark it, so a kill mid-delete leaves no half checkpoint
            shutil.rmtree(old, ignore_errors=True)
    barrier()
    return path


def load_checkpoint(engine, path: str, rank: int) -> tuple[dict, dict]:
    """Load a complete checkpoint into ``engine``; returns (meta, this rank's state)."""
    if not os.path.isfile(os.path.join(path, MARKER)):
        raise CheckpointError(f"{path} is not a complete checkpoint (no {MARKER} marker)")
    ckpt_dir, tag = os.path.split(path.rstrip("/"))
    loaded, _ = engine.load_checkpoint(ckpt_dir, tag=tag, load_optimizer_states=True,
                                       load_lr_scheduler_states=True)
    if loaded is None:
        raise CheckpointError(f"DeepSpeed could not load {path}")
    with open(os.path.join(path, MARKER)) as f:
        meta = json.load(f)
    rank_file = os.path.join(path, f"rank_{rank}.pt")
    state = {}
    if os.path.isfile(rank_file):
        state = torch.load(rank_file, weights_only=False)  # our own file: RNG states are numpy objects
        set_rng_state(state.pop("rng"))
    return meta, state
