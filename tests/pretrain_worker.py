"""Run a short pretraining on IndexedBatches; started by tests under torchrun or directly.

    python tests/pretrain_worker.py OUT SPM TOKENIZER GRAD_ACCUM STEPS [beit3 pretrain flags...]
"""
import os
import sys

# Run as a script, its folder (tests/) is first on sys.path; imported by a test, pytest put it there.
os.environ.setdefault("DS_ACCELERATOR", "cpu")

from pretrain_fixtures import IndexedBatches, run_args  # noqa: E402

from beit3.cli.pretrain import check_args, run_with_errors  # noqa: E402
from beit3.jobs.pretrain.loop import PretrainRun  # noqa: E402


def main(out: str, spm: str, tok: str, ga: int, steps: int, extra: list) -> int:
    world, rank = int(os.environ.get("WORLD_SIZE", 1)), int(os.environ.get("RANK", 0))
    defaults = dict(steps=steps, batch_images=2, batch_texts=2, batch_pairs=2, grad_accum=ga,
                    log_every=1, save_every=steps, drop_path=0.0)
    given = {k: v for k, v in defaults.items()
             if not any(e == flag or e.startswith(flag + "=") for e in extra for flag in ["--" + k.replace("_", "-")])}
    args = run_args(out, spm, tok, extra=tuple(extra), world=world, **given)
    ds = check_args(args, world)
    data = IndexedBatches(spm, rank, world, ga, sizes=(2, 2, 2))
    return run_with_errors(PretrainRun(args, ds, "cpu", data=data), args)


def in_this_process(out: str, spm: str, tok: str, ga: int, steps: int, extra: list = ()) -> int:
    """``main`` without a second interpreter to start and import DeepSpeed into: one rank, one
    intra-op thread as the launched ranks run (OMP_NUM_THREADS=1)."""
    import torch
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        return main(out, spm, tok, ga, steps, list(extra))
    finally:
        torch.set_num_threads(threads)


if __name__ == "__main__":
    out, spm, tok, ga, steps = sys.argv[1:6]
    sys.exit(main(out, spm, tok, int(ga), int(steps), sys.argv[6:]))
