"""Early pretraining under each initialisation scheme: loss and gradient norm over the first steps.

    .venv/bin/python scripts/init_probe.py --preset base --img-size 32 --patch-size 8 --steps 60
    .venv/bin/python scripts/init_probe.py --preset tiny --depth 40 --embed-dim 128 --num-heads 4 \\
        --ffn-dim 512 --img-size 32 --steps 100                                      (deep and narrow)

Runs ``MaskedDataModeling`` with plain PyTorch AdamW and the pretraining recipe (betas 0.9/0.98, eps
1e-6, wd 0.05, linear warmup then cosine, clipping at 3.0, drop path 0.1) from the same seed under
``subln`` (unilm's truncated normal + torchscale's Sub-LN scaling) and ``plain`` (the truncated
normal alone), on learnable synthetic data: smooth random images whose visual tokens are a fixed
function of each patch (so a masked patch is predictable from its neighbours) and texts from a
random bigram chain. Prints one Markdown table per run.
"""
from __future__ import annotations

import argparse
import math
import sys
import time

import numpy as np
import torch
import torch.nn.functional as F

from beit3.model.config import PRESETS, BEiT3Config
from beit3.data.masking import BlockMaskGenerator, default_num_masking_patches, mask_text
from beit3.core.settings import add_flag, check_args
from beit3.jobs.pretrain.objective import MaskedDataModeling, prepare_batch
from beit3.trainer.optim import build_optimizer, build_scheduler, param_groups

VOCAB, CODES, SPECIAL = 64, 64, (0, 1, 2, 3)


class Data:
    """Deterministic batches: the same sequence for every scheme."""

    def __init__(self, cfg: BEiT3Config, batch: int, text_len: int, seed: int = 0):
        g = torch.Generator().manual_seed(seed)
        p = cfg.patch_size
        self.codebook = torch.randn(3 * p * p, CODES, generator=g)  # patch pixels -> visual token
        self.bigram = torch.randn(VOCAB, VOCAB, generator=g).mul(3).softmax(-1)
        self.cfg, self.batch, self.text_len, self.seed = cfg, batch, text_len, seed
        grid = cfg.grid_size
        self.masker = BlockMaskGenerator(grid, default_num_masking_patches(grid, grid))

    def images(self, n: int, g: torch.Generator, rng) -> tuple[dict, torch.Tensor]:
        s = self.cfg.img_size
        low = torch.randn(n, 3, 4, 4, generator=g)
        img = F.interpolate(low, size=(s, s), mode="bicubic", align_corners=False).tanh()  # smooth: neighbours agree
        patches = F.unfold(img, self.cfg.patch_size, stride=self.cfg.patch_size).transpose(1, 2)  # (n, N, 3pp)
        codes = (patches @ self.codebook).argmax(-1)
        mask = torch.from_numpy(np.stack([self.masker(rng).reshape(-1) for _ in range(n)]))
        return {"image": img, "image_mask": mask}, codes

    def texts(self, n: int, prob: float, g: torch.Generator) -> dict:
        ids = torch.empty(n, self.text_len, dtype=torch.long)
        ids[:, 0] = 4 + torch.randint(0, VOCAB - 5, (n,), generator=g)
        for t in range(1, self.text_len):
            ids[:, t] = torch.multinomial(self.bigram[ids[:, t - 1]], 1, generator=g)[:, 0].clamp(min=4, max=VOCAB - 2)
        pad = torch.zeros_like(ids, dtype=torch.bool)
        inputs, labels = mask_text(ids, pad, prob, VOCAB - 1, VOCAB, SPECIAL + (VOCAB - 1,), g)
        return {"text": inputs, "padding_mask": pad, "labels": labels}

    def __call__(self, step: int) -> tuple[dict, dict]:
        g = torch.Generator().manual_seed(self.seed * 100_003 + step)
        rng = np.random.default_rng(self.seed * 100_003 + step)
        b = self.batch
        images, codes = self.images(b, g, rng)
        pair_img, _ = self.images(b, g, rng)
        batch = {"images": images, "texts": self.texts(b, 0.15, g),
                 "pairs": {"image": pair_img["image"], **self.texts(b, 0.5, g)}}
        return prepare_batch(batch, VOCAB), {"images": codes}


