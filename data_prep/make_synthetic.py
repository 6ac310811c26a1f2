#!/usr/bin/env python
"""Write the synthetic world; see ``beit3.data.synthetic`` (also ``beit3 data synthetic``).

    python data_prep/make_synthetic.py --output data/synthetic --num-images 2000
"""
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # run without install

from beit3.data.synthetic import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main())
