"""``beit3 finetune``: fine-tune BEiT-3 on VQA, retrieval, captioning, classification, NLVR2 or
semantic segmentation.

    beit3 finetune --task vqa                                   (tiny demo on the synthetic world, CPU)
    beit3 finetune --task retrieval --init runs/pretrain        (from our pretraining run)
    deepspeed --num_gpus 8 -m beit3.finetune.main --recipe vqa-base --init beit3_base_patch16_224.pth \\
        --data /data/vqa --spm beit3.spm --output runs/vqa-base

A recipe (``--recipe``, default ``<task>-tiny``) sets every hyperparameter; any of them can be
overridden by its own flag (``--lr``, ``--epochs``, ``--layer-decay``, ...). The entry point
parses and checks; the run lives in ``beit3.finetune.trainer``.
"""
from __future__ import annotations

import argparse
import os
import sys
from typing import Optional

from ..errors import UserError
from ..files import check_output_dir
from ..flags import add_dataclass_flags, given
from ..train.ds_config import ConfigError, default_ds_config, resolve_ds_config
from .init import init_tokenizer
from .recipes import DEFAULT_RECIPE, RECIPES, TASKS, TEXTLESS_TASKS, FinetuneConfig, get_recipe, recipe_names

def add_config_flags(ap: argparse.ArgumentParser) -> None:
    """One flag per FinetuneConfig field (not given = the recipe's value)."""
    group = ap.add_argument_group("recipe overrides (each FinetuneConfig field; default: the recipe's)")
    add_dataclass_flags(group, FinetuneConfig, skip=("task",))


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="beit3 finetune", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--task", choices=TASKS, help="default: the recipe's")
    ap.add_argument("--recipe", help=f"named hyperparameters (default <task>-tiny): {', '.join(RECIPES)}")
    ap.add_argument("--init", help="weights to start from: a run directory or checkpoint of ours, a state dict "
                                   "file, or an official unilm/beit3 checkpoint (default: random init)")
    ap.add_argument("--data", default="synthetic", help="data root holding the index files "
                    "(beit3.data.downstream), or 'synthetic' (the embedded world, built and cached)")
    ap.add_argument("--spm", help="SentencePiece model (default: the synthetic world's, or the --init run's)")
    ap.add_argument("--output", help="run directory (default runs/finetune-<task>)")
    ap.add_argument("--deepspeed", "--ds-config", dest="ds_config", default=None,
                    help="DeepSpeed JSON (default: ds_configs/zero3_bf16.json on GPU, cpu_zero3.json on CPU)")
    ap.add_argument("--grad-accum", type=int, default=None)
    ap.add_argument("--resume", default=None, help="'auto' (newest complete checkpoint in --output) or a path")
    ap.add_argument("--overwrite", action="store_true", help="replace the run already in --output (refused "
                    "otherwise, unless --resume): its files are first moved into <output>/replaced-<time>/")
    ap.add_argument("--allow-pickle", action="store_true", help="trust --init files and --resume checkpoints "
                    "that need unpickling (unilm's fine-tuned checkpoints pickle their argparse Namespace)")
    ap.add_argument("--max-bad-fraction", type=float, default=0.01,
                    help="share of the training images that may be missing or undecodable: each is named once "
                         "and skipped; beyond it the run stops")
    ap.add_argument("--vqa-annotations", help="VQA v2 annotation JSON of the val questions: also report the "
                    "official accuracy with answer normalisation")
    ap.add_argument("--max-bad-steps", type=int, default=5,
                    help="stop after this many non-finite steps in a row (each is skipped and counted)")
    ap.add_argument("--log-every", type=int, default=10)
    ap.add_argument("--save-every", type=int, default=0, help="optimizer steps between resumable checkpoints "
                    "(0: at the end of every epoch only)")
    ap.add_argument("--keep-last", type=int, default=1)
    ap.add_argument("--eval-every", type=int, default=1, help="epochs between validations")
    ap.add_argument("--num-workers", type=int, default=None, help="data loader workers (default 0 on CPU, 6 on GPU)")
    ap.add_argument("--device", choices=["cuda", "cpu"], default=None)
    ap.add_argument("--dist-timeout", type=float, default=1800.0)
    ap.add_argument("--no-tensorboard", action="store_true")
    ap.add_argument("--local_rank", "--local-rank", type=int, default=None, help=argparse.SUPPRESS)
    add_config_flags(ap)
    return ap


