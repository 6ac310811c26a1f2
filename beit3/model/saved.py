"""The saved-model folder: one folder holds everything needed to use a model; this module writes
it and reads its config.json (``beit3.model.pretrained`` builds the model back).

    model.save_pretrained("my_vqa", tokenizer="beit3.spm", labels=answers)
    model = beit3.from_pretrained("my_vqa")        # the same class, config and weights
    predictor = beit3.load_predictor("my_vqa")     # + image transform and tokenizer (beit3.cli.predict)

The folder (every path in it relative, so it can be copied or moved):

    config.json        format, task, model config, head arguments, image preprocessing (size, mean,
                       std, interpolation, resize/crop), labels (VQA answers, class names) and
                       inference settings (text length, beams), and the names of the files beside it
    model.safetensors  the weights: a task model's backbone under ``beit3.``, its head under its names
    tokenizer.model    the SentencePiece model, copied in

A fine-tuning run's ``best/`` is such a folder, plus ``meta.json`` (the run's step, metric and file
sizes). A ``best/`` written before config.json existed (meta.json only) still loads: its tokenizer
is the path meta.json recorded, and it carries no labels.
"""
from __future__ import annotations

import json
import os
import shutil
from dataclasses import dataclass
from typing import Optional, Sequence

from safetensors.torch import save_file
from torch import nn

from beit3.core.errors import BadFileError
from beit3.core.files import check_output_dir, commit_dir, file_sizes, is_write_error, read_json, staging_dir, write_error
from beit3.data.transforms import cls_preprocess, vl_preprocess
from beit3.model.config import BEiT3Config

FORMAT = "beit3"
FORMAT_VERSION = 1
CONFIG_FILE = "config.json"
WEIGHTS_FILE = "model.safetensors"
TOKENIZER_FILE = "tokenizer.model"
LEGACY_META = "meta.json"  # a fine-tuning run's best/ before config.json


def default_preprocess(task: Optional[str], img_size: int) -> dict:
    return cls_preprocess(img_size) if task == "classification" else vl_preprocess(img_size)


def saved_config(model: nn.Module, preprocess: Optional[dict] = None, labels: Optional[Sequence[str]] = None,
                 inference: Optional[dict] = None, tokenizer: bool = False) -> dict:
    """config.json of ``model`` (a ``BEiT3`` or a task model)."""
    task = getattr(model, "task", "") or None
    cfg: BEiT3Config = model.cfg
    head_args = dict(getattr(model, "head_args", {}) or {})
    n_out = head_args.get({"vqa": "num_answers", "classification": "num_classes"}.get(task, ""))
    if labels is not None and n_out is not None and len(labels) != n_out:
        raise ValueError(f"{len(labels)} labels for a head of {n_out} outputs")
    return {"format": FORMAT, "format_version": FORMAT_VERSION, "task": task,
            "model": cfg.to_dict(), "head_args": head_args,
            "weights": WEIGHTS_FILE, "tokenizer": TOKENIZER_FILE if tokenizer else None,
            "preprocess": preprocess or default_preprocess(task, cfg.img_size),
            "labels": list(labels) if labels is not None else None,
            "inference": inference or {"max_text_len": cfg.max_text_len}}


def write_files(directory: str, state_dict: dict, config: Optional[dict] = None,
                tokenizer: Optional[str] = None) -> None:
    """The folder's files (those given), into an existing (staging) ``directory``."""
    save_file({k: v.detach().cpu().contiguous() for k, v in state_dict.items()}, os.path.join(directory, WEIGHTS_FILE))
    if tokenizer is not None:
        shutil.copyfile(tokenizer, os.path.join(directory, TOKENIZER_FILE))
    if config is not None:
        with open(os.path.join(directory, CONFIG_FILE), "w") as f:
            json.dump(config, f, indent=1)


