#!/usr/bin/env python
"""Build the unilm/beit3 captioning index files; see ``beit3 data downstream`` (``--help`` lists the options).

    python data_prep/build_captioning_index.py --raw RAW --data-root DATA --spm beit3.spm [--output DIR]
"""
import sys

from beit3.cli.data import downstream_main as main

if __name__ == "__main__":
    sys.exit(main(["captioning", *sys.argv[1:]]))
