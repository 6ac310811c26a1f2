"""``beit3 info``: build a preset, print its parameter table, time one forward/backward pass."""
from __future__ import annotations

import argparse
import sys
import time
from dataclasses import dataclass

import torch

from beit3.model.config import PRESETS, BEiT3Config
from beit3.core.settings import SettingError, add_dataclass_flags, check_settings, given, setting as _f
from beit3.model import BEiT3
from beit3.model.params import count_parameters, format_parameter_table


@dataclass
class InfoSettings:
    preset: str = _f("tiny", choices=sorted(PRESETS))
    layout: str = _f("paper", choices=["paper", "released"])
    batch_size: int = _f(2, "samples of the timed pass", ge=1)
    text_len: int = _f(16, "text tokens of the timed pass (the last quarter padding), at most the preset's "
                       "position table (1022)", ge=2)
    meta: bool = _f(False, "count only; build on the meta device")

    def __post_init__(self):
        check_settings(self)
        positions = BEiT3Config.from_preset(self.preset, layout=self.layout).max_text_len
        if self.text_len > positions:
            raise SettingError(f"--text-len {self.text_len}: the {self.preset} preset's text position table holds "
                               f"{positions} tokens")


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="beit3 info", description=__doc__)
    add_dataclass_flags(ap, InfoSettings)
    return ap


def main(argv: list[str] | None = None) -> int:
    ns = build_parser().parse_args(argv)
    try:
        args = InfoSettings(**given(ns, InfoSettings))
    except SettingError as e:
        print(f"beit3 info: error: {e}", file=sys.stderr)
        return 2
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
