"""BEiT-3 weights written for other tools: timm (``export_timm``, ``create_timm_model``), consolidated
safetensors (``export_safetensors``) and unilm/beit3's format (``export_official``); ONNX graphs are
``beit3.weights.onnx``'s. ``saved_model_source`` reads what a saved-model folder keeps beside its
weights. The command is ``beit3 export`` (``beit3/cli/export.py``, whose help describes the formats).

A timm export's ``pretrained_cfg`` carries the source's evaluation preprocessing (a saved model's;
else the vision-language tasks' square resize), so timm's own ``resolve_data_config`` +
``create_transform`` compute the same input (a square resize is timm's ``crop_mode="squash"``).
BEiT-3's LayerNorms use eps 1e-5 and timm's string norm names all mean 1e-6, so config.json cannot
name the norm layer; instead its ``architecture`` is a timm entry point whose own norm layer has the
right eps (the CLIP ViTs' ``partial(LayerNorm, eps=1e-5)``; ``vit_base_patch16_224`` for 1e-6) and
``model_args`` override every other size of that entry point (``pre_norm`` included). The export
builds the model back through timm and refuses to finish if any LayerNorm's eps differs.

Every file is written beside its target and renamed over it when complete, so a failure (a full
disk, SIGTERM) leaves a previous export as it was.
"""
from __future__ import annotations

import functools
import json
import os
from dataclasses import dataclass
from typing import Optional

import timm
import torch
from safetensors.torch import save_file
from torch import Tensor, nn

from beit3.weights.backbones import timm_vit_kwargs, vision_state_dict
from beit3.weights.official import CONFIG_KEY, LoadedBackbone, convert_ours_to_official, official_vocab
from beit3.model.config import BEiT3Config
from beit3.data.transforms import vl_preprocess
from beit3.core.errors import BadFileError, UserError
from beit3.core.files import atomic_file, atomic_write_bytes, read_json
from beit3.model.saved import CONFIG_FILE, FORMAT, WEIGHTS_FILE


def _plain(sd: dict) -> dict[str, Tensor]:
    """Contiguous CPU tensors that share no memory (safetensors refuses views of one buffer)."""
    return {k: v.detach().to("cpu").contiguous().clone() for k, v in sd.items()}


def _save_safetensors(sd: dict, path: str, metadata: Optional[dict] = None) -> None:
    sd = _plain(sd)
    with atomic_file(path) as tmp:
        save_file(sd, tmp, metadata=metadata)


# timm entry points whose own norm layer is a LayerNorm of this eps; model_args override the rest.
TIMM_ARCH_BY_EPS = {1e-5: "vit_xsmall_patch16_clip_224", 1e-6: "vit_base_patch16_224"}


def timm_architecture(eps: float) -> str:
    for value, arch in TIMM_ARCH_BY_EPS.items():
        if abs(eps - value) <= 1e-12:
            return arch
    raise UserError(f"layer_norm_eps {eps}: no timm entry point builds LayerNorms with that eps "
                    f"(known: {sorted(TIMM_ARCH_BY_EPS)}); a timm export would compute other outputs")


def timm_data_config(cfg: BEiT3Config, preprocess: dict) -> dict:
    """The ``pretrained_cfg`` entries with which timm's own ``resolve_data_config`` +
    ``create_transform`` compute exactly the transform ``preprocess`` describes (the evaluation's):
    a square resize is timm's ``squash`` at crop_pct 1 (timm's default, ``center``, would keep the
    aspect ratio and cut the long side); short side + centre crop is ``center`` at its crop_pct."""
    square = preprocess["resize"] in ("square", "none")  # "none" (<= 32 px inputs): squash is a no-op at S x S
    return {"input_size": [cfg.in_chans, cfg.img_size, cfg.img_size], "interpolation": preprocess["interpolation"],
            "crop_pct": 1.0 if square else float(preprocess["crop_pct"]), "crop_mode": "squash" if square else "center",
            "mean": list(preprocess["mean"]), "std": list(preprocess["std"])}


