"""What every fine-tuning task provides (``Task``) and how its evaluation is described (``EvalPass``);
the tasks themselves are in ``tasks.py`` and ``segmentation_task.py``.

A task is used in three ways:

    model = task.build_model(model_cfg, train_set)
    loss, logs = task.train_step(model, batch, step)             # model: the module or a DeepSpeed engine
    metrics = task.metrics({name: rows for each task.eval_passes(dataset)}, dataset)

``eval_passes`` returns what to run over a split: a dataset view and a function from a batch to
per-sample rows (tensors); the evaluator gathers the rows of every rank before ``metrics``.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Optional

from torch import Tensor
from torch.utils.data import Dataset

from beit3.model.config import BEiT3Config
from beit3.data.text_tokenizer import TextTokenizer
from beit3.data.transforms import build_vl_transform, vl_preprocess
from beit3.model.heads import TaskModel
from beit3.jobs.finetune.recipes import FinetuneConfig

Rows = dict[str, Tensor]


@dataclass
class EvalPass:
    name: str
    dataset: Dataset
    run: Callable[[Any, dict], Rows]  # (model, batch on device) -> per-sample rows


def unwrap(model) -> TaskModel:
    """The task model inside a DeepSpeed engine (or the model itself)."""
    return getattr(model, "module", model)


class Task:
    name = ""
    main_metric = ""  # higher is better; selects the best checkpoint
    eval_split = "val"

    def __init__(self, cfg: FinetuneConfig, tokenizer: Optional[TextTokenizer] = None):
        self.cfg, self.tokenizer = cfg, tokenizer

    def transform(self, train: bool):
        c = self.cfg
        return build_vl_transform(c.img_size, train, randaug=c.randaug, hflip=c.hflip, scale=c.crop_scale)

    def preprocess(self) -> dict:
        """The eval transform as data (saved with the model; ``transforms.eval_transform`` rebuilds it)."""
        return vl_preprocess(self.cfg.img_size)

    def labels(self, train_set: Dataset) -> Optional[list[str]]:
        """What the head's outputs mean (answers, class names), saved with the model."""
        return None

    def inference(self) -> dict:
        """Settings a saved model needs to be used as it was evaluated."""
        return {"max_text_len": self.cfg.max_text_len}

    def dataset(self, root: str, split: str, train: bool) -> Dataset:
        raise NotImplementedError

    def build_model(self, model_cfg: BEiT3Config, train_set: Dataset) -> TaskModel:
        raise NotImplementedError

    def train_step(self, model, batch: dict, step: int) -> tuple[Tensor, dict]:
        raise NotImplementedError

    def eval_passes(self, dataset: Dataset) -> list[EvalPass]:
        raise NotImplementedError

    def metrics(self, rows: dict[str, Rows], dataset: Dataset, output_dir: Optional[str] = None) -> dict:
        raise NotImplementedError

    def report(self, metrics: dict) -> Optional[str]:
        """A text report ``beit3 evaluate`` prints below its table (a per-class table), if any."""
        return None
