"""One rank of a multi-rank ``beit3 finetune`` / ``beit3 evaluate`` test; started by
tests/test_finetune_distributed.py (RANK, WORLD_SIZE, MASTER_ADDR and MASTER_PORT set per process).

    python tests/finetune_worker.py JOBS.json

JOBS.json is a list of ``{"command": "finetune" | "evaluate", "argv": [...], "fixed_augment": bool}``,
run in order in one process group, so that two ranks start (import torch and DeepSpeed) once for
all of them.
"""
import contextlib
import json
import os
import sys
import time

os.environ.setdefault("DS_ACCELERATOR", "cpu")


@contextlib.contextmanager
def fixed_augment():
    """Train the vision-language tasks on their (deterministic) eval transform. Random crops draw
    from each rank's own RNG stream (seeded with seed + rank), so a sample is augmented differently
    on 2 ranks than on one; without the draws the runs differ only in how the batch is split."""
    from beit3.jobs.finetune.tasks import Task

    original = Task.transform
    Task.transform = lambda self, train: original(self, False)
    try:
        yield
    finally:
        Task.transform = original


def run(job: dict) -> int:
    from beit3.cli.evaluate import main as evaluate_main
    from beit3.cli.finetune import main as finetune_main

    entry = {"finetune": finetune_main, "evaluate": evaluate_main}[job["command"]]
    with fixed_augment() if job.get("fixed_augment") else contextlib.nullcontext():
        return entry(job["argv"])


def main(path: str) -> int:
    with open(path) as f:
        jobs = json.load(f)
    for job in jobs:
        t = time.perf_counter()
        rc = run(job)
        print(f"finetune_worker: {job['command']} {job['argv'][1]} took {time.perf_counter() - t:.1f} s", flush=True)
        if rc != 0:
            print(f"finetune_worker: {job['command']} {' '.join(job['argv'])} exited with {rc}", file=sys.stderr)
            return rc
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1]))
