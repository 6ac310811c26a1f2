#!/usr/bin/env python
"""Build the unilm/beit3 imagenet index files; see ``beit3 data downstream`` (``--help`` lists the options).

    python data_prep/build_imagenet_index.py --raw RAW --data-root DATA [--output DIR]
"""
import sys

from beit3.cli.data import downstream_main as main

if __name__ == "__main__":
    sys.exit(main(["imagenet", *sys.argv[1:]]))
