"""``beit3 pretrain``: masked data modeling on images, texts and image-text pairs with DeepSpeed.

    beit3 pretrain --preset tiny --data synthetic --steps 200 --output runs/demo      (CPU demo)
    deepspeed --num_gpus 8 -m beit3.pretrain --preset giant --data /shards \\
        --tokenizer vqkd.pth --deepspeed ds_configs/zero3_bf16.json --output runs/giant

The entry point parses, checks and builds; the step lives in ``beit3.train.loop``.
"""
from __future__ import annotations

import argparse
import os
import sys

from .config import PRESETS, BEiT3Config
from .errors import UserError
from .files import check_output_dir
from .train.checkpoint_args import add_checkpoint_args, check_checkpoint_args, fill_checkpoint_defaults
from .train.ds_config import ConfigError, default_ds_config, resolve_ds_config



def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="beit3 pretrain", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--preset", default="tiny", choices=sorted(PRESETS))
    ap.add_argument("--layout", default="paper", choices=["paper", "released"])
    ap.add_argument("--data", default=None,
                    help="'synthetic' (the embedded world, built and cached; the default without sources) or a "
                         "shards directory holding images-*/texts-*/pairs-*.tar and manifest.json")
    src = ap.add_argument_group(
        "data sources (instead of --data; repeat a flag to mix sources by weight; see docs/data.md)",
        "PATTERN[::WEIGHT]: webdataset shards with brace expansion, local, http(s):// or pipe:COMMAND "
        "(e.g. 'pipe:aws s3 cp s3://bucket/{00000..41407}.tar -'), as img2dataset writes them; a folder of "
        "shards or images; .txt/.jsonl text files. A kind without a source gets batch size 0.")
    src.add_argument("--pair-shards", action="append", metavar="PATTERN[::WEIGHT]", help="image-text pairs")
    src.add_argument("--image-shards", action="append", metavar="PATTERN[::WEIGHT]",
                     help="images (pair shards' captions are ignored)")
    src.add_argument("--text-shards", action="append", metavar="PATTERN[::WEIGHT]", help="texts")
    src.add_argument("--shard-retries", type=int, default=3,
                     help="further attempts at a remote shard whose open or read failed")
    src.add_argument("--retry-backoff", type=float, default=1.0,
                     help="seconds before the first retry, doubled for each further one")
    src.add_argument("--max-bad-shard-fraction", type=float, default=0.1,
                     help="stop when a reader has given up on more than this share of a source's shards")
    ap.add_argument("--data-streams", type=int, default=None,
                    help="readers of the data stream over all ranks (default: ranks x max(1, --num-workers)); "
                         "fixed for the run: a resume on another number of ranks keeps the exact stream, reading "
                         "without waste when this is a multiple of its ranks (x workers)")
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
    ap.add_argument("--micro-batches-per-step", type=int, default=None,
                    help="micro-batches per optimizer step over all ranks (ranks x grad-accum): the gradient "
                         "accumulation follows the number of ranks, so a run resumed or re-formed on fewer or more "
                         "ranks keeps its global batch")
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
    ap.add_argument("--allow-pickle", action="store_true",
                    help="resume from a checkpoint whose files need full unpickling (only one you trust: "
                         "unpickling can run code)")
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


SOURCE_FLAGS = {"images": "image_shards", "texts": "text_shards", "pairs": "pair_shards"}


def has_sources(args: argparse.Namespace) -> bool:
    return any(getattr(args, flag, None) for flag in SOURCE_FLAGS.values())


