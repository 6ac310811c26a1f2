"""VQ-KD, the BEiT v2 visual tokenizer (Peng et al. 2022, Sec. 2.2, Fig. 2).

    image --encoder ViT--> patch features --encode_task_layer--> z (B, N, code_dim)
          --quantize (nearest l2-normalised code, EMA codebook)--> z_q, token ids (B, N)
          --decoder ViT (over the h x w grid of codes)--> --decode_task_layer--> (B, N, teacher_dim)

and the decoder output is trained to match a frozen teacher's patch features by cosine similarity.
After training only the encoder and the codebook are used: ``get_codebook_indices`` turns images
into the visual tokens that BEiT-3's masked image modelling predicts.

The encoder and the decoder are timm's ``Beit`` ViT, which is BEiT's own VisionTransformer
(``attn.qkv.weight`` with separate ``q_bias``/``v_bias`` and no k bias, ``fc_norm`` on the
patch tokens, LayerNorm eps 1e-6): the state dict has exactly the key names of the unilm/beit2
``modeling_vqkd.py`` checkpoints, so ``load_vqkd`` loads them strictly without any renaming.

Grid: the token grid is ``img_size // patch_size`` per side and must equal the BEiT-3 model's
patch grid. The tokenizer's image size may differ from the model's (BEiT v2 feeds a ViT-g/14
at 224 px, a 16x16 grid, and tokenizes a separate view for the 224/16 tokenizer); the caller
compares ``VQKD.grid_size`` with its model's grid and resizes the tokenizer's view to match.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Mapping, Optional

import torch
import torch.nn.functional as F
from safetensors.torch import save_file
from timm.layers import resample_abs_pos_embed, trunc_normal_
from timm.models.beit import Beit
from torch import Tensor, nn

from beit3.model.config import checked_from_dict
from beit3.core.files import atomic_file, atomic_write_bytes
from beit3.core.weight_files import load_safetensors
from beit3.core.errors import BadFileError, first_line
from beit3.vqkd.quantizer import NormEMAVectorQuantizer
from beit3.core.weight_files import UnsafeCheckpointError, load_checkpoint_file

CONFIG_NAME = "tokenizer_config.json"
WEIGHTS_NAME = "model.safetensors"
LEGACY_WEIGHTS_NAME = "tokenizer.pth"  # what the trainer wrote before its weights were safetensors
# Keys the beit2 training checkpoints carry besides the tokenizer; beit2's own loader drops them.
FOREIGN_PREFIXES = ("teacher_model.", "scaling_layer.", "loss")


@dataclass
class VQKDConfig:
    img_size: int = 224
    patch_size: int = 16
    embed_dim: int = 768
    depth: int = 12
    num_heads: int = 12
    mlp_ratio: float = 4.0
    decoder_embed_dim: int = 768
    decoder_depth: int = 3
    decoder_num_heads: int = 12
    num_codes: int = 8192
    code_dim: int = 32
    decay: float = 0.99
    beta: float = 1.0  # commitment loss weight
    kmeans_init: bool = True
    # Restart codes unused for this many training batches (0 = never, as beit2). See quantizer.py.
    restart_unused_after: int = 0
    teacher_dim: int = 512  # 512: CLIP-B/16 projected tokens; 768: DINO-B/16
    drop_path_rate: float = 0.0
    preset: str = field(default="custom", compare=False)

    def __post_init__(self):
        if self.img_size % self.patch_size:
            raise ValueError(f"VQKDConfig: img_size={self.img_size} is not a multiple of patch_size={self.patch_size}")
        for dim, heads, what in ((self.embed_dim, self.num_heads, "encoder"),
                                 (self.decoder_embed_dim, self.decoder_num_heads, "decoder")):
            if dim % heads:
                raise ValueError(f"VQKDConfig: {what} width {dim} is not divisible by {heads} heads")
        if not 0.0 < self.decay < 1.0:
            raise ValueError(f"VQKDConfig: decay={self.decay} must be in (0, 1)")

    @property
    def grid_size(self) -> int:
        return self.img_size // self.patch_size

    @property
    def num_patches(self) -> int:
        return self.grid_size**2

    @classmethod
    def from_preset(cls, name: str, **overrides) -> "VQKDConfig":
        if name not in VQKD_PRESETS:
            raise ValueError(f"unknown VQ-KD preset {name!r}: expected one of {sorted(VQKD_PRESETS)}")
        return cls.from_dict({**VQKD_PRESETS[name], "preset": name, **overrides})

    @classmethod
    def from_dict(cls, d: Mapping) -> "VQKDConfig":
        return checked_from_dict(cls, d)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


VQKD_PRESETS: dict[str, dict] = {
    # beit2's vqkd_encoder_base_decoder_3x768x12_clip: ViT-B/16 encoder, 3-layer decoder, CLIP-B/16.
    "base": dict(),
    # The two other published tokenizers: 1-layer decoder with a CLIP or a DINO teacher.
    "base_d1_clip": dict(decoder_depth=1),
    "base_d1_dino": dict(decoder_depth=1, teacher_dim=768),
    # CPU demo and tests: 64 px in 8 px patches (the 8x8 grid of BEiT-3's tiny preset), HOG teacher
    # (3 channels x 9 bins x 2x2 cells = 108 features per patch).
    "tiny": dict(img_size=64, patch_size=8, embed_dim=96, depth=2, num_heads=3, decoder_embed_dim=96,
                 decoder_depth=1, decoder_num_heads=3, num_codes=256, teacher_dim=108,
                 restart_unused_after=20),
}


@dataclass
class VQKDOutput:
    loss: Tensor  # rec_loss + quant_loss, scalar
    rec_loss: Tensor  # 1 - cos(decoder output, teacher feature), mean over patches
    quant_loss: Tensor  # commitment loss
    indices: Tensor  # (B, N) long


def _vit(img_size: int, patch_size: int, in_chans: int, dim: int, depth: int, heads: int,
         mlp_ratio: float, drop_path_rate: float) -> Beit:
    # beit2's get_model_default_params: qkv bias (q and v only), no layer scale, mean-pooling
    # layout (fc_norm instead of norm), absolute positions, no class head.
    return Beit(img_size=img_size, patch_size=patch_size, in_chans=in_chans, num_classes=0,
                global_pool="avg", embed_dim=dim, depth=depth, num_heads=heads, mlp_ratio=mlp_ratio,
                qkv_bias=True, init_values=None, use_abs_pos_emb=True, drop_path_rate=drop_path_rate)


def _patch_tokens(vit: Beit, x: Tensor) -> Tensor:
    """x: (B, C, H, W) -> fc_norm'ed patch tokens (B, N, D), beit2's ``return_patch_tokens``."""
    return vit.fc_norm(vit.forward_features(x)[:, vit.num_prefix_tokens:])


def cosine_rec_loss(rec: Tensor, target: Tensor) -> Tensor:
    """rec, target: (B, N, C). 1 - cosine similarity, averaged (beit2's ``rec_loss_type='cosine'``)."""
    return (1 - F.cosine_similarity(rec.float(), target.float(), dim=-1)).mean()


class VQKD(nn.Module):
    def __init__(self, config: VQKDConfig):
        super().__init__()
        c = self.config = config
        self.encoder = _vit(c.img_size, c.patch_size, 3, c.embed_dim, c.depth, c.num_heads,
                            c.mlp_ratio, c.drop_path_rate)
        # The decoder reads the h x w map of codes as a code_dim-channel "image" in 1x1 patches.
        self.decoder = _vit(c.grid_size, 1, c.code_dim, c.decoder_embed_dim, c.decoder_depth,
                            c.decoder_num_heads, c.mlp_ratio, c.drop_path_rate)
        self.quantize = NormEMAVectorQuantizer(c.num_codes, c.code_dim, beta=c.beta, decay=c.decay,
                                               kmeans_init=c.kmeans_init, restart_after=c.restart_unused_after)
        self.encode_task_layer = nn.Sequential(
            nn.Linear(c.embed_dim, c.embed_dim), nn.Tanh(), nn.Linear(c.embed_dim, c.code_dim))
        self.decode_task_layer = nn.Sequential(
            nn.Linear(c.decoder_embed_dim, c.decoder_embed_dim), nn.Tanh(),
            nn.Linear(c.decoder_embed_dim, c.teacher_dim))
        for layer in (*self.encode_task_layer, *self.decode_task_layer):
            if isinstance(layer, nn.Linear):
                trunc_normal_(layer.weight, std=0.02)
                nn.init.zeros_(layer.bias)

    @property
    def grid_size(self) -> int:
        return self.config.grid_size

    @property
    def num_tokens(self) -> int:
        return self.config.num_codes

    def no_weight_decay(self) -> set[str]:
        return {"encoder.cls_token", "encoder.pos_embed", "decoder.cls_token", "decoder.pos_embed"}

    def _features(self, images: Tensor) -> Tensor:
        """images: (B, 3, H, W) in [0, 1] -> encoder features z (B, N, code_dim), float32."""
        x = images * 2.0 - 1.0  # beit2's process_type='default': pixels in [-1, 1]
        feats = _patch_tokens(self.encoder, x)
        # As in beit2 the task layer and the codebook run in float32 even under autocast: the
        # nearest-code search on the unit sphere is sensitive to bf16 rounding.
        with torch.autocast(device_type=x.device.type, enabled=False):
            return self.encode_task_layer(feats.float())

    def encode(self, images: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """images: (B, 3, H, W) in [0, 1]. Returns z_q (B, N, code_dim), indices (B, N), quant loss."""
        z = self._features(images)
        with torch.autocast(device_type=images.device.type, enabled=False):
            return self.quantize(z)

    def decode(self, z_q: Tensor) -> Tensor:
        """z_q: (B, N, code_dim) -> predicted teacher features (B, N, teacher_dim)."""
        b, n, c = z_q.shape
        g = self.grid_size
        grid = z_q.transpose(1, 2).reshape(b, c, g, g)  # (B, code_dim, h, w)
        return self.decode_task_layer(_patch_tokens(self.decoder, grid))

    def forward(self, images: Tensor, target: Tensor) -> VQKDOutput:
        """images: (B, 3, H, W) in [0, 1]; target: teacher features (B, N, teacher_dim)."""
        z_q, indices, quant_loss = self.encode(images)
        rec_loss = cosine_rec_loss(self.decode(z_q), target)
        return VQKDOutput(rec_loss + quant_loss, rec_loss, quant_loss, indices)

    @torch.no_grad()
    def get_codebook_indices(self, images: Tensor) -> Tensor:
        """images: (B, 3, H, W) in [0, 1] at the tokenizer's img_size -> token ids (B, h*w) long.
        Pure: never updates the codebook, whatever the module's mode. bf16 autocast on CUDA."""
        size = self.config.img_size
        if images.ndim != 4 or images.shape[1] != 3 or tuple(images.shape[-2:]) != (size, size):
            raise ValueError(f"get_codebook_indices: expected images (B, 3, {size}, {size}), "
                             f"got {tuple(images.shape)}")
        on_cuda = images.device.type == "cuda"
        with torch.autocast(device_type=images.device.type, dtype=torch.bfloat16, enabled=on_cuda):
            z = self._features(images)
        return self.quantize.assign(z)

    get_tokens = get_codebook_indices

    def freeze(self) -> "VQKD":
        """Eval mode and no gradients: the tokenizer as BEiT pretraining uses it."""
        self.eval()
        self.requires_grad_(False)
        return self


# -- loading -------------------------------------------------------------------------------------
def _read_state_dict(source: str | os.PathLike | Mapping, mmap: bool = False) -> tuple[dict, str]:
    if isinstance(source, Mapping):
        return dict(source), "<state dict>"
    path = Path(source)
    if not path.is_file():
        raise FileNotFoundError(f"VQ-KD checkpoint {path} does not exist")
    if path.suffix == ".safetensors":
        return load_safetensors(path), str(path)
    # beit2 training checkpoints also pickle their argparse.Namespace; it is harmless to allow.
    # Anything else pickled is refused, and an empty or truncated file named (BadFileError).
    try:
        with torch.serialization.safe_globals([argparse.Namespace]):
            state = load_checkpoint_file(str(path), mmap=mmap)
    except UnsafeCheckpointError:  # its advice, --allow-pickle, does not apply: tokenizers are never unpickled
        raise BadFileError(path, "holds pickled Python objects besides tensors; a VQ-KD tokenizer is read as "
                                 "tensors only") from None
    if not isinstance(state, Mapping):
        raise BadFileError(path, f"holds a {type(state).__name__}, not a VQ-KD state dict")
    return dict(state), str(path)


def _unwrap(ckpt: dict) -> dict:
    for key in ("model", "state_dict"):
        if key in ckpt and isinstance(ckpt[key], Mapping):
            ckpt = dict(ckpt[key])
            break
    if ckpt and all(k.startswith("module.") for k in ckpt):  # saved from a DDP wrapper
        ckpt = {k[len("module."):]: v for k, v in ckpt.items()}
    return {k: v for k, v in ckpt.items() if not k.startswith(FOREIGN_PREFIXES)}


def _check_keys(model: nn.Module, state: Mapping, name: str) -> None:
    expected, found = set(model.state_dict()), set(state)
    missing, unexpected = sorted(expected - found), sorted(found - expected)
    if missing or unexpected:
        def show(keys: list[str]) -> str:
            if not keys:
                return "none"
            return ", ".join(keys[:20]) + (f", ... ({len(keys)} in all)" if len(keys) > 20 else "")
        raise ValueError(f"{name} does not match the VQ-KD model (preset {model.config.preset!r}): "
                         f"missing keys: {show(missing)}; unexpected keys: {show(unexpected)}")
    own = model.state_dict()
    bad = [f"{k}: checkpoint {tuple(state[k].shape)} vs model {tuple(own[k].shape)}"
           for k in sorted(own) if tuple(state[k].shape) != tuple(own[k].shape)]
    if bad:
        raise ValueError(f"{name}: tensor shapes differ from the VQ-KD model: " + "; ".join(bad[:20]))


def load_vqkd(path_or_state_dict: str | os.PathLike | Mapping, config: VQKDConfig | None = None,
              freeze: bool = True) -> VQKD:
    """Build a VQKD for ``config`` (default: preset ``base``) and load a checkpoint strictly.

    Accepts a file or a state dict, plain or under a ``model``/``state_dict`` key (beit2's release
    files); the teacher and scaling-layer keys of beit2 training checkpoints are dropped first.
    Raises ValueError naming missing/unexpected keys or mismatched shapes. Returns the model
    frozen (eval, no grad) unless ``freeze=False``.

    A ``config.img_size`` other than the checkpoint's resamples the encoder's and decoder's
    absolute position tables (bicubic), so a 224/16 tokenizer can tokenize 256 px views on the
    16x16 grid of a patch-14 model at 224 px."""
    config = config or VQKDConfig.from_preset("base")
    state, name = _read_state_dict(path_or_state_dict)
    state = _unwrap(state)
    model = VQKD(config)
    state = _resample_positions(state, model)
    _check_keys(model, state, name)
    model.load_state_dict(state, strict=True)
    return model.freeze() if freeze else model


def _resample_positions(state: dict, model: VQKD) -> dict:
    own = model.state_dict()
    for key in ("encoder.pos_embed", "decoder.pos_embed"):
        if key in state and key in own and state[key].shape != own[key].shape \
                and state[key].shape[-1] == own[key].shape[-1]:
            grid = model.config.grid_size
            state[key] = resample_abs_pos_embed(state[key].float(), new_size=[grid, grid],
                                                num_prefix_tokens=1).to(state[key].dtype)
    return state


def save_trained(model: VQKD, output_dir: str | os.PathLike) -> Path:
    """Write ``model.safetensors`` and ``tokenizer_config.json``, each atomically."""
    out = Path(output_dir)
    out.mkdir(parents=True, exist_ok=True)
    weights = out / WEIGHTS_NAME
    with atomic_file(str(weights)) as tmp:
        save_file({k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}, tmp)
    atomic_write_bytes(str(out / CONFIG_NAME), json.dumps(model.config.to_dict(), indent=2).encode())
    return weights


def trained_weights(directory: str | os.PathLike) -> Optional[Path]:
    """The weights file a trainer run wrote into ``directory`` (its older ``tokenizer.pth`` too), or None."""
    for name in (WEIGHTS_NAME, LEGACY_WEIGHTS_NAME):
        if (Path(directory) / name).is_file():
            return Path(directory) / name
    return None


def _trained_files(dir_or_file: str | os.PathLike) -> tuple[Path, VQKDConfig]:
    """(weights file, config) of what ``train_tokenizer`` saved: a run directory, or its weights file
    with ``tokenizer_config.json`` beside it."""
    path = Path(dir_or_file)
    weights = (trained_weights(path) or path / WEIGHTS_NAME) if path.is_dir() else path
    cfg_file = weights.parent / CONFIG_NAME
    if not cfg_file.is_file():
        raise FileNotFoundError(f"no {CONFIG_NAME} beside {weights}: expected the output of train_tokenizer")
    try:
        d = json.loads(cfg_file.read_text())
        if not isinstance(d, dict):
            raise ValueError(f"a JSON {type(d).__name__}, not an object")
        return weights, VQKDConfig.from_dict(d)
    except (ValueError, TypeError) as e:  # JSONDecodeError, a wrong type or unknown key, a bad shape
        raise BadFileError(cfg_file, f"not a VQ-KD tokenizer config ({first_line(e)})") from None


def check_tokenizer_file(dir_or_file: str | os.PathLike, trained: bool = True) -> None:
    """Read what ``load_trained_tokenizer`` (``trained``: a run directory or its weights file) or
    ``load_vqkd`` (an official checkpoint file) would, tensors mapped and not loaded: a missing config,
    an empty, truncated or pickled file fails here, naming it, before a job builds anything."""
    weights = _trained_files(dir_or_file)[0] if trained else Path(dir_or_file)
    _read_state_dict(weights, mmap=True)


def load_trained_tokenizer(dir_or_file: str | os.PathLike, freeze: bool = True) -> VQKD:
    """Load what ``train_tokenizer`` saved: a run directory, or its weights file with
    ``tokenizer_config.json`` beside it."""
    weights, config = _trained_files(dir_or_file)
    return load_vqkd(weights, config, freeze=freeze)
