"""AdamW with the BEiT-3 recipe: parameter groups, layer-wise lr decay, cosine (or poly) schedule."""
from __future__ import annotations

import math
import re
from typing import Callable, Optional

import torch
from torch import nn

# Parameters that get no weight decay besides 1-D tensors (norms, biases): unilm/beit3's
# ``BEiT3Wrapper.no_weight_decay`` in our names (its ``encoder.embed_positions.A`` is our vision
# table), matched by exact name as its ``get_parameter_groups`` does, so the text position table and
# the mask token are decayed there and here (beit2's pretraining decays its mask token too).
NO_DECAY_NAMES = ("vision_embed.pos_embed", "vision_embed.cls_token", "logit_scale")


def no_weight_decay(name: str, p: torch.Tensor) -> bool:
    """unilm's rule: 1-D, a bias, or one of ``NO_DECAY_NAMES`` (as a whole name below any prefix)."""
    return p.ndim == 1 or name.endswith(".bias") or any(name == n or name.endswith("." + n) for n in NO_DECAY_NAMES)


def layer_id(name: str, depth: int) -> int:
    """0 for embeddings, i + 1 for ``layers.i``, depth + 1 for the final norm and heads."""
    if "vision_embed." in name or "text_embed." in name:
        return 0
    m = re.search(r"(?:^|\.)layers\.(\d+)\.", name)
    return int(m.group(1)) + 1 if m else depth + 1


def param_groups(model: nn.Module, weight_decay: float, layer_decay: Optional[float] = None,
                 depth: int = 0, lr_scale: Optional[Callable[[str], float]] = None) -> list[dict]:
    """Groups keyed by (decay?, lr scale). ``layer_decay`` scales layer l's lr by
    layer_decay ** (depth + 1 - l) (BEiT fine-tuning); ``lr_scale(name)`` multiplies further (e.g.
    a task-head lr multiplier). Each group carries "lr_scale" for the schedule."""
    groups: dict[tuple, dict] = {}
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        decay = 0.0 if no_weight_decay(name, p) else weight_decay
        scale = 1.0
        if layer_decay is not None and layer_decay != 1.0:
            scale *= layer_decay ** (depth + 1 - layer_id(name, depth))
        if lr_scale is not None:
            scale *= lr_scale(name)
        g = groups.setdefault((decay, scale), {"params": [], "names": [], "weight_decay": decay, "lr_scale": scale})
        g["params"].append(p)
        g["names"].append(name)
    return list(groups.values())


def build_optimizer(groups: list[dict], lr: float, betas=(0.9, 0.98), eps: float = 1e-6) -> torch.optim.AdamW:
    """torch AdamW (fused on CUDA): no JIT-compiled extension, works under DeepSpeed ZeRO."""
    on_cuda = any(p.is_cuda for g in groups for p in g["params"])
    clean = [{k: v for k, v in g.items() if k != "names"} for g in groups]
    for g in clean:
        g["lr"] = lr * g["lr_scale"]
    return torch.optim.AdamW(clean, lr=lr, betas=betas, eps=eps, fused=on_cuda or None)


def cosine_lr_lambda(warmup_steps: int, total_steps: int, min_ratio: float = 0.0) -> Callable[[int], float]:
    """Linear warmup to 1, then cosine decay to ``min_ratio`` at ``total_steps``."""
    def f(step: int) -> float:
        if step < warmup_steps:
            return (step + 1) / warmup_steps
        t = min(1.0, (step - warmup_steps) / max(1, total_steps - warmup_steps))
        return min_ratio + (1.0 - min_ratio) * 0.5 * (1.0 + math.cos(math.pi * t))
    return f


def poly_lr_lambda(warmup_steps: int, total_steps: int, min_ratio: float = 0.0, power: float = 1.0,
                   warmup_ratio: float = 1e-6) -> Callable[[int], float]:
    """mmcv's ``poly`` policy with its linear warmup (BEiT's segmentation): (1 - step / total) ** power
    from 1 to ``min_ratio``; over the first ``warmup_steps`` that value times a factor rising
    linearly from ``warmup_ratio`` to 1."""
    def f(step: int) -> float:
        t = min(step, total_steps) / max(1, total_steps)
        value = min_ratio + (1.0 - min_ratio) * (1.0 - t) ** power
        if step < warmup_steps:
            value *= 1.0 - (1.0 - step / warmup_steps) * (1.0 - warmup_ratio)
        return value
    return f


SCHEDULES = {"cosine": cosine_lr_lambda, "poly": poly_lr_lambda}


def build_scheduler(optimizer: torch.optim.Optimizer, warmup_steps: int, total_steps: int,
                    min_ratio: float = 0.0, schedule: str = "cosine") -> torch.optim.lr_scheduler.LambdaLR:
    if schedule not in SCHEDULES:
        raise ValueError(f"lr schedule {schedule!r}: expected one of {sorted(SCHEDULES)}")
    # LambdaLR multiplies each group's initial lr, which already holds its lr_scale.
    return torch.optim.lr_scheduler.LambdaLR(optimizer, SCHEDULES[schedule](warmup_steps, total_steps, min_ratio))
