"""Train a VQ-KD tokenizer on a folder of images (``beit3 train-tokenizer``).

One process, one device. The run directory gets ``tokenizer.pth`` + ``tokenizer_config.json``
(what ``load_trained_tokenizer`` reads), and the run files every beit3 job writes: ``run_config.json``,
``metrics.jsonl`` (one line after step 1 and every ``log_every`` steps) and ``tensorboard/``.
"""
from __future__ import annotations

import argparse
import collections
import json
import math
import os
import sys
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import torch
from PIL import Image
from timm.scheduler import CosineLRScheduler
from torch import Tensor
from torch.utils.data import DataLoader, Dataset
from torchvision import transforms as T

from beit3.train.metrics_log import MetricsLogger
from beit3.train.run_dir import write_run_config
from beit3.train.trainer import git_commit
from beit3.tokenizer.teachers import Teacher, build_teacher
from beit3.tokenizer.vqkd import (VQKD, VQKD_PRESETS, VQKDConfig, VQKDOutput, load_trained_tokenizer,
                                  save_trained)

__all__ = ["train_tokenizer", "load_trained_tokenizer", "ImageFolder", "CodeUsage", "main"]

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp")


# -- data ----------------------------------------------------------------------------------------
class ImageFolder(Dataset):
    """Every .png/.jpg/.jpeg/.webp under ``root`` (recursively), as random resized crops with a
    horizontal flip, (3, img_size, img_size) in [0, 1]. An undecodable file yields ``(None, path)``."""

    def __init__(self, root: str | os.PathLike, img_size: int, min_crop_scale: float = 0.08):
        root = Path(root)
        if not root.is_dir():
            raise FileNotFoundError(f"image directory {root} does not exist")
        self.files = sorted(p for p in root.rglob("*") if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES)
        if not self.files:
            raise ValueError(f"no images ({', '.join(IMAGE_SUFFIXES)}) found under {root}")
        self.transform = T.Compose([
            T.RandomResizedCrop(img_size, scale=(min_crop_scale, 1.0), interpolation=T.InterpolationMode.BICUBIC),
            T.RandomHorizontalFlip(),
            T.ToTensor(),
        ])

    def __len__(self) -> int:
        return len(self.files)

    def __getitem__(self, i: int) -> tuple[Tensor | None, str]:
        path = self.files[i]
        try:
            with Image.open(path) as im:
                image = im.convert("RGB")
        except (OSError, ValueError, Image.DecompressionBombError):
            return None, str(path)
        return self.transform(image), str(path)


def collate_skipping_bad(items: list[tuple[Tensor | None, str]]) -> tuple[Tensor | None, list[str]]:
    """Stack the decodable images; return the paths of the others beside them."""
    good = [img for img, _ in items if img is not None]
    bad = [path for img, path in items if img is None]
    return (torch.stack(good) if good else None), bad


def _batches(loader: DataLoader, bad_files: set[str], num_files: int) -> Iterator[Tensor]:
    """Cycle over the loader forever, warning once per undecodable file."""
    while True:
        for images, bad in loader:
            for path in bad:
                if path not in bad_files:
                    bad_files.add(path)
                    warnings.warn(f"skipping undecodable image {path}")
            if len(bad_files) == num_files:
                raise ValueError(f"none of the {num_files} images could be decoded")
            if images is not None:
                yield images


# -- metrics -------------------------------------------------------------------------------------
class CodeUsage:
    """Code counts over the last ``window`` batches: the share of codes used and the perplexity
    exp(H(p)) of the code distribution (``num_codes`` when all are used equally)."""

    def __init__(self, num_codes: int, window: int):
        self.num_codes = num_codes
        self.counts: collections.deque[Tensor] = collections.deque(maxlen=window)

    def update(self, indices: Tensor) -> None:
        self.counts.append(torch.bincount(indices.flatten().cpu(), minlength=self.num_codes))

    def _total(self) -> Tensor:
        return torch.stack(tuple(self.counts)).sum(0).double()

    def usage(self) -> float:
        return (self._total() > 0).double().mean().item()

    def perplexity(self) -> float:
        p = self._total()
        p = p[p > 0] / p.sum()
        return math.exp(-(p * p.log()).sum().item())


