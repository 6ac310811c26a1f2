"""Process-group setup for single-process, torchrun, the deepspeed launcher and Slurm."""
from __future__ import annotations

import atexit
import importlib
import os
import socket
from dataclasses import dataclass
from datetime import timedelta

import torch
import torch.distributed as dist

from beit3.core.errors import UserError


@dataclass
class DistInfo:
    rank: int
    world_size: int
    local_rank: int
    device: torch.device

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @classmethod
    def single(cls, device: str | torch.device) -> "DistInfo":
        """A world of this process alone, whatever group it belongs to: its collectives are no-ops.
        For a job one rank runs by itself (the demo's tokenizer, trained by rank 0 of a pretraining
        run while the others wait)."""
        return cls(0, 1, 0, torch.device(device))


def pick_device(requested: str | None) -> str:
    """``--device``: the one asked for, else cuda when a GPU is visible, else cpu. A UserError for
    cuda without a visible GPU, before anything is built."""
    if requested == "cuda" and not torch.cuda.is_available():
        raise UserError("--device cuda but no CUDA device is visible (torch.cuda.is_available() is False; "
                        "check CUDA_VISIBLE_DEVICES and the driver), or give --device cpu")
    return requested or ("cuda" if torch.cuda.is_available() else "cpu")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _env_from_slurm() -> None:
    # srun sets SLURM_* but not the torch variables; the deepspeed launcher and torchrun set both.
    if "RANK" not in os.environ and "SLURM_PROCID" in os.environ and int(os.environ.get("SLURM_NTASKS", 1)) > 1:
        os.environ["RANK"] = os.environ["SLURM_PROCID"]
        os.environ["WORLD_SIZE"] = os.environ["SLURM_NTASKS"]
        os.environ["LOCAL_RANK"] = os.environ.get("SLURM_LOCALID", "0")


def init_distributed(timeout_s: float = 1800.0, device: str | None = None) -> DistInfo:
    """Initialise torch.distributed (NCCL on GPUs, gloo on CPU) for any launcher, or a world of one.

    On CPU plain gloo is used rather than ``deepspeed.init_distributed``, which would JIT-compile a
    shared-memory op first (~30 s). ``timeout_s`` bounds every collective, so a rank whose peer died
    fails with a timeout instead of hanging forever.
    """
    _env_from_slurm()
    if device is None:
        device = "cuda" if torch.cuda.is_available() else "cpu"
    os.environ.setdefault("RANK", "0")
    os.environ.setdefault("WORLD_SIZE", "1")
    os.environ.setdefault("LOCAL_RANK", "0")
    os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
    if "MASTER_PORT" not in os.environ:
        if int(os.environ["WORLD_SIZE"]) > 1:
            raise RuntimeError("WORLD_SIZE > 1 but MASTER_PORT is not set: start with torchrun, "
                               "deepspeed or srun (see scripts/)")
        os.environ["MASTER_PORT"] = str(free_port())
    rank, world, local = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"]), int(os.environ["LOCAL_RANK"])
    if device == "cuda":
        torch.cuda.set_device(local)
        dev = torch.device("cuda", local)
    else:
        dev = torch.device("cpu")
        skip_cpu_shm_op()
    _group_end["clean"] = False
    if not dist.is_initialized():
        backend = "nccl" if dev.type == "cuda" else "gloo"
        dist.init_process_group(backend, rank=rank, world_size=world, timeout=timedelta(seconds=timeout_s))
        if not _group_end["registered"]:
            atexit.register(_end_group_at_exit)
            _group_end["registered"] = True
    return DistInfo(rank, world, local, dev)


def skip_cpu_shm_op() -> None:
    """DeepSpeed's CPU backend JIT-compiles a shared-memory all-reduce op on its first
    ``initialize`` (30 s to 5 min on 2 cores); gloo alone is all the CPU path needs."""
    try:
        comm_torch = importlib.import_module("deepspeed.comm.torch")
    except ImportError:
        return
    comm_torch.build_shm_op = lambda: None


def all_reduce_flag(flag: bool, info: DistInfo) -> bool:
    """True on every rank of ``info``'s world if ``flag`` is True on any of them."""
    if info.world_size == 1 or not dist.is_initialized():
        return flag
    t = torch.tensor([1.0 if flag else 0.0], device=info.device)
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return bool(t.item() > 0)


# Left to interpreter finalization, gloo's worker threads can still hold tensors whose release then
# aborts the process (SIGABRT, "terminate called without an active exception") after a job that
# succeeded, and the launcher reports a failure. So a group this module created is destroyed at
# exit, while the interpreter is fully alive; but only after a clean finish on every rank
# (finish_distributed): with a peer failing, destroying could wait on it (torchtitan does the same).
# Not earlier: DeepSpeed caches the group, and in-process callers (tests, notebooks) run job after job.
_group_end = {"registered": False, "clean": False}


def _end_group_at_exit() -> None:
    if _group_end["clean"] and dist.is_initialized():
        dist.destroy_process_group()


def finish_distributed(info: DistInfo) -> None:
    """A job finished cleanly on every rank of ``info``'s world: wait for the others; the process
    group ends at exit. A job one rank ran alone (``DistInfo.single`` in a larger group) says nothing
    of the group's job."""
    barrier(info)
    if info.world_size == (dist.get_world_size() if dist.is_initialized() else 1):
        _group_end["clean"] = True


def barrier(info: DistInfo) -> None:
    """Wait for every rank of ``info``'s world (none to wait for in a world of one, such as a
    single-process job run by one rank of a larger group)."""
    if info.world_size > 1 and dist.is_initialized():
        dist.barrier()
