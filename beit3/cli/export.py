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
import json
import os
import sys
from typing import Optional

from beit3.core.errors import OutputError, UserError
from beit3.core.files import check_output_dir, check_output_file, read_json, sigterm_as_exit
from beit3.model.config import PRESETS, BEiT3Config
from beit3.weights.export import export_official, export_safetensors, export_timm, saved_model_source
from beit3.weights.official import LoadedBackbone, load_backbone
from beit3.weights.onnx import RETRIEVAL_HEADS, export_onnx


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


def _config_arg(args) -> Optional[BEiT3Config]:
    if args.config:
        d = read_json(args.config)
        d = d.get("model", d) if "embed_dim" not in d else d  # a run's resolved config may nest it
        return BEiT3Config.from_dict(d)
    return args.preset


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