# -- training ------------------------------------------------------------------------------------
def build_optimizer(model: VQKD, lr: float, weight_decay: float) -> torch.optim.AdamW:
    """AdamW with beit2's betas (0.9, 0.99); no decay on biases, norms, positions and CLS tokens."""
    skip = model.no_weight_decay()
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        if p.requires_grad:
            (no_decay if p.ndim <= 1 or name in skip else decay).append(p)
    groups = [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    return torch.optim.AdamW(groups, lr=lr, betas=(0.9, 0.99))


def train_step(model: VQKD, teacher: Teacher, images: Tensor, optimizer: torch.optim.Optimizer) -> VQKDOutput:
    """One update. images: (B, 3, H, W) in [0, 1] on the model's device. bf16 autocast on CUDA."""
    with torch.autocast(device_type=images.device.type, dtype=torch.bfloat16,
                        enabled=images.device.type == "cuda"):
        target = teacher(images)  # (B, N, teacher_dim)
        out = model(images, target)
    optimizer.zero_grad(set_to_none=True)
    out.loss.backward()
    optimizer.step()
    return out


def _check_compatible(config: VQKDConfig, teacher: Teacher) -> None:
    if teacher.dim != config.teacher_dim:
        raise ValueError(f"teacher {type(teacher).__name__} gives {teacher.dim}-d features but "
                         f"VQKDConfig.teacher_dim={config.teacher_dim}")
    if teacher.grid != config.grid_size:
        raise ValueError(f"teacher grid {teacher.grid} != tokenizer grid {config.grid_size}")


@dataclass
class _Window:
    """Running sums of the losses between two log lines."""
    rec: float = 0.0
    quant: float = 0.0
    n: int = 0

    def add(self, out: VQKDOutput) -> None:
        self.rec += out.rec_loss.item()
        self.quant += out.quant_loss.item()
        self.n += 1


def _window_metrics(window: _Window, usage: CodeUsage, lr: float) -> dict:
    return {"rec_loss": window.rec / window.n, "quant_loss": window.quant / window.n,
            "usage": usage.usage(), "perplexity": usage.perplexity(), "lr": lr}


def train_tokenizer(images_source: str | os.PathLike, config: VQKDConfig, teacher: Teacher, steps: int,
                    batch_size: int = 64, lr: float = 1e-3, output_dir: str | os.PathLike = "runs/tokenizer",
                    seed: int = 0, log_every: int = 10, *, weight_decay: float = 1e-4,
                    warmup_steps: int | None = None, min_crop_scale: float = 0.08, num_workers: int = 0,
                    usage_window: int = 50, save_every: int = 0, device: str | torch.device | None = None) -> Path:
    """Train a VQKD for ``steps`` updates against ``teacher``; returns the saved ``tokenizer.pth``.

    Cosine learning-rate decay to lr/10 after a linear warm-up (default: 5% of the steps).
    ``usage_window``: batches over which ``codebook/usage`` and ``codebook/perplexity`` are counted.
    ``save_every`` > 0 also saves every that many steps (atomically, over the same files)."""
    _check_compatible(config, teacher)
    if steps < 1 or batch_size < 1 or log_every < 1:
        raise ValueError(f"steps={steps}, batch_size={batch_size}, log_every={log_every} must all be >= 1")
    device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    out_dir = Path(output_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(seed)
    model = VQKD(config).to(device).train()
    teacher = teacher.to(device)
    dataset = ImageFolder(images_source, config.img_size, min_crop_scale)
    loader = DataLoader(dataset, batch_size=batch_size, shuffle=True, drop_last=len(dataset) >= batch_size,
                        num_workers=num_workers, collate_fn=collate_skipping_bad,
                        generator=torch.Generator().manual_seed(seed), pin_memory=device.type == "cuda")
    optimizer = build_optimizer(model, lr, weight_decay)
    warmup = max(1, steps // 20) if warmup_steps is None else warmup_steps
    scheduler = CosineLRScheduler(optimizer, t_initial=steps, lr_min=lr / 10, warmup_t=warmup,
                                  warmup_lr_init=lr / 100, t_in_epochs=False)
    write_run_config(str(out_dir), dict(
        images=str(images_source), teacher=type(teacher).__name__, teacher_dim=teacher.dim, steps=steps,
        batch_size=batch_size, lr=lr, weight_decay=weight_decay, warmup_steps=warmup, seed=seed,
        min_crop_scale=min_crop_scale, config=config.to_dict(), git_commit=git_commit(), torch=torch.__version__))

    usage, window, bad_files = CodeUsage(config.num_codes, usage_window), _Window(), set()
    batches = _batches(loader, bad_files, len(dataset))
    # The run files of every beit3 job: metrics.jsonl, tensorboard/ and a progress bar.
    (out_dir / "metrics.jsonl").unlink(missing_ok=True)  # a fresh run's log, not appended to a previous one's
    logger = MetricsLogger(str(out_dir), True, steps, desc="vq-kd")
    try:
        for step in range(1, steps + 1):
            scheduler.step_update(step - 1)
            images = next(batches).to(device, non_blocking=True)
            out = train_step(model, teacher, images, optimizer)
            usage.update(out.indices)
            window.add(out)
            logger.advance()
            if step == 1 or step % log_every == 0 or step == steps:  # step 1: the untrained model
                logger.log(step, _window_metrics(window, usage, optimizer.param_groups[0]["lr"]))
                window = _Window()
            if save_every and step % save_every == 0:
                save_trained(model, out_dir)
    finally:
        logger.close()
    if bad_files:
        warnings.warn(f"skipped {len(bad_files)} undecodable image(s) under {images_source}")
    return save_trained(model, out_dir)


def read_metrics(run_dir: str | os.PathLike) -> list[dict]:
    """The ``metrics.jsonl`` lines of a run, in order."""
    with open(Path(run_dir) / "metrics.jsonl") as f:
        return [json.loads(line) for line in f if line.strip()]


# -- command line --------------------------------------------------------------------------------
def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="beit3 train-tokenizer", description="Train a BEiT v2 VQ-KD visual tokenizer.")
    p.add_argument("--images", required=True, help="directory of images (searched recursively)")
    p.add_argument("--preset", default="tiny", choices=sorted(VQKD_PRESETS))
    p.add_argument("--teacher", default="hog",
                   help="hog | pixel | open_clip:<model> | a timm model name (the last two need --teacher-weights)")
    p.add_argument("--teacher-weights", default=None, help="local weights file of the teacher")
    p.add_argument("--steps", type=int, required=True)
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--lr", type=float, default=1e-3, help="peak learning rate (the tiny demo's default)")
    p.add_argument("--weight-decay", type=float, default=1e-4)
    p.add_argument("--min-crop-scale", type=float, default=None,
                   help="smallest random-resized-crop area (default 0.5 for tiny, 0.08 as beit2 otherwise)")
    p.add_argument("--num-workers", type=int, default=0)
    p.add_argument("--log-every", type=int, default=10)
    p.add_argument("--save-every", type=int, default=0)
    p.add_argument("--output", required=True, help="run directory")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default=None, help="cpu | cuda (default: cuda when available)")
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    from ..errors import UserError
    from ..files import check_output_dir
    try:
        check_output_dir(args.output)  # before the teacher is loaded and the steps run
        preset = VQKDConfig.from_preset(args.preset)
        teacher = build_teacher(args.teacher, args.teacher_weights, grid=preset.grid_size, img_size=preset.img_size)
        config = VQKDConfig.from_preset(args.preset, teacher_dim=teacher.dim)
        crop = args.min_crop_scale if args.min_crop_scale is not None else (0.5 if args.preset == "tiny" else 0.08)
        path = train_tokenizer(args.images, config, teacher, args.steps, args.batch_size, args.lr, args.output,
                               args.seed, args.log_every, weight_decay=args.weight_decay, min_crop_scale=crop,
                               num_workers=args.num_workers, save_every=args.save_every, device=args.device)
    except (ValueError, FileNotFoundError, ImportError, UserError) as e:
        print(f"beit3 train-tokenizer: error: {e}", file=sys.stderr)
        return 2
    metrics = read_metrics(args.output)
    first, last = metrics[0], metrics[-1]
    print(f"final rec loss {last['rec_loss']:.4f} (first logged {first['rec_loss']:.4f}), "
          f"quant loss {last['quant_loss']:.4f}, codebook usage {last['usage']:.1%} of {config.num_codes} codes "
          f"(perplexity {last['perplexity']:.1f}); saved {path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
