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
from dataclasses import dataclass, field

LAYOUTS = ("paper", "released")


def checked_from_dict(cls, d):
    """``cls(**d)`` for a dataclass, naming the unknown keys (a config file from another version)."""
    known = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(d) - known)
    if unknown:
        raise TypeError(f"{cls.__name__} has no field(s) {unknown}; known fields: {sorted(known)}")
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
    init_std: float = 0.02
    # torchscale's Sub-LN residual scaling (fc1, fc2, v and out projections times sqrt(log 2N)).
    # Off by default: the official unilm/beit3 wrapper re-initialises over it.
    subln_init_scale: bool = False
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
        if not 0.0 <= self.drop_path_rate < 1.0:
            raise ValueError(f"BEiT3Config: drop_path_rate={self.drop_path_rate} must be in [0, 1)")

    # -- presets -------------------------------------------------------------------------------
    @classmethod
    def from_preset(cls, name: str, layout: str = "paper", **overrides) -> "BEiT3Config":
        if name not in PRESETS:
            raise ValueError(f"unknown preset {name!r}: expected one of {sorted(PRESETS)}")
        fields = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(overrides) - fields)
        if unknown:
            raise TypeError(f"BEiT3Config has no field(s) {unknown}; known fields: {sorted(fields)}")
        return cls(**{**PRESETS[name], "layout": layout, "preset": name, **overrides})

    @classmethod
    def from_dict(cls, d: dict) -> "BEiT3Config":
        return checked_from_dict(cls, d)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    def replace(self, **changes) -> "BEiT3Config":
        return dataclasses.replace(self, **changes)


PRESETS: dict[str, dict] = {
    # CPU demo and tests: 64 px images in 8 px patches (an 8x8 grid), 4 layers.
    "tiny": dict(embed_dim=192, depth=4, num_heads=3, ffn_dim=768, vl_layers=1,
                 img_size=64, patch_size=8),
    "base": dict(embed_dim=768, depth=12, num_heads=12, ffn_dim=3072, patch_size=16),
    "large": dict(embed_dim=1024, depth=24, num_heads=16, ffn_dim=4096, patch_size=16),
    "giant": dict(embed_dim=1408, depth=40, num_heads=16, ffn_dim=6144, patch_size=14),
}
