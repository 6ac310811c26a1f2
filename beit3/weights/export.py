"""``beit3 export``: write BEiT-3 weights for other tools.

    beit3 export --to timm CKPT -o DIR            the vision path as a timm VisionTransformer:
                                                  DIR/model.safetensors + DIR/config.json (timm's format)
    beit3 export --to onnx CKPT -o DIR            vision and text encoders as ONNX graphs, checked with
                                                  onnxruntime against PyTorch
    beit3 export --to safetensors CKPT -o F.safetensors   consolidated backbone weights, our names
    beit3 export --to official CKPT -o F.pth      unilm/beit3 layout ({"model": {"beit3.*": ...}})

CKPT: one of our ``.pt``/``.safetensors`` state dicts, a saved-model folder (``save_pretrained``, a
fine-tuning run's ``best/``: its config.json gives the sizes), an official unilm/beit3 checkpoint, or a
DeepSpeed (ZeRO) checkpoint directory, consolidated with DeepSpeed's ``zero_to_fp32``. The backbone
is found under its prefix (``model.`` for our pretraining engine, ``beit3.`` for unilm, ``module.``)
unless ``--prefix`` names it; other weights (objective or task heads) are dropped unless
``--keep-heads``.

A timm export's ``pretrained_cfg`` carries the source's evaluation preprocessing (a saved model's;
else the vision-language tasks' square resize), so timm's own ``resolve_data_config`` +
``create_transform`` compute the same input (a square resize is timm's ``crop_mode="squash"``).
Load a timm export with plain ``timm.create_model("local-dir:DIR", pretrained=True)`` (or
``create_timm_model(DIR)``, which also checks it). BEiT-3's LayerNorms use eps 1e-5 and timm's
string norm names all mean 1e-6, so config.json cannot name the norm layer; instead its
``architecture`` is a timm entry point whose own norm layer has the right eps (the CLIP ViTs'
``partial(LayerNorm, eps=1e-5)``; ``vit_base_patch16_224`` for 1e-6) and ``model_args`` override
every other size of that entry point (``pre_norm`` included). The export builds the model back
through timm and refuses to finish if any LayerNorm's eps differs (e.g. a timm whose entry point
changed, or an eps no entry point has).

``--to onnx`` writes ``DIR/vision_encoder.onnx`` (image -> tokens, pooled) and
``DIR/text_encoder.onnx`` (text, padding mask -> tokens, pooled; a retrieval model's graphs also
give its normalised embedding), batch and text length dynamic, ``DIR/preprocess.json`` and the
SentencePiece model, and checks both graphs against PyTorch with onnxruntime when it is installed
(see ``beit3.weights.onnx`` and docs/models.md).

Output paths are checked before anything is loaded: an output that is, lies inside or contains an
input (symlinks resolved) is refused, so an export never overwrites what it reads. Every file is
written beside its target and renamed over it when complete, so a failure (a full disk, SIGTERM)
leaves a previous export as it was and no temporary behind (after a ``kill -9``, the next export
to the same path removes it).
"""
from __future__ import annotations

import argparse
import functools
import json
import os
import sys
from dataclasses import dataclass
from typing import Optional

import torch
from torch import Tensor, nn

from beit3.weights.backbones import timm_vit_kwargs, vision_state_dict
from beit3.weights.official import CONFIG_KEY, LoadedBackbone, convert_ours_to_official, load_backbone, official_vocab
from beit3.model.config import PRESETS, BEiT3Config
from beit3.data.transforms import vl_preprocess
from beit3.core.errors import BadFileError, OutputError, UserError
from beit3.core.files import atomic_file, atomic_write_bytes, check_output_dir, check_output_file, read_json, sigterm_as_exit
from beit3.weights.onnx import RETRIEVAL_HEADS
from beit3.model.saved import CONFIG_FILE, FORMAT, WEIGHTS_FILE


def _plain(sd: dict) -> dict[str, Tensor]:
    """Contiguous CPU tensors that share no memory (safetensors refuses views of one buffer)."""
    return {k: v.detach().to("cpu").contiguous().clone() for k, v in sd.items()}


def _save_safetensors(sd: dict, path: str, metadata: Optional[dict] = None) -> None:
    from safetensors.torch import save_file
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
    import timm
    with torch.device("meta"):
        model = timm.create_model(f"local-dir:{os.path.abspath(export_dir)}", pretrained=False)
    return sorted({m.eps for m in model.modules() if isinstance(m, nn.LayerNorm) and m.eps != eps})


def create_timm_model(export_dir: str, **kwargs) -> nn.Module:
    """The timm ``VisionTransformer`` of a ``--to timm`` export, weights loaded strictly. An export
    written before config.json carried the eps gets its norm layer passed explicitly."""
    import timm

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


def _config_arg(args) -> Optional[BEiT3Config]:
    if args.config:
        d = read_json(args.config)
        d = d.get("model", d) if "embed_dim" not in d else d  # a run's resolved config may nest it
        return BEiT3Config.from_dict(d)
    return args.preset


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


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="beit3 export", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("checkpoint", help="file (.pt/.pth/.safetensors) or DeepSpeed checkpoint directory")
    ap.add_argument("--to", required=True, choices=["timm", "onnx", "safetensors", "official"])
    ap.add_argument("-o", "--output", required=True, help="directory (timm, onnx) or file")
    ap.add_argument("--preset", choices=sorted(PRESETS), help="model sizes (default: from the weights)")
    ap.add_argument("--config", help="BEiT3Config JSON (overrides --preset)")
    ap.add_argument("--img-size", type=int, help="image size to export for (patch positions interpolated)")
    ap.add_argument("--prefix", help="prefix of the backbone's keys (default: found automatically)")
    ap.add_argument("--tag", help="DeepSpeed checkpoint tag, when CKPT is the parent directory")
    ap.add_argument("--keep-heads", action="store_true", help="also write non-backbone weights")
    ap.add_argument("--spm", help="SentencePiece model to ship beside an ONNX export (default: the saved model's)")
    ap.add_argument("--allow-pickle", action="store_true",
                    help="allow full unpickling (only for files you trust; e.g. unilm fine-tuned checkpoints)")
    return ap


