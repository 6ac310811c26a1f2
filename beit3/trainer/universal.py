"""Resuming on another number of ranks through DeepSpeed's universal checkpoints.

A ZeRO checkpoint holds one optimizer partition per rank and DeepSpeed refuses to load it on another
data-parallel world size. Its own converter (``deepspeed.checkpoint.ds_to_universal``) rewrites the
partitions as one file per parameter (weights and both Adam moments), which an engine built with
``"checkpoint": {"load_universal": true}`` re-partitions for any world size. We run that converter
rather than re-partitioning ourselves, once per checkpoint: the result is cached inside the
checkpoint (``step_XXXXXXXX/universal/``), so a second resume on another size, or a restart of the
resumed job before its first save, does not convert again.

DeepSpeed's ZeRO-3 universal loader (0.19.8) leaves two things that change the next updates (found
by comparing with an uninterrupted run, whose losses drifted from the second step after the resume):
it gives every optimizer param group the hyperparameters of group 0 (our no-decay group of biases
and norms would decay like the weights, or the reverse), and it gives every partition the same
``step`` tensor object, which torch's AdamW increments in place once per group, so Adam's bias
correction runs ahead. ``repair_universal_optimizer`` puts each group's own hyperparameters back,
from the same converted file, and gives each partition its own step counter.

The conversion writes into a hidden temporary folder and renames it into place when it finished:
a ``universal/`` folder is always whole, and a kill mid-way leaves only the temporary, which the
checkpoint's file checks do not look into and the next attempt removes. The checkpoint's own files
are only read.
"""
from __future__ import annotations

import os
import subprocess
import sys

import torch

from beit3.core.files import atomic_file
from beit3.core.weight_files import deepspeed_safe_globals
from beit3.trainer.checkpoint import CheckpointError

UNIVERSAL = "universal"  # the converted copy's folder inside a checkpoint, and its DeepSpeed tag


def universal_dir(path: str) -> str:
    return os.path.join(path, UNIVERSAL)


def use_universal(ds_config: dict) -> None:
    """Make the engine load universal checkpoints (set before it is built)."""
    ds_config.setdefault("checkpoint", {})["load_universal"] = True


def ensure_universal(path: str, log=print, timeout_s: float = 1800.0) -> str:
    """The universal copy of checkpoint ``path``, converted now unless cached. One process only
    (rank 0); the others wait at a barrier."""
    final = universal_dir(path)
    if os.path.isdir(final):
        return final
    log(f"converting {path} to a universal checkpoint for another world size (DeepSpeed's ds_to_universal; "
        f"once, kept in {final})")
    # Written as a hidden temporary beside its final name (which a checkpoint's file checks skip),
    # renamed when whole; a killed conversion's temporary is removed by the next one.
    with atomic_file(final) as tmp:
        _convert(path, tmp, timeout_s)
    # The converter points a ``latest_universal`` file beside its output at the temporary name.
    stray = os.path.join(path, "latest_universal")
    if os.path.isfile(stray):
        os.remove(stray)
    return final


def _convert(path: str, out: str, timeout_s: float) -> None:
    cmd = [sys.executable, "-m", "deepspeed.checkpoint.ds_to_universal", "--input_folder", path,
           "--output_folder", out, "--num_extract_workers", "1", "--num_merge_workers", "1"]
    try:
        # A subprocess: the converter forks worker pools, which a process holding a process group
        # and an engine should not do.
        done = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout_s)
    except subprocess.TimeoutExpired:
        raise CheckpointError(f"converting {path} to a universal checkpoint took over {timeout_s:g}s") from None
    if done.returncode != 0:
        tail = (done.stderr or done.stdout).strip().splitlines()[-1:] or ["no output"]
        raise CheckpointError(f"DeepSpeed's ds_to_universal could not convert {path} for another world size "
                              f"(exit code {done.returncode}): {tail[0]}")


def repair_universal_optimizer(engine, folder: str) -> None:
    """After DeepSpeed loaded the universal checkpoint ``folder``: each optimizer param group's
    hyperparameters (weight decay, lr, lr scale, betas, ...) as the checkpoint saved them, and an
    Adam step counter of its own for each partition."""
    base = getattr(engine.optimizer, "optimizer", None)
    if base is None:
        return
    for state in base.state.values():
        if torch.is_tensor(state.get("step")):
            state["step"] = state["step"].clone()
    path = os.path.join(folder, "zero", "optimizer_state.pt")
    if not os.path.isfile(path):
        return
    with torch.serialization.safe_globals(deepspeed_safe_globals()):
        saved = torch.load(path, map_location="cpu", weights_only=True).get("optimizer_state_dict", {})
    if len(saved.get("param_groups", [])) != len(base.param_groups):
        return  # not the ZeRO-3 layout this repair is for
    for group, kept in zip(base.param_groups, saved["param_groups"]):
        group.update({k: v for k, v in kept.items() if k != "params"})
