"""The tokenizer trainer's settings: one dataclass whose fields are ``beit3 train-tokenizer``'s flags
(``beit3.flags``), with the checks that need no model."""
from __future__ import annotations

import os
from dataclasses import asdict, dataclass, field
from typing import Optional

from ..errors import UserError
from .vqkd import VQKD_PRESETS


class TokenizerConfigError(UserError, ValueError):
    pass


def _f(default, help: str = "", **meta):
    return field(default=default, metadata={"help": help, **meta})


@dataclass
class TokenizerTrainConfig:
    images: Optional[str] = _f(None, "directory of images (searched recursively); required")
    output: Optional[str] = _f(None, "run directory; required")
    steps: Optional[int] = _f(None, "optimizer steps; required")
    preset: str = _f("tiny", choices=sorted(VQKD_PRESETS))
    teacher: str = _f("hog", "hog | pixel | open_clip:<model> | a timm model name (the last two need "
                      "--teacher-weights)")
    teacher_weights: Optional[str] = _f(None, "local weights file of the teacher")
    batch_size: int = _f(64)
    lr: float = _f(1e-3, "peak learning rate (the tiny demo's default)")
    weight_decay: float = _f(1e-4)
    warmup_steps: Optional[int] = _f(None, "linear warm-up steps (default 5% of --steps)")
    min_crop_scale: Optional[float] = _f(None, "smallest random-resized-crop area (default 0.5 for tiny, 0.08 as "
                                         "beit2 otherwise)")
    num_workers: int = _f(0, "data loader workers (0: a resumed run repeats the crops exactly)")
    usage_window: int = _f(50, "batches over which codebook usage and perplexity are counted")
    log_every: int = _f(10)
    save_every: int = _f(0, "also write a resumable checkpoint (and the weights) every N steps (0: at the end only)")
    resume: Optional[str] = _f(None, "'auto' (the newest complete checkpoint in OUTPUT/checkpoints, if any) "
                               "or a checkpoint directory")
    overwrite: bool = _f(False, "replace the run already in --output (refused otherwise, unless --resume): its "
                         "files are first moved into <output>/replaced-<time>/")
    stop_after_steps: Optional[int] = _f(None, "checkpoint and stop after this many steps of this process "
                                         "(a time-limited job; continue with --resume auto)")
    max_bad_steps: int = _f(5, "non-finite steps in a row that stop the run (each one is skipped)")
    allow_pickle: bool = _f(False, "load checkpoint files that hold pickled objects (only files you trust)")
    tensorboard: bool = _f(True)
    seed: int = _f(0)
    device: Optional[str] = _f(None, "cpu | cuda (default: cuda when available)")

    def resolved(self) -> "TokenizerTrainConfig":
        """A copy with the preset-dependent defaults filled in."""
        c = TokenizerTrainConfig(**asdict(self))
        if c.min_crop_scale is None:
            c.min_crop_scale = 0.5 if c.preset == "tiny" else 0.08
        if c.warmup_steps is None and c.steps is not None:
            c.warmup_steps = max(1, c.steps // 20)
        return c

    def check(self) -> None:
        """Every check that needs no model, before the teacher is loaded and the steps run."""
        from ..files import check_output_dir
        from ..flags import check_at_least
        for name in ("images", "output", "steps"):
            if getattr(self, name) is None:
                raise TokenizerConfigError(f"--{name.replace('_', '-')} is required")
        check_at_least(self, 1, ("steps", "batch_size", "log_every", "max_bad_steps", "usage_window",
                                 "stop_after_steps"), TokenizerConfigError)
        check_at_least(self, 0, ("save_every", "num_workers"), TokenizerConfigError)
        if not self.lr > 0:
            raise TokenizerConfigError(f"--lr must be > 0, got {self.lr}")
        if self.min_crop_scale is not None and not 0 < self.min_crop_scale <= 1:
            raise TokenizerConfigError(f"--min-crop-scale must be in (0, 1], got {self.min_crop_scale}")
        if not os.path.isdir(self.images):
            raise TokenizerConfigError(f"--images {self.images}: image directory does not exist")
        if self.resume not in (None, "auto") and not os.path.isdir(self.resume):
            raise TokenizerConfigError(f"--resume {self.resume!r}: no such checkpoint directory")
        check_output_dir(self.output)
