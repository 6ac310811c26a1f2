"""``beit3 info``: build a preset, print its parameter table, time one forward/backward pass."""
from __future__ import annotations

import argparse
import time

import torch

from .config import PRESETS, BEiT3Config
from .model import BEiT3
from .model.params import count_parameters, format_parameter_table


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="beit3 info", description=__doc__)
    ap.add_argument("--preset", default="tiny", choices=sorted(PRESETS))
    ap.add_argument("--layout", default="paper", choices=["paper", "released"])
    ap.add_argument("--batch-size", type=int, default=2)
    ap.add_argument("--text-len", type=int, default=16)
    ap.add_argument("--meta", action="store_true", help="count only; build on the meta device")
    args = ap.parse_args(argv)
    cfg = BEiT3Config.from_preset(args.preset, layout=args.layout)
    print(f"preset {args.preset}, layout {args.layout}: depth {cfg.depth}, width {cfg.embed_dim}, "
          f"FFN {cfg.ffn_dim}, heads {cfg.num_heads}, image {cfg.img_size}/{cfg.patch_size}")
    if args.meta:
        with torch.device("meta"):
            model = BEiT3(cfg)
        print(format_parameter_table(count_parameters(model)))
        return 0
    model = BEiT3(cfg)
    print(format_parameter_table(count_parameters(model)))
    B = args.batch_size
    image = torch.randn(B, cfg.in_chans, cfg.img_size, cfg.img_size)
    text = torch.randint(4, min(cfg.vocab_size, 1000), (B, args.text_len))
    pad = torch.zeros_like(text, dtype=torch.bool)
    pad[:, args.text_len * 3 // 4:] = True
    for mode, inputs in [("vision", dict(image=image)), ("text", dict(text=text, text_padding_mask=pad)),
                         ("fusion", dict(image=image, text=text, text_padding_mask=pad))]:
        model.zero_grad(set_to_none=True)
        t = time.perf_counter()
        out = model(**inputs)
        out.float().square().mean().backward()
        print(f"{mode:<7} forward+backward: output {tuple(out.shape)} in {time.perf_counter() - t:.3f}s")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
