"""``python -m beit3.cli <command> ...`` is ``beit3 <command> ...`` (``torchrun ... -m beit3.cli embed ...``)."""
import sys

from beit3.cli import main

if __name__ == "__main__":
    sys.exit(main())
