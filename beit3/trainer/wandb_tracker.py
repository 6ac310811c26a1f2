"""A run's Weights & Biases run (``--report-to wandb``).

``wandb.init`` in the run folder (its files under ``<output>/wandb/``, or ``WANDB_DIR``), in the
project ``WANDB_PROJECT`` (default ``beit3``), named after the output folder (``WANDB_NAME`` to
rename), of job type ``pretrain``, a fine-tuning task or ``vq-kd``. ``WANDB_MODE=offline`` keeps
everything on disk for a later ``wandb sync``; ``WANDB_API_KEY``, ``WANDB_ENTITY`` and the rest of
wandb's variables apply as usual. ``run.log`` is attached to the run as a live file, and wandb's own
capture of the console is off (``WANDB_CONSOLE`` to turn it on): run.log already holds it.
"""
from __future__ import annotations

import os
from typing import Optional


class WandbTracker:
    name = "wandb"
    note: Optional[str] = None

    def __init__(self, info, previous: Optional[dict]):
        """``info``: the run's ``trackers.RunInfo``; ``previous``: what trackers.json holds of the wandb
        run to continue (resuming), continued when it is in the same project."""
        import wandb  # optional: the trackers extra; check_available ran before any work

        project = os.environ.get("WANDB_PROJECT", "beit3")
        run_id = (previous or {}).get("run_id") if (previous or {}).get("project") == project else None
        settings = wandb.Settings(console=os.environ.get("WANDB_CONSOLE", "off"))
        self.run = wandb.init(
            project=project, name=os.environ.get("WANDB_NAME", info.name),
            dir=None if os.environ.get("WANDB_DIR") else info.folder, id=run_id,
            resume="allow" if run_id else None, job_type=info.job, config={"output": os.path.abspath(info.folder)},
            reinit="create_new", settings=settings)
        self.run.save(os.path.join(info.folder, "run.log"), base_path=info.folder, policy="live")
        if run_id:
            self.note = f"wandb: continuing run {run_id}"

    def ids(self) -> dict:
        return {"run_id": self.run.id, "project": self.run.project}

    def log_config(self, config: dict) -> None:
        # A resumed run may change what a resume allows (--stop-after-steps, --log-every): the latest wins.
        self.run.config.update(config, allow_val_change=True)

    def log(self, step: int, scalars: dict[str, float]) -> None:
        self.run.log(scalars, step=step)

    def finish(self, failed: bool) -> None:
        self.run.finish(exit_code=1 if failed else 0)
