"""One training step (forward, backward, optimizer) of a module, plain or through DeepSpeed.

Every model in the benchmark is a module ``forward(batch, targets) -> (loss, metrics)``; these
wrap it with the same optimizer (torch AdamW, fused on CUDA, via ``beit3.train.optim``) and the
same gradient clipping as our DeepSpeed configs, so the step does the same work whoever runs it.
"""
from __future__ import annotations

import contextlib
import copy
import os
import shutil
from typing import Iterable, Optional

import torch
from torch import nn

from ..train.optim import build_optimizer, param_groups

LR = 1e-4  # any value: the benchmark measures speed, not learning
GRAD_CLIP = 3.0  # as ds_configs/*.json


class PlainTrainer:
    """Plain PyTorch: fp32 weights, bf16 autocast on CUDA (fp32 on the CPU), fused AdamW on CUDA."""

    def __init__(self, module: nn.Module, device: torch.device):
        self.device = device
        self.module = module.to(device).train()
        self.optimizer = build_optimizer(param_groups(module, weight_decay=0.05), LR)
        self.input_dtype = torch.float32

    def step(self, batch: dict, targets: dict) -> None:
        with torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=self.device.type == "cuda"):
            loss, _ = self.module(batch, targets)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(self.module.parameters(), GRAD_CLIP, foreach=True)
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)

    def close(self) -> None:
        self.optimizer = self.module = None


class DeepSpeedTrainer:
    """Our pretraining engine (``beit3.train.engine.build_engine``) with the given DeepSpeed config:
    the model in the config's precision, inputs cast to it as the pretraining loop does."""

    def __init__(self, module: nn.Module, ds_config: dict):
        from ..train.ds_config import precision
        from ..train.engine import OptimConfig, build_engine

        # build_engine adds sections to the config it is given: keep the caller's intact.
        self.engine = build_engine(module, copy.deepcopy(ds_config), OptimConfig(lr=LR, total_steps=10**6))
        self.module = self.engine.module
        self.input_dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(precision(ds_config), torch.float32)

    def step(self, batch: dict, targets: dict) -> None:
        loss, _ = self.engine(batch, targets)
        self.engine.backward(loss)
        self.engine.step()

    def close(self) -> None:
        if hasattr(self.engine, "destroy"):  # DeepSpeed >= 0.14: frees the optimizer's buffers
            self.engine.destroy()
        self.engine = self.module = None


def compile_support(device: torch.device) -> Optional[str]:
    """None if torch.compile (Inductor) can run on ``device``, else the reason it cannot."""
    import torch._dynamo

    if not torch._dynamo.is_dynamo_supported():
        return "TorchDynamo does not support this Python version"
    if device.type == "cuda":
        from torch.utils._triton import has_triton
        return None if has_triton() else "Triton is not installed (Inductor's GPU code generator)"
    if not any(shutil.which(c) for c in (os.environ.get("CXX", ""), "g++", "c++", "clang++") if c):
        return "no C++ compiler on PATH (Inductor's CPU code generator)"
    return None


def compile_layers(layers: Iterable[nn.Module], backend: str = "inductor") -> int:
    """torch.compile each layer in place (``Module.compile``: parameter names unchanged, so
    DeepSpeed and checkpoints see the same module tree). Per layer rather than the whole model:
    the layers are identical, so one graph serves them all, and the routing between image, text
    and pair inputs stays in eager Python. Returns how many were compiled."""
    import torch._dynamo

    # One graph per (input kinds, VL-FFN or not, mask or not): more than dynamo's default of 8
    # variants per code object, past which it would silently run the layer eagerly.
    for knob in ("recompile_limit", "cache_size_limit", "accumulated_recompile_limit", "accumulated_cache_size_limit"):
        if hasattr(torch._dynamo.config, knob):
            setattr(torch._dynamo.config, knob, max(getattr(torch._dynamo.config, knob), 64))
    n = 0
    for layer in layers:
        layer.compile(backend=backend)
        n += 1
    return n


SDPA_BACKENDS = ("auto", "flash", "efficient", "cudnn", "math")


def sdpa_context(backend: str):
    """Restrict F.scaled_dot_product_attention to one kernel ("auto": let PyTorch choose). With a
    padding mask on CUDA, "flash" has no kernel to run and fails: that is the point of measuring."""
    if backend == "auto":
        return contextlib.nullcontext()
    from torch.nn.attention import SDPBackend, sdpa_kernel
    kernel = {"flash": SDPBackend.FLASH_ATTENTION, "efficient": SDPBackend.EFFICIENT_ATTENTION,
              "cudnn": SDPBackend.CUDNN_ATTENTION, "math": SDPBackend.MATH}[backend]
    return sdpa_kernel(kernel)
