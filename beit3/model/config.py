"""Model configuration: one dataclass, named presets, keyword overrides.

Two layouts of the same Multiway Transformer are supported (see docs/model.md, "Layouts"):

* ``paper``: as the BEiT-3 paper describes it. One *shared* self-attention per layer, a vision FFN
  and a language FFN in every layer, and a vision-language FFN in the top ``vl_layers`` layers that
  image-text inputs use there instead of the V/L FFNs.
* ``released``: the layout of the published unilm/beit3 checkpoints (torchscale). Every projection
  and LayerNorm exists twice (A = vision, B = language) and there is no VL-FFN.
"""
from __future__ import annotations

import dataclasses
import warnings
from dataclasses import dataclass, field
from typing import Callable, Optional

from beit3.core.settings import check_values

LAYOUTS = ("paper", "released")
# The official checkpoints and unilm/beit3 (vocab_size=64010) have 64010 text rows for beit3.spm,
# whose 64000 pieces give 64002 ids in the fairseq/XLM-R layout (+1 offset, + <mask>).
OFFICIAL_VOCAB_SIZE = 64010
OFFICIAL_TOKENIZER_IDS = 64002


def text_table_rows(tokenizer_ids: int) -> int:
    """Rows of the text embedding and MLM head for a tokenizer of ``tokenizer_ids`` ids: the official
    64010 for a 64,000-piece SentencePiece model (the 8 rows past its ids are never an input or a
    target), otherwise the tokenizer's own count (the demo's small tokenizer keeps a small table)."""
    return OFFICIAL_VOCAB_SIZE if tokenizer_ids == OFFICIAL_TOKENIZER_IDS else tokenizer_ids


def check_text_vocab(tokenizer_ids: int, rows: int, source: str = "the model") -> None:
    """Raise if the tokenizer has ids past the text table; warn if the table was built for another
    tokenizer (e.g. an official 64010-row checkpoint with a small SentencePiece model, or a 64002-row
    table from before beit3 used the official size)."""
    if tokenizer_ids > rows:
        raise ValueError(f"the tokenizer has {tokenizer_ids} ids but {source}'s text embedding only {rows} rows: "
                         f"use the sentencepiece model it was trained with (--spm)")
    if rows != text_table_rows(tokenizer_ids):
        warnings.warn(f"{source}'s text embedding has {rows} rows but a tokenizer of {tokenizer_ids} ids gets "
                      f"{text_table_rows(tokenizer_ids)}: is this the sentencepiece model it was trained with?",
                      UserWarning, stacklevel=2)


def check_fields(cls, keys) -> None:
    """Raise naming the keys that are not fields of the dataclass ``cls`` (a config file from another
    version, a misspelt override): the one unknown-field check of every config."""
    known = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(keys) - known)
    if unknown:
        raise TypeError(f"{cls.__name__} has no field(s) {unknown}; known fields: {sorted(known)}")


def checked_from_dict(cls, d, naming: Optional[Callable[[str], str]] = None):
    """``cls(**d)`` for a dataclass, naming the unknown keys and the first value of the wrong type or
    outside its field's range (``naming``: how a field is named; default ``Class.field``)."""
    check_fields(cls, d)
    check_values(cls, d, naming or (lambda name: f"{cls.__name__}.{name}"))
    return cls(**d)


