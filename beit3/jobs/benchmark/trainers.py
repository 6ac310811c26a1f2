"""One training step (forward, backward, optimizer) of a module, through the engines the training
jobs use: DeepSpeed (``beit3.trainer.engine.build_engine``, as pretraining) or plain PyTorch
(``beit3.trainer.plain_engine.PlainEngine``, as the tokenizer trainer).

Every model in the benchmark is a module ``forward(batch, targets) -> (loss, metrics)``; both
engines give it the same optimizer (torch AdamW, fused on CUDA, via ``beit3.trainer.optim``) and the
same gradient clipping as our DeepSpeed configs, so the step does the same work whoever runs it.
"""
from __future__ import annotations

import contextlib
import copy
import os
import shutil
from typing import Iterable, Optional

import torch
import torch._dynamo
from torch import nn
from torch._dynamo.utils import counters
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.utils._triton import has_triton

from beit3.trainer.engine import OptimConfig, build_engine
from beit3.trainer.optim import build_optimizer, param_groups
from beit3.trainer.plain_engine import PlainEngine
from beit3.trainer.trainer import compute_dtype

LR = 1e-4  # any value: the benchmark measures speed, not learning
GRAD_CLIP = 3.0  # as ds_configs/*.json


class BenchTrainer:
    """An engine and the dtype its inputs are cast to; the benchmark supplies the batch."""

    def __init__(self, engine, input_dtype: torch.dtype):
        self.engine, self.module, self.input_dtype = engine, engine.module, input_dtype
        self.info: dict = {}

    def step(self, batch: dict, targets: dict) -> torch.Tensor:
        """One optimizer step; returns the (detached) loss."""
        loss, _ = self.engine(batch, targets)
        self.engine.backward(loss)
        self.engine.step()
        return loss.detach()

    def close(self) -> None:
        if hasattr(self.engine, "destroy"):  # DeepSpeed >= 0.14: frees the optimizer's buffers
            self.engine.destroy()
        self.engine = self.module = None


def plain_trainer(module: nn.Module, device: torch.device) -> BenchTrainer:
    """Plain PyTorch: fp32 weights, bf16 autocast on CUDA (fp32 on the CPU), fused AdamW on CUDA."""
    module = module.to(device).train()
    optimizer = build_optimizer(param_groups(module, weight_decay=0.05), LR)
    autocast = torch.bfloat16 if device.type == "cuda" else None
    return BenchTrainer(PlainEngine(module, optimizer, grad_clip=GRAD_CLIP, autocast=autocast), torch.float32)


def deepspeed_trainer(module: nn.Module, ds_config: dict) -> BenchTrainer:
    """Our pretraining engine with the given DeepSpeed config: the model in the config's precision,
    inputs cast to it as the pretraining loop does."""
    # build_engine adds sections to the config it is given: keep the caller's intact.
    engine = build_engine(module, copy.deepcopy(ds_config), OptimConfig(lr=LR, total_steps=10**6))
    return BenchTrainer(engine, compute_dtype(ds_config))


def compile_support(device: torch.device) -> Optional[str]:
    """None if torch.compile (Inductor) can run on ``device``, else the reason it cannot."""
    if not torch._dynamo.is_dynamo_supported():
        return "TorchDynamo does not support this Python version"
    if device.type == "cuda":
        return None if has_triton() else "Triton is not installed (Inductor's GPU code generator)"
    if not any(shutil.which(c) for c in (os.environ.get("CXX", ""), "g++", "c++", "clang++") if c):
        return "no C++ compiler on PATH (Inductor's CPU code generator)"
    return None


def compile_layers(layers: Iterable[nn.Module], backend: str = "inductor") -> int:
    """torch.compile each layer in place (``Module.compile``: parameter names unchanged, so
    DeepSpeed and checkpoints see the same module tree). Per layer rather than the whole model:
    the layers are identical, so one graph serves them all, and the routing between image, text
    and pair inputs stays in eager Python. Returns how many were compiled."""
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


def uncompile_layers(layers: Iterable[nn.Module]) -> None:
    """Undo ``compile_layers``: the layers run eagerly again (dynamo keeps its compiled graphs, so
    compiling them again costs only the guard checks)."""
    for layer in layers:
        layer._compiled_call_impl = None


def compile_stats() -> dict:
    """What dynamo made of the compiled code so far: graphs, graph breaks and their main reasons
    (a layer broken into many graphs gains little)."""
    breaks = counters["graph_break"]
    return {"unique_graphs": int(counters["stats"].get("unique_graphs", 0)),
            "graph_breaks": int(sum(breaks.values())),
            "break_reasons": [r[:200] for r, _ in sorted(breaks.items(), key=lambda kv: -kv[1])[:3]]}


SDPA_BACKENDS = ("auto", "flash", "efficient", "cudnn", "math")


def sdpa_context(backend: str):
    """Restrict F.scaled_dot_product_attention to one kernel ("auto": let PyTorch choose). With a
    padding mask on CUDA, "flash" has no kernel to run and fails: that is the point of measuring."""
    if backend == "auto":
        return contextlib.nullcontext()
    kernel = {"flash": SDPBackend.FLASH_ATTENTION, "efficient": SDPBackend.EFFICIENT_ATTENTION,
              "cudnn": SDPBackend.CUDNN_ATTENTION, "math": SDPBackend.MATH}[backend]
    return sdpa_kernel(kernel)
