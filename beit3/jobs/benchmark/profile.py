"""A torch.profiler trace of training steps, summarised by kind of work."""
from __future__ import annotations

import os
import time
from collections import defaultdict
from dataclasses import dataclass
from typing import Callable, Optional

import torch
from torch.profiler import ProfilerActivity, profile

from beit3.jobs.benchmark.measure import sync

# Kind of work of an aten op, by name (first match wins); everything else is "other".
CATEGORIES = (
    ("matmul", ("aten::mm", "aten::addmm", "aten::bmm", "aten::baddbmm", "convolution", "aten::linear")),
    ("attention", ("scaled_dot_product", "flash_attention", "efficient_attention", "cudnn_attention",
                   "aten::_softmax", "aten::softmax")),
    ("layernorm", ("layer_norm",)),
    ("gelu", ("gelu",)),
    ("optimizer", ("adam", "aten::_foreach", "clip_grad")),
    ("loss", ("cross_entropy", "nll_loss", "log_softmax")),
    ("copy/index", ("aten::copy_", "aten::cat", "aten::index", "masked", "aten::nonzero", "aten::where",
                    "aten::fill_", "aten::zero_", "aten::clone", "aten::contiguous", "aten::_to_copy")),
    ("elementwise", ("aten::add", "aten::mul", "aten::div", "aten::sum", "aten::sub", "aten::neg")),
    ("communication", ("nccl", "gloo", "all_gather", "reduce_scatter", "all_reduce", "c10d::", "broadcast")),
)


# Everything run inside these ranges is the optimizer's, whatever the op (AdamW's sqrt and div).
OPTIMIZER_RANGES = ("Optimizer.step", "Optimizer.zero_grad", "clip_grad_norm")


def category(op: str) -> str:
    low = op.lower()
    return next((c for c, keys in CATEGORIES if any(k in low for k in keys)), "other")


def _in_optimizer(evt) -> bool:
    parent = evt.cpu_parent
    while parent is not None:
        if parent.name.startswith(OPTIMIZER_RANGES):
            return True
        parent = parent.cpu_parent
    return False


def _self_time_us(evt, device: torch.device) -> float:
    """Time on ``device``: GPU kernel time on CUDA (attributed to the op that launched it)."""
    return float(evt.self_device_time_total if device.type == "cuda" else evt.self_cpu_time_total)


@dataclass
class Profile:
    """What ``profile_steps`` found: the op table, the share of time by kind of work, the largest
    costs (kernels on CUDA, ops on the CPU) with their ms per step and share of the step, the step's
    wall time and the share of it the device was busy."""
    table: str
    shares: dict
    top: list
    wall_ms: float
    busy: float


def profile_steps(step: Callable[[], None], steps: int, device: torch.device,
                  out_dir: Optional[str] = None, row_limit: int = 15, top: int = 5) -> Profile:
    """Profile ``steps`` already warmed-up steps; writes a Chrome trace to ``out_dir``."""
    acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    with profile(activities=acts, record_shapes=False) as prof:
        sync(device)
        t0 = time.perf_counter()
        for _ in range(steps):
            step()
        sync(device)
        wall_s = (time.perf_counter() - t0) / steps
    if out_dir:
        os.makedirs(out_dir, exist_ok=True)
        prof.export_chrome_trace(os.path.join(out_dir, "trace.json"))
    totals: dict[str, float] = defaultdict(float)
    for e in prof.events():
        kind = "optimizer" if _in_optimizer(e) else category(e.name)
        totals[kind] += _self_time_us(e, device)
    whole = sum(totals.values()) or 1.0
    shares = {k: v / whole for k, v in sorted(totals.items(), key=lambda kv: -kv[1])}
    sort_by = "self_device_time_total" if device.type == "cuda" else "self_cpu_time_total"
    costs = _costs_us(prof, device)
    busy = sum(costs.values()) / 1e6 / steps / wall_s
    rows = [{"name": name[:120], "ms_per_step": us / 1e3 / steps, "share": us / 1e6 / steps / wall_s}
            for name, us in sorted(costs.items(), key=lambda kv: -kv[1])[:top]]
    return Profile(prof.key_averages().table(sort_by=sort_by, row_limit=row_limit), shares, rows, 1e3 * wall_s,
                   busy)


def _costs_us(prof, device: torch.device) -> dict:
    """Microseconds by name: each GPU kernel's on CUDA; each op's self time on the CPU."""
    totals: dict[str, float] = defaultdict(float)
    if device.type == "cuda":
        for e in prof.events():
            if e.device_type.name == "CUDA":
                totals[e.name] += e.time_range.elapsed_us()
    else:
        for e in prof.key_averages():
            totals[e.key] += e.self_cpu_time_total
    return totals
