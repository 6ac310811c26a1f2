#!/usr/bin/env python
"""Write webdataset pretraining shards; see ``beit3.data.shards`` (also ``beit3 data shards``).

    python data_prep/make_shards.py --images imgs/ --output shards/ --shard-size 1000
    python data_prep/make_shards.py --captions pairs.jsonl --output shards/
    python data_prep/make_shards.py --texts corpus.txt --output shards/
"""
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # run without install

from beit3.data.shards import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main())
