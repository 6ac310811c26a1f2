"""Checkpoints that survive a kill at any moment and are checked before they are used.

Layout: ``<output>/checkpoints/step_00000200/`` holds DeepSpeed's files (model/optimizer partitions,
written by every rank), one ``rank_<r>.pt`` per rank (data stream position and RNG states, which
differ per rank) and, last, a ``COMPLETE`` marker written atomically by rank 0 after every rank
finished. ``--resume auto`` only considers directories with the marker, so a checkpoint that was
being written when the process died is never picked. Older complete checkpoints are deleted only
after a newer one is complete. DeepSpeed's own ``latest`` file (its tag, which ``zero_to_fp32.py``
and ``engine.load_checkpoint(dir)`` read when no tag is given) is replaced atomically after the
marker, so it always names a complete checkpoint.

The marker lists every file with its size and its CRC-32. ``verify_checkpoint`` compares them before
a resume (a lost rank file, a truncated optimizer file or one whose bytes changed is an error naming
it, not a resume that quietly restarts the data stream or loads damaged optimizer states), then
probes the files with weights-only loading: ``rank_<r>.pt`` holds only tensors and plain values,
DeepSpeed's files nothing beyond DeepSpeed's own types, so a pickle planted in either is refused
unless the user passes ``--allow-pickle``.

The digests are read back and checked by the ranks together: each rank the files of its own rank
number (``owner``: ``rank_3.pt`` and ``zero_pp_rank_3_...`` are rank 3's; files without one are rank
0's), so a rank reads its share of the checkpoint, not all of it. CRC-32 (zlib) because it is the
fastest digest in the standard library (in memory, on one core here: 2.4 GB/s, sha256 0.7, blake2b
0.4; docs/pretraining.md has the cost for the giant) and it catches damage (bit rot, a torn copy),
which is all it is for: a planted file is refused by the pickle probe, not by the digest, which
whoever plants a file can rewrite. A marker without digests (written before they were recorded) is
checked by its sizes alone.
"""
from __future__ import annotations

import json
import os
import random
import re
import shutil
import time
import zlib
from typing import Any, Optional

import numpy as np
import torch
import torch.distributed as dist

from beit3.core.weight_files import check_deepspeed_files, load_checkpoint_file
from beit3.core.errors import OutputError, UserError, first_line
from beit3.core.files import atomic_file, atomic_write_bytes, file_sizes, read_json, size_problems
from beit3.trainer.distributed import DistInfo, all_reduce_flag, barrier

MARKER = "COMPLETE"
LATEST = "latest"  # DeepSpeed's name: its tools read the newest tag from this file
_TAG = re.compile(r"^step_(\d{8})$")
_RANK = re.compile(r"(?:^|_)rank_(\d+)(?:_|\.)")  # rank_3.pt, zero_pp_rank_3_mp_rank_00_optim_states.pt
DIGEST = "crc32"


class CheckpointError(UserError, RuntimeError):
    pass


def tag_for(step: int) -> str:
    return f"step_{step:08d}"


def atomic_torch_save(obj: Any, path: str) -> None:
    with atomic_file(path) as tmp:
        torch.save(obj, tmp)


def rng_state() -> dict:
    """Every RNG's state as tensors and plain values, which weights-only loading accepts."""
    version, internal, gauss = random.getstate()
    _, keys, pos, has_gauss, cached = np.random.get_state()
    state = {"python": [version, list(internal), gauss],
             "numpy": {"keys": torch.from_numpy(keys.astype(np.int64)), "pos": int(pos),
                       "has_gauss": int(has_gauss), "cached_gaussian": float(cached)},
             "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def set_rng_state(state: dict) -> None:
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    n = state["numpy"]
    if isinstance(n, dict):
        np.random.set_state(("MT19937", n["keys"].numpy().astype(np.uint32), n["pos"], n["has_gauss"],
                             n["cached_gaussian"]))
    else:  # written before the RNG states were plain values (loaded with --allow-pickle)
        np.random.set_state(n)
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])


