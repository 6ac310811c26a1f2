"""Training metrics: tensorboard scalars, ``metrics.jsonl`` (one JSON object per logged step) and a
progress bar with ETA, all on rank 0 only."""
from __future__ import annotations

import json
import math
import os
from typing import Optional

from tqdm import tqdm


class MetricsLogger:
    def __init__(self, output_dir: str, enabled: bool, total_steps: int, start_step: int = 0,
                 tensorboard: bool = True, desc: str = "train"):
        self.enabled = enabled
        self.writer = None
        self.bar: Optional[tqdm] = None
        if not enabled:
            return
        os.makedirs(output_dir, exist_ok=True)
        self.jsonl = open(os.path.join(output_dir, "metrics.jsonl"), "a", buffering=1)
        if tensorboard:
            from torch.utils.tensorboard import SummaryWriter
            self.writer = SummaryWriter(os.path.join(output_dir, "tensorboard"))
        self.bar = tqdm(total=total_steps, initial=start_step, desc=desc, dynamic_ncols=True,
                        mininterval=1.0)

    def advance(self, n: int = 1) -> None:
        if self.bar is not None:
            self.bar.update(n)

    def log(self, step: int, metrics: dict) -> None:
        if not self.enabled:
            return
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
        self.jsonl.close()
