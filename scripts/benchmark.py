"""Thin wrapper: ``python scripts/benchmark.py ...`` is ``beit3 benchmark ...`` (see beit3/cli/benchmark.py)."""
import sys

from beit3.cli.benchmark import main

if __name__ == "__main__":
    sys.exit(main())