def export_timm(loaded: LoadedBackbone, out_dir: str, preprocess: Optional[dict] = None) -> dict:
    """Write ``model.safetensors`` and timm's ``config.json`` (``preprocess``: the image preprocessing
    timm's data config reproduces, default the vision-language tasks' square resize); returns the
    config written. Raises ``UserError`` (and writes nothing) if plain timm would not build the same
    LayerNorms."""
    cfg = loaded.config
    preprocess = preprocess or vl_preprocess(cfg.img_size)
    kwargs = {**timm_vit_kwargs(cfg, final_norm=loaded.final_norm), "pre_norm": False}
    config = {
        "architecture": timm_architecture(cfg.layer_norm_eps),
        "num_classes": 0,
        "num_features": cfg.embed_dim,
        "global_pool": "token",
        "model_args": kwargs,
        "pretrained_cfg": {**timm_data_config(cfg, preprocess), "num_classes": 0,
                           "first_conv": "patch_embed.proj", "classifier": "head"},
        "beit3": {"layer_norm_eps": cfg.layer_norm_eps, "source_format": loaded.source_format,
                  "config": cfg.to_dict(), "preprocess": preprocess},
    }
    os.makedirs(out_dir, exist_ok=True)
    _save_safetensors(vision_state_dict(loaded.state_dict), os.path.join(out_dir, "model.safetensors"))
    atomic_write_bytes(os.path.join(out_dir, "config.json"), json.dumps(config, indent=2).encode())
    wrong = _timm_eps_problems(out_dir, cfg.layer_norm_eps)
    if wrong:
        for name in ("config.json", "model.safetensors"):
            os.remove(os.path.join(out_dir, name))
        raise UserError(f"timm builds {out_dir} with LayerNorm eps {wrong}, not {cfg.layer_norm_eps}: "
                        f"its outputs would differ; export removed")
    return config


def _timm_eps_problems(export_dir: str, eps: float) -> list:
    """The LayerNorm eps values that plain ``timm.create_model("local-dir:...")`` gets wrong (built on
    the meta device: no memory, no initialisation)."""
    with torch.device("meta"):
        model = timm.create_model(f"local-dir:{os.path.abspath(export_dir)}", pretrained=False)
    return sorted({m.eps for m in model.modules() if isinstance(m, nn.LayerNorm) and m.eps != eps})


def create_timm_model(export_dir: str, **kwargs) -> nn.Module:
    """The timm ``VisionTransformer`` of a ``--to timm`` export, weights loaded strictly. An export
    written before config.json carried the eps gets its norm layer passed explicitly."""
    eps = read_json(os.path.join(export_dir, "config.json")).get("beit3", {}).get("layer_norm_eps")
    if eps is not None and _timm_eps_problems(export_dir, eps):
        kwargs.setdefault("norm_layer", functools.partial(nn.LayerNorm, eps=eps))
    return timm.create_model(f"local-dir:{os.path.abspath(export_dir)}", pretrained=True, **kwargs)


def export_safetensors(loaded: LoadedBackbone, path: str, keep_heads: bool = False) -> dict:
    """Our-format backbone weights (and, with ``keep_heads``, the other weights under their own
    names); the config goes into the file's metadata."""
    sd = {**loaded.state_dict, **(loaded.extras if keep_heads else {})}
    _save_safetensors(sd, path, metadata={CONFIG_KEY: json.dumps(loaded.config.to_dict())})
    return sd


def export_official(loaded: LoadedBackbone, path: str, keep_heads: bool = False) -> dict:
    """``{"model": ...}`` under official names and shapes (the 64010-row text table: ``official_vocab``),
    as unilm's fine-tuning scripts load it."""
    sd = convert_ours_to_official(loaded.state_dict)
    sd.update(loaded.extras if keep_heads else {})
    sd = official_vocab(sd)
    with atomic_file(path) as tmp:
        torch.save({"model": _plain(sd)}, tmp)
    return sd


@dataclass
class Source:
    """What an export reads: the weights, and what a saved model folder keeps beside them."""
    weights: str
    config: Optional[BEiT3Config] = None  # the head count, which weights alone do not hold
    preprocess: Optional[dict] = None  # the evaluation's image preprocessing
    tokenizer: Optional[str] = None
    max_text_len: Optional[int] = None

    def image_preprocess(self, cfg: BEiT3Config) -> dict:
        """The preprocessing for the exported image size (default: the square resize)."""
        p = dict(self.preprocess or vl_preprocess(cfg.img_size))
        p["size"] = cfg.img_size  # --img-size
        return p


def saved_model_source(path: str) -> Source:
    """A saved-model folder (``save_pretrained``, a run's ``best/``) or its ``model.safetensors``:
    the weights with the config, preprocessing and tokenizer stored beside them; anything else:
    ``path`` alone."""
    folder = path if os.path.isdir(path) else os.path.dirname(path)
    config = os.path.join(folder, CONFIG_FILE)
    if not (os.path.isfile(config) and (os.path.isdir(path) or os.path.basename(path) == WEIGHTS_FILE)):
        return Source(path)
    d = read_json(config)
    if d.get("format") != FORMAT:  # e.g. a timm export's config.json
        return Source(path)
    if not isinstance(d.get("model"), dict):
        raise BadFileError(config, "has no model config ('model')")
    tokenizer = os.path.join(folder, d["tokenizer"]) if d.get("tokenizer") else None
    return Source(os.path.join(folder, d.get("weights", WEIGHTS_FILE)), BEiT3Config.from_dict(d["model"]),
                  d.get("preprocess"), tokenizer if tokenizer and os.path.isfile(tokenizer) else None,
                  (d.get("inference") or {}).get("max_text_len"))
