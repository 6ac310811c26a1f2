"""``python -m beit3.data.downstream``: the index-file builders' command line."""
import sys

from beit3.data.downstream import main

sys.exit(main())
