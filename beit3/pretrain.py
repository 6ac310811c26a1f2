"""``beit3 pretrain``: masked data modeling on images, texts and image-text pairs with DeepSpeed.

    beit3 pretrain --preset tiny --data synthetic --steps 200 --output runs/demo      (CPU demo)
    deepspeed --num_gpus 8 -m beit3.pretrain --preset giant --data /shards \\
        --tokenizer vqkd.pth --deepspeed ds_configs/zero3_bf16.json --output runs/giant

The entry point parses, checks and builds; the step lives in ``beit3.train.loop``.
"""
from __future__ import annotations

import argparse
import json
import os
import sys

from .config import PRESETS, BEiT3Config
from .train.checkpoint_args import add_checkpoint_args, check_checkpoint_args, fill_checkpoint_defaults
from .train.ds_config import ConfigError, default_ds_config, resolve_ds_config



def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="beit3 pretrain", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--preset", default="tiny", choices=sorted(PRESETS))
    ap.add_argument("--layout", default="paper", choices=["paper", "released"])
    ap.add_argument("--data", default="synthetic",
                    help="'synthetic' (the embedded world, built and cached) or a shards directory "
                         "holding images-*/texts-*/pairs-*.tar and manifest.json")
    ap.add_argument("--spm", help="SentencePiece model (default: the synthetic world's)")
    ap.add_argument("--tokenizer", help="VQ-KD: a train-tokenizer output dir, or an official beit2 "
                                        "checkpoint (with --tokenizer-preset)")
    ap.add_argument("--tokenizer-preset", default=None, help="VQKDConfig preset of an official checkpoint")
    ap.add_argument("--deepspeed", "--ds-config", dest="ds_config", default=None,
                    help="DeepSpeed JSON (default: ds_configs/zero3_bf16.json on GPU, cpu_zero3.json on CPU)")
    ap.add_argument("--output", default="runs/pretrain")
    ap.add_argument("--steps", type=int, default=200)
    ap.add_argument("--batch-images", type=int, default=None, help="per rank per micro-step")
    ap.add_argument("--batch-texts", type=int, default=None)
    ap.add_argument("--batch-pairs", type=int, default=None)
    ap.add_argument("--grad-accum", type=int, default=None)
    ap.add_argument("--max-text-len", type=int, default=None)
    ap.add_argument("--text-padding", choices=["longest", "max"], default="longest",
                    help="pad each micro-batch's texts to its longest text rounded up to 8 (default: no "
                         "compute on padding) or always to --max-text-len (one shape every step)")
    ap.add_argument("--mask-pair-images", action="store_true", help="also mask (and predict) pair images")
    ap.add_argument("--patch-aggregation", action="store_true", help="BEiT v2 CLS pretraining head")
    # Paper hyperparameters (BEiT-3, Appendix): AdamW (0.9, 0.98), eps 1e-6, wd 0.05, cosine, drop path 0.1.
    ap.add_argument("--lr", type=float, default=None, help="peak lr (default 1e-3; 2e-3 for tiny)")
    ap.add_argument("--min-lr-ratio", type=float, default=0.01)
    ap.add_argument("--warmup-steps", type=int, default=None, help="default: min(10000, steps // 10)")
    ap.add_argument("--weight-decay", type=float, default=0.05)
    ap.add_argument("--beta2", type=float, default=0.98)
    ap.add_argument("--drop-path", type=float, default=0.1)
    ap.add_argument("--grad-clip", type=float, default=None, help="override the DeepSpeed config's gradient_clipping (3.0 in ours)")
    add_checkpoint_args(ap)
    ap.add_argument("--save-every", type=int, default=100)
    ap.add_argument("--keep-last", type=int, default=3)
    ap.add_argument("--resume", default=None, help="'auto' (newest complete checkpoint in --output) or a path")
    ap.add_argument("--stop-after-steps", type=int, default=None,
                    help="leave after this many steps of this run with a checkpoint, as on SIGTERM "
                         "(time-limited jobs; the schedule still spans --steps)")
    ap.add_argument("--log-every", type=int, default=10)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--num-workers", type=int, default=None)
    ap.add_argument("--max-bad-steps", type=int, default=5,
                    help="stop after this many non-finite steps in a row")
    ap.add_argument("--dist-timeout", type=float, default=1800.0,
                    help="seconds a collective may wait for a peer before failing")
    ap.add_argument("--device", choices=["cuda", "cpu"], default=None)
    ap.add_argument("--no-tensorboard", action="store_true")
    ap.add_argument("--local_rank", "--local-rank", type=int, default=None, help=argparse.SUPPRESS)
    return ap


