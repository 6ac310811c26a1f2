"""Model FLOPs and a measured matmul peak, for TFLOP/s and MFU (nanoGPT's estimate_mfu idea), of
every job: pretraining, fine-tuning (the backbone's passes, ``encoder_flops``) and VQ-KD training.

Model FLOPs of a training step = 6 x (active parameters each token passes through) x tokens
+ attention (12 x L^2 x D per layer per sequence for forward + backward). Recomputation by
activation checkpointing is not counted: this is *model* FLOPs utilisation.

Counted: every matmul (fused qkv, output projection, fc1/fc2 of the one FFN expert a token passes
through, the patch-embedding conv, q k^T and attention x v, the MLM/MIM heads on the masked
tokens). Not counted: LayerNorm, GELU, softmax, embeddings lookups, the optimizer. Sequences count
with their padding (the kernels compute it), so FLOPs follow the batch's tensor shapes.
"""
from __future__ import annotations

import time

import torch

from beit3.model.config import BEiT3Config
from beit3.vqkd.vqkd import VQKDConfig


def _blocks(batch: int, tokens: int, depth: int, dim: int, ffn_dim: int) -> tuple[float, float]:
    """(linear, attention): forward + backward FLOPs of ``depth`` transformer blocks over ``batch``
    sequences of ``tokens``. Linear: qkv + out projections (4 D^2) and the FFN (one expert: 2 D F)
    per token; attention: q k^T and attention x v, 12 L^2 D per layer per sequence."""
    linear = 6 * batch * tokens * depth * (4 * dim * dim + 2 * dim * ffn_dim)
    return float(linear), float(12 * batch * depth * tokens * tokens * dim)


def encoder_flops_breakdown(cfg: BEiT3Config, batch: int, image_tokens: int, text_tokens: int) -> dict:
    """Forward + backward FLOPs of the encoder, by kind: "linear" (the blocks' projections and FFNs),
    "attention" (q k^T and attention x v), "patch_embed" (the conv). image_tokens include the CLS."""
    linear, attention = _blocks(batch, image_tokens + text_tokens, cfg.depth, cfg.embed_dim, cfg.ffn_dim)
    patch = cfg.in_chans * cfg.patch_size**2 * cfg.embed_dim if image_tokens else 0
    return {"linear": linear, "attention": attention,
            "patch_embed": float(6 * batch * max(image_tokens - 1, 0) * patch)}


def encoder_flops(cfg: BEiT3Config, batch: int, image_tokens: int, text_tokens: int) -> float:
    """The encoder's forward + backward FLOPs (``encoder_flops_breakdown``'s total): a fine-tuning
    task's backbone pass over its image and text tokens."""
    return sum(encoder_flops_breakdown(cfg, batch, image_tokens, text_tokens).values())


def vqkd_flops(cfg: VQKDConfig, images: int) -> float:
    """Forward + backward FLOPs of a VQ-KD training step on ``images`` images: the encoder ViT over
    CLS + patches, its patch embedding and task layer, the nearest-code search (forward only), the
    decoder ViT over the code map with its 1x1 patch embedding and task layer. The frozen teacher is
    not counted, as pretraining does not count its visual tokenizer."""
    n, mlp = cfg.num_patches, cfg.mlp_ratio
    enc = _blocks(images, n + 1, cfg.depth, cfg.embed_dim, int(cfg.embed_dim * mlp))
    dec = _blocks(images, n + 1, cfg.decoder_depth, cfg.decoder_embed_dim, int(cfg.decoder_embed_dim * mlp))
    d, dd = cfg.embed_dim, cfg.decoder_embed_dim
    per_patch = (3 * cfg.patch_size**2 * d + d * d + d * cfg.code_dim  # patch embedding, encoder task layer
                 + cfg.code_dim * dd + dd * dd + dd * cfg.teacher_dim)  # decoder's patch embedding and task layer
    search = 2 * images * n * cfg.num_codes * cfg.code_dim
    return sum(enc) + sum(dec) + 6.0 * images * n * per_patch + search


def head_flops(dim: int, classes: int, tokens: int) -> float:
    return 6.0 * dim * classes * tokens


