"""``beit3 train-tokenizer``: train a BEiT v2 VQ-KD visual tokenizer on a folder of images; the run
is ``beit3.jobs.tokenizer.train``'s."""
from __future__ import annotations

import argparse
import sys

from beit3.core.errors import UserError
from beit3.core.settings import add_dataclass_flags, given
from beit3.trainer.distributed import pick_device
from beit3.trainer.run_dir import check_run_folder
from beit3.trainer.trackers import check_request
from beit3.jobs.tokenizer.config import TokenizerTrainConfig
from beit3.jobs.tokenizer.train import read_metrics, tokenizer_run


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="beit3 train-tokenizer", description="Train a BEiT v2 VQ-KD visual tokenizer.")
    add_dataclass_flags(p, TokenizerTrainConfig)
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        settings = TokenizerTrainConfig(**given(args, TokenizerTrainConfig)).resolved()
        settings.check()  # before the teacher is loaded and the steps run
        check_request(settings.report_to, settings.tensorboard, getattr(args, "tensorboard", None))
        check_run_folder(settings.output, settings.resume, settings.overwrite)  # the run checks again, locked
        pick_device(settings.device)
        run = tokenizer_run(settings)
        path = run.train()
    except (ValueError, FileNotFoundError, ImportError, UserError) as e:
        print(f"beit3 train-tokenizer: error: {e}", file=sys.stderr)
        return 2
    metrics = read_metrics(settings.output)
    first, last = metrics[0], metrics[-1]
    if run.step_reached < settings.steps:
        print(f"stopped at step {run.step_reached} of {settings.steps} (rec loss {last['rec_loss']:.4f} at step "
              f"{last['step']}); continue with --resume auto; saved {path}")
        return 0
    print(f"final rec loss {last['rec_loss']:.4f} (first logged {first['rec_loss']:.4f}), "
          f"quant loss {last['quant_loss']:.4f}, codebook usage {last['usage']:.1%} of {run.config.num_codes} codes "
          f"(perplexity {last['perplexity']:.1f}); saved {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
