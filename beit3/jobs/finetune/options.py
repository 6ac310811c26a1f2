"""The fine-tuning run's settings besides its hyperparameters (``FinetuneConfig``): where its weights,
data and outputs are, how often it logs, saves and validates, on what device. ``beit3 finetune``
generates these flags beside the recipe's (``beit3.core.settings``); unlike the recipe's they are not kept
with the model."""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Optional

from beit3.core.settings import check_settings, setting as _f
from beit3.trainer.trackers import report_to_setting, tensorboard_setting

SYNTHETIC = "synthetic"


@dataclass
class RunOptions:
    init: Optional[str] = _f(None, "weights to start from: a run directory or checkpoint of ours, a state dict file, "
                             "or an official unilm/beit3 checkpoint (default: random init)")
    data: str = _f(SYNTHETIC, "data root holding the index files (beit3.data.downstream), or 'synthetic' (the "
                   "embedded world, built and cached)")
    spm: Optional[str] = _f(None, "SentencePiece model (default: the synthetic world's, or the --init run's)")
    output: Optional[str] = _f(None, "run directory (default runs/finetune-<task>)")
    ds_config: Optional[str] = _f(None, "DeepSpeed JSON (default: ds_configs/zero3_bf16.json on GPU, cpu_zero3.json "
                                  "on CPU)", flags=("--deepspeed",))
    grad_accum: Optional[int] = _f(None, "gradient accumulation steps (default: the DeepSpeed config's)", ge=1)
    resume: Optional[str] = _f(None, "'auto' (newest complete checkpoint in --output) or a path")
    overwrite: bool = _f(False, "replace the run already in --output (refused otherwise, unless --resume): its "
                         "files are first moved into <output>/replaced-<time>/")
    allow_pickle: bool = _f(False, "trust --init files and --resume checkpoints that need unpickling (unilm's "
                            "fine-tuned checkpoints pickle their argparse Namespace)")
    max_bad_fraction: float = _f(0.01, "share of the training images that may be missing or undecodable: each is "
                                 "named once and skipped; beyond it the run stops", ge=0, lt=1)
    vqa_annotations: Optional[str] = _f(None, "VQA v2 annotation JSON of the val questions: also report the "
                                        "official accuracy with answer normalisation")
    max_bad_steps: int = _f(5, "stop after this many non-finite steps in a row (each is skipped and counted)", ge=1)
    log_every: int = _f(10, "optimizer steps between logged lines", ge=1)
    save_every: int = _f(0, "optimizer steps between resumable checkpoints (0: at the end of every epoch only)",
                         ge=0)
    keep_last: int = _f(1, "checkpoints kept (0: all)", ge=0)
    stop_after_steps: Optional[int] = _f(None, "leave after this many steps of this run with a checkpoint "
                                         "(time-limited jobs; the schedule still spans the recipe's epochs or "
                                         "--max-steps; continue with --resume auto)", ge=1)
    eval_every: int = _f(1, "epochs between validations (and after the last step)", ge=1)
    num_workers: Optional[int] = _f(None, "data loader workers (default 0 on CPU, 6 on GPU)", ge=0)
    device: Optional[str] = _f(None, "default: cuda when available", choices=["cuda", "cpu"])
    dist_timeout: float = _f(1800.0, "seconds a collective may wait for a peer before failing", gt=0)
    tensorboard: bool = tensorboard_setting()
    report_to: str = report_to_setting()

    def __post_init__(self):
        check_settings(self)

    def resolved(self, task: str, device: str) -> "RunOptions":
        """A copy with the task- and device-dependent defaults filled in."""
        return dataclasses.replace(
            self, device=device, output=self.output or f"runs/finetune-{task}",
            num_workers=self.num_workers if self.num_workers is not None else (0 if device == "cpu" else 6))
