"""The official unilm/beit3 (torchscale) checkpoint format, to and from ours.

Official names, under ``beit3.`` in unilm's files (A = vision expert, B = language expert):

    text_embed.weight                                   text_embed.tokens.weight
    vision_embed.{proj.*, cls_token, mask_token}        vision_embed.{...}
    encoder.embed_positions.A.weight                    vision_embed.pos_embed   (2 unused + CLS + patches)
    encoder.embed_positions.B.weight                    text_embed.pos_embed     (2 unused + positions)
    encoder.layers.N.self_attn.{q,k,v}_proj.E.*         layers.N.attn.qkv.E.*    (one fused (3D, D) matrix)
    encoder.layers.N.self_attn.out_proj.E.*             layers.N.attn.proj.E.*
    encoder.layers.N.self_attn.inner_attn_ln.E.*        layers.N.attn.inner_norm.E.*
    encoder.layers.N.self_attn_layer_norm.E.*           layers.N.attn.norm.E.*
    encoder.layers.N.ffn.E.{fc1,fc2,ffn_layernorm}.*    layers.N.ffn.E.{...}
    encoder.layers.N.final_layer_norm.E.*               layers.N.ffn.E.norm.*
    encoder.layer_norm.E.*                              norm.E.*

Everything outside ``beit3.`` in a fine-tuned checkpoint is a task head (``fc_norm``/``head``,
``pooler.*``, ``vision_head``/``language_head``/``logit_scale``, ``mlm_head``, ...); it is returned
as is, under its official name, for the fine-tuning heads to load.

unilm's classification and VQA models run torchscale with ``normalize_output=False``: their
checkpoints have no ``encoder.layer_norm``. Loading one gives a model whose final norm is an
``nn.Identity`` (exactly what those checkpoints compute).
"""
from __future__ import annotations

import json
import math
import os
import re
import warnings
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, Optional, Union

import torch
from safetensors import safe_open
from torch import Tensor, nn

from beit3.model.config import OFFICIAL_TOKENIZER_IDS, OFFICIAL_VOCAB_SIZE, PRESETS, BEiT3Config
from beit3.model import BEiT3, Multiway
from beit3.model.embeddings import POS_OFFSET, resize_vision_pos_embed
from beit3.core.weight_files import load_state_dict
from beit3.model.pretrained import build_loaded

PREFIX = "beit3."
CONFIG_KEY = "beit3_config"  # safetensors metadata written by ``beit3 export``: our config as JSON
_OFFICIAL_ROOTS = ("text_embed.", "vision_embed.", "encoder.")
_OUR_ROOTS = ("text_embed.", "vision_embed.", "layers.", "norm.")

# (official, ours) name templates; {i} layer, {e} expert, {p} weight|bias, {m} FFN module.
_NAMES = [
    ("text_embed.weight", "text_embed.tokens.weight"),
    ("vision_embed.proj.{p}", "vision_embed.proj.{p}"),
    ("vision_embed.cls_token", "vision_embed.cls_token"),
    ("vision_embed.mask_token", "vision_embed.mask_token"),
    ("encoder.embed_positions.A.weight", "vision_embed.pos_embed"),
    ("encoder.embed_positions.B.weight", "text_embed.pos_embed"),
    ("encoder.layers.{i}.self_attn_layer_norm.{e}.{p}", "layers.{i}.attn.norm.{e}.{p}"),
    ("encoder.layers.{i}.self_attn.inner_attn_ln.{e}.{p}", "layers.{i}.attn.inner_norm.{e}.{p}"),
    ("encoder.layers.{i}.self_attn.out_proj.{e}.{p}", "layers.{i}.attn.proj.{e}.{p}"),
    ("encoder.layers.{i}.final_layer_norm.{e}.{p}", "layers.{i}.ffn.{e}.norm.{p}"),
    ("encoder.layers.{i}.ffn.{e}.{m}.{p}", "layers.{i}.ffn.{e}.{m}.{p}"),
    ("encoder.layer_norm.{e}.{p}", "norm.{e}.{p}"),
]
_QKV = ("encoder.layers.{i}.self_attn.{x}_proj.{e}.{p}", "layers.{i}.attn.qkv.{e}.{p}")
_FIELDS = {"i": r"\d+", "e": "A|B", "p": "weight|bias", "m": "fc1|fc2|ffn_layernorm", "x": "q|k|v"}