def run(cfg: BEiT3Config, data: Data, steps: int, lr: float, warmup: int, seed: int) -> list[dict]:
    torch.manual_seed(seed)
    model = MaskedDataModeling(cfg, num_visual_tokens=CODES).train()
    opt = build_optimizer(param_groups(model, 0.05), lr, betas=(0.9, 0.98), eps=1e-6)
    sched = build_scheduler(opt, warmup, steps, min_ratio=0.01)
    log = []
    for step in range(steps):
        batch, targets = data(step)
        loss, metrics = model(batch, targets)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        norm = torch.nn.utils.clip_grad_norm_(model.parameters(), 3.0).item()
        opt.step()
        sched.step()
        log.append({"loss": loss.item(), "grad_norm": norm, **{k: v.item() for k, v in metrics.items()
                                                                 if k.startswith("loss/")}})
    return log


def summary(log: list[dict], window: int) -> dict:
    def mean(key, part):
        vals = [m[key] for m in part]
        return sum(vals) / len(vals)
    first, last = log[:window], log[-window:]
    return {"first loss": mean("loss", first), "last loss": mean("loss", last),
            "last image": mean("loss/image", last), "last text": mean("loss/text", last),
            "last pair": mean("loss/pair", last), "max grad norm": max(m["grad_norm"] for m in log),
            "first grad norm": mean("grad_norm", first), "last grad norm": mean("grad_norm", last),
            "finite": all(math.isfinite(m["loss"]) for m in log)}


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="init_probe.py", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--preset", default="tiny", choices=sorted(PRESETS))
    for name in ("depth", "embed-dim", "num-heads", "ffn-dim", "img-size", "patch-size"):
        add_flag(ap, f"--{name}", type=int, help="overrides the preset's", ge=1)
    add_flag(ap, "--init-std", type=float, default=0.02, help="unilm's, also for --preset tiny", gt=0)
    add_flag(ap, "--steps", type=int, default=100, ge=1)
    add_flag(ap, "--warmup", type=int, default=10, ge=0)
    add_flag(ap, "--lr", type=float, nargs="+", default=[2e-3], gt=0)
    add_flag(ap, "--batch", type=int, default=8, help="images, texts and pairs each", ge=1)
    add_flag(ap, "--text-len", type=int, default=16, ge=2)
    add_flag(ap, "--seeds", type=int, nargs="+", default=[0], ge=0, lt=2**32)
    add_flag(ap, "--threads", type=int, default=2, ge=1)
    return ap


def main(argv=None) -> int:
    ap = build_parser()
    a = ap.parse_args(argv)
    over = {k: getattr(a, k) for k in ("depth", "embed_dim", "num_heads", "ffn_dim", "img_size", "patch_size")
            if getattr(a, k)}
    try:
        check_args(ap, a)
        base = BEiT3Config.from_preset(a.preset, vocab_size=VOCAB, drop_path_rate=0.1,
                                       max_text_positions=a.text_len + 2, init_std=a.init_std, **over)
    except ValueError as e:  # SettingError too
        print(f"{ap.prog}: error: {e}", file=sys.stderr)
        return 2
    torch.set_num_threads(a.threads)
    torch.set_flush_denormal(True)  # Adam moments go denormal, which x86 computes with 10-100x slower
    window = max(1, a.steps // 10)
    print(f"preset {a.preset} {over}: depth {base.depth}, width {base.embed_dim}, {a.steps} steps, batch "
          f"{a.batch}/{a.batch}/{a.batch}, text {a.text_len}; means over the first / last {window} steps\n")
    print("| lr | seed | init | first loss | last loss | last image / text / pair | grad norm first / last / max | s |")
    print("|---|---|---|---|---|---|---|---|")
    for lr in a.lr:
        for seed in a.seeds:
            for scheme in ("subln", "plain"):
                t0 = time.time()
                cfg = base.replace(subln_init_scale=scheme == "subln")
                s = summary(run(cfg, Data(cfg, a.batch, a.text_len, seed), a.steps, lr, a.warmup, seed), window)
                bad = "" if s["finite"] else " (non-finite)"
                print(f"| {lr:g} | {seed} | {scheme} | {s['first loss']:.3f} | {s['last loss']:.3f}{bad} | "
                      f"{s['last image']:.3f} / {s['last text']:.3f} / {s['last pair']:.3f} | "
                      f"{s['first grad norm']:.2f} / {s['last grad norm']:.2f} / {s['max grad norm']:.2f} | "
                      f"{time.time() - t0:.0f} |", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
