"""``beit3 export --to onnx``: the vision and text encoders as two ONNX graphs, checked against PyTorch,
with what it takes to feed them.

    DIR/vision_encoder.onnx   image (B, C, S, S) float32 -> tokens (B, 1 + N, D), pooled (B, D)
                              [, retrieval_embedding (B, D)]
    DIR/text_encoder.onnx     text (B, L) int64, padding_mask (B, L) bool (True = padding)
                              -> tokens (B, L, D), pooled (B, D) [, retrieval_embedding (B, D)]
    DIR/preprocess.json       the image preprocessing (the saved model's, as its evaluation does it)
                              and the text encoding (tokenizer file, ids, length)
    DIR/tokenizer.model       the SentencePiece model (a saved model's, or ``--spm``), when there is one
    DIR/onnx_check.json       the largest absolute difference to PyTorch of every output

``retrieval_embedding``: for a retrieval model (weights with ``vision_head``/``language_head``), what
``Predictor.embed_images`` / ``embed_texts`` return: the pooled token through its projection head,
l2-normalised. docs/models.md gives the preprocessing recipe in PIL and numpy.

Written by torch.onnx's torch.export-based exporter (opset 18; B and L dynamic; weights inline up
to 1 GiB, in a ``.data`` file beside the graph beyond). The check runs both graphs in onnxruntime on random inputs (a padded text
included) and refuses the export (files removed) when an output differs by more than ``TOL``: an
export that cannot be silently wrong.
"""
from __future__ import annotations

import contextlib
import importlib.util
import io
import json
import os
import shutil
import warnings
from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from beit3.weights.backbones import TextEncoder, VisionEncoder, text_state_dict, vision_state_dict
from beit3.data.text_tokenizer import FAIRSEQ_OFFSET, TextTokenizer
from beit3.data.transforms import vl_preprocess
from beit3.weights.official import LoadedBackbone
from beit3.model.pretrained import build_loaded
from beit3.core.errors import UserError
from beit3.core.files import atomic_file, atomic_write_bytes

TOL = 1e-4  # float32 graph vs eager PyTorch; measured 2e-6 .. 5e-6 (tiny preset, the tests' small model)
OPSET = 18


class _Outputs(nn.Module):
    """An encoder returning a plain (tokens, pooled[, embedding]) tuple, as an ONNX graph's outputs
    must be; ``head``: the retrieval projection, whose l2-normalised output is the embedding."""

    def __init__(self, encoder: nn.Module, head: Optional[nn.Linear] = None):
        super().__init__()
        self.encoder, self.head = encoder, head

    @property
    def output_names(self) -> list[str]:
        return ["tokens", "pooled"] + (["retrieval_embedding"] if self.head is not None else [])

    def forward(self, *inputs: Tensor) -> tuple[Tensor, ...]:
        out = self.encoder(*inputs)
        if self.head is None:
            return out.tokens, out.pooled
        return out.tokens, out.pooled, F.normalize(self.head(out.pooled), dim=-1)  # RetrievalModel.forward


RETRIEVAL_HEADS = {"vision": "vision_head.weight", "text": "language_head.weight"}


def graphs(loaded: LoadedBackbone) -> dict[str, _Outputs]:
    """{"vision", "text"}: each encoder with, for retrieval weights, its projection head."""
    cfg, norm = loaded.config, loaded.final_norm
    vision = build_loaded(lambda: VisionEncoder(cfg, final_norm=norm),
                          {"vit." + k: v for k, v in vision_state_dict(loaded.state_dict).items()})
    text = build_loaded(lambda: TextEncoder(cfg, final_norm=norm), text_state_dict(loaded.state_dict))
    heads = {name: loaded.extras.get(key) for name, key in RETRIEVAL_HEADS.items()}
    out = {}
    for name, encoder in (("vision", vision), ("text", text)):
        head = None
        if all(h is not None for h in heads.values()):
            head = build_loaded(lambda: nn.Linear(cfg.embed_dim, cfg.embed_dim, bias=False), {"weight": heads[name]})
        out[name] = _Outputs(encoder, head).float().eval()
    return out


def text_recipe(tokenizer: Optional[str], max_text_len: int) -> dict:
    """How ``Predictor.texts`` turns a text into ids, as data: SentencePiece ids shifted by the
    fairseq offset (piece 0, <unk>, becomes 3), <s> first, </s> last, at most ``max_len`` ids,
    right-padded with ``pad_id`` (``padding_mask`` True there)."""
    tok = TextTokenizer
    return {"tokenizer": os.path.basename(tokenizer) if tokenizer else None, "max_len": max_text_len,
            "bos_id": tok.bos_id, "eos_id": tok.eos_id, "pad_id": tok.pad_id, "unk_id": tok.unk_id,
            "piece_offset": FAIRSEQ_OFFSET}


