"""``beit3 pretrain``: masked data modeling on images, texts and image-text pairs with DeepSpeed.

    beit3 pretrain --preset tiny --data synthetic --steps 200 --output runs/demo      (CPU demo)
    deepspeed --num_gpus 8 -m beit3.cli.pretrain --preset giant --data /shards \\
        --tokenizer vqkd.pth --deepspeed ds_configs/zero3_bf16.json --output runs/giant

    beit3 pretrain --recipe pretrain-giant --print-config                            (the resolved settings)
    beit3 pretrain --config runs/demo/run_config.json --steps 400                    (replay, with a change)

The settings are ``beit3.jobs.pretrain.config.PretrainConfig``, a tree of parts (model, tokenizers,
data, optim, engine, run) whose every setting is a flag: a recipe, then a --config file, then the flags
given. The global batch: --micro-batches-per-step (or its per-rank spelling --grad-accum). The entry
point parses, checks and builds; the step lives in ``beit3.jobs.pretrain.loop``.
"""
from __future__ import annotations

import argparse
import json
import os
import sys

import torch.distributed as dist

from beit3.core.errors import UserError
from beit3.core.settings import add_dataclass_flags, given
from beit3.data.pretrain_loader import check_sources, resolve_sources
from beit3.data.sources import DataSourceError
from beit3.trainer.trackers import TrackerError, check_request
from beit3.jobs.pretrain.config import RECIPES, PretrainConfig
from beit3.jobs.pretrain.loop import PretrainRun
from beit3.trainer.checkpoint import CheckpointError
from beit3.trainer.distributed import pick_device
from beit3.trainer.ds_config import ConfigError
from beit3.trainer.trainer import NonFiniteLossError
from beit3.vqkd.vqkd import check_tokenizer_file


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="beit3 pretrain", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--recipe", choices=list(RECIPES), help="named settings (beit3.jobs.pretrain.config.RECIPES): "
                    "pretrain-tiny is the CPU demo, the others the BEiT-3 paper's pretraining at that size")
    ap.add_argument("--config", metavar="FILE", help="settings from a JSON file, e.g. a run's run_config.json to "
                    "replay it; flags given on the command line override it (and it overrides --recipe)")
    ap.add_argument("--print-config", action="store_true", help="print the resolved settings (every one, nested "
                    "by part) as JSON and exit")
    ap.add_argument("--local_rank", "--local-rank", type=int, default=None, help=argparse.SUPPRESS)
    add_dataclass_flags(ap, PretrainConfig)  # a help group per part of the tree
    return ap


def config_from_args(args: argparse.Namespace) -> PretrainConfig:
    """The recipe, then the --config file, then the flags given."""
    recipe = dict(RECIPES[args.recipe]) if getattr(args, "recipe", None) else {}
    file = PretrainConfig.from_file(args.config) if getattr(args, "config", None) else {}
    return PretrainConfig.from_layers(recipe, file, given(args, PretrainConfig))


def launch_world_size() -> int:
    """Ranks of this launch, from the launcher's environment (torchrun, deepspeed, Slurm)."""
    return int(os.environ.get("WORLD_SIZE", os.environ.get("SLURM_NTASKS", "1")))


def defaults_for(args: argparse.Namespace | PretrainConfig, device: str, world: int = 1) -> PretrainConfig:
    """The resolved config: the device-, size- and rank-dependent defaults filled in."""
    cfg = args if isinstance(args, PretrainConfig) else config_from_args(args)
    return cfg.resolved(device, world)


def check_args(cfg: PretrainConfig, world_size: int) -> dict:
    """Every check that needs no model: fails before any GPU time is spent."""
    ds_config = cfg.check(world_size)
    tokenizers = cfg.tokenizers
    if tokenizers.tokenizer is not None:
        try:
            check_tokenizer_file(tokenizers.tokenizer, trained=tokenizers.tokenizer_preset is None)
        except FileNotFoundError as e:
            raise ConfigError(f"--tokenizer {tokenizers.tokenizer}: {e}") from None
    if cfg.data.shards_dir != "synthetic":
        check_data_sources(cfg, world_size)
    return ds_config


def check_data_sources(cfg: PretrainConfig, world_size: int) -> None:
    """Resolve every source and decode a sample of its first shard, before a model or an output
    file exists: a pattern matching nothing or an unreachable source is a ConfigError."""
    data = cfg.data
    try:
        data.validate()
        sources = resolve_sources(data, data.data_streams or world_size * data.readers_per_rank)
        check_sources(sources, data.retry())
    except DataSourceError as e:
        raise ConfigError(str(e)) from None


def _peer_failure(e: BaseException) -> bool:
    text = str(e).lower()
    return isinstance(e, dist.DistError) or any(k in text for k in ("connection closed", "connection reset",
                                                                     "timed out", "timeout", "gloo"))


def main(argv: list[str] | None = None) -> int:
    ns = build_parser().parse_args(argv)
    try:
        cfg = config_from_args(ns)
        check_request(cfg.run.report_to, cfg.run.tensorboard, getattr(ns, "tensorboard", None))
        device = pick_device(cfg.engine.device)
        if device == "cpu":
            os.environ.setdefault("DS_ACCELERATOR", "cpu")
        world = launch_world_size()
        cfg = cfg.resolved(device, world)
        if ns.print_config:
            print(json.dumps(cfg.to_dict(), indent=1))
            return 0
        ds_config = check_args(cfg, world)
    except (ConfigError, ValueError, TypeError, UserError) as e:
        print(f"beit3 pretrain: error: {e}", file=sys.stderr)
        return 2
    return run_with_errors(PretrainRun(cfg, ds_config, device), cfg)


def run_with_errors(run, args) -> int:
    """Run, turning the failures a user must act on into one clear line and exit code 1."""
    try:
        return run.train()
    except TrackerError as e:  # could not start: nothing was trained, as a refused setting
        print(f"beit3 pretrain: error: {e}", file=sys.stderr)
        return 2
    except (UserError, CheckpointError, NonFiniteLossError, FileNotFoundError, DataSourceError, ValueError) as e:
        print(f"beit3 pretrain: error: {e}", file=sys.stderr)
        return 1
    except RuntimeError as e:
        if not _peer_failure(e):
            raise
        print(f"beit3 pretrain: error: a peer process died or a collective timed out "
              f"(--dist-timeout {args.engine.dist_timeout:g}s): {e}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
