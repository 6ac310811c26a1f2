"""Reading checkpoint files without running code hidden in them.

``torch.load`` unpickles, and a pickle can call any Python function while it loads. So every file
is read with ``weights_only=True`` (tensors, containers and plain values only) unless the caller
opts in with ``allow_pickle=True``. unilm/beit3 fine-tuned checkpoints need the opt-in: they pickle
the training ``argparse.Namespace`` beside the weights. ``.safetensors`` files hold tensors only.

DeepSpeed ZeRO checkpoint directories are consolidated with DeepSpeed's own ``zero_to_fp32``, which
always unpickles; its files are first probed with ``weights_only=True`` (allowing DeepSpeed's
``ZeroStageEnum`` and loss scalers), so that without the opt-in nothing else in them can run.
Resuming a training run applies the same probe (``check_deepspeed_files``) before DeepSpeed loads.

A file that cannot be read at all (empty, truncated, text, random bytes) raises ``BadFileError``
naming the file, its size and what is wrong, instead of the library's own error. The format is
told by the file's first bytes before anything is unpickled: a torch zip archive, a legacy torch
pickle (torch's magic number) or a safetensors header; anything else is not a checkpoint, and the
advice to unpickle it is never given.
"""
from __future__ import annotations

import glob
import json
import os
import struct
import warnings
from collections.abc import Mapping
from typing import Any, Optional

import torch
from safetensors.torch import load_file
from torch import Tensor

from beit3.core.errors import BadFileError, UserError, first_line

PICKLE_HINT = ("if you trust this file, pass allow_pickle=True (command line: --allow-pickle); "
               "unpickling can run arbitrary code")


ZIP_MAGIC = b"PK\x03\x04"  # torch.save's format since 1.6
# torch.save before 1.6: a pickle (protocol 2) of the magic number 0x1950a86a20f9469cfc6c first.
LEGACY_TORCH_MAGIC = b"\x80\x02\x8a\x0al\xfc\x9cF\xf9 j\xa8P\x19"


class UnsafeCheckpointError(UserError, ValueError):
    """The file needs full unpickling and the caller did not opt in."""


def file_format(path: str) -> str:
    """What the first bytes of ``path`` say it is: "zip" (torch), "legacy" (torch before 1.6),
    "safetensors", "empty" or "unknown"."""
    with open(path, "rb") as f:
        head = f.read(16)
    if not head:
        return "empty"
    if head.startswith(ZIP_MAGIC):
        return "zip"
    if head.startswith(LEGACY_TORCH_MAGIC[:len(head)]):
        return "legacy"
    if len(head) > 8 and head[8:9] == b"{" and struct.unpack("<Q", head[:8])[0] < os.path.getsize(path):
        return "safetensors"  # an 8-byte header length, then the JSON header
    return "unknown"


def not_a_checkpoint(path: str) -> BadFileError:
    with open(path, "rb") as f:
        head = f.read(12)
    if not head:
        return BadFileError(path, "empty file, not a checkpoint")
    return BadFileError(path, f"not a torch checkpoint (neither a zip archive nor a legacy torch pickle) nor a "
                              f"safetensors file: it starts with {head!r}")


def _torch_load(path: str, allow_pickle: bool, mmap: bool = False) -> Any:
    kind = file_format(path)
    if kind == "safetensors":  # whatever its name says
        return load_safetensors(path)
    if kind not in ("zip", "legacy"):  # nothing in it is worth unpickling: say so, never suggest it
        raise not_a_checkpoint(path)
    try:
        return torch.load(path, map_location="cpu", weights_only=True, mmap=mmap)
    except Exception as e:  # the weights-only unpickler raises pickle.UnpicklingError
        if not _is_weights_only_refusal(e):
            raise unreadable(path, e) from None
        reason = _refusal_reason(e)
        if not allow_pickle:
            raise UnsafeCheckpointError(
                f"{path}: holds pickled Python objects that weights-only loading refuses ({reason}); "
                f"{PICKLE_HINT}") from None
    warnings.warn(f"{path}: loading with full unpickling (allow_pickle=True); only do this for files you "
                  f"trust", UserWarning, stacklevel=3)
    try:
        # Reached only with allow_pickle (--allow-pickle): the user vouches for this file, which the
        # weights-only load above refused; the warning says so on every load.
        return torch.load(path, map_location="cpu", weights_only=False)
    except Exception as e:
        raise unreadable(path, e) from None


def unreadable(path: str, error: Exception) -> BadFileError:
    """What a failed ``torch.load`` says about the file, in the user's words."""
    with open(path, "rb") as f:
        head = f.read(12)
    text = str(error)
    if head.startswith(ZIP_MAGIC):
        what = "incomplete zip archive" if "zip archive" in text or "central directory" in text else first_line(text)
        problem = f"truncated or corrupted torch checkpoint ({what})"
    elif head and head.startswith(LEGACY_TORCH_MAGIC[:len(head)]):
        problem = f"truncated or corrupted torch checkpoint ({type(error).__name__}: {first_line(text)})"
    else:
        return not_a_checkpoint(path)
    return BadFileError(path, problem)


def _is_weights_only_refusal(e: Exception) -> bool:
    return "weights_only" in str(e) or "Weights only load failed" in str(e)