def defaults_for(args: argparse.Namespace, device: str) -> argparse.Namespace:
    """Fill the device- and size-dependent defaults."""
    tiny = args.preset == "tiny"
    fill_checkpoint_defaults(args, device)
    for name, value in (("batch_images", 16 if tiny else 32), ("batch_texts", 16 if tiny else 32),
                        ("batch_pairs", 16 if tiny else 32), ("max_text_len", 32 if tiny else 64),
                        ("lr", 2e-3 if tiny else 1e-3), ("num_workers", 0 if device == "cpu" else 6)):
        if getattr(args, name) is None:
            setattr(args, name, value)
    if args.warmup_steps is None:
        args.warmup_steps = min(10000, max(1, args.steps // 10))
    if args.ds_config is None:
        args.ds_config = default_ds_config(device)
    return args


def check_args(args: argparse.Namespace, world_size: int) -> dict:
    """Every check that needs no model: fails before any GPU time is spent."""
    for name in ("steps", "save_every", "log_every"):
        if getattr(args, name) <= 0:
            raise ConfigError(f"--{name.replace('_', '-')} must be positive, got {getattr(args, name)}")
    for name in ("batch_images", "batch_texts", "batch_pairs"):
        if getattr(args, name) < 0:
            raise ConfigError(f"--{name.replace('_', '-')} must be >= 0, got {getattr(args, name)}")
    check_checkpoint_args(args)
    micro = args.batch_images + args.batch_texts + args.batch_pairs
    if micro == 0:
        raise ConfigError("--batch-images, --batch-texts and --batch-pairs are all 0")
    if args.data != "synthetic" and not os.path.isdir(args.data):
        raise ConfigError(f"--data {args.data!r}: no such directory (expected shards, or 'synthetic')")
    if args.data != "synthetic" and (args.spm is None or args.tokenizer is None):
        raise ConfigError("--data with real shards needs --spm and --tokenizer")
    for name in ("spm", "tokenizer"):
        path = getattr(args, name)
        if path is not None and not os.path.exists(path):
            raise ConfigError(f"--{name} {path!r} does not exist")
    if args.resume not in (None, "auto") and not os.path.isdir(args.resume):
        raise ConfigError(f"--resume {args.resume!r}: no such checkpoint directory")
    return resolve_ds_config(args.ds_config, micro, args.grad_accum, world_size)


def _peer_failure(e: BaseException) -> bool:
    import torch.distributed as dist
    text = str(e).lower()
    return isinstance(e, dist.DistError) or any(k in text for k in ("connection closed", "connection reset",
                                                                     "timed out", "timeout", "gloo"))


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    import torch

    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    if device == "cpu":
        os.environ.setdefault("DS_ACCELERATOR", "cpu")
    args = defaults_for(args, device)
    world = int(os.environ.get("WORLD_SIZE", os.environ.get("SLURM_NTASKS", "1")))
    try:
        BEiT3Config.from_preset(args.preset, layout=args.layout)
        ds_config = check_args(args, world)
    except (ConfigError, ValueError) as e:
        print(f"beit3 pretrain: error: {e}", file=sys.stderr)
        return 2
    from .train.loop import PretrainRun
    return run_with_errors(PretrainRun(args, ds_config, device), args)


def run_with_errors(run, args) -> int:
    """Run, turning the failures a user must act on into one clear line and exit code 1."""
    from .train.checkpoint import CheckpointError
    from .train.loop import NonFiniteLossError
    try:
        return run.train()
    except (CheckpointError, NonFiniteLossError, FileNotFoundError) as e:
        print(f"beit3 pretrain: error: {e}", file=sys.stderr)
        return 1
    except RuntimeError as e:
        if not _peer_failure(e):
            raise
        print(f"beit3 pretrain: error: a peer process died or a collective timed out "
              f"(--dist-timeout {args.dist_timeout:g}s): {e}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