def _regex(template: str) -> re.Pattern:
    out = re.escape(template)
    for name, alt in _FIELDS.items():
        out = out.replace(re.escape("{" + name + "}"), f"(?P<{name}>{alt})")
    return re.compile(out + "$")


_RENAME = [(_regex(off), ours) for off, ours in _NAMES]
_RENAME_BACK = [(_regex(ours), off) for off, ours in _NAMES]
_QKV_OFF, _QKV_OURS = _regex(_QKV[0]), _regex(_QKV[1])


def _rename(key: str, table) -> Optional[str]:
    for pattern, template in table:
        m = pattern.match(key)
        if m:
            return template.format(**m.groupdict())
    return None


# -- state-dict conversion (pure functions) ----------------------------------------------------------
def split_official_state_dict(sd: Mapping[str, Tensor]) -> tuple[dict, dict]:
    """(backbone, heads) of an official state dict. The backbone keeps its official names (with the
    ``beit3.`` prefix when the file has one); heads keep theirs (``head.weight``, ``pooler.dense.bias``)."""
    if any(k.startswith(PREFIX) for k in sd):
        is_backbone = lambda k: k.startswith(PREFIX)  # noqa: E731
    else:  # a bare torchscale BEiT3 state dict
        is_backbone = lambda k: k.startswith(_OFFICIAL_ROOTS)  # noqa: E731
    backbone = {k: v for k, v in sd.items() if is_backbone(k)}
    heads = {k: v for k, v in sd.items() if not is_backbone(k)}
    return backbone, heads


def _official_to_ours(sd: Mapping[str, Tensor]) -> tuple[dict, list[str]]:
    """(our state dict, official keys not recognised)."""
    out, qkv, unknown = {}, {}, []
    for key, value in sd.items():
        k = key[len(PREFIX):] if key.startswith(PREFIX) else key
        m = _QKV_OFF.match(k)
        if m:
            g = m.groupdict()
            qkv.setdefault(_QKV[1].format(**g), {})[g["x"]] = value
            continue
        new = _rename(k, _RENAME)
        if new is None:
            unknown.append(key)
        else:
            out[new] = value
    for new, parts in qkv.items():
        if len(parts) == 3:
            out[new] = torch.cat([parts["q"], parts["k"], parts["v"]], dim=0)
        else:  # an incomplete q/k/v triple: report the absent projections as missing downstream
            unknown += [f"{new} (only {sorted(parts)} of q, k, v)"]
    return out, sorted(unknown)


def convert_official_to_ours(sd: Mapping[str, Tensor]) -> dict[str, Tensor]:
    """Official backbone state dict (with or without ``beit3.``) -> our released-layout state dict.
    Raises on keys it does not know: split heads off first with ``split_official_state_dict``."""
    out, unknown = _official_to_ours(sd)
    if unknown:
        raise ValueError(f"not official BEiT-3 backbone keys: {_names(unknown)}")
    return out


def convert_ours_to_official(sd: Mapping[str, Tensor], prefix: str = PREFIX) -> dict[str, Tensor]:
    """Our state dict -> official names under ``prefix``. The paper layout converts when it has no
    VL-FFN (``vl_layers=0``): its shared attention is written as both the A and the B expert."""
    vl = sorted({k.split(".ffn_vl.")[0] for k in sd if ".ffn_vl." in k})
    if vl:
        raise ValueError(f"the official format has no VL-FFN; this state dict has one in {vl} "
                         f"(paper layout with vl_layers > 0)")
    out, unknown = {}, []
    for key, value in sd.items():
        for k in ([key.replace(".shared.", ".A."), key.replace(".shared.", ".B.")]
                  if ".shared." in key else [key]):
            m = _QKV_OURS.match(k)
            if m:
                q, kk, v = value.chunk(3, dim=0)
                for x, part in zip("qkv", (q, kk, v)):
                    out[prefix + _QKV[0].format(x=x, **m.groupdict())] = part.clone()
                continue
            new = _rename(k, _RENAME_BACK)
            if new is None:
                unknown.append(key)
            else:
                out[prefix + new] = value
    if unknown:
        raise ValueError(f"not BEiT-3 backbone keys: {_names(unknown)}")
    return out