def example_inputs(cfg, batch: int = 2, length: int = 7, seed: int = 0) -> dict[str, tuple[Tensor, ...]]:
    """Random inputs of both graphs; the second text is padded after 3 tokens."""
    g = torch.Generator().manual_seed(seed)
    image = torch.randn(batch, cfg.in_chans, cfg.img_size, cfg.img_size, generator=g)
    text = torch.randint(4, cfg.vocab_size, (batch, length), generator=g)
    pad = torch.zeros(batch, length, dtype=torch.bool)
    pad[-1, 3:] = True
    return {"vision": (image,), "text": (text, pad)}


INPUT_NAMES = {"vision": ["image"], "text": ["text", "padding_mask"]}
MAX_INLINE_BYTES = 1 << 30  # ONNX files hold at most 2 GiB; beyond this the weights go to a .data file


def _dynamic_shapes(name: str, cfg) -> tuple:
    """torch.export's dims of ``_Outputs``' ``*inputs``: the batch, and the text length."""
    batch = torch.export.Dim("batch")
    if name == "vision":
        return (({0: batch},),)
    length = torch.export.Dim("length", max=cfg.max_text_len)
    return (({0: batch, 1: length}, {0: batch, 1: length}),)


def _export_one(graph: _Outputs, inputs: tuple, name: str, path: str) -> None:
    """torch.export-based ONNX export. A graph with inline weights is written beside ``path`` and
    renamed; one with external weights names its .data file, so it is written in place."""
    size = sum(p.numel() * p.element_size() for p in graph.parameters())
    kwargs = dict(input_names=INPUT_NAMES[name], output_names=graph.output_names, opset_version=OPSET,
                  dynamic_shapes=_dynamic_shapes(name, graph.encoder.cfg), dynamo=True, verbose=False,
                  external_data=size > MAX_INLINE_BYTES)
    with torch.no_grad(), contextlib.redirect_stdout(io.StringIO()), warnings.catch_warnings():
        # The exporter narrates its steps on stdout, and warns that the input and output axes of one
        # name (batch, length) get that one name.
        warnings.filterwarnings("ignore", message=".*axis name.*will not be used")
        if size > MAX_INLINE_BYTES:
            torch.onnx.export(graph, inputs, path, **kwargs)
            return
        with atomic_file(path) as tmp:
            torch.onnx.export(graph, inputs, tmp, **kwargs)


def max_differences(graph: _Outputs, path: str, inputs: tuple) -> dict[str, float]:
    """{output: max |onnxruntime - PyTorch|} on ``inputs``."""
    import onnxruntime as ort  # optional: the onnx extra; only the check of a graph needs it
    session = ort.InferenceSession(path, providers=["CPUExecutionProvider"])
    feed = {i.name: x.numpy() for i, x in zip(session.get_inputs(), inputs)}
    got = session.run(graph.output_names, feed)
    with torch.no_grad():
        ref = graph(*inputs)
    return {n: float((torch.from_numpy(g) - r).abs().max()) for n, g, r in zip(graph.output_names, got, ref)}


def export_onnx(loaded: LoadedBackbone, out_dir: str, check: Optional[bool] = None, preprocess: Optional[dict] = None,
                tokenizer: Optional[str] = None, max_text_len: Optional[int] = None) -> dict:
    """Write both graphs, ``preprocess.json`` (``preprocess``: the image preprocessing; the text
    recipe for ``max_text_len``, default the config's) and a copy of ``tokenizer``; with ``check``
    (default: when onnxruntime is installed) compare the graphs with PyTorch on inputs of another
    batch size and text length than the export's. Returns the check."""
    if check is None:
        check = importlib.util.find_spec("onnxruntime") is not None
    os.makedirs(out_dir, exist_ok=True)
    modules = graphs(loaded)
    traced, fresh = example_inputs(loaded.config), example_inputs(loaded.config, batch=3, length=5, seed=1)
    paths = {name: os.path.join(out_dir, f"{name}_encoder.onnx") for name in modules}
    for name, graph in modules.items():
        _export_one(graph, traced[name], name, paths[name])
    if check:
        report = {name: max_differences(modules[name], paths[name], fresh[name]) for name in modules}
        worst = max(v for diffs in report.values() for v in diffs.values())
        if not worst <= TOL:
            for p in paths.values():
                os.remove(p)
            raise UserError(f"ONNX export of {out_dir} differs from PyTorch by {worst:.3g} (> {TOL}): {report}; "
                            f"export removed")
        atomic_write_bytes(os.path.join(out_dir, "onnx_check.json"),
                           json.dumps({"max_abs_diff": report, "tolerance": TOL, "opset": OPSET}, indent=1).encode())
    shipped = None
    if tokenizer is not None:
        shipped = os.path.join(out_dir, "tokenizer.model")
        with atomic_file(shipped) as tmp:
            shutil.copyfile(tokenizer, tmp)
    recipe = {"image": preprocess or vl_preprocess(loaded.config.img_size), "text": text_recipe(shipped, max_text_len or loaded.config.max_text_len),
              "outputs": {name: graph.output_names for name, graph in modules.items()}}
    atomic_write_bytes(os.path.join(out_dir, "preprocess.json"), json.dumps(recipe, indent=1).encode())
    return report if check else {}