def plain(obj: Any) -> Any:
    """``obj`` with numpy values made Python numbers or tensors (metrics can hold numpy floats),
    so the rank state loads with ``weights_only=True``."""
    if isinstance(obj, dict):
        return {k: plain(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return type(obj)(plain(v) for v in obj)
    if isinstance(obj, np.ndarray):
        return torch.from_numpy(obj.copy())
    if isinstance(obj, np.generic):
        return obj.item()
    return obj


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


def save_checkpoint(engine, ckpt_dir: str, step: int, info: DistInfo, rank_state: dict, meta: dict,
                    keep_last: int = 3) -> str:
    """Collective: every rank of ``info``'s world calls it. Returns the checkpoint directory.

    A failure on any rank (disk full, unwritable directory) raises CheckpointError on every rank,
    after removing the partial directory; earlier checkpoints are untouched.
    """
    tag = tag_for(step)
    path = os.path.join(ckpt_dir, tag)
    rank = info.rank
    if rank == 0 and os.path.isfile(os.path.join(path, MARKER)):
        os.remove(os.path.join(path, MARKER))  # the same step saved again: unmarked while it is rewritten
        point_latest(ckpt_dir)
    barrier(info)
    error, digests = None, {}
    try:
        os.makedirs(ckpt_dir, exist_ok=True)
        engine.save_checkpoint(ckpt_dir, tag=tag, save_latest=False)
        atomic_torch_save(plain({**rank_state, "rng": rng_state()}), os.path.join(path, rank_file(rank)))
    except (OSError, RuntimeError, OutputError) as e:  # torch.save reports a full disk as RuntimeError
        error = e
    if not all_reduce_flag(error is not None, info):  # every rank's files are written: read back its own
        try:
            digests = own_digests(path, rank, info.world_size)
        except OSError as e:
            error = e
    if all_reduce_flag(error is not None, info):
        if rank == 0:
            shutil.rmtree(path, ignore_errors=True)
        barrier(info)
        where = f"rank {rank}: {error}" if error is not None else "another rank failed"
        raise CheckpointError(f"could not write checkpoint {path} ({where}); the previous complete "
                              f"checkpoint is kept: {latest_checkpoint(ckpt_dir)}")
    digests = gather_digests(digests, info)
    if rank == 0:
        mark_complete(path, {**meta, "step": step}, digests)
        point_latest(ckpt_dir)
        for _, old in complete_checkpoints(ckpt_dir)[:-keep_last] if keep_last > 0 else []:
            os.remove(os.path.join(old, MARKER))  # first un-mark it, so a kill mid-delete leaves no half checkpoint
            shutil.rmtree(old, ignore_errors=True)
    barrier(info)
    return path


def mark_complete(path: str, meta: dict, digests: dict[str, str]) -> None:
    """The marker: ``meta``, the time, every file's size and digest. Listed once every rank's files
    are complete (on a shared filesystem)."""
    files = {name: size for name, size in file_sizes(path).items() if name != MARKER}
    record = {**meta, "time": time.time(), "files": files, "digests": digests}
    atomic_write_bytes(os.path.join(path, MARKER), json.dumps(record, indent=1).encode())


# -- digests -------------------------------------------------------------------------------------
def file_crc32(path: str, block: int = 1 << 20) -> str:
    """``crc32:<8 hex digits>`` of the file's bytes, read in 1 MiB blocks into one buffer (one that
    stays in the CPU's cache between the read and the CRC: faster than 8 MiB, measured)."""
    crc, buf = 0, bytearray(block)
    view = memoryview(buf)
    with open(path, "rb", buffering=0) as f:
        while n := f.readinto(buf):
            crc = zlib.crc32(view[:n], crc)
    return f"{DIGEST}:{crc:08x}"


def owner(name: str, world_size: int) -> int:
    """The rank that digests ``name``: the rank number in its name modulo the world (0 without one),
    so every file has one reader however many ranks write or resume the checkpoint."""
    m = _RANK.search(name)
    return int(m.group(1)) % world_size if m else 0


def own_digests(path: str, rank: int, world_size: int) -> dict[str, str]:
    return {name: file_crc32(os.path.join(path, name)) for name in sorted(file_sizes(path))
            if name != MARKER and owner(name, world_size) == rank}


def gather_digests(digests: dict[str, str], info: DistInfo) -> dict[str, str]:
    """Every rank's ``digests`` in one dict (on every rank)."""
    if info.world_size == 1 or not dist.is_initialized():
        return digests
    parts: list = [None] * info.world_size
    dist.all_gather_object(parts, digests)
    return {name: d for part in parts for name, d in sorted(part.items())}


def digest_problems(path: str, digests: dict, rank: int, world_size: int) -> list[str]:
    """The files of ``rank`` whose bytes differ from the digests the marker recorded."""
    problems = []
    for name, then in sorted(digests.items()):
        # Another rank's file; or a digest of another kind (a newer version's): its size was checked.
        if owner(name, world_size) != rank or not str(then).startswith(DIGEST + ":"):
            continue
        try:
            now = file_crc32(os.path.join(path, name))
        except OSError as e:  # missing, or a disk that cannot read it back (EIO)
            problems.append(f"{name} cannot be read ({e.strerror or e})")
            continue
        if now != then:
            problems.append(f"{name} does not hold the bytes written ({now}, {then} when written)")
    return problems


def point_latest(ckpt_dir: str) -> None:
    """DeepSpeed's ``latest`` names the newest complete checkpoint (removed when there is none)."""
    newest = latest_checkpoint(ckpt_dir)
    latest = os.path.join(ckpt_dir, LATEST)
    if newest is not None:
        atomic_write_bytes(latest, os.path.basename(newest).encode())
    elif os.path.isfile(latest):
        os.remove(latest)


def rank_file(rank: int) -> str:
    return f"rank_{rank}.pt"


def read_marker(path: str) -> dict:
    marker = os.path.join(path, MARKER)
    if not os.path.isdir(path):
        raise CheckpointError(f"{path}: no such checkpoint folder")
    if not os.path.isfile(marker):
        raise CheckpointError(f"{path} is not a complete checkpoint (no {MARKER} marker: it was being "
                              f"written when its run stopped)")
    return read_json(marker)


def verify_checkpoint(path: str, rank: int, allow_pickle: bool = False, world_size: int = 1) -> dict:
    """The marker's metadata, once the checkpoint's files are all there with the sizes they were
    written with, this rank's share of them (of ``world_size`` ranks reading it) with the digests
    they were written with, and none of them holds code to run (unless ``allow_pickle``)."""
    meta = read_marker(path)
    files = meta.get("files") if isinstance(meta.get("files"), dict) else {}
    digests = meta.get("digests") if isinstance(meta.get("digests"), dict) else {}  # none before digests
    ranks = [rank_file(r) for r in range(int(meta.get("world_size") or 1))]
    problems = size_problems(path, files)
    problems += [f"{name} is missing" for name in ranks
                 if name not in files and not os.path.isfile(os.path.join(path, name))]
    if not problems:
        problems = digest_problems(path, digests, rank, world_size)
    if problems:
        raise CheckpointError(f"checkpoint {path} is damaged: {'; '.join(problems)}; it cannot be resumed "
                              f"(remove it to resume from an earlier one)")
    check_deepspeed_files(path, allow_pickle)
    own = os.path.join(path, rank_file(rank))
    if os.path.isfile(own) and not allow_pickle:  # trusted files are unpickled once, when loaded
        _load_rank_state(own, allow_pickle, mmap=True)
    return meta


def _load_rank_state(path: str, allow_pickle: bool, mmap: bool = False) -> dict:
    state = load_checkpoint_file(path, allow_pickle, mmap=mmap)
    if not isinstance(state, dict) or "rng" not in state:
        raise CheckpointError(f"{path}: not a rank state of ours (expected a dict with the RNG states)")
    return state


def load_checkpoint(engine, path: str, rank: int, allow_pickle: bool = False,
                    tag_dir: Optional[str] = None) -> tuple[dict, dict]:
    """Load a checkpoint that ``verify_checkpoint`` accepted into ``engine``; returns (meta, this
    rank's state), its RNG states applied. ``tag_dir``: DeepSpeed's files from another folder (the
    checkpoint's universal copy, for an engine built to load one)."""
    meta = read_marker(path)
    ckpt_dir, tag = os.path.split((tag_dir or path).rstrip("/"))
    try:
        loaded, _ = engine.load_checkpoint(ckpt_dir, tag=tag, load_optimizer_states=True,
                                           load_lr_scheduler_states=True)
    except Exception as e:  # a file of the recorded size whose content is damaged
        raise CheckpointError(f"DeepSpeed could not load {path}: {type(e).__name__}: {first_line(e)}") from e
    if loaded is None:
        raise CheckpointError(f"DeepSpeed could not load {path}")
    own = os.path.join(path, rank_file(rank))
    if not os.path.isfile(own):  # a rank beyond the checkpoint's world size (verified above)
        return meta, {}
    state = _load_rank_state(own, allow_pickle)
    set_rng_state(state.pop("rng"))
    return meta, state


def data_states(path: str, allow_pickle: bool = False) -> list:
    """Every rank's data-stream state in checkpoint ``path`` (a stream split over another number
    of ranks is rebuilt from all of them)."""
    world = int(read_marker(path).get("world_size") or 1)
    return [_load_rank_state(os.path.join(path, rank_file(r)), allow_pickle).get("data") for r in range(world)]
