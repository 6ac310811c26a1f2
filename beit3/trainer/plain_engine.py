"""A DeepSpeed-shaped engine for a model trained by one plain PyTorch process.

The ``Trainer`` drives its engine through DeepSpeed's interface: call it for the forward,
``backward(loss)``, ``step()``, ``get_lr()``, ``get_global_grad_norm()`` and
``save_checkpoint``/``load_checkpoint`` of a tag folder. Jobs that need no DeepSpeed (the VQ-KD
tokenizer, the benchmark's plain-PyTorch baseline) use this one instead, so the same Trainer
saves, verifies and resumes them.

A checkpoint tag folder holds ``model.safetensors`` (the module's weights) and ``engine_state.pt``
(optimizer, scheduler and step count: tensors and plain values only, so it loads with
weights-only unpickling like every other checkpoint file of ours).
"""
from __future__ import annotations

import contextlib
import os
from typing import Optional

import torch
from safetensors.torch import load_file, save_file
from torch import nn

from beit3.core.files import atomic_file

WEIGHTS = "model.safetensors"
STATE = "engine_state.pt"


class PlainEngine:
    """``module`` trained by ``optimizer`` on this process's device.

    - ``scheduler``: a timm scheduler (``step_update(num_updates)``, ``state_dict``), told the
      number of updates done after each step, so the next step runs at its learning rate;
    - ``grad_clip``: the gradients' global norm is clipped to it (None: measured, not clipped);
    - ``autocast``: the forward's dtype under ``torch.autocast`` (None: the weights' dtype).
    """

    def __init__(self, module: nn.Module, optimizer: torch.optim.Optimizer, scheduler=None,
                 grad_clip: Optional[float] = None, autocast: Optional[torch.dtype] = None):
        self.module, self.optimizer, self.scheduler = module, optimizer, scheduler
        self.grad_clip, self.autocast_dtype = grad_clip, autocast
        self.device = next(module.parameters()).device
        self.global_steps = 0
        self._grad_norm: Optional[torch.Tensor] = None
        if scheduler is not None:
            scheduler.step_update(0)

    def autocast(self):
        """The forward's precision context (the teacher of a distillation runs under it too)."""
        if self.autocast_dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(self.device.type, dtype=self.autocast_dtype)

    def __call__(self, *args, **kwargs):
        with self.autocast():
            return self.module(*args, **kwargs)

    def backward(self, loss: torch.Tensor) -> None:
        loss.backward()

    def step(self) -> None:
        params = [p for g in self.optimizer.param_groups for p in g["params"] if p.grad is not None]
        max_norm = self.grad_clip if self.grad_clip is not None else float("inf")
        self._grad_norm = torch.nn.utils.clip_grad_norm_(params, max_norm, foreach=True) if params else None
        self.optimizer.step()
        self.zero_grad()
        self.global_steps += 1
        if self.scheduler is not None:
            self.scheduler.step_update(self.global_steps)

    def zero_grad(self) -> None:
        """Drop the gradients of a step that is skipped (a non-finite loss)."""
        self.optimizer.zero_grad(set_to_none=True)

    def get_lr(self) -> list[float]:
        return [g["lr"] for g in self.optimizer.param_groups]

    def get_global_grad_norm(self) -> Optional[float]:
        return None if self._grad_norm is None else float(self._grad_norm)

    def gradient_accumulation_steps(self) -> int:
        return 1

    # -- checkpoints: DeepSpeed's signatures, our two files ------------------------------------
    def save_checkpoint(self, save_dir: str, tag: str, save_latest: bool = False) -> None:
        path = os.path.join(save_dir, tag)
        os.makedirs(path, exist_ok=True)
        with atomic_file(os.path.join(path, WEIGHTS)) as tmp:
            save_file({k: v.detach().cpu().contiguous() for k, v in self.module.state_dict().items()}, tmp)
        state = {"optimizer": self.optimizer.state_dict(), "global_steps": self.global_steps,
                 "scheduler": self.scheduler.state_dict() if self.scheduler is not None else None}
        with atomic_file(os.path.join(path, STATE)) as tmp:
            torch.save(state, tmp)

    def load_checkpoint(self, load_dir: str, tag: str, load_optimizer_states: bool = True,
                        load_lr_scheduler_states: bool = True) -> tuple[Optional[str], dict]:
        path = os.path.join(load_dir, tag)
        if not os.path.isfile(os.path.join(path, WEIGHTS)):
            return None, {}
        self.module.load_state_dict(load_file(os.path.join(path, WEIGHTS), device=str(self.device)))
        state = torch.load(os.path.join(path, STATE), map_location=self.device, weights_only=True)
        if load_optimizer_states:
            self.optimizer.load_state_dict(state["optimizer"])
        self.global_steps = int(state["global_steps"])
        if self.scheduler is not None:
            if load_lr_scheduler_states and state.get("scheduler") is not None:
                self.scheduler.load_state_dict(state["scheduler"])
            self.scheduler.step_update(self.global_steps)
        return path, {}
