"""``beit3 finetune``: fine-tune BEiT-3 on VQA, retrieval, captioning, classification, NLVR2 or
semantic segmentation.

    beit3 finetune --task vqa                                   (tiny demo on the synthetic world, CPU)
    beit3 finetune --task retrieval --init runs/pretrain        (from our pretraining run)
    deepspeed --num_gpus 8 -m beit3.cli.finetune --recipe vqa-base --init beit3_base_patch16_224.pth \\
        --data /data/vqa --spm beit3.spm --output runs/vqa-base

A recipe (``--recipe``, default ``<task>-tiny``) sets every hyperparameter; any of them can be
overridden by its own flag (``--lr``, ``--epochs``, ``--layer-decay``, ...). The entry point
parses and checks; the run lives in ``beit3.jobs.finetune.run``.
"""
from __future__ import annotations

import argparse
import os
import sys
from typing import Optional

from beit3.core.errors import UserError
from beit3.core.files import check_output_dir
from beit3.core.settings import add_dataclass_flags, given
from beit3.metrics.report import print_results_table
from beit3.trainer.distributed import pick_device
from beit3.trainer.ds_config import ConfigError, default_ds_config, resolve_ds_config
from beit3.trainer.trackers import TrackerError, check_request
from beit3.trainer.trainer import NonFiniteLossError
from beit3.jobs.finetune.init_weights import init_tokenizer
from beit3.jobs.finetune.options import SYNTHETIC, RunOptions
from beit3.jobs.finetune.recipes import RECIPES, TASKS, TEXTLESS_TASKS, FinetuneConfig, resolve_recipe
from beit3.jobs.finetune.run import FinetuneRun


def add_config_flags(ap: argparse.ArgumentParser) -> None:
    """One flag per FinetuneConfig field (not given = the recipe's value)."""
    group = ap.add_argument_group("recipe overrides (each FinetuneConfig field; default: the recipe's)")
    add_dataclass_flags(group, FinetuneConfig, skip=("task",))


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="beit3 finetune", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--task", choices=TASKS, help="default: the recipe's")
    ap.add_argument("--recipe", help=f"named hyperparameters (default <task>-tiny): {', '.join(RECIPES)}")
    ap.add_argument("--local_rank", "--local-rank", type=int, default=None, help=argparse.SUPPRESS)
    add_dataclass_flags(ap.add_argument_group("the run (RunOptions fields)"), RunOptions)
    add_config_flags(ap)
    return ap


def resolve_config(args: argparse.Namespace) -> FinetuneConfig:
    """The recipe (``--recipe``, else the task's demo recipe) with the flags given on top."""
    return resolve_recipe(args.recipe, args.task, given(args, FinetuneConfig))


def check_paths(o: RunOptions, needs_spm: bool = True) -> None:
    if o.data != SYNTHETIC:
        if not os.path.isdir(o.data):
            raise ConfigError(f"--data {o.data!r}: no such directory (expected index files, or 'synthetic')")
        if o.spm is None and needs_spm and init_tokenizer(o.init) is None:
            raise ConfigError("--data with a real data root needs --spm (the model's sentencepiece file), "
                              "unless --init is a saved model holding its tokenizer")
    for name in ("spm", "init", "vqa_annotations"):
        path = getattr(o, name)
        if path is not None and not os.path.exists(path):
            raise ConfigError(f"--{name.replace('_', '-')} {path!r} does not exist")
    if o.resume not in (None, "auto") and not os.path.isdir(o.resume):
        raise ConfigError(f"--resume {o.resume!r}: no such checkpoint directory")


def settings_from_args(args: argparse.Namespace, world: int) -> tuple[FinetuneConfig, RunOptions, dict]:
    """(hyperparameters, run options, resolved DeepSpeed config), every check that needs no model done."""
    cfg = resolve_config(args)
    options = RunOptions(**given(args, RunOptions))
    check_request(options.report_to, options.tensorboard, getattr(args, "tensorboard", None))
    device = pick_device(options.device)
    options = options.resolved(cfg.task, device)
    if cfg.checkpoint_every is None:
        cfg = cfg.replace(checkpoint_every=0 if device == "cpu" else 1)
    check_paths(options, needs_spm=cfg.task not in TEXTLESS_TASKS)
    check_output_dir(options.output)
    ds_config = resolve_ds_config(options.ds_config or default_ds_config(device), cfg.batch_size,
                                  options.grad_accum, world)
    return cfg, options, ds_config


def main(argv: Optional[list[str]] = None) -> int:
    args = build_parser().parse_args(argv)
    world = int(os.environ.get("WORLD_SIZE", os.environ.get("SLURM_NTASKS", "1")))
    try:
        cfg, options, ds_config = settings_from_args(args, world)
    except (ConfigError, ValueError, TypeError, UserError) as e:
        print(f"beit3 finetune: error: {e}", file=sys.stderr)
        return 2
    if options.device == "cpu":
        os.environ.setdefault("DS_ACCELERATOR", "cpu")
    os.makedirs(options.output, exist_ok=True)
    run = FinetuneRun(cfg, options, ds_config)
    try:
        best = run.train()
    except TrackerError as e:  # could not start: nothing was trained, as a refused setting
        print(f"beit3 finetune: error: {e}", file=sys.stderr)
        return 2
    except (UserError, ValueError, FileNotFoundError, NonFiniteLossError) as e:
        print(f"beit3 finetune: error: {e}", file=sys.stderr)
        return 1
    if run.dist.is_main and best:
        print_results_table(best, title=f"best validation ({cfg.task}, {cfg.dataset}) -> {options.output}/best")
    return 0


if __name__ == "__main__":
    sys.exit(main())
