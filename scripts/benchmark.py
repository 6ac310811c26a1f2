"""Thin wrapper: ``python scripts/benchmark.py ...`` is ``beit3 benchmark ...`` (see beit3/benchmark.py)."""
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from beit3.benchmark import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main())
