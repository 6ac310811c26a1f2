"""The activation-checkpointing options shared by ``beit3 pretrain`` and ``beit3 benchmark``: their
device-dependent defaults and the check that needs no model (their ranges are the settings')."""
from __future__ import annotations

import argparse

from beit3.trainer.ds_config import ConfigError


def fill_checkpoint_defaults(args: argparse.Namespace, device: str) -> None:
    """``checkpoint_every``: 1 on GPU, 0 on CPU, 1 when a mode is asked for (also on the CPU);
    ``checkpoint_mode``: "full"."""
    if args.checkpoint_every is None:
        args.checkpoint_every = 1 if device == "cuda" or args.checkpoint_mode is not None else 0
    args.checkpoint_mode = args.checkpoint_mode or "full"


def check_activation_checkpointing(args: argparse.Namespace) -> None:
    """A ``ConfigError`` for settings that cannot run, before anything is built."""
    if args.checkpoint_mode == "selective" and args.checkpoint_every == 0:
        raise ConfigError("--checkpoint-mode selective with --checkpoint-every 0 (checkpointing off): "
                          "give --checkpoint-every k >= 1")
