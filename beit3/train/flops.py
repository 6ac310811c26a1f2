"""Model FLOPs and a measured matmul peak, for TFLOP/s and MFU (nanoGPT's estimate_mfu idea).

Model FLOPs of a training step = 6 x (active parameters each token passes through) x tokens
+ attention (12 x L^2 x D per layer per sequence for forward + backward). Recomputation by
activation checkpointing is not counted: this is *model* FLOPs utilisation.
"""
from __future__ import annotations

import time

import torch

from ..config import BEiT3Config


def _block_params(cfg: BEiT3Config) -> tuple[int, int]:
    D, F = cfg.embed_dim, cfg.ffn_dim
    attn = 4 * D * D  # qkv + out projection matmuls, per token whatever the layout
    ffn = 2 * D * F
    return attn, ffn


def encoder_flops(cfg: BEiT3Config, batch: int, image_tokens: int, text_tokens: int) -> float:
    """Forward + backward FLOPs of the encoder for ``batch`` sequences of image_tokens + text_tokens."""
    attn, ffn = _block_params(cfg)
    L = image_tokens + text_tokens
    per_token = cfg.depth * (attn + ffn)  # every token passes one FFN expert per layer
    patch = cfg.in_chans * cfg.patch_size**2 * cfg.embed_dim if image_tokens else 0
    linear = 6 * batch * (L * per_token + max(image_tokens - 1, 0) * patch)
    attention = 12 * batch * cfg.depth * L * L * cfg.embed_dim
    return float(linear + attention)


def head_flops(dim: int, classes: int, tokens: int) -> float:
    return 6.0 * dim * classes * tokens


@torch.no_grad()
def measure_matmul_peak(device: torch.device, dtype: torch.dtype = torch.bfloat16, n: int = 8192,
                        iters: int = 10) -> float:
    """Achieved FLOP/s of an n^3 matmul on ``device`` (smaller n on CPU to keep it quick)."""
    if device.type == "cpu":
        n, iters, dtype = 1024, 3, torch.float32
    # Fresh, non-random operands: the training RNG stream must not depend on when this runs.
    a = torch.full((n, n), 0.5, device=device, dtype=dtype)
    b = torch.full((n, n), 0.25, device=device, dtype=dtype)
    for _ in range(2):
        a @ b
    _sync(device)
    t = time.perf_counter()
    for _ in range(iters):
        a @ b
    _sync(device)
    return 2 * n**3 * iters / (time.perf_counter() - t)


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


# Dense bf16 datasheet peaks (FLOP/s), for MFU against the datasheet.
DATASHEET_BF16 = {"H100": 989e12, "H200": 989e12, "A100": 312e12, "L40S": 362e12, "B200": 2250e12}


def datasheet_peak(device: torch.device) -> float | None:
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    return next((v for k, v in DATASHEET_BF16.items() if k in name), None)