def check_args(args) -> None:
    """What can be checked before the weights are loaded: sizes, the output path."""
    if args.img_size is not None and args.img_size <= 0:
        raise ValueError(f"--img-size must be positive, got {args.img_size}")
    if not os.path.exists(args.checkpoint):
        raise FileNotFoundError(f"{args.checkpoint}: no such file or DeepSpeed checkpoint directory")
    if args.config and not os.path.isfile(args.config):
        raise FileNotFoundError(f"--config {args.config}: no such file")
    if args.spm and not os.path.isfile(args.spm):
        raise FileNotFoundError(f"--spm {args.spm}: no such file")
    check_not_an_input(args.output, export_inputs(args), "-o/--output")
    (check_output_dir if args.to in ("timm", "onnx") else check_output_file)(args.output, "-o/--output")


def export_inputs(args) -> list[str]:
    """Every path the export reads: the checkpoint (with a saved model's config.json and tokenizer
    when it is one of its files) and ``--config``."""
    inputs = [args.checkpoint] + [p for p in (args.config, args.spm) if p]
    if os.path.isfile(args.checkpoint):
        folder = os.path.dirname(os.path.abspath(args.checkpoint))
        inputs += [os.path.join(folder, n) for n in ("config.json", "tokenizer.model")
                   if os.path.isfile(os.path.join(folder, n))]
    return inputs


def check_not_an_input(output: str, inputs: list[str], flag: str) -> None:
    """Refuse an output that is, lies inside or contains one of ``inputs`` (symlinks resolved): the
    export would overwrite what it reads, e.g. a saved model's config.json and weights."""
    out = os.path.realpath(output)
    for given in inputs:
        real = os.path.realpath(given)
        if out == real:
            how = "is"
        elif out.startswith(real.rstrip(os.sep) + os.sep):
            how = "lies inside"
        elif real.startswith(out.rstrip(os.sep) + os.sep):
            how = "contains"
        else:
            continue
        raise OutputError(f"{flag} {output} {how} the input {given}: the export would overwrite what it reads; "
                          f"choose another output (nothing was written)")


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    with sigterm_as_exit():  # a terminated export removes its half-written file
        return _export(args)


def _export(args) -> int:
    try:
        check_args(args)
        source = saved_model_source(args.checkpoint)
        config = _config_arg(args) or source.config
        loaded = load_backbone(source.weights, config, allow_pickle=args.allow_pickle,
                               prefix=args.prefix, tag=args.tag, img_size=args.img_size,
                               path="vision" if args.to == "timm" else None)
        if loaded.unexpected:
            raise ValueError(f"{args.checkpoint}: unknown backbone keys {loaded.unexpected[:12]}")
    except (ValueError, FileNotFoundError, TypeError, UserError) as e:
        print(f"beit3 export: error: {e}", file=sys.stderr)
        return 2
    try:
        if args.to == "timm":
            export_timm(loaded, args.output, source.image_preprocess(loaded.config))
        elif args.to == "onnx":
            from beit3.weights.onnx import export_onnx
            spm = args.spm or source.tokenizer
            check = export_onnx(loaded, args.output, preprocess=source.image_preprocess(loaded.config),
                                tokenizer=spm, max_text_len=source.max_text_len)
            print(f"onnxruntime vs PyTorch, max abs difference: {json.dumps(check)}" if check else
                  "onnxruntime is not installed: the graphs were not checked")
            if spm is None:
                print("no SentencePiece model shipped (the source has none; --spm names one)")
        elif args.to == "safetensors":
            export_safetensors(loaded, args.output, args.keep_heads)
        else:
            export_official(loaded, args.output, args.keep_heads)
    except (ValueError, UserError) as e:
        print(f"beit3 export: error: {e}", file=sys.stderr)
        return 1
    print(summary(args, loaded))
    return 0


def summary(args, loaded: LoadedBackbone) -> str:
    """The line a successful export prints: what was read, what was written, what was left out."""
    cfg = loaded.config
    guessed = " (guessed from the width: pass --preset or --config if wrong)" if loaded.inferred else ""
    heads = set(RETRIEVAL_HEADS.values())
    in_graph = heads if args.to == "onnx" and heads <= set(loaded.extras) else set()  # they end the graphs
    rest = len(set(loaded.extras) - in_graph)
    dropped = ("; the retrieval heads in the graphs" if in_graph else "") + \
        ("" if args.keep_heads or not rest else f"; {rest} non-backbone tensors dropped")
    return (f"wrote {args.output} ({args.to}) from {loaded.source_format} weights: layout {cfg.layout}, "
            f"embed_dim {cfg.embed_dim}, depth {cfg.depth}, image {cfg.img_size}/{cfg.patch_size}, "
            f"heads {cfg.num_heads}{guessed}{dropped}")

if __name__ == "__main__":
    raise SystemExit(main())
