"""Thin wrapper: ``torchrun --nproc-per-node 2 scripts/zero3_comm.py ...`` counts the bytes ZeRO-3
moves per micro-step (see beit3/jobs/benchmark/comm_bytes.py and docs/multinode.md)."""
import sys

from beit3.jobs.benchmark.comm_bytes import main

if __name__ == "__main__":
    sys.exit(main())
