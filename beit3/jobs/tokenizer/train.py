"""Train a VQ-KD tokenizer on a folder of images (``beit3 train-tokenizer``).

One process, one device, on the ``Trainer`` every beit3 job shares. The run folder gets the
weights (``model.safetensors`` + ``tokenizer_config.json``, what ``load_trained_tokenizer`` reads)
and the run files of every job: ``run_config.json``, ``metrics.jsonl`` (one line after step 1 and
every ``log_every`` steps, with the throughput figures of every job: ``flops.vqkd_flops``), the
``--report-to`` trackers (``tensorboard/`` by default), ``run.log`` and ``checkpoints/`` (``--resume auto``).
"""
from __future__ import annotations

import collections
import json
import math
import os
import warnings
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Iterator, Optional

import torch
from PIL import Image
from timm.scheduler import CosineLRScheduler
from torch import Tensor
from torch.utils.data import DataLoader, Dataset, Sampler
from torchvision import transforms as T

from beit3.trainer.distributed import pick_device
from beit3.trainer.flops import vqkd_flops
from beit3.trainer.plain_engine import PlainEngine
from beit3.trainer.run_dir import check_resume, find_checkpoint
from beit3.trainer.throughput import Throughput
from beit3.trainer.trainer import StopRequested, Trainer, seed_everything
from beit3.vqkd.teachers import Teacher, build_teacher
from beit3.jobs.tokenizer.config import TokenizerTrainConfig
from beit3.vqkd.vqkd import VQKD, VQKDConfig, VQKDOutput, WEIGHTS_NAME, load_trained_tokenizer, save_trained

__all__ = ["train_tokenizer", "tokenizer_run", "load_trained_tokenizer", "ImageFolder", "CodeUsage", "TokenizerRun"]

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp")


# -- data ----------------------------------------------------------------------------------------
class ImageFolder(Dataset):
    """Every .png/.jpg/.jpeg/.webp under ``root`` (recursively), as random resized crops with a
    horizontal flip, (3, img_size, img_size) in [0, 1]. An undecodable file yields ``(None, path)``."""

    def __init__(self, root: str | os.PathLike, img_size: int, min_crop_scale: float = 0.08):
        root = Path(root)
        if not root.is_dir():
            raise FileNotFoundError(f"--images {root}: image directory does not exist")
        self.files = sorted(p for p in root.rglob("*") if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES)
        if not self.files:
            raise ValueError(f"--images {root}: no images ({', '.join(IMAGE_SUFFIXES)}) found in it")
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


class ResumableRandomSampler(Sampler[int]):
    """A new random order each epoch, as ``shuffle=True`` with the loader's ``generator`` (the
    DataLoader draws its worker seed from that generator, then the sampler its permutation), and
    resumable mid-epoch: its state is the generator's at the epoch's start and the batches the
    loop consumed since (counted by the loop: workers may have read ahead)."""

    def __init__(self, n: int, generator: torch.Generator, batch_size: int):
        self.n, self.generator, self.batch_size = n, generator, batch_size
        self.epoch_start: Optional[Tensor] = None
        self.batches = 0
        self._resume_at = 0  # batches of the next epoch already trained on (a resumed run)
        self._skip = 0

    def start_epoch(self) -> None:
        """Call before each epoch's DataLoader iterator is made."""
        self.epoch_start = self.generator.get_state()
        self.batches, self._skip = self._resume_at, self._resume_at * self.batch_size
        self._resume_at = 0

    def consumed(self, batches: int = 1) -> None:
        self.batches += batches

    def __iter__(self) -> Iterator[int]:
        order = torch.randperm(self.n, generator=self.generator).tolist()
        skip, self._skip = self._skip, 0
        yield from order[skip:]
        # RandomSampler draws a second, empty-sliced permutation at an epoch's end; drawn here too,
        # the orders stay those of shuffle=True (and the demo's tokenizer the same as before).
        torch.randperm(self.n, generator=self.generator)

    def __len__(self) -> int:
        return self.n

    def state_dict(self) -> dict:
        return {"epoch_start": self.epoch_start, "batches": self.batches}

    def load_state_dict(self, state: dict) -> None:
        """Resume at the saved position: the epoch's order is drawn again from its saved start."""
        self.generator.set_state(state["epoch_start"])
        self._resume_at = int(state["batches"])


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


def _check_compatible(config: VQKDConfig, teacher: Teacher) -> None:
    if teacher.dim != config.teacher_dim:
        raise ValueError(f"--teacher {type(teacher).__name__} gives {teacher.dim}-d features but "
                         f"VQKDConfig.teacher_dim={config.teacher_dim}")
    if teacher.grid != config.grid_size:
        raise ValueError(f"--teacher grid {teacher.grid} != the --preset tokenizer's grid {config.grid_size}")


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


