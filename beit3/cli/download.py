"""``beit3 download NAME``: an official unilm/beit3 checkpoint by name, checksummed and resumable
(``beit3.weights.hub``); prints the cached file's path."""
from __future__ import annotations

import argparse
import sys
from typing import Optional

from beit3.core.errors import UserError
from beit3.weights.hub import DownloadError, download


def main(argv: Optional[list[str]] = None) -> int:
    """``beit3 download NAME [--mirror URL|FOLDER] [--sha256 H] [--offline] [--timeout S]``."""
    ap = argparse.ArgumentParser(prog="beit3 download")
    ap.add_argument("name")
    ap.add_argument("--mirror", default=None,
                    help="base URL (http(s):// or file://) or folder holding the files by name (default $BEIT3_MIRROR)")
    ap.add_argument("--sha256", default=None, help="the expected checksum")
    ap.add_argument("--offline", action="store_true", default=None,
                    help="never use the network: the cache or a mirror folder only (default $BEIT3_OFFLINE)")
    ap.add_argument("--timeout", type=float, default=60.0, help="seconds any network read may wait (default 60)")
    args = ap.parse_args(argv)
    try:
        if not args.timeout > 0:
            raise UserError(f"--timeout must be positive, got {args.timeout}")
        print(download(args.name, args.mirror, args.sha256, timeout=args.timeout, offline=args.offline))
    except UserError as e:
        print(f"beit3 download: error: {e}", file=sys.stderr)
        return 2 if not isinstance(e, DownloadError) else 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
