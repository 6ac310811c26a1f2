"""Saved models built back: ``from_pretrained`` and ``load_pretrained`` turn a saved folder
(``beit3.model.saved``) into its ``BEiT3`` or task model, its weights loaded without a random
initialisation first."""
from __future__ import annotations

import os
from typing import Callable, Mapping

import torch
from torch import Tensor, nn

from beit3.core.errors import BadFileError, first_line
from beit3.core.weight_files import load_safetensors
from beit3.model.beit3 import BEiT3
from beit3.model.config import BEiT3Config
from beit3.model.heads import CaptioningModel, ImageClassifier, NLVR2Model, RetrievalModel, VQAModel
from beit3.model.saved import CONFIG_FILE, WEIGHTS_FILE, Pretrained, read_config
from beit3.model.segmentation import SegmentationModel

TASK_MODELS: dict[str, type] = {cls.task: cls for cls in (VQAModel, RetrievalModel, CaptioningModel, ImageClassifier,
                                                         NLVR2Model, SegmentationModel)}


def build_loaded(make: Callable[[], nn.Module], sd: Mapping[str, Tensor]) -> nn.Module:
    """``make()`` built on the meta device, then given copies of ``sd`` (cast to its dtypes; every key
    required): no time spent on a random initialisation that would be overwritten."""
    with torch.device("meta"):
        module = make()
    ref = module.state_dict()
    module.load_state_dict({k: v.detach().to(dtype=ref[k].dtype if k in ref else v.dtype, copy=True)
                            for k, v in sd.items()}, strict=True, assign=True)
    return module


def load_pretrained(directory: str, device: str | torch.device = "cpu") -> Pretrained:
    """The model of a saved folder (or of a fine-tuning run: its ``best/``), in eval mode."""
    if os.path.isdir(os.path.join(directory, "best")) and not os.path.isfile(os.path.join(directory, WEIGHTS_FILE)):
        directory = os.path.join(directory, "best")
    config = read_config(directory)
    task = config.get("task")
    classes = TASK_MODELS
    if task is not None and task not in classes:
        raise BadFileError(os.path.join(directory, CONFIG_FILE), f"unknown task {task!r}")
    where = os.path.join(directory, CONFIG_FILE)
    try:
        cfg = BEiT3Config.from_dict(config["model"]).replace(drop_path_rate=0.0)
    except (ValueError, TypeError) as e:
        raise BadFileError(where, f"'model': {first_line(e)}") from None
    head_args = config.get("head_args") or {}
    make = (lambda: BEiT3(cfg)) if task is None else (lambda: classes[task](cfg, **head_args))
    weights = os.path.join(directory, config.get("weights", WEIGHTS_FILE))
    sd = _read_weights(weights)
    try:
        model = build_loaded(make, sd)
    except TypeError as e:  # head_args that the task's head does not take
        raise BadFileError(where, f"'head_args' {head_args}: {first_line(e)}") from None
    except RuntimeError as e:
        raise BadFileError(weights, f"does not fit the model of {CONFIG_FILE}: {str(e).splitlines()[0]}") from None
    model = model.to(device).eval()
    saved = Pretrained(model, config, os.path.abspath(directory))
    model.pretrained = saved  # what save_pretrained keeps when the model is saved again
    return saved


def _read_weights(path: str) -> dict:
    if not os.path.isfile(path):
        raise BadFileError(path, "the saved model's weights are missing")
    return load_safetensors(path)


def from_pretrained(directory: str, device: str | torch.device = "cpu") -> nn.Module:
    """The ``BEiT3`` or task model saved in ``directory`` by ``save_pretrained`` (or a fine-tuning
    run's ``best/``), in eval mode; ``model.pretrained`` holds its config and folder."""
    return load_pretrained(directory, device).model




__all__ = ["Pretrained", "build_loaded", "from_pretrained", "load_pretrained"]
