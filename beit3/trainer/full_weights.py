"""A DeepSpeed engine's whole weights in one state dict on rank 0's CPU: what a run writes as a saved
model (pretraining's ``final/``, fine-tuning's ``best/``).

Under ZeRO each rank holds a slice of every parameter (ZeRO-3) or of its fp32 master (ZeRO-1/2, the
bf16 optimizer), so the whole tensor is a collective: every rank calls ``full_state_dict`` and
gathers the same parameters in the same order; rank 0 alone keeps them. One parameter at a time is
whole on a rank and on the device, so the peak beyond training is the largest parameter (giant's
text embedding: 360 MB in fp32), and rank 0's CPU holds the model once.
"""
from __future__ import annotations

from typing import Optional

from torch import Tensor, nn


def full_parameter(p: nn.Parameter, masters: bool, keep: bool) -> Optional[Tensor]:
    """``p`` whole, a CPU copy where ``keep`` (collective under ZeRO). ``masters``: the optimizer's
    fp32 master where DeepSpeed keeps one (a bf16 run's module holds bf16 roundings of it); a
    parameter without one (frozen, or no ZeRO and fp32, where the module's is the master) is the
    module's."""
    if masters:
        from deepspeed.utils import safe_get_full_fp32_param  # heavy: deepspeed, ~2 s to import
        full = safe_get_full_fp32_param(p)
        if full is not None:
            return full.detach().to("cpu", copy=True) if keep else None
    if hasattr(p, "ds_id"):  # a ZeRO-3 partition
        import deepspeed  # heavy: deepspeed, ~2 s to import
        with deepspeed.zero.GatheredParameters([p], modifier_rank=None):
            return p.detach().to("cpu", copy=True) if keep else None
    return p.detach().to("cpu", copy=True) if keep else None


def full_state_dict(module: nn.Module, masters: bool = False, keep: bool = True) -> dict[str, Tensor]:
    """``module.state_dict()`` whole, on the CPU, on the ranks where ``keep`` (rank 0); {} elsewhere.
    Collective: every rank calls it. Keys, and shapes through a module's ``official_shapes``, are its
    state dict's."""
    out = {}
    for name, p in module.named_parameters():
        value = full_parameter(p, masters, keep)
        if keep:
            out[name] = value
    if not keep:
        return out
    for prefix, sub in module.named_modules():
        for name, b in sub.named_buffers(recurse=False):
            if name not in sub._non_persistent_buffers_set:
                out[f"{prefix}.{name}" if prefix else name] = b.detach().to("cpu", copy=True)
    return module.official_shapes(out) if hasattr(module, "official_shapes") else out


__all__ = ["full_parameter", "full_state_dict"]
