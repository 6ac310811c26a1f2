"""Scoring a fine-tuned model on a split (``beit3 evaluate``): the model rebuilt from its weights
and its fine-tuning config, every rank evaluating a shard, the metrics and predictions written
into the output folder by rank 0.
"""
from __future__ import annotations

import json
import os
import sys
from dataclasses import dataclass
from typing import Optional

import torch

from beit3.core.errors import UserError, first_line
from beit3.core.files import atomic_write_bytes, recover_dir
from beit3.data.index_check import check_dataset
from beit3.data.text_tokenizer import TextTokenizer
from beit3.metrics.report import write_results_json
from beit3.metrics.vqa import write_vqa_submission
from beit3.trainer.distributed import finish_distributed, init_distributed
from beit3.trainer.ds_config import ConfigError
from beit3.trainer.run_dir import OutputLock, RunDirError
from beit3.jobs.finetune.init_weights import InitWeights, apply_init
from beit3.jobs.finetune.options import SYNTHETIC
from beit3.jobs.finetune.recipes import TEXTLESS_TASKS, FinetuneConfig, resolve_recipe
from beit3.jobs.finetune.run import cpu_flush_denormal, model_config, synthetic_data
from beit3.jobs.finetune.tasks import build_task
from beit3.jobs.finetune.validation import evaluate

DEFAULT_SPLIT = {"vqa": "val", "retrieval": "test", "captioning": "test", "classification": "val", "nlvr2": "test",
                 "segmentation": "val"}


class EvaluationError(UserError):
    """What stops an evaluation once it has started. ``status``: the command's exit status, 2 for
    a tokenizer that is missing or unreadable (a setting), 1 for the data or the model."""

    def __init__(self, message: str, status: int = 1):
        super().__init__(message)
        self.status = status


@dataclass
class EvalSettings:
    """An evaluation, every value checked and resolved (``beit3 evaluate``'s flags)."""
    init: InitWeights
    cfg: FinetuneConfig
    split: str
    data: str  # a data root with the index files, or SYNTHETIC
    output: str
    device: str  # cuda | cpu
    spm: Optional[str] = None  # default: the one recorded with the checkpoint, or the synthetic world's
    vqa_annotations: Optional[str] = None
    dtype: Optional[str] = None  # fp32 | bf16; default bf16 on GPU, fp32 on CPU
    num_workers: Optional[int] = None  # default 0 on CPU, 6 on GPU
    dist_timeout: float = 1800.0


@dataclass
class Evaluation:
    """What rank 0 wrote: ``results`` (also in ``results_json``) and the task's text report."""
    results: dict
    report: Optional[str]
    results_json: str


def config_for(meta: dict, task: Optional[str], recipe: Optional[str], flags: dict) -> FinetuneConfig:
    """The checkpoint's fine-tuning config (ours, from its ``meta``) or the recipe's, with ``flags``
    (the FinetuneConfig fields the command line set) on top."""
    if "finetune" in meta and recipe is None:
        saved = dict(meta["finetune"])
        if task is not None and saved["task"] != task:
            raise ConfigError(f"the checkpoint was fine-tuned for {saved['task']}, not --task {task}")
        # a field newer than the run (ban_special) too
        overrides = {k: v for k, v in flags.items() if k != "task" and v is not None}
        return FinetuneConfig(**{**saved, **overrides})
    if task is None and recipe is None:
        raise ConfigError("the checkpoint has no meta.json of ours: give --task (and --recipe for its settings)")
    return resolve_recipe(recipe, task, flags)


def build_model(task, cfg: FinetuneConfig, init: InitWeights, meta: dict, dataset, vocab_size: Optional[int]):
    mc = model_config(cfg.replace(drop_path=0.0), init, vocab_size)
    head_args = meta.get("head_args")
    model = task.build_model(mc, dataset)
    if head_args is not None:
        model = type(model)(mc, **head_args)
    elif "head.weight" in init.heads and hasattr(model, "head"):  # official: classes from the weights
        n = init.heads["head.weight"].shape[0]
        if n != model.head_args.get("num_classes", n):
            model = type(model)(mc, **{**model.head_args, "num_classes": n})
    report = apply_init(model, init)
    heads = {k for k in model.state_dict() if not k.startswith("beit3.")}
    untrained = sorted(k for k in heads - set(report.heads_loaded) if "running_" not in k and "num_batches" not in k)
    if untrained:
        raise ValueError(f"{init.source} has no trained {cfg.task} head: {', '.join(untrained[:6])} not found")
    return model


