#!/usr/bin/env python
"""Train the BEiT-3 sentencepiece text tokenizer; see ``beit3.data.text_tokenizer.main``.

    python data_prep/train_spm.py --input corpus.txt --output out/beit3 --vocab-size 64000
"""
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # run without install

from beit3.data.text_tokenizer import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main())