class TokenizerRun(Trainer):
    """VQ-KD distillation in the Trainer's run folder, in this process alone (``single_process``:
    the demo trains its tokenizer on rank 0 of a pretraining job while the other ranks wait).

    The engine is a ``PlainEngine``: AdamW, timm's cosine schedule with warm-up, bf16 autocast on
    CUDA. Checkpoints (``--save-every``, and the last step) are the Trainer's, so ``--resume auto``
    continues a stopped run: with ``num_workers`` 0 the resumed steps equal the uninterrupted ones
    (the sampler's epoch order and position, the crops' RNG and the usage window are saved)."""

    def __init__(self, settings: TokenizerTrainConfig, config: VQKDConfig, teacher: Teacher):
        self.settings, self.config, self.teacher = settings.resolved(), config, teacher

    def check_resume(self) -> tuple[Optional[str], Optional[dict]]:
        s = self.settings
        path = find_checkpoint(self.ckpt_dir, s.resume)
        if path is None:
            return None, None
        return path, check_resume(path, self.dist, self.identity(), s.allow_pickle)

    def identity(self) -> dict:
        """What a checkpoint must match to be resumed by this run."""
        s = self.settings
        return {"config": self.config.to_dict(), "teacher": type(self.teacher).__name__, "steps": s.steps,
                "batch_size": s.batch_size, "lr": s.lr, "seed": s.seed}

    def build(self) -> None:
        s = self.settings
        device = torch.device(pick_device(s.device))
        self.open_run(s.output, str(device), 0.0, s.steps, resume=s.resume, overwrite=s.overwrite,
                      tensorboard=s.tensorboard, report_to=s.report_to, desc="vq-kd", max_bad_steps=s.max_bad_steps,
                      single_process=True)
        seed_everything(s.seed)
        model = VQKD(self.config).to(device).train()
        model.quantize.sync_ranks = self.dist.world_size > 1  # this job's world, not the process group's
        self.teacher = self.teacher.to(device)
        dataset = ImageFolder(s.images, self.config.img_size, s.min_crop_scale)
        self.sampler = ResumableRandomSampler(len(dataset), torch.Generator().manual_seed(s.seed), s.batch_size)
        self.loader = DataLoader(dataset, batch_size=s.batch_size, sampler=self.sampler,
                                 drop_last=len(dataset) >= s.batch_size, num_workers=s.num_workers,
                                 collate_fn=collate_skipping_bad, generator=self.sampler.generator,
                                 pin_memory=device.type == "cuda")
        self.num_files = len(dataset)
        optimizer = build_optimizer(model, s.lr, s.weight_decay)
        scheduler = CosineLRScheduler(optimizer, t_initial=s.steps, lr_min=s.lr / 10, warmup_t=s.warmup_steps,
                                      warmup_lr_init=s.lr / 100, t_in_epochs=False)
        autocast = torch.bfloat16 if device.type == "cuda" else None
        self.engine = PlainEngine(model, optimizer, scheduler, autocast=autocast)
        self.usage, self.window, self.bad_files = CodeUsage(self.config.num_codes, s.usage_window), _Window(), set()

    def info(self) -> dict:
        s = self.settings
        return {"job": "train-tokenizer", **asdict(s), "teacher_class": type(self.teacher).__name__,
                "teacher_dim": self.teacher.dim, "config": self.config.to_dict()}

    def resume(self) -> int:
        meta, state = self.load_state(self.settings.allow_pickle, self.settings.resume)
        if meta is None:
            # A fresh run's log, not appended to a previous one's in the same folder.
            (Path(self.output) / "metrics.jsonl").unlink(missing_ok=True)
            return 0
        self.sampler.load_state_dict(state["sampler"])
        self.usage.counts.extend(state["usage"])
        self.window = _Window(**state["window"])
        self.bad_files = set(state["bad_files"])
        return int(meta["step"])

    def batches(self) -> Iterator[Tensor]:
        """Cycle over the data forever, warning once per undecodable file."""
        while True:
            self.sampler.start_epoch()
            for images, bad in self.loader:
                self.sampler.consumed(1)
                for path in bad:
                    if path not in self.bad_files:
                        self.bad_files.add(path)
                        warnings.warn(f"skipping undecodable image {path}")
                if len(self.bad_files) == self.num_files:
                    raise ValueError(f"--images {self.settings.images}: none of its {self.num_files} images could be "
                                     f"decoded")
                if images is not None:
                    yield images

    def step(self, images: Tensor) -> Optional[VQKDOutput]:
        """One update; None when the loss was not finite (the step is skipped)."""
        with self.engine.autocast():
            target = self.teacher(images)  # (B, N, teacher_dim)
        out = self.engine(images, target)
        if not torch.isfinite(out.loss):
            self.engine.zero_grad()
            return None
        self.engine.backward(out.loss)
        self.engine.step()
        return out

    def save(self, step: int) -> None:
        state = {"sampler": self.sampler.state_dict(), "usage": list(self.usage.counts),
                 "window": asdict(self.window), "bad_files": sorted(self.bad_files)}
        self.save_state(step, state, self.identity())
        save_trained(self.engine.module, self.output)

    def loop(self, step: int) -> None:
        """Steps until ``steps``, or until ``stop_after_steps`` more or a SIGTERM/SIGINT: then a
        checkpoint is written and the run returns, to be resumed with ``--resume auto``."""
        s, first = self.settings, step
        self.logger.start_at(step)
        batches = self.batches()
        throughput = Throughput(self.dist.device, 1)
        stop = StopRequested().install()
        try:
            while step < s.steps:
                images = next(batches).to(self.dist.device, non_blocking=True)
                out = self.step(images)
                if out is None:
                    self.non_finite.skipped(step + 1)
                    continue
                self.non_finite.finite()
                step += 1
                n = images.shape[0]
                throughput.add(n, n * (1 + self.config.num_patches), vqkd_flops(self.config, n))  # CLS + patches
                self.usage.update(out.indices)
                self.window.add(out)
                self.logger.advance()
                if step == 1 or step % s.log_every == 0 or step == s.steps:  # step 1: the untrained model
                    self.logger.log(step, {**_window_metrics(self.window, self.usage, self.engine.get_lr()[0]),
                                           **throughput.figures(), "skipped_steps": self.non_finite.total})
                    self.window = _Window()
                leave = stop.signal is not None or (s.stop_after_steps is not None and step - first >= s.stop_after_steps)
                if (s.save_every and step % s.save_every == 0) or step == s.steps or leave:
                    self.save(step)
                if leave:
                    self.logger.write(f"stopped at step {step}; checkpoint written (continue with --resume auto)")
                    break
        finally:
            stop.restore()
            self.step_reached, self.stopped_by = step, stop.signal

    def train(self) -> Path:
        def body() -> Path:
            self.build()
            step = self.resume()
            self.write_run_config(self.info())  # only now: every check on the folder and the checkpoint passed
            self.loop(step)
            return Path(self.output) / WEIGHTS_NAME
        path = self.run(body)
        if self.bad_files:
            warnings.warn(f"skipped {len(self.bad_files)} undecodable image(s) under {self.settings.images}")
        return path