def defaults_for(args: argparse.Namespace, device: str) -> argparse.Namespace:
    """Fill the device- and size-dependent defaults."""
    tiny = args.preset == "tiny"
    fill_checkpoint_defaults(args, device)
    if has_sources(args):  # a kind without a source trains on nothing unless its batch is asked for
        for kind, flag in SOURCE_FLAGS.items():
            if not getattr(args, flag) and getattr(args, f"batch_{kind}") is None:
                setattr(args, f"batch_{kind}", 0)
    elif args.data is None:
        args.data = "synthetic"
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
    if args.data_streams is not None and args.data_streams < 1:
        raise ConfigError(f"--data-streams must be >= 1, got {args.data_streams}")
    micro = args.batch_images + args.batch_texts + args.batch_pairs
    accumulation_for_world(args, world_size)
    if micro == 0:
        raise ConfigError("--batch-images, --batch-texts and --batch-pairs are all 0")
    sources = has_sources(args)
    if sources and args.data is not None:
        raise ConfigError("give --data or the --image/--text/--pair-shards sources, not both")
    for kind, flag in SOURCE_FLAGS.items():
        if sources and not getattr(args, flag) and getattr(args, f"batch_{kind}"):
            raise ConfigError(f"--batch-{kind} {getattr(args, f'batch_{kind}')} but no --{flag.replace('_', '-')} "
                              f"source")
    if not sources and args.data != "synthetic" and not os.path.isdir(args.data):
        raise ConfigError(f"--data {args.data!r}: no such directory (expected shards, or 'synthetic')")
    if args.data != "synthetic" and (args.spm is None or args.tokenizer is None):
        raise ConfigError("real data (--data DIR or sources) needs --spm and --tokenizer")
    for name in ("spm", "tokenizer"):
        path = getattr(args, name)
        if path is not None and not os.path.exists(path):
            raise ConfigError(f"--{name} {path!r} does not exist")
    if args.resume not in (None, "auto") and not os.path.isdir(args.resume):
        raise ConfigError(f"--resume {args.resume!r}: no such checkpoint directory")
    check_output_dir(args.output)
    ds_config = resolve_ds_config(args.ds_config, micro, args.grad_accum, world_size)
    if args.data != "synthetic":
        check_data_sources(args, world_size)
    return ds_config


def accumulation_for_world(args: argparse.Namespace, world_size: int) -> None:
    """``--micro-batches-per-step`` N: ``grad_accum`` = N / ranks."""
    n = args.micro_batches_per_step
    if n is None:
        return
    if n < 1 or n % world_size:
        raise ConfigError(f"--micro-batches-per-step {n} is not a positive multiple of the {world_size} ranks")
    if args.grad_accum is not None and args.grad_accum != n // world_size:
        raise ConfigError(f"--grad-accum {args.grad_accum} but --micro-batches-per-step {n} on {world_size} ranks "
                          f"means {n // world_size}: give one of them")
    args.grad_accum = n // world_size


def check_data_sources(args: argparse.Namespace, world_size: int) -> None:
    """Resolve every source and decode a sample of its first shard, before a model or an output
    file exists: a pattern matching nothing or an unreachable source is a ConfigError."""
    from .data.pretrain_loader import check_sources, resolve_sources
    from .data.sources import DataSourceError
    from .train.loop import pretrain_data_config
    cfg = pretrain_data_config(args)
    try:
        cfg.validate()
        sources = resolve_sources(cfg, args.data_streams or world_size * cfg.readers_per_rank)
        check_sources(sources, cfg.retry())
    except DataSourceError as e:
        raise ConfigError(str(e)) from None


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
    except (ConfigError, ValueError, UserError) as e:
        print(f"beit3 pretrain: error: {e}", file=sys.stderr)
        return 2
    from .train.loop import PretrainRun
    return run_with_errors(PretrainRun(args, ds_config, device), args)


def run_with_errors(run, args) -> int:
    """Run, turning the failures a user must act on into one clear line and exit code 1."""
    from .data.sources import DataSourceError
    from .train.checkpoint import CheckpointError
    from .train.loop import NonFiniteLossError
    try:
        return run.train()
    except (UserError, CheckpointError, NonFiniteLossError, FileNotFoundError, DataSourceError, ValueError) as e:
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
