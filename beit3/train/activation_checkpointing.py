"""The activation-checkpointing options shared by ``beit3 pretrain`` and ``beit3 benchmark``:
their flags, their device-dependent defaults and the checks that need no model."""
from __future__ import annotations

import argparse

from ..model.activation_checkpointing import CHECKPOINT_MODES
from .ds_config import ConfigError


def add_activation_checkpointing_flags(ap: argparse.ArgumentParser) -> None:
    ap.add_argument("--checkpoint-every", type=int, default=None,
                    help="activation checkpointing every k-th layer (0 = off; default 1 on GPU, 0 on CPU, "
                         "1 with --checkpoint-mode)")
    ap.add_argument("--checkpoint-mode", choices=list(CHECKPOINT_MODES), default=None,
                    help="what a checkpointed layer keeps: 'full' (default) only its input, recomputing the "
                         "whole layer; 'selective' also its matmul and attention outputs, recomputing only "
                         "LayerNorms, GELU and adds (more memory, no repeated matmuls)")


def fill_checkpoint_defaults(args: argparse.Namespace, device: str) -> None:
    """``checkpoint_every``: 1 on GPU, 0 on CPU, 1 when a mode is asked for (also on the CPU);
    ``checkpoint_mode``: "full"."""
    if args.checkpoint_every is None:
        args.checkpoint_every = 1 if device == "cuda" or args.checkpoint_mode is not None else 0
    args.checkpoint_mode = args.checkpoint_mode or "full"


def check_activation_checkpointing(args: argparse.Namespace) -> None:
    """A ``ConfigError`` for settings that cannot run, before anything is built."""
    if args.checkpoint_every < 0:
        raise ConfigError(f"--checkpoint-every must be >= 0 (0 = off), got {args.checkpoint_every}")
    if args.checkpoint_mode == "selective" and args.checkpoint_every == 0:
        raise ConfigError("--checkpoint-mode selective with --checkpoint-every 0 (checkpointing off): "
                          "give --checkpoint-every k >= 1")
