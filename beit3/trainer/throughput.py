"""The figures every job logs of the steps between two log lines: samples/s and tokens/s (over all
ranks), model TFLOP/s and MFU (per rank, against the matmul peak ``flops.measure_matmul_peak``
measured once per run on this rank's device) and peak memory. The job counts the work (samples,
tokens, model FLOPs) of each micro-batch it trains on; the keys are pretraining's."""
from __future__ import annotations

import resource
import time

import torch

from beit3.trainer.flops import measure_matmul_peak


def peak_memory_gb(device: torch.device) -> float:
    """The most memory this process held: the device's allocations on a GPU, the resident set on the CPU."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**30
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # KiB -> GiB (Linux)


class Throughput:
    """The work of a window of steps and its figures (see the module docstring)."""

    def __init__(self, device: torch.device, world_size: int):
        self.device, self.world_size = device, world_size
        self.peak = measure_matmul_peak(device)  # FLOP/s, once per run
        self.reset()

    def reset(self) -> None:
        """Start a new window now (after a pause the figures should not count: validation)."""
        self.start, self.samples, self.tokens, self.flops = time.perf_counter(), 0, 0, 0.0

    def add(self, samples: int, tokens: int, flops: float) -> None:
        """One micro-batch of this rank: its samples, tokens and model FLOPs (forward + backward)."""
        self.samples += samples
        self.tokens += tokens
        self.flops += flops

    def figures(self) -> dict[str, float]:
        """The window's figures; a new window starts."""
        seconds = max(time.perf_counter() - self.start, 1e-9)
        rate = self.flops / seconds  # this rank's model FLOP/s
        out = {"samples_per_s": self.samples * self.world_size / seconds,
               "tokens_per_s": self.tokens * self.world_size / seconds,
               "model_tflops": rate / 1e12, "mfu": rate / self.peak, "memory_gb": peak_memory_gb(self.device)}
        self.reset()
        return out