def train_tokenizer(images_source: str | os.PathLike, config: VQKDConfig, teacher: Teacher, steps: int,
                    batch_size: int = 64, lr: float = 1e-3, output_dir: str | os.PathLike = "runs/tokenizer",
                    seed: int = 0, log_every: int = 10, *, weight_decay: float = 1e-4,
                    warmup_steps: int | None = None, min_crop_scale: float = 0.08, num_workers: int = 0,
                    usage_window: int = 50, save_every: int = 0, device: str | torch.device | None = None,
                    resume: str | None = None, max_bad_steps: int = 5, allow_pickle: bool = False,
                    tensorboard: bool = True, stop_after_steps: int | None = None, overwrite: bool = False,
                    report_to: str = "") -> Path:
    """Train a VQKD for ``steps`` updates against ``teacher``; returns the saved weights file.

    Cosine learning-rate decay to lr/10 after a linear warm-up (default: 5% of the steps).
    ``usage_window``: batches over which ``codebook/usage`` and ``codebook/perplexity`` are counted.
    ``save_every`` > 0 also checkpoints (and writes the weights) every that many steps;
    ``resume="auto"`` continues from the newest checkpoint in ``output_dir``; a folder holding another
    run is refused unless ``overwrite`` (its files are moved aside first). ``report_to``: as
    ``--report-to`` (``beit3.trainer.trackers``)."""
    _check_compatible(config, teacher)
    settings = TokenizerTrainConfig(
        images=str(images_source), output=str(output_dir), steps=steps, teacher=type(teacher).__name__,
        batch_size=batch_size, lr=lr, weight_decay=weight_decay, warmup_steps=warmup_steps,
        min_crop_scale=min_crop_scale, num_workers=num_workers, usage_window=usage_window, log_every=log_every,
        save_every=save_every, resume=resume, max_bad_steps=max_bad_steps, allow_pickle=allow_pickle,
        tensorboard=tensorboard, seed=seed, device=None if device is None else str(device),
        stop_after_steps=stop_after_steps, overwrite=overwrite, report_to=report_to)
    settings.check()
    return TokenizerRun(settings, config, teacher).train()


def tokenizer_run(settings: TokenizerTrainConfig) -> TokenizerRun:
    """The run of checked ``settings`` (``beit3 train-tokenizer``): the teacher built, the VQ-KD
    sized to its features."""
    preset = VQKDConfig.from_preset(settings.preset)
    teacher = build_teacher(settings.teacher, settings.teacher_weights, grid=preset.grid_size,
                            img_size=preset.img_size)
    config = VQKDConfig.from_preset(settings.preset, teacher_dim=teacher.dim)
    _check_compatible(config, teacher)
    return TokenizerRun(settings, config, teacher)


def read_metrics(run_dir: str | os.PathLike) -> list[dict]:
    """The ``metrics.jsonl`` lines of a run, in order."""
    with open(Path(run_dir) / "metrics.jsonl") as f:
        return [json.loads(line) for line in f if line.strip()]
