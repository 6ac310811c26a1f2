"""DeepSpeed engine construction shared by pretraining, fine-tuning and the benchmark."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch
from torch import nn
from torch.utils._python_dispatch import _disable_current_modes

from beit3.trainer.optim import build_optimizer, build_scheduler, param_groups


@dataclass
class OptimConfig:
    lr: float
    weight_decay: float = 0.05
    betas: tuple = (0.9, 0.98)
    eps: float = 1e-6
    warmup_steps: int = 0
    total_steps: int = 1
    min_lr_ratio: float = 0.0
    grad_clip: Optional[float] = None
    layer_decay: Optional[float] = None  # fine-tuning: lr x decay^(depth + 1 - layer)
    depth: int = 0
    schedule: str = "cosine"  # after the warmup: "cosine" or "poly" (optim.SCHEDULES)


def build_engine(model: nn.Module, ds_config: dict, opt: OptimConfig, groups: Optional[list] = None):
    """Wrap ``model`` in a DeepSpeed engine with AdamW and the warmup + cosine (or poly) schedule.

    A torch AdamW is passed as a client optimizer (no JIT-compiled extension). With ZeRO-Offload
    DeepSpeed needs its own CPU Adam, which it builds from an "optimizer" section we add here.
    ``groups`` (from ``optim.param_groups``) override the default decay / no-decay groups.
    """
    import deepspeed  # heavy: deepspeed, ~2 s to import

    if ds_config.get("zero_optimization", {}).get("stage", 0) == 3:
        keep_zero3_fetches_out_of_dispatch_modes()
    if opt.grad_clip is not None:
        ds_config["gradient_clipping"] = opt.grad_clip
    if groups is None:
        groups = param_groups(model, opt.weight_decay, opt.layer_decay, opt.depth)
    def schedule(o):
        return build_scheduler(o, opt.warmup_steps, opt.total_steps, opt.min_lr_ratio, opt.schedule)
    if "offload_optimizer" in ds_config.get("zero_optimization", {}):
        ds_config["optimizer"] = {"type": "AdamW", "params": {
            "lr": opt.lr, "betas": list(opt.betas), "eps": opt.eps, "weight_decay": opt.weight_decay}}
        clean = [{k: v for k, v in g.items() if k != "names"} for g in groups]
        for g in clean:
            g["lr"] = opt.lr * g["lr_scale"]
        engine, _, _, _ = deepspeed.initialize(model=model, model_parameters=clean, config=ds_config,
                                               dist_init_required=False, lr_scheduler=schedule)
        return engine
    from deepspeed.accelerator import get_accelerator  # heavy: deepspeed, ~2 s to import

    if get_accelerator().device_name() == "cuda":
        # On the GPU before the optimizer is built, so torch's AdamW takes its fused kernel (it
        # decides from where the parameters are); DeepSpeed would move the model there anyway.
        model.to(torch.device("cuda", torch.cuda.current_device()))
    optimizer = build_optimizer(groups, opt.lr, betas=opt.betas, eps=opt.eps)
    engine, _, _, _ = deepspeed.initialize(model=model, optimizer=optimizer, lr_scheduler=schedule(optimizer),
                                           config=ds_config, dist_init_required=False)
    return engine


def keep_zero3_fetches_out_of_dispatch_modes() -> None:
    """Run ZeRO-3's parameter fetches and releases with python dispatch modes switched off.

    Selective activation checkpointing (a dispatch mode) numbers every op of a checkpointed block
    in forward and expects the same ops again in the recomputation. ZeRO-3 gathers and frees the
    block's parameters from inside the block (module hooks), and whether a parameter still has to be
    gathered depends on its prefetch state, which differs between the two passes as soon as the
    module order changes (a batch without pairs, say): the recomputation then meets ops the forward
    never ran and fails. Parameter bookkeeping is not part of the model's computation, so it is kept
    out of the count. Idempotent."""
    from deepspeed.runtime.zero.partitioned_param_coordinator import (  # heavy: deepspeed, ~2 s to import
        PartitionedParameterCoordinator as C)

    for name in ("fetch_sub_module", "release_sub_module"):
        fn = getattr(C, name)
        if getattr(fn, "_beit3_modes_off", False):
            continue

        def outside_modes(self, *args, _fn=fn, **kwargs):
            with _disable_current_modes():
                return _fn(self, *args, **kwargs)
        outside_modes._beit3_modes_off = True
        outside_modes.__wrapped__ = fn
        setattr(C, name, outside_modes)