def _names(keys: list[str], limit: int = 12) -> str:
    shown = ", ".join(keys[:limit])
    return shown + (f", ... ({len(keys)} in all)" if len(keys) > limit else "")


# -- configuration from weights ---------------------------------------------------------------------
def _guess_heads(embed_dim: int) -> int:
    """Head count is not stored in the weights: the preset of that width's, else 64-wide heads."""
    for p in PRESETS.values():
        if p["embed_dim"] == embed_dim:
            return p["num_heads"]
    return max(1, embed_dim // 64)


def _preset_hint(name: str, value: Any) -> str:
    hits = [n for n, p in PRESETS.items() if p.get(name) == value]
    return "/".join(hits)


def _config(layout: str, embed_dim: int, vocab_size: int, depth: int, ffn_dim: int, proj: Tensor,
            vision_rows: int, text_rows: int, vl_layers: int = 0) -> BEiT3Config:
    patch = proj.shape[-1]
    grid = math.isqrt(vision_rows - POS_OFFSET - 1)
    if grid * grid != vision_rows - POS_OFFSET - 1:
        raise ValueError(f"vision position table has {vision_rows} rows; expected 3 + a square number")
    hint = _preset_hint("embed_dim", embed_dim)
    return BEiT3Config(
        layout=layout, embed_dim=embed_dim, depth=depth, num_heads=_guess_heads(embed_dim), ffn_dim=ffn_dim,
        vl_layers=vl_layers, img_size=grid * patch, patch_size=patch, in_chans=proj.shape[1],
        vocab_size=vocab_size, max_text_positions=text_rows,
        preset=hint if hint and PRESETS[hint.split("/")[0]]["depth"] == depth else "custom")


def _depth(keys, pattern: str) -> int:
    found = [int(m.group(1)) for k in keys for m in [re.match(pattern, k)] if m]
    if not found:
        raise ValueError("no transformer layers found in the state dict")
    return max(found) + 1


def _require(sd: Mapping[str, Tensor], keys: list[str], what: str) -> None:
    absent = [k for k in keys if k not in sd]
    if absent:
        raise ValueError(f"not {what}: no {absent}")


def infer_config_from_official(sd: Mapping[str, Tensor]) -> BEiT3Config:
    """Released-layout config matching an official backbone (``num_heads`` guessed from the width)."""
    sd = {k[len(PREFIX):] if k.startswith(PREFIX) else k: v for k, v in sd.items()}
    need = ["text_embed.weight", "vision_embed.proj.weight", "encoder.embed_positions.A.weight",
            "encoder.embed_positions.B.weight", "encoder.layers.0.ffn.A.fc1.weight"]
    _require(sd, need, "an official BEiT-3 state dict")
    tok = sd["text_embed.weight"]
    return _config("released", tok.shape[1], tok.shape[0], _depth(sd, r"encoder\.layers\.(\d+)\."),
                   sd["encoder.layers.0.ffn.A.fc1.weight"].shape[0], sd["vision_embed.proj.weight"],
                   sd["encoder.embed_positions.A.weight"].shape[0], sd["encoder.embed_positions.B.weight"].shape[0])


def infer_config_from_ours(sd: Mapping[str, Tensor]) -> BEiT3Config:
    """Config matching one of our state dicts, either layout (``num_heads`` guessed from the width)."""
    need = ["text_embed.tokens.weight", "vision_embed.proj.weight", "vision_embed.pos_embed",
            "text_embed.pos_embed", "layers.0.ffn.A.fc1.weight"]
    _require(sd, need, "a BEiT-3 state dict")
    tok = sd["text_embed.tokens.weight"]
    layout = "paper" if any(".attn.qkv.shared." in k for k in sd) else "released"
    vl = len({k.split(".ffn_vl.")[0] for k in sd if ".ffn_vl." in k})
    return _config(layout, tok.shape[1], tok.shape[0], _depth(sd, r"layers\.(\d+)\."),
                   sd["layers.0.ffn.A.fc1.weight"].shape[0], sd["vision_embed.proj.weight"],
                   sd["vision_embed.pos_embed"].shape[0], sd["text_embed.pos_embed"].shape[0], vl)


_CHECKED = ("layout", "embed_dim", "depth", "ffn_dim", "vocab_size", "patch_size", "in_chans",
            "max_text_positions")
# The sizes only one path reads: a vision encoder never touches the text tables, nor the reverse.
_OTHER_PATH = {"vision": ("vocab_size", "max_text_positions"), "text": ("patch_size", "in_chans")}


def check_compatible(found: BEiT3Config, cfg: BEiT3Config, source: str = "checkpoint",
                     path: Optional[str] = None) -> None:
    """Raise naming every size in which the checkpoint (``found``) differs from the config; ``path``
    ("vision" | "text") leaves out the sizes of the tables the other path holds."""
    skip = _OTHER_PATH.get(path, ())
    fields = tuple(f for f in _CHECKED if f not in skip) + (("vl_layers",) if cfg.layout == "paper" else ())
    errors = []
    for name in fields:
        a, b = getattr(found, name), getattr(cfg, name)
        if a != b:
            ha, hb = _preset_hint(name, a), cfg.preset if cfg.preset != "custom" else _preset_hint(name, b)
            errors.append(f"checkpoint {name} {a}{f' ({ha}?)' if ha else ''} but config {name} {b}"
                          f"{f' ({hb})' if hb else ''}")
    if {found.vocab_size, cfg.vocab_size} == {OFFICIAL_TOKENIZER_IDS, OFFICIAL_VOCAB_SIZE}:
        errors.append(f"a {OFFICIAL_TOKENIZER_IDS}-row text table is beit3.spm's ids without the official "
                      f"padding to {OFFICIAL_VOCAB_SIZE}: `beit3 export --to official` pads it")
    if errors:
        raise ValueError(f"{source} does not fit the model config: " + "; ".join(errors))


# -- loading -------------------------------------------------------------------------------------
@dataclass
class LoadedBackbone:
    """Our state dict for ``config`` (positions already fitted to its image size), plus the keys
    that are not backbone weights (official task heads, our objective heads)."""
    state_dict: dict
    config: BEiT3Config
    extras: dict = field(default_factory=dict)
    source_format: str = "ours"  # "ours" | "official"
    unexpected: list = field(default_factory=list)  # backbone-looking names that are not ours
    inferred: bool = False  # config guessed from the weights (num_heads is not stored in them)

    @property
    def final_norm(self) -> bool:
        """False for checkpoints without a final LayerNorm (unilm's normalize_output=False)."""
        return any(k.startswith("norm.") for k in self.state_dict)


def backbone_prefix(sd: Mapping[str, Tensor]) -> str:
    """The prefix in front of the backbone's names, found from the patch embedding
    (``model.`` for our pretraining engine, ``beit3.`` for unilm, ``module.`` for DDP, or '')."""
    for k in sd:
        if k.endswith("vision_embed.proj.weight"):
            return k[: -len("vision_embed.proj.weight")]
    raise ValueError(f"no BEiT-3 backbone found (no '*vision_embed.proj.weight'); keys: {_names(sorted(sd))}")


def _split_prefix(sd: Mapping[str, Tensor], prefix: str) -> tuple[dict, dict]:
    if prefix:
        inside = {k[len(prefix):]: v for k, v in sd.items() if k.startswith(prefix)}
        return inside, {k: v for k, v in sd.items() if not k.startswith(prefix)}
    roots = _OFFICIAL_ROOTS + _OUR_ROOTS
    return ({k: v for k, v in sd.items() if k.startswith(roots)},
            {k: v for k, v in sd.items() if not k.startswith(roots)})


def _resolve_config(preset_or_config, found: BEiT3Config) -> BEiT3Config:
    if preset_or_config is None:
        return found
    if isinstance(preset_or_config, BEiT3Config):
        return preset_or_config
    overrides = {"vl_layers": 0} if found.layout == "released" else {}
    return BEiT3Config.from_preset(preset_or_config, layout=found.layout, **overrides)


def fit_positions(sd: dict, cfg: BEiT3Config) -> dict:
    """Interpolate the vision position table's patch rows to ``cfg``'s image size (bicubic; the 2
    unused rows and the CLS row are kept)."""
    pos = sd.get("vision_embed.pos_embed")
    if pos is not None and pos.shape[0] != POS_OFFSET + 1 + cfg.num_patches:
        sd = {**sd, "vision_embed.pos_embed": resize_vision_pos_embed(pos, cfg.num_patches)}
    return sd


def _describe(checkpoint: Any) -> str:
    if isinstance(checkpoint, (str, os.PathLike)):
        return os.fspath(checkpoint)
    return "model" if isinstance(checkpoint, nn.Module) else "state dict"


def _stored_config(checkpoint: Any) -> Optional[BEiT3Config]:
    """The config ``beit3 export --to safetensors`` writes into the file's metadata, if any."""
    if not (isinstance(checkpoint, (str, os.PathLike)) and os.fspath(checkpoint).endswith(".safetensors")):
        return None
    with safe_open(checkpoint, "pt") as f:
        meta = f.metadata() or {}
    return BEiT3Config.from_dict(json.loads(meta[CONFIG_KEY])) if CONFIG_KEY in meta else None


def load_backbone(checkpoint: Any, preset_or_config: Union[str, BEiT3Config, None] = None,
                  allow_pickle: bool = False, prefix: Optional[str] = None, tag: Optional[str] = None,
                  img_size: Optional[int] = None, path: Optional[str] = None) -> LoadedBackbone:
    """Any BEiT-3 weights -> our state dict and config.

    checkpoint: a ``BEiT3``; a state dict; a file (``.pt``/``.pth``/``.safetensors``); or a DeepSpeed
        checkpoint directory (``tag``: its tag when the path is the parent). Official (unilm) or
        ours, either layout, under any prefix (found from the patch embedding unless given).
    preset_or_config: None takes the config stored with the weights (a ``BEiT3``, our safetensors
        export) or infers it from them (``inferred`` is then True: ``num_heads`` is a guess); a
        preset name takes the layout from the weights; a config is checked against them.
    img_size: overrides the config's image size; patch positions are interpolated to it.
    path: "vision" or "text" when only that path will be built: the other path's table sizes may
        then differ from the config's.
    """
    if isinstance(checkpoint, BEiT3):
        sd = checkpoint.state_dict()
        preset_or_config = checkpoint.cfg if preset_or_config is None else preset_or_config
    else:
        sd = load_state_dict(checkpoint, allow_pickle=allow_pickle, tag=tag)
        preset_or_config = _stored_config(checkpoint) if preset_or_config is None else preset_or_config
    prefix = backbone_prefix(sd) if prefix is None else prefix
    backbone, extras = _split_prefix(sd, prefix)
    official = any(k.startswith("encoder.") for k in backbone)
    unknown = []
    if official:
        found = infer_config_from_official(backbone)
        backbone, unknown = _official_to_ours(backbone)
        unknown = [prefix + k for k in unknown]
    else:
        found = infer_config_from_ours(backbone)
    cfg = _resolve_config(preset_or_config, found)
    if img_size is not None and img_size != cfg.img_size:
        cfg = cfg.replace(img_size=img_size)
    check_compatible(found, cfg, _describe(checkpoint), path)
    if path == "vision":  # the config describes the weights handed on, whatever the preset's text tables
        cfg = cfg.replace(vocab_size=found.vocab_size, max_text_positions=found.max_text_positions)
    return LoadedBackbone(fit_positions(backbone, cfg), cfg, extras, "official" if official else "ours",
                          unknown, inferred=preset_or_config is None)


@dataclass
class LoadedModel:
    model: BEiT3
    heads: dict  # the checkpoint's non-backbone weights, names as in the file
    missing: list
    unexpected: list


def load_official(checkpoint: Any, preset_or_config: Union[str, BEiT3Config, None] = None,
                  strict: bool = True, allow_pickle: bool = False) -> LoadedModel:
    """A ``BEiT3`` (released layout) with an official checkpoint's weights, and its task heads.

    Keys under ``beit3.`` that are not backbone weights are *unexpected*; backbone weights the file
    lacks are *missing*; with ``strict`` either raises naming them, otherwise a warning names them
    and the missing weights keep their initialisation.
    """
    loaded = load_backbone(checkpoint, preset_or_config, allow_pickle)

    def make() -> BEiT3:
        model = BEiT3(loaded.config)
        if not loaded.final_norm:
            model.norm = Multiway(nn.Identity)  # normalize_output=False checkpoints (classification, VQA)
        return model

    with torch.device("meta"):
        expected = make().state_dict()
    missing = sorted(set(expected) - set(loaded.state_dict))
    unexpected = loaded.unexpected + sorted(set(loaded.state_dict) - set(expected))
    _report(_describe(checkpoint), missing, unexpected, strict)
    weights = {k: v for k, v in loaded.state_dict.items() if k in expected}
    if missing:
        model = make()
        model.load_state_dict(weights, strict=False)
    else:
        model = build_loaded(make, weights)
    return LoadedModel(model, loaded.extras, missing, unexpected)


def _report(src: str, missing: list, unexpected: list, strict: bool) -> None:
    if not missing and not unexpected:
        return
    parts = ([f"missing keys: {_names(missing)}"] if missing else []) + \
            ([f"unexpected keys: {_names(unexpected)}"] if unexpected else [])
    msg = f"{src}: " + "; ".join(parts)
    if strict:
        raise ValueError(msg + " (strict=False loads the rest)")
    warnings.warn(msg, UserWarning, stacklevel=3)


def from_official(checkpoint: Any, preset_or_config: Union[str, BEiT3Config, None] = None,
                  strict: bool = True, allow_pickle: bool = False) -> BEiT3:
    """A ``BEiT3`` built for ``preset_or_config`` (inferred when None) holding an official
    checkpoint's backbone; positions are interpolated to the config's image size.
    ``load_official`` also returns the task heads."""
    return load_official(checkpoint, preset_or_config, strict, allow_pickle).model


def to_official(model: BEiT3, prefix: str = PREFIX) -> dict[str, Tensor]:
    """The model's weights under official names (``beit3.`` prefix; torchscale's ``BEiT3`` loads the
    rest strictly)."""
    return convert_ours_to_official(model.state_dict(), prefix)


def save_official(model: BEiT3, path: str, heads: Optional[Mapping[str, Tensor]] = None) -> None:
    """Write ``{"model": state dict}`` as unilm's ``load_model_and_may_interpolate`` reads it, the
    text table in the official size (``official_vocab``)."""
    sd = {k: v.detach().cpu().contiguous() for k, v in to_official(model).items()}
    sd.update({k: v.detach().cpu() for k, v in (heads or {}).items()})
    sd = official_vocab(sd)
    torch.save({"model": sd}, path)


_TEXT_ROWS = ("text_embed.weight", "mlm_head.weight", "mlm_head.bias")  # official names, any prefix


def official_vocab(sd: Mapping[str, Tensor]) -> dict[str, Tensor]:
    """The official 64010-row text embedding (and MLM head) for an official-format state dict.

    A 64002-row table (beit3.spm's ids, as beit3 sized it before it used the official size) gets 8
    zero rows, which no token id reaches. Any other size but 64010 is returned as it is with a
    warning: unilm/beit3 builds 64010 rows, and its loader only prints the size mismatch and goes on
    with a random text embedding.
    """
    out = dict(sd)
    for k, v in sd.items():
        if not k.endswith(_TEXT_ROWS) or v.shape[0] == OFFICIAL_VOCAB_SIZE:
            continue
        if v.shape[0] == OFFICIAL_TOKENIZER_IDS:
            out[k] = torch.cat([v, v.new_zeros(OFFICIAL_VOCAB_SIZE - v.shape[0], *v.shape[1:])])
        else:
            warnings.warn(f"{k} has {v.shape[0]} rows, not the official {OFFICIAL_VOCAB_SIZE}: unilm/beit3 "
                          f"(vocab_size={OFFICIAL_VOCAB_SIZE}) will not load it and keeps a random text "
                          f"embedding; torchscale needs vocab_size={v.shape[0]}", UserWarning, stacklevel=2)
    return out
