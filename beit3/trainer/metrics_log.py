"""Training metrics: ``metrics.jsonl`` (one JSON object per logged step), the trackers of
``--report-to`` (``beit3.trainer.trackers``: tensorboard, wandb, MLflow) with the same scalars at
the same steps, ``run.log`` (``beit3.trainer.run_log``) and a progress bar with ETA, all on rank 0 only.

The files are opened at the first logged step, not before: a run that stops while it is still
being checked (a refused resume, a folder in use) leaves the output folder as it found it. The
Trainer opens run.log and starts wandb and MLflow once those checks have passed
(``open_session``)."""
from __future__ import annotations

import json
import math
import os
from typing import Optional, Sequence

from tqdm import tqdm

from beit3.trainer.run_log import RunLog
from beit3.trainer.trackers import RunInfo, Trackers


def tracked(metrics: dict) -> dict[str, float]:
    """The values trackers plot: finite numbers (strings and NaN stay in metrics.jsonl only)."""
    return {k: v for k, v in metrics.items()
            if isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)}


class MetricsLogger:
    def __init__(self, output_dir: str, enabled: bool, total_steps: int,
                 tensorboard: bool = True, desc: str = "train", trackers: Optional[Sequence[str]] = None):
        """``trackers``: the names ``--report-to`` resolved to (``trackers.requested``); None: tensorboard
        when ``tensorboard``, as before ``--report-to``."""
        self.enabled, self.output_dir, self.total_steps = enabled, output_dir, total_steps
        names = (("tensorboard",) if tensorboard else ()) if trackers is None else tuple(trackers)
        self.trackers = Trackers(names, output_dir, self.write)
        self.jsonl = None
        self.run_log: Optional[RunLog] = None
        self.bar: Optional[tqdm] = None
        if not enabled:
            return
        bar = tqdm(total=total_steps, desc=desc, dynamic_ncols=True, mininterval=1.0)
        # TQDM_DISABLE=1 in the environment overrides disable=False: tqdm then returns a bar without
        # its clock and counters, which start_at would use. Such a run logs as one without a bar.
        self.bar = None if bar.disable else bar

    def open_session(self, header: list[str], info: RunInfo) -> None:
        """Rank 0, once the run folder is the run's: append this session's ``header`` to run.log and
        start (or continue) the wandb and MLflow runs; ``trackers.TrackerError`` if one cannot start."""
        if not self.enabled:
            return
        self.run_log = RunLog(self.output_dir, header)
        self.trackers.start(info)

    def set_total(self, total_steps: int) -> None:
        """The schedule's length, once known (fine-tuning counts it from the data)."""
        self.total_steps = total_steps
        if self.bar is not None:
            self.bar.total = total_steps

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

    def log_config(self, config: dict) -> None:
        """The resolved settings (run_config.json's content), as each tracker's run config."""
        if self.enabled:
            self.trackers.log_config(config)

    def log(self, step: int, metrics: dict) -> None:
        if not self.enabled:
            return
        if self.jsonl is None:
            os.makedirs(self.output_dir, exist_ok=True)
            self.jsonl = open(os.path.join(self.output_dir, "metrics.jsonl"), "a", buffering=1)
        clean = {k: (float(v) if not isinstance(v, (int, str)) else v) for k, v in metrics.items()}
        self.jsonl.write(json.dumps({"step": step, **clean}) + "\n")
        self.trackers.log(step, tracked(clean))
        if self.run_log is not None:
            shown = ", ".join(f"{k} {v:.4g}" if isinstance(v, float) else f"{k} {v}" for k, v in clean.items())
            self.run_log.write(f"step {step}/{self.total_steps}: {shown}")
        if self.bar is not None:
            short = {k.split("/")[-1] if k.startswith("loss/") else k: v for k, v in clean.items()
                     if k in ("loss", "loss/image", "loss/text", "loss/pair", "samples_per_s")}
            self.bar.set_postfix({k: f"{v:.3g}" for k, v in short.items()}, refresh=False)

    def write(self, msg: str) -> None:
        """A line for the console (above the bar) and run.log."""
        if self.enabled:
            (self.bar.write if self.bar is not None else print)(msg)
            self.note(msg)

    def note(self, msg: str) -> None:
        """A line for run.log only (the reason a run stopped: the command prints it itself)."""
        if self.enabled and self.run_log is not None:
            self.run_log.write(msg)

    def close(self, failed: bool = False) -> None:
        if not self.enabled:
            return
        if self.bar is not None:
            self.bar.close()
        self.note(f"---- session ended{' on an error' if failed else ''}")
        self.trackers.finish(failed)  # after the last line: MLflow keeps run.log as it is now
        if self.jsonl is not None:
            self.jsonl.close()
        if self.run_log is not None:
            self.run_log.close()
