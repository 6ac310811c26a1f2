"""Where a run's metrics go besides ``metrics.jsonl``: ``--report-to tensorboard,wandb,mlflow`` or ``none``.

Every tracker is written by rank 0 only and gets the scalars of ``metrics.jsonl`` at the same steps
(its finite numbers: strings and NaN stay in the file), the resolved settings (``run_config.json``'s
content) as its run's config, and the run's name (the output folder's) and folder. The ids of the
wandb and MLflow runs are kept in ``<output>/trackers.json``, so that ``--resume`` continues the same
tracker runs.

``--report-to`` names the whole list; without it, ``--tensorboard`` (the default) or
``--no-tensorboard`` decides, as before trackers existed. Both given and disagreeing is refused.

Failures: a tracker asked for but not importable is refused before any work (``check_request``);
one that cannot start stops the run before the model is built (``TrackerError``); one that fails
during the run is reported once and dropped (``Trackers``): the run goes on, and ``metrics.jsonl``
keeps every step.
"""
from __future__ import annotations

import importlib
import json
import os
from dataclasses import dataclass
from typing import Callable, Optional, Sequence

from beit3.core.errors import UserError, first_line
from beit3.core.files import atomic_write_bytes
from beit3.core.settings import setting
from beit3.trainer.mlflow_tracker import MlflowTracker
from beit3.trainer.wandb_tracker import WandbTracker

TRACKERS = ("tensorboard", "wandb", "mlflow")
# The libraries of the trackers that are optional extras (pip install 'beit3[trackers]').
LIBRARIES = {"wandb": "wandb", "mlflow": "mlflow"}
IDS_FILE = "trackers.json"  # <output>/trackers.json: the tracker runs' ids, for --resume


def tensorboard_setting():
    """Every job's ``--tensorboard/--no-tensorboard`` setting."""
    return setting(True, "also write tensorboard/ beside metrics.jsonl")


def report_to_setting():
    """Every job's ``--report-to`` setting."""
    return setting("", "where the metrics go besides metrics.jsonl: a comma list of tensorboard, wandb, mlflow, "
                   "or none (default: tensorboard; none with --no-tensorboard; docs/tracking.md)", metavar="LIST")


class TrackerError(UserError):
    """A tracker that cannot be used: misspelt, contradicted, not installed or not starting."""


@dataclass
class RunInfo:
    """What a tracker run is named after: the output folder (its name is the run's) and the job."""
    folder: str
    job: str
    resume: bool  # --resume was given: continue the tracker runs named in trackers.json

    @property
    def name(self) -> str:
        return os.path.basename(os.path.normpath(self.folder))


# -- which trackers -----------------------------------------------------------------------------
def parse_report_to(value: str) -> tuple[str, ...]:
    """``--report-to``'s comma list: tracker names (in order, once each), or () for ``none``."""
    names = [n.strip() for n in value.split(",")]
    choices = f"a comma list of {', '.join(TRACKERS)}, or none"
    unknown = [n for n in names if n not in (*TRACKERS, "none")]
    if unknown:
        raise TrackerError(f"--report-to {value!r}: unknown tracker {unknown[0]!r}; give {choices}")
    if "none" in names and len(names) > 1:
        raise TrackerError(f"--report-to {value!r}: 'none' with trackers; give {choices}")
    return () if names == ["none"] else tuple(dict.fromkeys(names))


def requested(report_to: Optional[str], tensorboard: bool = True,
              tensorboard_flag: Optional[bool] = None) -> tuple[str, ...]:
    """The trackers a run reports to. ``report_to`` not given (None or ""): tensorboard unless
    ``tensorboard`` is False (``--no-tensorboard``). Given, its list decides; ``--no-tensorboard``
    with tensorboard in it, or a ``--tensorboard`` given on the command line (``tensorboard_flag``)
    without it, is refused."""
    if not report_to:
        return ("tensorboard",) if tensorboard else ()
    names = parse_report_to(report_to)
    if not tensorboard and "tensorboard" in names:
        raise TrackerError(f"--no-tensorboard and --report-to {report_to} (which names tensorboard): give one")
    if tensorboard_flag and "tensorboard" not in names:
        raise TrackerError(f"--tensorboard and --report-to {report_to} (which does not name tensorboard): give one")
    return names


