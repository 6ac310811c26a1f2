"""``python -m beit3 <command> ...`` is ``beit3 <command> ...``; a launcher may put ``--local_rank=N``
before the command (``deepspeed ... -m beit3 pretrain ...``)."""
import sys

from beit3.cli import main

if __name__ == "__main__":
    sys.exit(main())
