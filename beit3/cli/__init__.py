"""The ``beit3`` console script: a thin dispatcher to each command's own module (``beit3/cli/<command>.py``),
imported by name when its command runs, so that ``beit3 --help`` imports none of them."""
from __future__ import annotations

import importlib
import re
import sys

from beit3 import __version__

# command -> (module, help). Each module exposes main(argv) -> int.
COMMANDS = {
    "info": ("beit3.cli.info", "build a preset, print its parameter table, run a forward/backward pass"),
    "pretrain": ("beit3.cli.pretrain", "masked data modeling pretraining (DeepSpeed)"),
    "train-tokenizer": ("beit3.cli.train_tokenizer", "train a VQ-KD visual tokenizer"),
    "data": (None, "data preparation: 'beit3 data synthetic|shards|downstream|spm|cifar ...'"),
    "export": ("beit3.cli.export", "export weights: --to timm | onnx | safetensors | official"),
    "finetune": ("beit3.cli.finetune", "fine-tune on vqa, retrieval, captioning, classification, nlvr2, segmentation"),
    "evaluate": ("beit3.cli.evaluate", "evaluate a fine-tuned checkpoint"),
    "predict": ("beit3.cli.predict", "answers, captions, classes, rankings from a saved model (JSON lines)"),
    "embed": ("beit3.cli.embed:main_embed", "feature vectors of a folder, text file, list or shards (retrieval model)"),
    "search": ("beit3.cli.embed:main_search", "nearest neighbours in a saved embedding matrix; recall of two"),
    "benchmark": ("beit3.cli.benchmark", "throughput, TFLOP/s and MFU of pretraining steps"),
    "list-models": ("beit3.cli.list_models", "the official checkpoints by name"),
    "download": ("beit3.cli.download", "download an official checkpoint by name (checksummed, resumable)"),
}
DATA_COMMANDS = {
    "synthetic": "beit3.cli.data:synthetic_main",
    "shards": "beit3.cli.data:shards_main",
    "downstream": "beit3.cli.data:downstream_main",
    "spm": "beit3.cli.data:spm_main",
    "cifar": "beit3.cli.data:cifar_main",
}
# The launchers' rank flag: ``deepspeed ... -m beit3 pretrain ...`` runs ``python -u -m beit3
# --local_rank=N pretrain ...`` (torch.distributed.launch: ``--local-rank=N``).
LOCAL_RANK = re.compile(r"--local[_-]rank(=\d+)?$")


def _usage() -> str:
    lines = ["usage: beit3 <command> [options]   (beit3 --version)", "", "commands:"]
    lines += [f"  {name:<16}{help_}" for name, (_, help_) in COMMANDS.items()]
    return "\n".join(lines)


def _launcher_flags(argv: list[str]) -> tuple[list[str], list[str]]:
    """(the launcher's ``--local_rank`` flag and its value, if it precedes the command; the rest)."""
    if argv and LOCAL_RANK.match(argv[0]):
        n = 1 if "=" in argv[0] else 2
        return argv[:n], argv[n:]
    return [], argv


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    local_rank, argv = _launcher_flags(argv)
    if not argv or argv[0] in ("-h", "--help"):
        print(_usage())
        return 0
    if argv[0] in ("-V", "--version"):
        print(f"beit3 {__version__}")
        return 0
    cmd, rest = argv[0], argv[1:]
    if cmd == "data":
        if not rest or rest[0] not in DATA_COMMANDS:
            print(f"usage: beit3 data {{{','.join(DATA_COMMANDS)}}} [options]", file=sys.stderr)
            return 2
        module, rest = DATA_COMMANDS[rest[0]], rest[1:]
    elif cmd in COMMANDS:
        module = COMMANDS[cmd][0]
    else:
        print(f"beit3: unknown command {cmd!r}\n\n{_usage()}", file=sys.stderr)
        return 2
    module, _, func = module.partition(":")
    # by name: a command's module (and what it imports) loads only when the command runs
    return int(getattr(importlib.import_module(module), func or "main")(local_rank + rest) or 0)
