#!/usr/bin/env python
"""Write webdataset pretraining shards; see ``beit3.data.shards`` (also ``beit3 data shards``).

    python data_prep/make_shards.py --images imgs/ --output shards/ --shard-size 1000
    python data_prep/make_shards.py --captions pairs.jsonl --output shards/
    python data_prep/make_shards.py --texts corpus.txt --output shards/
"""
import sys

from beit3.cli.data import shards_main as main

if __name__ == "__main__":
    sys.exit(main())
