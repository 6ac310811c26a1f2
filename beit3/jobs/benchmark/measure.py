"""Timing of training steps and peak memory, on CUDA and on the CPU."""
from __future__ import annotations

import gc
import math
import resource
import statistics
import time
from dataclasses import dataclass, field
from typing import Callable, Optional

import torch

GiB = 2**30


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def is_oom(e: BaseException) -> bool:
    """A CUDA out-of-memory error, also when a library re-raised it as a plain RuntimeError."""
    return isinstance(e, torch.OutOfMemoryError) or "out of memory" in str(e).lower()


def release_memory(device: torch.device) -> None:
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


class PeakMemory:
    """Peak memory since ``reset()``: CUDA max allocated, or on the CPU the process's peak RSS
    (Linux VmHWM, reset through /proc/self/clear_refs; without it, the peak since start)."""

    def __init__(self, device: torch.device):
        self.device = device

    def reset(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(self.device)
            return
        try:
            with open("/proc/self/clear_refs", "w") as f:
                f.write("5")  # "5" resets the peak RSS to the current RSS (Linux >= 4.0)
        except OSError:
            pass

    def read_gb(self) -> float:
        if self.device.type == "cuda":
            return torch.cuda.max_memory_allocated(self.device) / GiB
        try:
            with open("/proc/self/status") as f:
                for line in f:
                    if line.startswith("VmHWM:"):
                        return int(line.split()[1]) * 1024 / GiB  # kB
        except OSError:
            pass
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 / GiB  # KiB on Linux


@dataclass
class Measurement:
    """Steps of one model on one batch: seconds per timed step and the per-step work."""
    name: str
    samples: int = 0  # per step
    tokens: int = 0
    flops: float = 0.0
    step_s: list = field(default_factory=list)
    peak_mem_gb: float = float("nan")
    error: Optional[str] = None  # e.g. "out of memory": no figures
    info: dict = field(default_factory=dict)  # model facts for the record (parameters, kernels)

    @property
    def ok(self) -> bool:
        return self.error is None and bool(self.step_s)

    @property
    def seconds(self) -> float:
        return sum(self.step_s)

    @property
    def samples_per_s(self) -> float:
        return self.samples * len(self.step_s) / self.seconds if self.ok else math.nan

    @property
    def tokens_per_s(self) -> float:
        return self.tokens * len(self.step_s) / self.seconds if self.ok else math.nan

    @property
    def flops_per_s(self) -> float:
        return self.flops * len(self.step_s) / self.seconds if self.ok else math.nan

    @property
    def step_ms_median(self) -> float:
        return 1e3 * statistics.median(self.step_s) if self.ok else math.nan


def time_steps(step: Callable[[], None], warmup: int, steps: int, device: torch.device) -> list[float]:
    """Run ``warmup`` untimed steps, then return the seconds of each of ``steps`` timed steps. The
    device is synchronised around every timed step, so each time holds its whole GPU work."""
    for _ in range(warmup):
        step()
    times = []
    for _ in range(steps):
        sync(device)
        t = time.perf_counter()
        step()
        sync(device)
        times.append(time.perf_counter() - t)
    return times


def measure(name: str, step: Callable[[], None], work: tuple[int, int, float], warmup: int, steps: int,
            device: torch.device) -> Measurement:
    """Time ``step`` and read the peak memory of the steps (the model and optimizer state already
    allocated count; what earlier measurements left in the caching allocator does not).
    ``work``: (samples, tokens, FLOPs) of one step. A step that fails (out of memory, no SDPA kernel
    for the inputs, ...) is recorded as the Measurement's error rather than ending the run."""
    m = Measurement(name, *work)
    mem = PeakMemory(device)
    release_memory(device)
    mem.reset()
    try:
        m.step_s = time_steps(step, warmup, steps, device)
    except RuntimeError as e:
        m.error = "out of memory" if is_oom(e) else f"{type(e).__name__}: {str(e).strip().splitlines()[0][:300]}"
    m.peak_mem_gb = mem.read_gb()
    return m