def save_pretrained(model: nn.Module, directory: str, tokenizer: Optional[str] = None,
                    preprocess: Optional[dict] = None, labels: Optional[Sequence[str]] = None,
                    inference: Optional[dict] = None) -> str:
    """Write ``model`` as a self-contained folder, replacing ``directory`` as a whole (a kill leaves
    the previous copy). What a model loaded by ``from_pretrained`` came with (tokenizer,
    preprocessing, labels) is kept unless given anew. Returns ``directory``."""
    came_with = getattr(model, "pretrained", None)
    if came_with is not None:
        tokenizer = tokenizer or came_with.path("tokenizer")
        preprocess = preprocess or came_with.config.get("preprocess")
        labels = labels if labels is not None else came_with.config.get("labels")
        inference = inference or came_with.config.get("inference")
    if tokenizer is not None and not os.path.isfile(tokenizer):
        raise BadFileError(tokenizer, "no such SentencePiece model file (tokenizer=)")
    config = saved_config(model, preprocess, labels, inference, tokenizer is not None)
    check_output_dir(directory, "directory")
    save_folder(directory, model.state_dict(), config, tokenizer)
    return directory


def save_folder(directory: str, state_dict: dict, config: Optional[dict] = None, tokenizer: Optional[str] = None,
                meta: Optional[dict] = None) -> None:
    """Write the folder's files into a staging copy and replace ``directory`` with it as a whole
    (``files.commit_dir``), so a kill at any moment leaves a complete copy. ``meta``: also a
    ``meta.json`` (a fine-tuning run's record), written last with every other file's size. A failed
    write (a full disk) raises ``OutputError``; the previous copy is kept."""
    tmp = staging_dir(directory)
    try:
        write_files(tmp, state_dict, config, tokenizer)
        if meta is not None:
            meta = {**meta, "files": file_sizes(tmp)}  # before meta.json exists: it lists the others
            with open(os.path.join(tmp, LEGACY_META), "w") as f:
                json.dump(meta, f, indent=1, default=str)
    except Exception as e:
        shutil.rmtree(tmp, ignore_errors=True)
        if is_write_error(e):
            raise write_error(directory, e, kept=os.path.isdir(directory)) from e
        raise
    commit_dir(directory)



@dataclass
class Pretrained:
    """What a saved folder holds: the model (eval mode) and its config.json."""
    model: nn.Module
    config: dict
    directory: str

    @property
    def task(self) -> Optional[str]:
        return self.config.get("task")

    def path(self, key: str) -> Optional[str]:
        """The file that config entry ``key`` names, resolved against the folder (None: none)."""
        name = self.config.get(key)
        return None if name is None else os.path.join(self.directory, name)


def read_config(directory: str) -> dict:
    if not os.path.isdir(directory):
        raise BadFileError(directory, "not a saved model folder (expected config.json and model.safetensors)")
    path = os.path.join(directory, CONFIG_FILE)
    if os.path.isfile(path):
        config = read_json(path)
        if config.get("format") != FORMAT:
            raise BadFileError(path, f"not a beit3 saved model (format {config.get('format')!r}; a timm "
                                     f"export loads with timm.create_model('local-dir:...'))")
        for key, kind in (("model", dict), ("head_args", (dict, type(None)))):
            if not isinstance(config.get(key), kind):
                what = "no" if config.get(key) is None else f"a {type(config.get(key)).__name__} as"
                raise BadFileError(path, f"has {what} '{key}' entry; expected a JSON object "
                                         f"(save_pretrained writes it)")
        return config
    if os.path.isfile(os.path.join(directory, LEGACY_META)):
        return _from_legacy_meta(read_json(os.path.join(directory, LEGACY_META)))
    raise BadFileError(directory, f"not a saved model folder: no {CONFIG_FILE}")


def _from_legacy_meta(meta: dict) -> dict:
    """config.json's content from an older best/meta.json (absolute tokenizer path, no labels)."""
    ft = meta.get("finetune") or {}
    model = BEiT3Config.from_dict(meta["model"])
    task = meta.get("task")
    preprocess = default_preprocess(task, model.img_size)
    if task == "classification":
        preprocess["crop_pct"] = ft.get("crop_pct", 1.0)
    inference = {k: ft[k] for k in ("max_text_len", "num_beams", "length_penalty") if k in ft}
    spm = meta.get("spm")
    return {"format": FORMAT, "format_version": 0, "task": task, "model": meta["model"],
            "head_args": meta.get("head_args") or {}, "weights": WEIGHTS_FILE,
            "tokenizer": os.path.abspath(spm) if spm else None,  # joined with an absolute path: itself
            "preprocess": preprocess, "labels": None, "inference": inference or {"max_text_len": model.max_text_len}}