def pretrain_flops_breakdown(cfg: BEiT3Config, batch: dict, num_visual_tokens: int) -> dict:
    """Model FLOPs of one masked-data-modeling micro-batch (the loader's format, see
    ``beit3.jobs.pretrain.objective``), by kind: linear, attention, patch_embed, mlm_head, mim_head and
    "total". The MIM head of pairs is counted when the pairs carry an ``image_mask``."""
    out = dict.fromkeys(("linear", "attention", "patch_embed", "mlm_head", "mim_head"), 0.0)
    img_tokens = 1 + cfg.num_patches
    for part, has_img, has_txt in (("images", True, False), ("texts", False, True), ("pairs", True, True)):
        if part not in batch:
            continue
        p = batch[part]
        B = (p["image"] if has_img else p["text"]).shape[0]
        L_txt = p["text"].shape[1] if has_txt else 0
        for k, v in encoder_flops_breakdown(cfg, B, img_tokens if has_img else 0, L_txt).items():
            out[k] += v
        if has_txt:
            out["mlm_head"] += head_flops(cfg.embed_dim, cfg.vocab_size, int((p["labels"] != -100).sum()))
        if has_img and p.get("image_mask") is not None:
            out["mim_head"] += head_flops(cfg.embed_dim, num_visual_tokens, int(p["image_mask"].sum()))
    out["total"] = sum(out.values())
    return out


def batch_counts(cfg: BEiT3Config, batch: dict) -> tuple[int, int]:
    """(samples, tokens) of a micro-batch: every image counts 1 + N tokens (CLS + patches), masked
    or not; texts count their non-padding tokens."""
    samples = tokens = 0
    for part in ("images", "texts", "pairs"):
        if part not in batch:
            continue
        p = batch[part]
        samples += (p["image"] if "image" in p else p["text"]).shape[0]
        if "image" in p:
            tokens += p["image"].shape[0] * (1 + cfg.num_patches)
        if "text" in p:
            pad = p.get("padding_mask")  # None: no padding (see train.objective.prepare_batch)
            tokens += p["text"].numel() if pad is None else int((~pad).sum())
    return samples, tokens


def _best_rate(fn, flops: float, iters: int, device: torch.device) -> float:
    """FLOP/s of the fastest of ``iters`` timed calls: the peak, robust to a shared machine."""
    best = float("inf")
    for _ in range(iters):
        _sync(device)
        t = time.perf_counter()
        fn()
        _sync(device)
        best = min(best, time.perf_counter() - t)
    return flops / best


@torch.no_grad()
def measure_matmul_peak(device: torch.device, dtype: torch.dtype = torch.bfloat16, n: int = 8192,
                        iters: int = 10) -> float:
    """Achieved FLOP/s of an n^3 matmul on ``device``: bf16 8192^3 on GPU; fp32 512^3 on CPU
    (bf16 matmuls are emulated on most CPUs, and the CPU training path runs in fp32). Every
    pretraining run measures it: on one CPU thread 512^3 reached 1024^3's rate (102 against 92
    GFLOP/s) in a tenth of the time (0.06 s against 0.63 s)."""
    if device.type == "cpu":
        n, iters, dtype = 512, 5, torch.float32
    # Random operands (constant or zero ones run faster than real data on some GPUs: up to 13% seen
    # on an H200) from a private generator, so the training RNG stream does not depend on this.
    g = torch.Generator(device=device).manual_seed(0)
    a = torch.randn((n, n), device=device, dtype=dtype, generator=g)
    b = torch.randn((n, n), device=device, dtype=dtype, generator=g)
    reps = 4  # several matmuls per timing, so launch latency and clock ramp-up do not count
    for _ in range(2):
        a @ b
    return _best_rate(lambda: [a @ b for _ in range(reps)], 2.0 * n**3 * reps, iters, device)


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


# Dense bf16 datasheet peaks (FLOP/s), for MFU against the datasheet. Checked in order: the more
# specific names first (an "H100 PCIe" must not match the SXM figure).
DATASHEET_BF16 = (("H100 PCIe", 756e12), ("H100 NVL", 835e12), ("H100", 989e12), ("H200", 989e12),
                  ("A100", 312e12), ("L40S", 362e12), ("B200", 2250e12))


def datasheet_peak(device: torch.device) -> float | None:
    """Dense bf16 FLOP/s of the GPU's datasheet, or None (CPU, or a GPU not in the table)."""
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    return next((v for k, v in DATASHEET_BF16 if k in name), None)
