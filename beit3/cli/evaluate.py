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
import os
import sys
from typing import Optional

from beit3.cli.finetune import add_config_flags
from beit3.core.errors import UserError
from beit3.core.files import check_output_dir
from beit3.core.settings import add_flag, check_args, given
from beit3.metrics.report import print_results_table
from beit3.trainer.distributed import pick_device
from beit3.trainer.ds_config import ConfigError
from beit3.jobs.finetune.evaluate import (DEFAULT_SPLIT, EvalSettings, EvaluationError, config_for, repair_best,
                                          run_evaluation)
from beit3.jobs.finetune.init_weights import load_init
from beit3.jobs.finetune.options import SYNTHETIC
from beit3.jobs.finetune.recipes import TASKS, FinetuneConfig


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


def settings_from_args(parser: argparse.ArgumentParser, args: argparse.Namespace) -> EvalSettings:
    """Every check before the evaluation starts: the flags, the weights and their config, the paths."""
    check_args(parser, args)
    device = pick_device(args.device)
    repair_best(args.init)
    init = load_init(args.init, args.allow_pickle)
    cfg = config_for(init.meta, args.task, args.recipe, given(args, FinetuneConfig))
    split = args.split or DEFAULT_SPLIT[cfg.task]
    if args.data != SYNTHETIC and not os.path.isdir(args.data):
        raise ConfigError(f"--data {args.data!r}: no such directory")
    output = args.output or os.path.join(os.path.dirname(init.source), f"eval-{split}")
    check_output_dir(output)
    return EvalSettings(init=init, cfg=cfg, split=split, data=args.data, output=output, device=device, spm=args.spm,
                        vqa_annotations=args.vqa_annotations, dtype=args.dtype, num_workers=args.num_workers,
                        dist_timeout=args.dist_timeout)


def main(argv: Optional[list[str]] = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        settings = settings_from_args(parser, args)
    except (ConfigError, ValueError, TypeError, FileNotFoundError, UserError) as e:
        print(f"beit3 evaluate: error: {e}", file=sys.stderr)
        return 2
    try:
        done = run_evaluation(settings)
    except EvaluationError as e:
        print(f"beit3 evaluate: error: {e}", file=sys.stderr)
        return e.status
    if done is not None:  # rank 0
        cfg = settings.cfg
        shown = {k: v for k, v in done.results.items() if not isinstance(v, (dict, list))}
        print_results_table(shown, title=f"{cfg.task} ({cfg.dataset}, {settings.split})")
        if done.report:
            print(done.report)
        print(f"wrote {done.results_json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
