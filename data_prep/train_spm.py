#!/usr/bin/env python
"""Train the BEiT-3 sentencepiece text tokenizer; see ``beit3.data.text_tokenizer.main``.

    python data_prep/train_spm.py --input corpus.txt --output out/beit3 --vocab-size 64000
"""
import sys

from beit3.data.text_tokenizer import main

if __name__ == "__main__":
    sys.exit(main())
