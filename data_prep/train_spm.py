#!/usr/bin/env python
"""Train the BEiT-3 sentencepiece text tokenizer; see ``beit3.data.text_tokenizer`` (also ``beit3 data spm``).

    python data_prep/train_spm.py --input corpus.txt --output out/beit3 --vocab-size 64000
"""
import sys

from beit3.cli.data import spm_main as main

if __name__ == "__main__":
    sys.exit(main())