@dataclass
class BEiT3Config:
    layout: str = "paper"
    embed_dim: int = 768
    depth: int = 12
    num_heads: int = 12
    ffn_dim: int = 3072
    vl_layers: int = 3  # top layers with a vision-language FFN (paper layout only)
    img_size: int = 224
    patch_size: int = 16
    in_chans: int = 3
    vocab_size: int = 64010
    max_text_positions: int = 1024  # rows of the text position table (fairseq: 2 unused + 1022)
    drop_path_rate: float = 0.0
    attn_dropout: float = 0.0
    layer_norm_eps: float = 1e-5
    init_std: float = 0.02  # normal cut at +-init_std, as unilm (beit3.model.init); tiny: 0.04
    # torchscale's Sub-LN (Magneto) scaling of fc1, fc2, v and out by sqrt(log 2N). Off here because
    # unilm/beit3's fine-tuning wrapper re-initialises every Linear over it; `beit3 pretrain` turns it
    # on (torchscale's default, subln=True), `--init-scheme plain` leaves it off.
    subln_init_scale: bool = False
    # BEiT v2 patch aggregation (--patch-aggregation): the CLS head reads the patches after this
    # many layers (beit2's --early_layers: 9 of 12 for base, 21 of 24 for large); None = depth - 3.
    aggregation_early_layers: Optional[int] = field(default=None, compare=False)  # not the backbone's shape
    preset: str = field(default="custom", compare=False)

    def __post_init__(self):
        self.validate()

    # -- derived sizes -------------------------------------------------------------------------
    @property
    def head_dim(self) -> int:
        return self.embed_dim // self.num_heads

    @property
    def grid_size(self) -> int:
        return self.img_size // self.patch_size

    @property
    def num_patches(self) -> int:
        return self.grid_size**2

    @property
    def max_text_len(self) -> int:
        return self.max_text_positions - 2  # fairseq positions start at 2

    @property
    def first_vl_layer(self) -> int:
        """Index of the first layer with a VL-FFN (``depth`` when there is none)."""
        return self.depth - self.vl_layers if self.layout == "paper" else self.depth

    @property
    def early_layers(self) -> int:
        """Layers before BEiT v2's patch aggregation reads the patches (see aggregation_early_layers)."""
        if self.aggregation_early_layers is not None:
            return self.aggregation_early_layers
        return max(1, self.depth - 3)

    def validate(self) -> None:
        if self.layout not in LAYOUTS:
            raise ValueError(f"BEiT3Config.layout={self.layout!r}: expected one of {LAYOUTS}")
        if self.embed_dim % self.num_heads:
            raise ValueError(
                f"BEiT3Config: embed_dim={self.embed_dim} is not divisible by num_heads={self.num_heads}")
        if self.img_size % self.patch_size:
            raise ValueError(
                f"BEiT3Config: img_size={self.img_size} is not a multiple of patch_size={self.patch_size}")
        if not 0 <= self.vl_layers <= self.depth:
            raise ValueError(f"BEiT3Config: vl_layers={self.vl_layers} must be in [0, depth={self.depth}]")
        if self.max_text_positions < 3:
            raise ValueError(f"BEiT3Config: max_text_positions={self.max_text_positions} must be >= 3")
        if self.aggregation_early_layers is not None and self.aggregation_early_layers < 1:
            raise ValueError(f"BEiT3Config: aggregation_early_layers={self.aggregation_early_layers} must be >= 1")
        if not 0.0 <= self.drop_path_rate < 1.0:
            raise ValueError(f"BEiT3Config: drop_path_rate={self.drop_path_rate} must be in [0, 1)")

    # -- presets -------------------------------------------------------------------------------
    @classmethod
    def from_preset(cls, name: str, layout: str = "paper", **overrides) -> "BEiT3Config":
        if name not in PRESETS:
            raise ValueError(f"unknown preset {name!r}: expected one of {sorted(PRESETS)}")
        check_fields(cls, overrides)
        return cls(**{**PRESETS[name], "layout": layout, "preset": name, **overrides})

    @classmethod
    def from_dict(cls, d: dict) -> "BEiT3Config":
        return checked_from_dict(cls, d)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    def replace(self, **changes) -> "BEiT3Config":
        return dataclasses.replace(self, **changes)


PRESETS: dict[str, dict] = {
    # CPU demo and tests: 64 px images in 8 px patches (an 8x8 grid), 4 layers. init_std 0.04: cut at
    # +-std, its actual std is 0.0216, the scale the demos were tuned at; at unilm's 0.02 (0.0108) the
    # CPU tests' budgets left the VQA demo at one constant answer and captioning at CIDEr 0.
    "tiny": dict(embed_dim=192, depth=4, num_heads=3, ffn_dim=768, vl_layers=1,
                 img_size=64, patch_size=8, aggregation_early_layers=3, init_std=0.04),
    "base": dict(embed_dim=768, depth=12, num_heads=12, ffn_dim=3072, patch_size=16, aggregation_early_layers=9),
    "large": dict(embed_dim=1024, depth=24, num_heads=16, ffn_dim=4096, patch_size=16, aggregation_early_layers=21),
    # beit2 has no giant; 37 keeps its rule for base and large (the last 3 layers after the read-out).
    "giant": dict(embed_dim=1408, depth=40, num_heads=16, ffn_dim=6144, patch_size=14, aggregation_early_layers=37),
}
