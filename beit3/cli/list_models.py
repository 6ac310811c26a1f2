"""``beit3 list-models [PATTERN] [--task T]``: the official checkpoints by name (``beit3.weights.hub``)."""
from __future__ import annotations

import argparse
import sys
from typing import Optional

from beit3.core.errors import UserError
from beit3.weights.hub import list_models, tasks


def main(argv: Optional[list[str]] = None) -> int:
    """``beit3 list-models [PATTERN] [--task T]``."""
    ap = argparse.ArgumentParser(prog="beit3 list-models")
    ap.add_argument("pattern", nargs="?", default="*")
    ap.add_argument("--task", default=None, help=", ".join(tasks()))
    args = ap.parse_args(argv)
    try:
        found = list_models(args.pattern, args.task)
    except UserError as e:
        print(f"beit3 list-models: error: {e}", file=sys.stderr)
        return 2
    for m in found:
        print(f"{m.name:<48} {m.task or 'backbone':<14} {m.preset:<6} {m.img_size or '':>4}  {m.note}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