def resolve_config(args: argparse.Namespace) -> FinetuneConfig:
    """The recipe (``--recipe``, else the task's demo recipe) with the flags given on top."""
    if args.recipe is None and args.task is None:
        raise ConfigError(f"give --task ({', '.join(TASKS)}) or --recipe")
    name = args.recipe or DEFAULT_RECIPE[args.task]
    if name not in RECIPES:
        lines = [f"  {t}: {', '.join(recipe_names(t))}" for t in TASKS]
        raise ConfigError(f"unknown --recipe {name!r}; choices:\n" + "\n".join(lines))
    if args.task is not None and RECIPES[name]["task"] != args.task:
        raise ConfigError(f"--recipe {name} is a {RECIPES[name]['task']} recipe, not {args.task}; "
                          f"{args.task} recipes: {', '.join(recipe_names(args.task))}")
    return get_recipe(name, **given(args, FinetuneConfig))


def check_paths(args: argparse.Namespace, needs_spm: bool = True) -> None:
    if args.data != "synthetic":
        if not os.path.isdir(args.data):
            raise ConfigError(f"--data {args.data!r}: no such directory (expected index files, or 'synthetic')")
        if args.spm is None and needs_spm and init_tokenizer(args.init) is None:
            raise ConfigError("--data with a real data root needs --spm (the model's sentencepiece file), "
                              "unless --init is a saved model holding its tokenizer")
    for name in ("spm", "init", "vqa_annotations"):
        path = getattr(args, name)
        if path is not None and not os.path.exists(path):
            raise ConfigError(f"--{name.replace('_', '-')} {path!r} does not exist")
    if args.resume not in (None, "auto") and not os.path.isdir(args.resume):
        raise ConfigError(f"--resume {args.resume!r}: no such checkpoint directory")
    if args.max_bad_steps < 1:
        raise ConfigError(f"--max-bad-steps must be >= 1, got {args.max_bad_steps}")
    if not 0 <= args.max_bad_fraction < 1:
        raise ConfigError(f"--max-bad-fraction must be in [0, 1), got {args.max_bad_fraction}")


def main(argv: Optional[list[str]] = None) -> int:
    args = build_parser().parse_args(argv)
    import torch

    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    if device == "cpu":
        os.environ.setdefault("DS_ACCELERATOR", "cpu")
    world = int(os.environ.get("WORLD_SIZE", os.environ.get("SLURM_NTASKS", "1")))
    try:
        cfg = resolve_config(args)
        if cfg.checkpoint_every is None:
            cfg = cfg.replace(checkpoint_every=0 if device == "cpu" else 1)
        check_paths(args, needs_spm=cfg.task not in TEXTLESS_TASKS)
        output = args.output or f"runs/finetune-{cfg.task}"
        check_output_dir(output)
        ds_path = args.ds_config or default_ds_config(device)
        ds_config = resolve_ds_config(ds_path, cfg.batch_size, args.grad_accum, world)
    except (ConfigError, ValueError, TypeError, UserError) as e:
        print(f"beit3 finetune: error: {e}", file=sys.stderr)
        return 2
    from ..eval.report import print_results_table
    from ..train.trainer import NonFiniteLossError
    from .trainer import FinetuneRun, RunOptions

    options = RunOptions(
        output=output, data=args.data, spm=args.spm, ds_config=ds_config,
        device=device, init=args.init, resume=args.resume, overwrite=args.overwrite, allow_pickle=args.allow_pickle,
        log_every=args.log_every, save_every=args.save_every, keep_last=args.keep_last,
        eval_every=args.eval_every, num_workers=args.num_workers if args.num_workers is not None else
        (0 if device == "cpu" else 6), tensorboard=not args.no_tensorboard,
        vqa_annotations=args.vqa_annotations, dist_timeout=args.dist_timeout, max_bad_fraction=args.max_bad_fraction,
        max_bad_steps=args.max_bad_steps)
    os.makedirs(options.output, exist_ok=True)
    run = FinetuneRun(cfg, options)
    try:
        best = run.train()
    except (UserError, ValueError, FileNotFoundError, NonFiniteLossError) as e:
        print(f"beit3 finetune: error: {e}", file=sys.stderr)
        return 1
    if run.dist.is_main and best:
        print_results_table(best, title=f"best validation ({cfg.task}, {cfg.dataset}) -> {options.output}/best")
    return 0


if __name__ == "__main__":
    sys.exit(main())
