"""Training metrics: tensorboard scalars, ``metrics.jsonl`` (one JSON object per logged step) and a
progress bar with ETA, all on rank 0 only.

The files are opened at the first logged step, not before: a run that stops while it is still
being checked (a refused resume, a folder in use) leaves the output folder as it found it."""
from __future__ import annotations

import json
import math
import os
from typing import Optional

from torch.utils.tensorboard import SummaryWriter
from tqdm import tqdm


class MetricsLogger:
    def __init__(self, output_dir: str, enabled: bool, total_steps: int,
                 tensorboard: bool = True, desc: str = "train"):
        self.enabled, self.output_dir, self.tensorboard = enabled, output_dir, tensorboard
        self.writer = None
        self.jsonl = None
        self.bar: Optional[tqdm] = None
        if not enabled:
            return
        bar = tqdm(total=total_steps, desc=desc, dynamic_ncols=True, mininterval=1.0)
        # TQDM_DISABLE=1 in the environment overrides disable=False: tqdm then returns a bar without
        # its clock and counters, which start_at would use. Such a run logs as one without a bar.
        self.bar = None if bar.disable else bar

    def start_at(self, step: int) -> None:
        """A resumed run's bar starts at its step, as tqdm's ``initial=``: the rate and the ETA count
        only the steps of this process."""
        if self.bar is not None:
            self.bar.initial = self.bar.n = self.bar.last_print_n = step
            self.bar.start_t = self.bar.last_print_t = self.bar._time()
            self.bar.refresh()

    def advance(self, n: int = 1) -> None:
        if self.bar is not None:
            self.bar.update(n)

    def _open(self) -> None:
        os.makedirs(self.output_dir, exist_ok=True)
        self.jsonl = open(os.path.join(self.output_dir, "metrics.jsonl"), "a", buffering=1)
        if self.tensorboard:
            self.writer = SummaryWriter(os.path.join(self.output_dir, "tensorboard"))

    def log(self, step: int, metrics: dict) -> None:
        if not self.enabled:
            return
        if self.jsonl is None:
            self._open()
        clean = {k: (float(v) if not isinstance(v, (int, str)) else v) for k, v in metrics.items()}
        self.jsonl.write(json.dumps({"step": step, **clean}) + "\n")
        if self.writer is not None:
            for k, v in clean.items():
                if isinstance(v, (int, float)) and math.isfinite(v):
                    self.writer.add_scalar(k, v, step)
        if self.bar is not None:
            short = {k.split("/")[-1] if k.startswith("loss/") else k: v for k, v in clean.items()
                     if k in ("loss", "loss/image", "loss/text", "loss/pair", "samples_per_s")}
            self.bar.set_postfix({k: f"{v:.3g}" for k, v in short.items()}, refresh=False)

    def write(self, msg: str) -> None:
        if self.enabled:
            (self.bar.write if self.bar is not None else print)(msg)

    def close(self) -> None:
        if not self.enabled:
            return
        if self.bar is not None:
            self.bar.close()
        if self.writer is not None:
            self.writer.close()
        if self.jsonl is not None:
            self.jsonl.close()