def write_outputs(task: str, split: str, metrics: dict, output: str) -> dict:
    """Predictions to their own files; returns what goes to results.json."""
    preds = metrics.pop("predictions", None)
    if preds is not None and task == "vqa":
        path = write_vqa_submission([p["question_id"] for p in preds], [p["answer"] for p in preds],
                                    os.path.join(output, f"vqa_submission_{split}.json"))
        metrics["submission"] = str(path)
    elif preds is not None:
        path = os.path.join(output, f"captions_{split}.json")
        atomic_write_bytes(path, json.dumps(preds, indent=1).encode())
        metrics["predictions_file"] = path
    if "report" in metrics:
        metrics["confusion_matrix_png"] = os.path.join(output, "confusion_matrix.png")
    return metrics


def repair_best(path: str) -> None:
    """Put a run's ``best/`` back in place after a kill while it was being replaced, unless a run
    holds the folder (then ``load_init`` reads the newest complete copy and changes nothing)."""
    if not os.path.isdir(path) or not any(os.path.isdir(os.path.join(path, f"best{s}")) for s in (".tmp", ".old")):
        return
    try:
        lock = OutputLock(path)
    except RunDirError:
        return
    try:
        recovered = recover_dir(os.path.join(path, "best"))
        if recovered:
            print(recovered, file=sys.stderr)
    finally:
        lock.release()


def _tokenizer(s: EvalSettings, spm: Optional[str]) -> Optional[TextTokenizer]:
    """The text tokenizer (None for a task without text and no --spm)."""
    textless = s.cfg.task in TEXTLESS_TASKS
    if (spm is None or not os.path.isfile(spm)) and not (textless and s.spm is None):
        raise EvaluationError(f"no sentencepiece model (--spm; recorded: {spm!r})", status=2)
    try:
        return TextTokenizer(spm) if spm is not None and os.path.isfile(spm) else None
    except ValueError as e:  # a corrupt or foreign SentencePiece file
        raise EvaluationError(first_line(e), status=2) from None


def run_evaluation(s: EvalSettings) -> Optional[Evaluation]:
    """Evaluate on every rank; rank 0 writes the predictions and ``results.json`` and returns them
    (the other ranks None). Raises ``EvaluationError``."""
    init, cfg = s.init, s.cfg
    dist = init_distributed(s.dist_timeout, s.device)
    cpu_flush_denormal(dist.device)
    data, spm, annotations = s.data, s.spm or init.meta.get("spm"), s.vqa_annotations
    if data == SYNTHETIC:
        data, world_spm = synthetic_data(dist)
        spm = s.spm or world_spm
        if cfg.task == "vqa" and annotations is None:
            annotations = os.path.join(data, "raw", "vqa",
                                       f"v2_mscoco_{'val' if s.split == 'val' else 'test'}_annotations.json")
    tokenizer = _tokenizer(s, spm)
    os.makedirs(s.output, exist_ok=True)
    task = build_task(cfg, tokenizer, **({"annotations": annotations} if cfg.task == "vqa" else {}))
    try:
        dataset = task.dataset(data, s.split, train=False)
        check_dataset(dataset, s.split, progress=dist.is_main)  # evaluation skips nothing: every image must be there
        model = build_model(task, cfg, init, init.meta, dataset, tokenizer.vocab_size if tokenizer else None)
    except (ValueError, FileNotFoundError, UserError) as e:
        raise EvaluationError(str(e)) from None
    dtype = torch.bfloat16 if (s.dtype or ("bf16" if s.device == "cuda" else "fp32")) == "bf16" else torch.float32
    model = model.to(dist.device, dtype).eval()
    workers = s.num_workers if s.num_workers is not None else (0 if s.device == "cpu" else 6)
    try:
        metrics = evaluate(task, model, dataset, cfg.eval_batch, dist.device, dtype, workers,
                           s.output if dist.is_main else None)
    except UserError as e:  # an image that exists but cannot be decoded: evaluation skips nothing
        raise EvaluationError(str(e)) from None
    done = None
    if dist.is_main:
        results = {"task": cfg.task, "dataset": cfg.dataset, "split": s.split, "checkpoint": init.source,
                   **write_outputs(cfg.task, s.split, metrics, s.output)}
        done = Evaluation(results, task.report(metrics), str(write_results_json(results, s.output)))
    finish_distributed(dist)
    return done
