#!/usr/bin/env python
"""Write the synthetic world; see ``beit3.data.synthetic`` (also ``beit3 data synthetic``).

    python data_prep/make_synthetic.py --output data/synthetic --num-images 2000
"""
import sys

from beit3.cli.data import synthetic_main as main

if __name__ == "__main__":
    sys.exit(main())