def _refusal_reason(e: Exception) -> str:
    for line in str(e).splitlines():
        if "unsupported global" in line.lower() or "Unsupported operand" in line:
            return line.strip().split(" was not an allowed global")[0].replace("WeightsUnpickler error: ", "")
    return "not plain tensors"


def load_checkpoint_file(path: str, allow_pickle: bool = False, mmap: bool = False) -> Any:
    """The object stored in a ``.pt``/``.pth``/``.bin`` (torch) or ``.safetensors`` file, on the CPU
    (``mmap``: torch tensors mapped from the file, read only when used)."""
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"checkpoint file not found: {path}")
    if path.endswith(".safetensors"):
        return load_safetensors(path)
    return _torch_load(path, allow_pickle, mmap)


def load_safetensors(path: str | os.PathLike, device: str = "cpu") -> dict[str, Tensor]:
    """A ``.safetensors`` file's tensors; an empty, truncated or foreign file raises ``BadFileError``."""
    problem = safetensors_problem(path)
    if problem is not None:
        raise BadFileError(path, f"not a complete safetensors file ({problem})")
    try:
        return load_file(path, device=device)
    except Exception as e:  # SafetensorError derives from Exception only
        raise BadFileError(path, f"not a complete safetensors file ({first_line(e)})") from None


def safetensors_problem(path: str | os.PathLike) -> Optional[str]:
    """Why ``path`` is not a whole safetensors file (its header's offsets must cover the file
    exactly), or None."""
    size = os.path.getsize(path)
    if size == 0:
        return "empty file"
    with open(path, "rb") as f:
        head = f.read(8)
        n = struct.unpack("<Q", head)[0] if len(head) == 8 else None
        if n is None or n > size - 8:
            return f"a header of {n if n is not None else '?'} bytes does not fit in {size:,} bytes"
        try:
            header = json.loads(f.read(n))
        except (ValueError, UnicodeDecodeError):
            return "the header is not JSON"
    if not isinstance(header, dict):
        return "the header is not a JSON object"
    ends = [v["data_offsets"][1] for k, v in header.items()
            if k != "__metadata__" and isinstance(v, dict) and len(v.get("data_offsets", ())) == 2]
    data = size - 8 - n
    if max(ends, default=0) != data:
        return f"its tensors end at byte {max(ends, default=0):,} of {data:,} data bytes (truncated or padded)"
    return None


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


def deepspeed_safe_globals() -> list:
    """DeepSpeed classes its checkpoints pickle; building them runs nothing but their plain
    constructors and attribute updates. ``fragment_address`` (two ints) is in every ZeRO-1/2
    optimizer file: where each parameter's slice lies in the flat partition."""
    from deepspeed.runtime.fp16.loss_scaler import DynamicLossScaler, LossScaler  # heavy: deepspeed, ~2 s to import
    from deepspeed.runtime.zero.config import ZeroStageEnum  # heavy: deepspeed, ~2 s to import
    from deepspeed.utils.tensor_fragment import fragment_address  # heavy: deepspeed, ~2 s to import
    return [ZeroStageEnum, LossScaler, DynamicLossScaler, fragment_address]


def deepspeed_state_files(tag_dir: str) -> list[str]:
    """Every torch file DeepSpeed may unpickle from the folder: model and optimizer partitions, and
    the per-parameter files of a universal checkpoint (``zero/<param>/*.pt``)."""
    return sorted(glob.glob(os.path.join(glob.escape(tag_dir), "**", "*.pt"), recursive=True))


def check_deepspeed_files(tag_dir: str, allow_pickle: bool) -> None:
    """Refuse a DeepSpeed checkpoint whose files hold pickled objects beyond DeepSpeed's own types
    (DeepSpeed unpickles them fully), or that cannot be read at all, before anything loads them."""
    if allow_pickle:
        warnings.warn(f"{tag_dir}: loading DeepSpeed files with full unpickling (allow_pickle=True)", UserWarning,
                      stacklevel=3)
        return
    with torch.serialization.safe_globals(deepspeed_safe_globals()):
        for f in deepspeed_state_files(tag_dir):
            if file_format(f) not in ("zip", "legacy"):
                raise not_a_checkpoint(f)
            try:
                torch.load(f, map_location="cpu", weights_only=True, mmap=True)
            except Exception as e:
                if not _is_weights_only_refusal(e):
                    raise unreadable(f, e) from None
                raise UnsafeCheckpointError(
                    f"{f}: holds pickled Python objects beyond DeepSpeed's own ({_refusal_reason(e)}); "
                    f"{PICKLE_HINT}") from None


def load_zero_checkpoint(path: str, tag: Optional[str] = None, allow_pickle: bool = False) -> dict[str, Tensor]:
    """Consolidated fp32 weights of a DeepSpeed (ZeRO 1/2/3) checkpoint, names as in the engine's
    module (e.g. ``model.layers.0...`` for a module holding the backbone at ``.model``)."""
    from deepspeed.utils.zero_to_fp32 import (  # heavy: deepspeed, ~2 s to import
        get_fp32_state_dict_from_zero_checkpoint)

    ckpt_dir, tag, tag_dir = _zero_location(os.fspath(path), tag)
    check_deepspeed_files(tag_dir, allow_pickle)
    sd = get_fp32_state_dict_from_zero_checkpoint(ckpt_dir, tag=tag)
    return {k: v for k, v in sd.items() if isinstance(v, Tensor)}
