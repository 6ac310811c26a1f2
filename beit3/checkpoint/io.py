"""Reading checkpoint files without running code hidden in them.

``torch.load`` unpickles, and a pickle can call any Python function while it loads. So every file
is read with ``weights_only=True`` (tensors, containers and plain values only) unless the caller
opts in with ``allow_pickle=True``. unilm/beit3 fine-tuned checkpoints need the opt-in: they pickle
the training ``argparse.Namespace`` beside the weights. ``.safetensors`` files hold tensors only.

DeepSpeed ZeRO checkpoint directories are consolidated with DeepSpeed's own ``zero_to_fp32``, which
always unpickles; its files are first probed with ``weights_only=True`` (allowing DeepSpeed's
``ZeroStageEnum`` and loss scalers), so that without the opt-in nothing else in them can run.
"""
from __future__ import annotations

import glob
import os
import warnings
from collections.abc import Mapping
from typing import Any, Optional

import torch
from torch import Tensor

PICKLE_HINT = ("if you trust this file, pass allow_pickle=True (command line: --allow-pickle); "
               "unpickling can run arbitrary code")


class UnsafeCheckpointError(ValueError):
    """The file needs full unpickling and the caller did not opt in."""


def _torch_load(path: str, allow_pickle: bool) -> Any:
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # the weights-only unpickler raises pickle.UnpicklingError
        if not _is_weights_only_refusal(e):
            raise
        reason = _refusal_reason(e)
        if not allow_pickle:
            raise UnsafeCheckpointError(
                f"{path}: holds pickled Python objects that weights-only loading refuses ({reason}); "
                f"{PICKLE_HINT}") from None
    warnings.warn(f"{path}: loading with full unpickling (allow_pickle=True); only do this for files you "
                  f"trust", UserWarning, stacklevel=3)
    return torch.load(path, map_location="cpu", weights_only=False)


def _is_weights_only_refusal(e: Exception) -> bool:
    return "weights_only" in str(e) or "Weights only load failed" in str(e)


def _refusal_reason(e: Exception) -> str:
    for line in str(e).splitlines():
        if "Unsupported global" in line or "Unsupported operand" in line:
            return line.strip().split(" was not an allowed global")[0].replace("WeightsUnpickler error: ", "")
    return "not plain tensors"


def load_checkpoint_file(path: str, allow_pickle: bool = False) -> Any:
    """The object stored in a ``.pt``/``.pth``/``.bin`` (torch) or ``.safetensors`` file, on the CPU."""
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"checkpoint file not found: {path}")
    if path.endswith(".safetensors"):
        from safetensors.torch import load_file
        return load_file(path, device="cpu")
    return _torch_load(path, allow_pickle)


def extract_state_dict(obj: Any, source: str = "checkpoint") -> dict[str, Tensor]:
    """The weights inside a loaded checkpoint: under ``model`` or ``module`` (unilm, DeepSpeed), or
    the object itself when it is a bare state dict. Non-tensor entries are dropped."""
    if not isinstance(obj, Mapping):
        raise ValueError(f"{source}: expected a state dict (a mapping of names to tensors), got "
                         f"{type(obj).__name__}")
    for key in ("model", "module"):
        if isinstance(obj.get(key), Mapping):
            obj = obj[key]
            break
    sd = {k: v for k, v in obj.items() if isinstance(v, Tensor)}
    if not sd:
        raise ValueError(f"{source}: no tensors found; top-level keys: {sorted(obj)[:20]}")
    return sd


def load_state_dict(source: Any, allow_pickle: bool = False, tag: Optional[str] = None) -> dict[str, Tensor]:
    """Weights from a state dict, a checkpoint file or a DeepSpeed checkpoint directory."""
    if isinstance(source, Mapping):
        return extract_state_dict(source, "state dict")
    path = os.fspath(source)
    if os.path.isdir(path):
        return load_zero_checkpoint(path, tag=tag, allow_pickle=allow_pickle)
    return extract_state_dict(load_checkpoint_file(path, allow_pickle), path)


# -- DeepSpeed ------------------------------------------------------------------------------------
def _zero_location(path: str, tag: Optional[str]) -> tuple[str, Optional[str], str]:
    """(checkpoint_dir, tag, tag directory) for DeepSpeed's consolidation. Accepts the tag directory
    itself (what ``engine.save_checkpoint(dir, tag)`` writes, with or without a ``latest`` file
    beside it) or the parent directory with a tag or a ``latest`` file."""
    path = path.rstrip("/")
    if tag is None and glob.glob(os.path.join(path, "*model_states.pt")):
        parent, tag = os.path.split(path)
        return parent, tag, path
    if tag is None:
        latest = os.path.join(path, "latest")
        if not os.path.isfile(latest):
            raise ValueError(f"{path}: not a DeepSpeed checkpoint directory: expected *model_states.pt files "
                             f"in it, or a 'latest' file naming the tag directory (or pass a tag)")
        with open(latest) as f:
            tag = f.read().strip()
    tag_dir = os.path.join(path, tag)
    if not glob.glob(os.path.join(tag_dir, "*model_states.pt")):
        raise ValueError(f"{tag_dir}: no DeepSpeed *model_states.pt files")
    return path, tag, tag_dir


def _deepspeed_safe_globals() -> list:
    """DeepSpeed classes its checkpoints pickle; building them runs nothing but their plain
    constructors and attribute updates."""
    from deepspeed.runtime.fp16.loss_scaler import DynamicLossScaler, LossScaler
    from deepspeed.runtime.zero.config import ZeroStageEnum
    return [ZeroStageEnum, LossScaler, DynamicLossScaler]


def _check_zero_files(tag_dir: str, allow_pickle: bool) -> None:
    files = sorted(glob.glob(os.path.join(tag_dir, "*model_states.pt")) +
                   glob.glob(os.path.join(tag_dir, "*optim_states.pt")))
    if allow_pickle:
        warnings.warn(f"{tag_dir}: consolidating with full unpickling (allow_pickle=True)", UserWarning,
                      stacklevel=3)
        return
    with torch.serialization.safe_globals(_deepspeed_safe_globals()):
        for f in files:
            try:
                torch.load(f, map_location="cpu", weights_only=True, mmap=True)
            except Exception as e:
                if not _is_weights_only_refusal(e):
                    raise
                raise UnsafeCheckpointError(
                    f"{f}: holds pickled Python objects beyond DeepSpeed's own ({_refusal_reason(e)}); "
                    f"{PICKLE_HINT}") from None


def load_zero_checkpoint(path: str, tag: Optional[str] = None, allow_pickle: bool = False) -> dict[str, Tensor]:
    """Consolidated fp32 weights of a DeepSpeed (ZeRO 1/2/3) checkpoint, names as in the engine's
    module (e.g. ``model.layers.0...`` for a module holding the backbone at ``.model``)."""
    from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

    ckpt_dir, tag, tag_dir = _zero_location(os.fspath(path), tag)
    _check_zero_files(tag_dir, allow_pickle)
    sd = get_fp32_state_dict_from_zero_checkpoint(ckpt_dir, tag=tag)
    return {k: v for k, v in sd.items() if isinstance(v, Tensor)}
