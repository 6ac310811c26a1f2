"""The tokenizer trainer's settings: one dataclass whose fields are ``beit3 train-tokenizer``'s flags
(``beit3.core.settings``), with the checks that need no model."""
from __future__ import annotations

import os
from dataclasses import asdict, dataclass
from typing import Optional

from beit3.core.errors import UserError
from beit3.core.files import check_output_dir
from beit3.core.settings import check_settings, setting as _f
from beit3.trainer.trackers import report_to_setting, tensorboard_setting
from beit3.vqkd.vqkd import VQKD_PRESETS


class TokenizerConfigError(UserError, ValueError):
    pass


@dataclass
class TokenizerTrainConfig:
    images: Optional[str] = _f(None, "directory of images (searched recursively); required")
    output: Optional[str] = _f(None, "run directory; required")
    steps: Optional[int] = _f(None, "optimizer steps; required", ge=1)
    preset: str = _f("tiny", choices=sorted(VQKD_PRESETS))
    teacher: str = _f("hog", "hog | pixel | open_clip:<model> | a timm model name (the last two need "
                      "--teacher-weights)")
    teacher_weights: Optional[str] = _f(None, "local weights file of the teacher")
    batch_size: int = _f(64, ge=1)
    lr: float = _f(1e-3, "peak learning rate (the tiny demo's default)", gt=0)
    weight_decay: float = _f(1e-4, ge=0)
    warmup_steps: Optional[int] = _f(None, "linear warm-up steps (default 5% of --steps)", ge=0)
    min_crop_scale: Optional[float] = _f(None, "smallest random-resized-crop area (default 0.5 for tiny, 0.08 as "
                                         "beit2 otherwise)", gt=0, le=1)
    num_workers: int = _f(0, "data loader workers (0: a resumed run repeats the crops exactly)", ge=0)
    usage_window: int = _f(50, "batches over which codebook usage and perplexity are counted", ge=1)
    log_every: int = _f(10, ge=1)
    save_every: int = _f(0, "also write a resumable checkpoint (and the weights) every N steps (0: at the end only)",
                        ge=0)
    resume: Optional[str] = _f(None, "'auto' (the newest complete checkpoint in OUTPUT/checkpoints, if any) "
                               "or a checkpoint directory")
    overwrite: bool = _f(False, "replace the run already in --output (refused otherwise, unless --resume): its "
                         "files are first moved into <output>/replaced-<time>/")
    stop_after_steps: Optional[int] = _f(None, "checkpoint and stop after this many steps of this process "
                                         "(a time-limited job; continue with --resume auto)", ge=1)
    max_bad_steps: int = _f(5, "non-finite steps in a row that stop the run (each one is skipped)", ge=1)
    allow_pickle: bool = _f(False, "load checkpoint files that hold pickled objects (only files you trust)")
    tensorboard: bool = tensorboard_setting()
    report_to: str = report_to_setting()
    seed: int = _f(0, ge=0, lt=2**32)
    device: Optional[str] = _f(None, "default: cuda when available", choices=["cuda", "cpu"])

    def __post_init__(self):
        check_settings(self, TokenizerConfigError)

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
        for name in ("images", "output", "steps"):
            if getattr(self, name) is None:
                raise TokenizerConfigError(f"--{name.replace('_', '-')} is required")
        if not os.path.isdir(self.images):
            raise TokenizerConfigError(f"--images {self.images}: image directory does not exist")
        if self.resume not in (None, "auto") and not os.path.isdir(self.resume):
            raise TokenizerConfigError(f"--resume {self.resume!r}: no such checkpoint directory")
        check_output_dir(self.output)
