"""The run machinery every training job shares: one ``Trainer`` (torchtitan's split: the job brings
its model, its step and its data; the trainer owns the rest).

The jobs: ``PretrainRun`` (train/loop.py), ``FinetuneRun`` (finetune/trainer.py) and
``TokenizerRun`` (tokenizer/train.py, in one process: ``open_run(single_process=True)``). Their
engines share DeepSpeed's interface: DeepSpeed's own, or ``plain_engine.PlainEngine`` for a
plain-PyTorch job (the tokenizer; the benchmark's baseline, whose timed step is the same
forward/backward/step through either engine).

What a job supplies: ``build`` (model, engine, data, after ``open_run``), ``check_resume`` (what
identifies a run, compared with the checkpoint before anything is built), the loop over its steps,
and what its checkpoints hold. What the Trainer owns, the same in every job:

- the run folder: distributed setup, the folder's lock, the refusal of a folder holding another
  run unless it is resumed or replaced (``--overwrite``: moved aside), the metrics logger
  (``metrics.jsonl``, the ``--report-to`` trackers: ``tensorboard/``, wandb, MLflow; ``run.log``; a
  progress bar that starts at the resumed step), ``run_config.json`` with the git commit, all
  released by ``run`` whatever happens;
- checkpoints: ``checkpoints/step_XXXXXXXX`` through ``beit3.trainer.checkpoint`` (atomic, verified);
- seeding, the compute dtype of the DeepSpeed config, moving batches to the device;
- logging means over the window's micro-batches and over the ranks;
- one policy for non-finite steps (``NonFiniteSteps``, ``--max-bad-steps``).
"""
from __future__ import annotations

import os
import random
import signal
from typing import Callable, Optional

import numpy as np
import torch

from beit3.core.errors import first_line
from beit3.trainer.checkpoint import latest_checkpoint, load_checkpoint, save_checkpoint
from beit3.trainer.distributed import DistInfo, finish_distributed, init_distributed
from beit3.trainer.ds_config import precision
from beit3.trainer.metrics_log import MetricsLogger
from beit3.trainer.run_dir import check_run_folder, lock_output, move_aside, on_every_rank, write_run_config
from beit3.trainer.run_log import git_commit, session_header
from beit3.trainer.trackers import RunInfo, check_available, requested


class NonFiniteLossError(RuntimeError):
    pass


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def to_device(batch: dict, device: torch.device, dtype: torch.dtype) -> dict:
    """Move a (nested) batch to ``device``; images (floating tensors under keys ``image*``) to the
    engine's dtype. Everything else keeps its dtype: ids, masks, and fp32 labels and soft targets
    (VQA scores, mixup targets) whose precision the loss needs."""
    out = {}
    for k, v in batch.items():
        if isinstance(v, dict):
            out[k] = to_device(v, device, dtype)
        elif isinstance(v, torch.Tensor):
            v = v.to(device, non_blocking=True)
            out[k] = v.to(dtype) if k.startswith("image") and v.is_floating_point() else v
        else:
            out[k] = v
    return out


def compute_dtype(ds_config: dict) -> torch.dtype:
    """The dtype a DeepSpeed config trains in (inputs are cast to it)."""
    return {"bf16": torch.bfloat16, "fp16": torch.float16}.get(precision(ds_config), torch.float32)


class StopRequested:
    """SIGTERM/SIGINT set a flag; the loop checkpoints at the next step boundary and exits."""

    def __init__(self):
        self.signal: Optional[int] = None
        self._old = {}

    def install(self) -> "StopRequested":
        for sig in (signal.SIGTERM, signal.SIGINT):
            self._old[sig] = signal.signal(sig, self._handle)
        return self

    def _handle(self, signum, frame) -> None:
        self.signal = signum

    def restore(self) -> None:
        for sig, old in self._old.items():
            signal.signal(sig, old)


class NonFiniteSteps:
    """The one policy for a step whose loss or gradient is not finite, in every job: the step is
    skipped (no optimizer update), logged and counted (``skipped_steps`` in the metrics), and
    ``limit`` of them in a row stop the run with ``NonFiniteLossError`` naming the last complete
    checkpoint. ``--max-bad-steps 1`` stops at the first."""

    def __init__(self, limit: int, ckpt_dir: str, log: Callable[[str], None]):
        if limit < 1:
            raise ValueError(f"--max-bad-steps must be >= 1, got {limit}")
        self.limit, self.ckpt_dir, self.log = limit, ckpt_dir, log
        self.in_a_row = self.total = 0

    def skipped(self, step: int, what: str = "loss") -> None:
        """Step ``step`` had a non-finite ``what`` on some rank (every rank calls this together)."""
        self.in_a_row += 1
        self.total += 1
        self.log(f"step {step}: non-finite {what}; step skipped ({self.in_a_row} in a row)")
        if self.in_a_row >= self.limit:
            raise NonFiniteLossError(
                f"{self.in_a_row} non-finite steps in a row (limit --max-bad-steps {self.limit}); stopping; lower "
                f"--lr or check the data. Last complete checkpoint: {latest_checkpoint(self.ckpt_dir)}")

    def finite(self) -> None:
        self.in_a_row = 0