def check_available(names: Sequence[str]) -> None:
    """Each optional tracker's library imports; else TrackerError naming what to install."""
    for name in names:
        if name not in LIBRARIES:
            continue
        try:
            importlib.import_module(LIBRARIES[name])
        except Exception as e:  # not installed, or installed but broken (a mismatched dependency)
            raise TrackerError(f"--report-to {name}: cannot import {LIBRARIES[name]} ({first_line(e)}); install it "
                               f"with pip install {LIBRARIES[name]} (or pip install 'beit3[trackers]'), or leave "
                               f"{name} out of --report-to") from None


def is_main_process() -> bool:
    """Rank 0 of the launch, known from the launcher's environment before the process group exists."""
    return int(os.environ.get("RANK", os.environ.get("SLURM_PROCID", "0"))) == 0


def check_request(report_to: Optional[str], tensorboard: bool = True,
                  tensorboard_flag: Optional[bool] = None) -> tuple[str, ...]:
    """The command line's check, before any work: the trackers asked for, each importable on the
    rank that writes them (rank 0: only it reports)."""
    names = requested(report_to, tensorboard, tensorboard_flag)
    if is_main_process():
        check_available(names)
    return names


# -- the trackers of a run ----------------------------------------------------------------------
class TensorBoard:
    """``<output>/tensorboard/``: opened at the first logged step, like ``metrics.jsonl``."""
    name = "tensorboard"

    def __init__(self, folder: str):
        self.folder, self.writer = folder, None

    def log_config(self, config: dict) -> None:
        pass  # run_config.json beside it holds the settings

    def log(self, step: int, scalars: dict[str, float]) -> None:
        if self.writer is None:
            from torch.utils.tensorboard import SummaryWriter  # heavy: imports tensorboard, only runs that log
            self.writer = SummaryWriter(os.path.join(self.folder, "tensorboard"))
        for k, v in scalars.items():
            self.writer.add_scalar(k, v, step)

    def finish(self, failed: bool) -> None:
        if self.writer is not None:
            self.writer.close()


STARTED = {"wandb": WandbTracker, "mlflow": MlflowTracker}  # started with the run, not at the first step


def read_ids(folder: str) -> dict:
    try:
        with open(os.path.join(folder, IDS_FILE)) as f:
            ids = json.load(f)
    except (OSError, ValueError):
        return {}
    return ids if isinstance(ids, dict) else {}


class Trackers:
    """The trackers of one run (rank 0), called together; ``say`` reports a tracker's failure."""

    def __init__(self, names: Sequence[str], folder: str, say: Callable[[str], None]):
        self.names, self.folder, self.say = tuple(names), folder, say
        self.active: list = [TensorBoard(folder)] if "tensorboard" in self.names else []
        self.dropped: list = []

    def start(self, info: RunInfo) -> None:
        """Start (or, resuming, continue) the wandb and MLflow runs; TrackerError if one cannot."""
        known = read_ids(self.folder) if info.resume else {}
        ids = dict(known)
        for name in self.names:
            if name not in STARTED:
                continue
            try:
                tracker = STARTED[name](info, known.get(name))
            except Exception as e:  # whatever the library raised: the run has not started, nothing is lost
                raise TrackerError(f"--report-to {name}: could not start its run: {first_line(e)}") from None
            self.active.append(tracker)
            ids[name] = tracker.ids()
            if tracker.note:
                self.say(tracker.note)
        if ids != known:
            atomic_write_bytes(os.path.join(self.folder, IDS_FILE), json.dumps(ids, indent=1).encode())

    def _each(self, call: Callable[[object], None]) -> None:
        for tracker in list(self.active):
            try:
                call(tracker)
            except Exception as e:  # a tracker's outage must not end a run that has weeks to go
                self.active.remove(tracker)
                self.dropped.append(tracker)
                self.say(f"--report-to {tracker.name}: {type(e).__name__}: {first_line(e)}; no longer reporting "
                         f"to it, the run goes on (metrics.jsonl keeps every step)")

    def log_config(self, config: dict) -> None:
        self._each(lambda t: t.log_config(config))

    def log(self, step: int, scalars: dict[str, float]) -> None:
        self._each(lambda t: t.log(step, scalars))

    def finish(self, failed: bool) -> None:
        """End the trackers' runs; a dropped tracker's run, which misses steps, ends as failed if it can."""
        self._each(lambda t: t.finish(failed))
        for tracker in self.dropped:
            try:
                tracker.finish(True)
            except Exception:  # reported when it was dropped
                pass
        self.active, self.dropped = [], []
