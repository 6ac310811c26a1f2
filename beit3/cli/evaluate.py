"""``beit3 evaluate``: score a fine-tuned model on a split; print a table, write ``<output>/results.json``.

    beit3 evaluate --task vqa --checkpoint runs/finetune-vqa                     (its best/ weights)
    beit3 evaluate --task vqa --split test-dev --checkpoint ... --data /data/vqa   (+ the submission JSON)
    beit3 evaluate --task retrieval --checkpoint beit3_base_patch16_384_coco_retrieval.pth \\
        --recipe retrieval-coco-base --data /data/coco --spm beit3.spm

Per task: VQA score (and the official accuracy with answer normalisation given the annotations)
plus ``vqa_submission_<split>.json``; retrieval R@1/5/10 both ways; captioning BLEU-4, CIDEr
(METEOR with Java) and ``captions_<split>.json``; classification acc@1/acc@5, the per-class report
(in results.json) and ``confusion_matrix.png``; NLVR2 accuracy; segmentation mIoU, mAcc, aAcc and the
per-class IoU table (sliding windows, single scale). Every rank evaluates a shard;
rows are gathered before scoring.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
from typing import Optional

from beit3.core.errors import UserError, first_line
from beit3.core.settings import add_flag, check_args
from beit3.trainer.ds_config import ConfigError
from beit3.cli.finetune import add_config_flags, resolve_config
from beit3.jobs.finetune.recipes import TASKS, TEXTLESS_TASKS, FinetuneConfig

DEFAULT_SPLIT = {"vqa": "val", "retrieval": "test", "captioning": "test", "classification": "val", "nlvr2": "test",
                 "segmentation": "val"}


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="beit3 evaluate", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--task", choices=TASKS, help="default: the checkpoint's")
    ap.add_argument("--checkpoint", "--init", dest="init", required=True,
                    help="a fine-tuning run directory of ours (its best/), weights of ours, or an official "
                         "unilm/beit3 fine-tuned checkpoint")
    ap.add_argument("--recipe", help="settings for a checkpoint without our meta.json (default <task>-tiny)")
    ap.add_argument("--split", help=f"default: {DEFAULT_SPLIT}")
    ap.add_argument("--data", default="synthetic", help="data root with the index files, or 'synthetic'")
    ap.add_argument("--spm", help="SentencePiece model (default: the one recorded with the checkpoint, or "
                                  "the synthetic world's)")
    ap.add_argument("--output", help="where results.json and predictions go (default <checkpoint dir>/eval-<split>)")
    ap.add_argument("--vqa-annotations", help="VQA v2 annotation JSON of the split's questions (official accuracy)")
    ap.add_argument("--allow-pickle", action="store_true", help="trust checkpoint files that need unpickling")
    ap.add_argument("--device", choices=["cuda", "cpu"], default=None)
    ap.add_argument("--dtype", choices=["fp32", "bf16"], default=None, help="default bf16 on GPU, fp32 on CPU")
    add_flag(ap, "--num-workers", type=int, default=None, help="data loader workers (default 0 on CPU, 6 on GPU)", ge=0)
    add_flag(ap, "--dist-timeout", type=float, default=1800.0, help="seconds a collective may wait for a peer", gt=0)
    add_config_flags(ap)
    return ap


def config_for(args: argparse.Namespace, meta: dict) -> FinetuneConfig:
    """The checkpoint's fine-tuning config (ours) or the recipe's, with the flags given on top."""
    if "finetune" in meta and args.recipe is None:
        saved = dict(meta["finetune"])
        if args.task is not None and saved["task"] != args.task:
            raise ConfigError(f"the checkpoint was fine-tuned for {saved['task']}, not --task {args.task}")
        fields = FinetuneConfig.__dataclass_fields__  # a field newer than the run (ban_special) too
        overrides = {k: v for k, v in vars(args).items() if k in fields and k != "task" and v is not None}
        return FinetuneConfig(**{**saved, **overrides})
    if args.task is None and args.recipe is None:
        raise ConfigError("the checkpoint has no meta.json of ours: give --task (and --recipe for its settings)")
    return resolve_config(args)


def build_model(task, cfg: FinetuneConfig, init, meta: dict, dataset, vocab_size: int):
    from beit3.jobs.finetune.init_weights import apply_init
    from beit3.jobs.finetune.run import model_config
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
    from beit3.metrics.vqa import write_vqa_submission
    preds = metrics.pop("predictions", None)
    if preds is not None and task == "vqa":
        path = write_vqa_submission([p["question_id"] for p in preds], [p["answer"] for p in preds],
                                    os.path.join(output, f"vqa_submission_{split}.json"))
        metrics["submission"] = str(path)
    elif preds is not None:
        from beit3.core.files import atomic_write_bytes
        path = os.path.join(output, f"captions_{split}.json")
        atomic_write_bytes(path, json.dumps(preds, indent=1).encode())
        metrics["predictions_file"] = path
    if "report" in metrics:
        metrics["confusion_matrix_png"] = os.path.join(output, "confusion_matrix.png")
    return metrics


def repair_best(path: str) -> None:
    """Put a run's ``best/`` back in place after a kill while it was being replaced, unless a run
    holds the folder (then ``load_init`` reads the newest complete copy and changes nothing)."""
    from beit3.core.files import recover_dir
    from beit3.trainer.run_dir import OutputLock, RunDirError
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


def main(argv: Optional[list[str]] = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    import torch

    from beit3.data.index_check import check_dataset
    from beit3.data.text_tokenizer import TextTokenizer
    from beit3.metrics.report import print_results_table, write_results_json
    from beit3.core.files import check_output_dir
    from beit3.trainer.distributed import finish_distributed, init_distributed, pick_device
    from beit3.jobs.finetune.init_weights import load_init
    from beit3.jobs.finetune.tasks import build_task
    from beit3.jobs.finetune.run import SYNTHETIC, cpu_flush_denormal, synthetic_data
    from beit3.jobs.finetune.validation import evaluate

    try:
        check_args(parser, args)
        device = pick_device(args.device)
        repair_best(args.init)
        init = load_init(args.init, args.allow_pickle)
        cfg = config_for(args, init.meta)
        split = args.split or DEFAULT_SPLIT[cfg.task]
        if args.data != SYNTHETIC and not os.path.isdir(args.data):
            raise ConfigError(f"--data {args.data!r}: no such directory")
        output = args.output or os.path.join(os.path.dirname(init.source), f"eval-{split}")
        check_output_dir(output)
    except (ConfigError, ValueError, TypeError, FileNotFoundError, UserError) as e:
        print(f"beit3 evaluate: error: {e}", file=sys.stderr)
        return 2
    dist = init_distributed(args.dist_timeout, device)
    cpu_flush_denormal(dist.device)
    data, spm, annotations = args.data, args.spm or init.meta.get("spm"), args.vqa_annotations
    if data == SYNTHETIC:
        data, world_spm = synthetic_data(dist)
        spm = args.spm or world_spm
        if cfg.task == "vqa" and annotations is None:
            annotations = os.path.join(data, "raw", "vqa", f"v2_mscoco_{'val' if split == 'val' else 'test'}_annotations.json")
    textless = cfg.task in TEXTLESS_TASKS
    if (spm is None or not os.path.isfile(spm)) and not (textless and args.spm is None):
        print(f"beit3 evaluate: error: no sentencepiece model (--spm; recorded: {spm!r})", file=sys.stderr)
        return 2
    try:
        tokenizer = TextTokenizer(spm) if spm is not None and os.path.isfile(spm) else None
    except ValueError as e:  # a corrupt or foreign SentencePiece file
        print(f"beit3 evaluate: error: {first_line(e)}", file=sys.stderr)
        return 2
    os.makedirs(output, exist_ok=True)
    task = build_task(cfg, tokenizer, **({"annotations": annotations} if cfg.task == "vqa" else {}))
    try:
        dataset = task.dataset(data, split, train=False)
        check_dataset(dataset, split, progress=dist.is_main)  # evaluation skips nothing: every image must be there
        model = build_model(task, cfg, init, init.meta, dataset, tokenizer.vocab_size if tokenizer else None)
    except (ValueError, FileNotFoundError, UserError) as e:
        print(f"beit3 evaluate: error: {e}", file=sys.stderr)
        return 1
    dtype = torch.bfloat16 if (args.dtype or ("bf16" if device == "cuda" else "fp32")) == "bf16" else torch.float32
    model = model.to(dist.device, dtype).eval()
    workers = args.num_workers if args.num_workers is not None else (0 if device == "cpu" else 6)
    try:
        metrics = evaluate(task, model, dataset, cfg.eval_batch, dist.device, dtype, workers,
                           output if dist.is_main else None)
    except UserError as e:  # an image that exists but cannot be decoded: evaluation skips nothing
        print(f"beit3 evaluate: error: {e}", file=sys.stderr)
        return 1
    if dist.is_main:
        results = {"task": cfg.task, "dataset": cfg.dataset, "split": split, "checkpoint": init.source,
                   **write_outputs(cfg.task, split, metrics, output)}
        shown = {k: v for k, v in results.items() if not isinstance(v, (dict, list))}
        print_results_table(shown, title=f"{cfg.task} ({cfg.dataset}, {split})")
        report = task.report(metrics)
        if report:
            print(report)
        print(f"wrote {write_results_json(results, output)}")
    finish_distributed(dist)
    return 0


if __name__ == "__main__":
    sys.exit(main())