class Trainer:
    """Base of every training job (see the module docstring). Subclasses set ``self.engine`` in
    ``build`` and call ``open_run`` first thing there."""

    dist: DistInfo
    logger: Optional[MetricsLogger] = None
    lock = None
    engine = None
    keep_last: int = 1

    def open_run(self, output: str, device: str, dist_timeout: float, total_steps: int, *,
                 resume: Optional[str] = None, overwrite: bool = False, tensorboard: bool = True,
                 report_to: Optional[str] = None, desc: str = "train", max_bad_steps: int = 5,
                 keep_last: int = 1, single_process: bool = False) -> None:
        """Join the process group, lock ``output``, check that a run it holds is resumed (``resume``)
        or replaced (``overwrite``: moved aside), verify the checkpoint to resume from (the job's
        ``check_resume``), open the logger and start the trackers of ``report_to`` (``tensorboard``:
        ``--tensorboard``, see ``trackers.requested``): all before a model exists. ``single_process``:
        the job runs in this process alone (``DistInfo.single``), joining no group and waiting for no
        other rank, even when this process is one rank of a larger job."""
        self.output, self.keep_last = output, keep_last
        trackers = requested(report_to, tensorboard)
        self.dist = DistInfo.single(device) if single_process else init_distributed(dist_timeout, device)
        on_every_rank(self.dist, lambda: check_available(trackers) if self.dist.is_main else None)
        self.lock = lock_output(output, self.dist)
        held = on_every_rank(self.dist, lambda: check_run_folder(output, resume, overwrite))
        self.resume_path, self.resume_meta = self.check_resume()
        # The bar starts at the resumed step once it is loaded (MetricsLogger.start_at).
        self.logger = MetricsLogger(output, self.dist.is_main, total_steps, desc=desc, trackers=trackers)
        self.non_finite = NonFiniteSteps(max_bad_steps, self.ckpt_dir, self.logger.write)
        moved = None
        if overwrite and held:
            moved = on_every_rank(self.dist, lambda: move_aside(output) if self.dist.is_main else None)
        # The folder is this run's now: run.log, and the wandb and MLflow runs (one that cannot start
        # stops every rank here, before the model is built).
        on_every_rank(self.dist, lambda: self.logger.open_session(
            session_header(self.dist.world_size, self.dist.device), RunInfo(output, desc, resume is not None))
            if self.dist.is_main else None)
        if moved:
            self.logger.write(f"--overwrite: moved the run that was in {output} ({', '.join(held)}) into {moved}; "
                              f"delete it once it is no longer needed")

    def check_resume(self) -> tuple[Optional[str], Optional[dict]]:
        return None, None

    def close_run(self, failed: bool = False) -> None:
        if self.logger is not None:
            self.logger.close(failed)
        if self.lock is not None:
            self.lock.release()

    def run(self, body: Callable[[], object]):
        """``body()`` with the run folder released whatever happens (the trackers' runs marked failed
        and run.log told why when it raised); on success the ranks finish together
        (``finish_distributed``)."""
        self.lock = self.logger = None
        failed = True
        try:
            result = body()
            failed = False
        except BaseException as e:
            if self.logger is not None:
                self.logger.note(f"stopped: {type(e).__name__}: {first_line(e)}")
            raise
        finally:
            self.close_run(failed)
        finish_distributed(self.dist)
        return result

    @property
    def ckpt_dir(self) -> str:
        return os.path.join(self.output, "checkpoints")

    def save_state(self, step: int, state: dict, meta: dict) -> str:
        """A resumable checkpoint: the engine's states, this rank's ``state``, the run's ``meta``."""
        meta = {**meta, "world_size": self.dist.world_size}
        return save_checkpoint(self.engine, self.ckpt_dir, step, self.dist, state, meta, keep_last=self.keep_last)

    def load_state(self, allow_pickle: bool, resume: Optional[str],
                   tag_dir: Optional[str] = None) -> tuple[Optional[dict], Optional[dict]]:
        """(meta, this rank's state) of the checkpoint ``check_resume`` chose, loaded into the engine
        (from ``tag_dir``, its universal form, when the world size changed); (None, None) for a fresh
        start."""
        path = self.resume_path
        if path is None:
            if resume == "auto":
                self.logger.write(f"--resume auto: no complete checkpoint in {self.ckpt_dir}; starting fresh")
            return None, None
        meta, state = on_every_rank(self.dist, lambda: load_checkpoint(self.engine, path, self.dist.rank,
                                                                         allow_pickle, tag_dir))
        self.logger.write(f"resumed from {path} at step {meta['step']}")
        return meta, state

    def write_run_config(self, info: dict) -> None:
        """``run_config.json`` (rank 0): the job's ``info`` plus world size, git commit and torch; the
        same settings go to the trackers as their run's config."""
        if self.dist.is_main:
            config = {**info, "world_size": self.dist.world_size, "git_commit": git_commit(),
                      "torch": torch.__version__}
            write_run_config(self.output, config)
            self.logger.log_config(config)

    def mean_over_ranks(self, logs: list[dict]) -> dict[str, float]:
        """Each value's mean over the window's micro-batches (those that have it) and over the ranks:
        the value of the steps' global batches, not rank 0's share of them."""
        keys = sorted({k for m in logs for k in m})
        if not keys:
            return {}
        nan = torch.tensor(float("nan"))
        stacked = torch.stack([torch.stack([torch.as_tensor(m.get(k, nan)).float().detach().cpu() for k in keys])
                               for m in logs])
        mean = torch.nanmean(stacked, dim=0)
        if torch.distributed.is_initialized() and self.dist.world_size > 1:  # same keys, same steps on every rank
            mean = mean.to(self.dist.device)
            torch.distributed.all_reduce(mean)
            mean = mean.cpu() / self.dist.world_size
        return dict(zip(keys, mean.tolist()))
