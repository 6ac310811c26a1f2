"""A run's MLflow run (``--report-to mlflow``).

The tracking store is ``MLFLOW_TRACKING_URI`` when set (a server, a database), else MLflow's local
file store in the run folder (``file:<output>/mlruns``; MLflow 3 keeps that store in maintenance
mode and wants ``MLFLOW_ALLOW_FILE_STORE=true`` for it, which beit3 sets for its own folder). The
experiment is ``MLFLOW_EXPERIMENT_NAME`` (default ``beit3``), the run is named after the output
folder and tagged with the folder and the job. Metrics keep their names (``loss/image``), but in a
file store, where they are file names, ``/`` becomes ``.`` (``loss.image``). The settings are the
run's parameters (flattened, ``args.lr``) and its ``run_config.json`` artifact; ``run.log`` is added
as an artifact when the run ends.
"""
from __future__ import annotations

import json
import os
import re
import time
from typing import Optional

MAX_PARAM = 6000  # MLflow's longest parameter value
BATCH = 100  # parameters per log_batch (MLflow's limit; 1000 for metrics)


def store_uri(folder: str) -> str:
    return os.environ.get("MLFLOW_TRACKING_URI") or "file:" + os.path.join(os.path.abspath(folder), "mlruns")


def metric_name(key: str, file_store: bool) -> str:
    """``key`` in the characters MLflow accepts in a metric's name (others become ``_``). The file
    store keeps a metric in a file named by its key, where ``loss`` and ``loss/image`` cannot both
    be: there a ``/`` becomes ``.`` (``loss.image``)."""
    key = re.sub(r"[^\w\-. :/]", "_", key)
    return key.replace("/", ".") if file_store else key


def flatten(config: dict, prefix: str = "") -> dict[str, str]:
    """Nested settings as MLflow parameters: ``{"args": {"lr": 0.1}}`` -> ``{"args.lr": "0.1"}``."""
    out = {}
    for k, v in config.items():
        if isinstance(v, dict) and v:
            out.update(flatten(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = (v if isinstance(v, str) else json.dumps(v, default=str))[:MAX_PARAM]
    return out


class MlflowTracker:
    name = "mlflow"
    note: Optional[str] = None

    def __init__(self, info, previous: Optional[dict]):
        """``info``: the run's ``trackers.RunInfo``; ``previous``: what trackers.json holds of the MLflow
        run to continue (resuming), continued when it is in the same tracking store."""
        if not os.environ.get("MLFLOW_TRACKING_URI"):
            os.environ.setdefault("MLFLOW_ALLOW_FILE_STORE", "true")  # the store in the run folder
        from mlflow.tracking import MlflowClient  # optional: the trackers extra

        self.info, self.uri = info, store_uri(info.folder)
        self.file_store = self.uri.startswith(("file:", "/", "."))  # a path is a file store too
        self.client = MlflowClient(tracking_uri=self.uri)
        previous = previous or {}
        if previous.get("run_id") and previous.get("tracking_uri") == self.uri:
            self.run_id = previous["run_id"]
            self.client.get_run(self.run_id)  # raises if the store no longer holds it
            self.client.update_run(self.run_id, status="RUNNING")
            self.note = f"mlflow: continuing run {self.run_id} in {self.uri}"
        else:
            name = os.environ.get("MLFLOW_EXPERIMENT_NAME", "beit3")
            experiment = self.client.get_experiment_by_name(name)
            experiment_id = experiment.experiment_id if experiment else self.client.create_experiment(name)
            run = self.client.create_run(experiment_id, run_name=info.name, tags={
                "beit3.output": os.path.abspath(info.folder), "beit3.job": info.job})
            self.run_id = run.info.run_id

    def ids(self) -> dict:
        return {"run_id": self.run_id, "tracking_uri": self.uri}

    def log_config(self, config: dict) -> None:
        from mlflow.entities import Param  # optional: the trackers extra
        # A parameter cannot change once logged: a resumed run adds the new ones, and the run_config.json
        # artifact holds the latest settings whole.
        have = self.client.get_run(self.run_id).data.params
        new = [Param(k[:250], v) for k, v in flatten(config).items() if k[:250] not in have]
        for i in range(0, len(new), BATCH):
            self.client.log_batch(self.run_id, params=new[i:i + BATCH])
        self.client.log_dict(self.run_id, json.loads(json.dumps(config, default=str)), "run_config.json")

    def log(self, step: int, scalars: dict[str, float]) -> None:
        from mlflow.entities import Metric  # optional: the trackers extra
        now = int(time.time() * 1000)
        self.client.log_batch(self.run_id, metrics=[Metric(metric_name(k, self.file_store), float(v), now, step)
                                                    for k, v in scalars.items()])

    def finish(self, failed: bool) -> None:
        log = os.path.join(self.info.folder, "run.log")
        if os.path.isfile(log):
            self.client.log_artifact(self.run_id, log)
        self.client.set_terminated(self.run_id, status="FAILED" if failed else "FINISHED")
