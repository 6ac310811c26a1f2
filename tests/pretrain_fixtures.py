"""Shared helpers for pretraining tests: a tiny SentencePiece model, an untrained tiny VQ-KD and
deterministic mixed batches indexed by (step, global micro-batch) so that any split of the same
global batch over ranks and accumulation steps sees the same samples."""
from __future__ import annotations

import os

import numpy as np
import torch

from beit3.data.masking import BlockMaskGenerator, default_num_masking_patches, mask_text
from beit3.data.text_tokenizer import TextTokenizer, train_spm
from beit3.vqkd.vqkd import VQKD, VQKDConfig, save_trained

WORDS = "a the red green blue small large circle square triangle left right of above below two".split()


def make_assets(root: str) -> tuple[str, str]:
    """(spm path, tokenizer dir), built once per directory."""
    spm = os.path.join(root, "spm.model")
    tok = os.path.join(root, "vqkd")
    if not os.path.isfile(spm):
        rng = np.random.default_rng(0)
        corpus = os.path.join(root, "corpus.txt")
        with open(corpus, "w") as f:
            for _ in range(400):
                f.write(" ".join(rng.choice(WORDS, size=rng.integers(4, 10))) + "\n")
        train_spm([corpus], os.path.join(root, "spm"), vocab_size=60)
    if not os.path.isdir(tok):
        torch.manual_seed(0)
        save_trained(VQKD(VQKDConfig.from_preset("tiny", num_codes=64)), tok)
    return spm, tok


class IndexedBatches:
    """Batch for (step, micro) of rank r is global micro-batch number step * G + r * ga + micro
    where G = world * ga; each is generated from its own seed."""

    def __init__(self, spm: str, rank: int, world: int, ga: int, sizes=(4, 4, 4), img=64, text_len=12):
        self.tok = TextTokenizer(spm)
        self.rank, self.world, self.ga, self.sizes, self.img, self.text_len = rank, world, ga, sizes, img, text_len
        grid = img // 8
        self.masker = BlockMaskGenerator(grid, default_num_masking_patches(grid, grid))
        self.i = 0

    def __iter__(self):
        return self

    def state_dict(self) -> dict:
        return {"i": self.i}

    def load_state_dict(self, state: dict) -> None:
        self.i = state["i"]

    def __next__(self) -> dict:
        step, micro = divmod(self.i, self.ga)
        self.i += 1
        return self.batch(step * self.world * self.ga + self.rank * self.ga + micro)

    def batch(self, index: int) -> dict:
        g = torch.Generator().manual_seed(1000 + index)
        rng = np.random.default_rng(1000 + index)
        bi, bt, bp = self.sizes
        out = {}

        def texts(n, prob):
            sents = [" ".join(rng.choice(WORDS, size=rng.integers(3, 8))) for _ in range(n)]
            ids, pad = self.tok.batch_encode(sents, self.text_len, pad_to_max=True)
            inp, labels = mask_text(ids, pad, prob, self.tok.mask_id, self.tok.vocab_size, self.tok.special_ids, g)
            return {"text": inp, "padding_mask": pad, "labels": labels}

        def images(n):
            img = torch.rand(n, 3, self.img, self.img, generator=g)
            mask = torch.from_numpy(np.stack([self.masker(rng).reshape(-1) for _ in range(n)]))
            return {"image": img * 2 - 1, "tokenizer_image": img, "image_mask": mask}

        if bi:
            out["images"] = images(bi)
        if bt:
            out["texts"] = texts(bt, 0.15)
        if bp:
            im = images(bp)
            out["pairs"] = {"image": im["image"], **texts(bp, 0.5)}
        return out


def run_args(output: str, spm: str, tok: str, extra: tuple = (), world: int = 1, **kw):
    """The resolved ``PretrainConfig`` of these flags on ``world`` CPU ranks; ``kw``: settings by key
    (``steps=2``), over the flags."""
    from beit3.cli.pretrain import build_parser, defaults_for
    args = build_parser().parse_args(["--preset", "tiny", "--output", output, "--data", "synthetic",
                                      "--spm", spm, "--tokenizer", tok, "--no-tensorboard", *extra])
    for k, v in kw.items():
        setattr(args, k, v)
    return defaults_for(args, "cpu", world)


def exported_backbone(checkpoint: str, out_dir) -> dict:
    """The backbone ``beit3 export --to safetensors`` consolidates from a DeepSpeed checkpoint."""
    from safetensors.torch import load_file

    from beit3.cli.export import main as export_main
    out = os.path.join(str(out_dir), f"{os.path.basename(checkpoint)}.safetensors")
    assert export_main(["--to", "safetensors", str(checkpoint), "-o", out]) == 0
    return load_file(out)
