"""Files the sweep needs that only torch can write, built in one child of the fork server
(``sweep_harness``), so that the test process never imports torch's model stack.

    build ROOT SPM    ->  ROOT/vqkd/            an untrained tiny VQ-KD, as train-tokenizer saves it
                          ROOT/saved/           a 5-class tiny classifier (random weights), save_pretrained
                          ROOT/official.pth     a small torch (zip) checkpoint, served as a download
                          ROOT/planted.pth      a pickle that creates ROOT/pickle-ran when loaded
    number_flags COMMAND...  the number flags of each command and values outside their ranges (JSON)
"""
from __future__ import annotations

import argparse
import importlib
import importlib.util
import json
import os

import torch

from beit3 import BEiT3Config
from beit3.cli import COMMANDS, DATA_COMMANDS
from beit3.core.settings import flag_ranges
from beit3.model.heads import ImageClassifier
from beit3.vqkd.vqkd import VQKD, VQKDConfig, save_trained

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CLASSES = ["circle", "square", "triangle", "star", "cross"]


class Planted:
    """Unpickling this creates a file: a checkpoint's payload, as an attacker would plant it."""

    def __init__(self, path: str):
        self.path = path

    def __reduce__(self):
        return open, (self.path, "a")


def build(argv) -> int:
    root, spm = argv
    torch.manual_seed(0)
    save_trained(VQKD(VQKDConfig.from_preset("tiny", num_codes=64)), os.path.join(root, "vqkd"))
    cfg = BEiT3Config.from_preset("tiny", embed_dim=64, num_heads=4, ffn_dim=128, depth=2, vl_layers=1, img_size=40,
                                  patch_size=8, vocab_size=120)
    model = ImageClassifier(cfg, num_classes=len(CLASSES))
    model.save_pretrained(os.path.join(root, "saved"), tokenizer=spm, labels=CLASSES)
    torch.save({"model": {"w": torch.arange(74_900, dtype=torch.float32)}}, os.path.join(root, "official.pth"))
    torch.save({"encoder.pos_embed": Planted(os.path.join(root, "pickle-ran"))}, os.path.join(root, "planted.pth"))
    return 0


def number_flags(argv) -> int:
    """Print {command: [[flag, [values], the error's start]]}: for each number flag of the ``argv``
    commands, a value just outside each of its bounds (NaN for a flag that only needs to be finite)."""
    out = {}
    for command in argv:
        parser = _parser(command)
        actions = [parser._option_string_actions[flag] for flag in flag_ranges(parser)]
        out[command] = [[a.option_strings[0], values, f"{a.option_strings[0]} must be {a.valid.describe()}"]
                        for a in actions for values in _outside(a)]
    print(json.dumps(out))
    return 0


def _parser(command: str):
    if command.startswith("scripts/"):
        path = os.path.join(ROOT, command)
        spec = importlib.util.spec_from_file_location("script", path)
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
        return module.build_parser()
    words = command.split()
    module, _, main = (DATA_COMMANDS[words[1]] if words[0] == "data" else COMMANDS[words[0]][0]).partition(":")
    stem = main.replace("main", "").strip("_")  # shards_main, main_embed -> shards_parser, embed_parser
    parser = getattr(importlib.import_module(module), f"{stem}_parser" if stem else "build_parser")()
    if command == "data downstream":  # the sub-command the sweep runs
        parser = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction)).choices["all"]
    return parser


def _outside(action) -> list[list[str]]:
    """Values just outside ``action``'s range, one list (as many as the flag takes) per bound."""
    r, is_int = action.valid, action.type.__name__ == "int"
    bad = [r.ge - 1 if r.ge is not None else None, r.gt, r.le + 1 if r.le is not None else None, r.lt]
    bad = [v for v in bad if v is not None] or [float("nan")]
    count = action.nargs if isinstance(action.nargs, int) else 1
    return [[str(int(v)) if is_int else f"{v:g}"] * count for v in bad]
