"""Task models: the BEiT-3 backbone (``beit3``) plus one small head per task.

Attribute and parameter names are those of unilm/beit3 ``modeling_finetune.py``, so the head of an
official fine-tuned checkpoint loads as it is (its backbone goes through
``beit3.weights.official``):

    classification  fc_norm, head                               mean of patch tokens -> LN -> Linear
    vqa             pooler.{norm,dense}, head.{0,1,3}           vision CLS -> LN, Linear, Tanh -> MLP
    retrieval       vision_head, language_head, logit_scale     dual encoder, l2-normalised CLS/BOS
    captioning      mlm_head                                    masked caption tokens (UniLM)
    nlvr2           head.{norm1,dense1,norm2,dense2}            two fusions, 4D -> 2D -> 2

Classification and VQA read the backbone *before* its final LayerNorm: the official models are
built with ``normalize_output=False`` and put their own LayerNorm (``fc_norm``, ``pooler.norm``)
there. The other tasks use the normalised output.
"""
from __future__ import annotations

import math
from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from beit3.model.config import BEiT3Config
from beit3.model import BEiT3
from beit3.model.init import trunc_normal_
from beit3.model.saved import save_pretrained

HEAD_INIT_STD = 0.02
SMALL_INIT = 0.001  # unilm/beit3 scales the last classifier layers by this at init
LOGIT_SCALE_INIT = math.log(1 / 0.07)  # CLIP
CLIP_LOGIT_SCALE_MAX = 100.0  # CLIP clamps exp(logit_scale) here; unilm/beit3 does not (--logit-scale-max 100)


def init_head(*heads: nn.Module, scale_last: tuple[nn.Linear, ...] = ()) -> None:
    """unilm/beit3 ``_init_weights`` on the head modules: Linear weights from a normal truncated at
    +-std, zero biases, LayerNorm 1/0; then the ``scale_last`` layers times 0.001."""
    for m in (m for head in heads for m in head.modules()):
        if isinstance(m, nn.Linear):
            trunc_normal_(m.weight, HEAD_INIT_STD)
            if m.bias is not None:
                nn.init.zeros_(m.bias)
        elif isinstance(m, nn.LayerNorm):
            nn.init.ones_(m.weight)
            nn.init.zeros_(m.bias)
    with torch.no_grad():
        for lin in scale_last:
            lin.weight.mul_(SMALL_INIT)
            if lin.bias is not None:
                lin.bias.mul_(SMALL_INIT)


class TaskModel(nn.Module):
    """Base: ``self.beit3`` and the helpers the heads share. ``head_args`` rebuilds the same head
    (used to find the parameters a task never reaches, see ``beit3.jobs.finetune.tasks``)."""

    final_norm = True  # read the backbone after its final LayerNorm
    task = ""  # the fine-tuning task this head serves

    def save_pretrained(self, directory: str, **files) -> str:
        """A self-contained folder (``beit3.model.pretrained.save_pretrained``: config, weights, tokenizer,
        preprocessing, labels); ``beit3.from_pretrained(directory)`` loads it back."""
        return save_pretrained(self, directory, **files)

    def __init__(self, cfg: BEiT3Config, **head_args):
        super().__init__()
        self.cfg = cfg
        self.head_args = head_args
        self.beit3 = BEiT3(cfg)

    def encode(self, **inputs) -> tuple[Optional[Tensor], Optional[Tensor]]:
        """(image (B, 1 + N, D), text (B, L, D)) streams, before or after the final LayerNorm."""
        if self.final_norm:
            out = self.beit3.forward_streams(**inputs)
            return out.image, out.text
        last = self.cfg.depth - 1
        return self.beit3.forward_streams(**inputs, out_layers=(last,)).hidden[last]

    def example_inputs(self, batch_size: int = 2) -> dict:
        """A forward's keyword arguments with the right shapes (tests, parameter-usage probe)."""
        raise NotImplementedError

    def official_shapes(self, state_dict: dict, prefix: str = "") -> dict:
        """``state_dict`` with tensors in the shapes of unilm's checkpoints (in place; returned)."""
        return state_dict


def _example_image(cfg: BEiT3Config, B: int) -> Tensor:
    return torch.randn(B, cfg.in_chans, cfg.img_size, cfg.img_size)


def _example_text(cfg: BEiT3Config, B: int, L: int = 6) -> tuple[Tensor, Tensor]:
    text = torch.randint(4, max(5, min(cfg.vocab_size, 64)), (B, L))
    text[:, 0] = 0  # <s>
    return text, torch.zeros(B, L, dtype=torch.bool)


# -- classification ------------------------------------------------------------------------------
class ImageClassifier(TaskModel):
    """Vision encoder only: mean of the patch tokens -> ``fc_norm`` -> ``head``.

    ``linear_probe``: the head of BEiT v2's linear probing, a BatchNorm without affine parameters
    (standardises the frozen features; at eval a fixed affine map, so the probe stays linear)
    before the linear layer; the trainer freezes the backbone.
    """

    task = "classification"
    final_norm = False

    def __init__(self, cfg: BEiT3Config, num_classes: int, linear_probe: bool = False):
        super().__init__(cfg, num_classes=num_classes, linear_probe=linear_probe)
        d = cfg.embed_dim
        if linear_probe:
            self.fc_norm = nn.BatchNorm1d(d, affine=False, eps=1e-6)
        else:
            self.fc_norm = nn.LayerNorm(d, eps=cfg.layer_norm_eps)
        self.head = nn.Linear(d, num_classes)
        init_head(self.fc_norm, self.head, scale_last=(self.head,) if not linear_probe else ())
        if linear_probe:
            nn.init.trunc_normal_(self.head.weight, std=0.01)  # MAE / BEiT v2 linear probe

    def forward(self, image: Tensor) -> Tensor:
        """image (B, C, H, W) -> logits (B, num_classes)."""
        img, _ = self.encode(image=image)
        return self.head(self.fc_norm(img[:, 1:].mean(dim=1)))

    def example_inputs(self, batch_size: int = 2) -> dict:
        return {"image": _example_image(self.cfg, batch_size)}


# -- VQA -----------------------------------------------------------------------------------------
class Pooler(nn.Module):
    """First token -> LayerNorm -> Linear -> Tanh (official ``Pooler``)."""

    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.norm = nn.LayerNorm(dim, eps=eps)
        self.dense = nn.Linear(dim, dim)

    def forward(self, x: Tensor) -> Tensor:  # (B, L, D) -> (B, D)
        return torch.tanh(self.dense(self.norm(x[:, 0])))


class VQAModel(TaskModel):
    """Fusion encoder; the pooled vision CLS goes through Linear(D, 2D), LN, GELU, Linear(2D, A)."""

    task = "vqa"
    final_norm = False

    def __init__(self, cfg: BEiT3Config, num_answers: int):
        super().__init__(cfg, num_answers=num_answers)
        d = cfg.embed_dim
        self.pooler = Pooler(d, cfg.layer_norm_eps)
        self.head = nn.Sequential(nn.Linear(d, 2 * d), nn.LayerNorm(2 * d, eps=cfg.layer_norm_eps),
                                  nn.GELU(), nn.Linear(2 * d, num_answers))
        init_head(self.pooler, self.head)

    def forward(self, image: Tensor, text: Tensor, padding_mask: Tensor) -> Tensor:
        """-> answer logits (B, num_answers)."""
        img, _ = self.encode(image=image, text=text, text_padding_mask=padding_mask)
        return self.head(self.pooler(img))

    def example_inputs(self, batch_size: int = 2) -> dict:
        text, pad = _example_text(self.cfg, batch_size)
        return {"image": _example_image(self.cfg, batch_size), "text": text, "padding_mask": pad}


# -- retrieval -----------------------------------------------------------------------------------
class RetrievalModel(TaskModel):
    """Dual encoder: image CLS -> ``vision_head``, text BOS -> ``language_head``, l2-normalised;
    similarities are scaled by exp(``logit_scale``), unclamped as in unilm/beit3 unless
    ``logit_scale_max`` is given (CLIP's ``CLIP_LOGIT_SCALE_MAX``)."""

    task = "retrieval"

    def __init__(self, cfg: BEiT3Config, logit_scale_max: Optional[float] = None):
        super().__init__(cfg, logit_scale_max=logit_scale_max)
        self.logit_scale_max = logit_scale_max
        d = cfg.embed_dim
        self.vision_head = nn.Linear(d, d, bias=False)
        self.language_head = nn.Linear(d, d, bias=False)
        init_head(self.vision_head, self.language_head)
        # Stored with shape (1,): DeepSpeed cannot broadcast 0-dim parameters. The state dict keeps
        # the official shape ().
        self.logit_scale = nn.Parameter(torch.full((1,), LOGIT_SCALE_INIT))
        self.register_state_dict_post_hook(lambda m, sd, prefix, meta: m.official_shapes(sd, prefix) and None)
        self.register_load_state_dict_pre_hook(_logit_scale_from_scalar)

    def official_shapes(self, state_dict: dict, prefix: str = "") -> dict:
        v = state_dict.get(prefix + "logit_scale")
        if v is not None and v.numel() == 1:  # (a ZeRO-3 partition holds no element)
            state_dict[prefix + "logit_scale"] = v.reshape(())
        return state_dict

    def forward(self, image: Optional[Tensor] = None, text: Optional[Tensor] = None,
                padding_mask: Optional[Tensor] = None) -> dict:
        """Either or both modalities -> {"image": (B, D), "text": (B, D), "scale": ()}; the scale is
        read here so that ZeRO-3 has gathered ``logit_scale``."""
        scale = self.logit_scale.exp()
        out = {"scale": (scale if self.logit_scale_max is None else scale.clamp(max=self.logit_scale_max)).squeeze(0)}
        if image is not None:
            img, _ = self.encode(image=image)
            out["image"] = F.normalize(self.vision_head(img[:, 0]), dim=-1)
        if text is not None:
            _, txt = self.encode(text=text, text_padding_mask=padding_mask)
            out["text"] = F.normalize(self.language_head(txt[:, 0]), dim=-1)
        return out

    def example_inputs(self, batch_size: int = 2) -> dict:
        text, pad = _example_text(self.cfg, batch_size)
        return {"image": _example_image(self.cfg, batch_size), "text": text, "padding_mask": pad}


def _logit_scale_from_scalar(module, state_dict, prefix, *args) -> None:
    v = state_dict.get(prefix + "logit_scale")
    if v is not None and v.dim() == 0:
        state_dict[prefix + "logit_scale"] = v.reshape(1)


# -- captioning ----------------------------------------------------------------------------------
def captioning_attention_mask(num_image: int, num_text: int, device=None) -> Tensor:
    """(Li + Lt, Li + Lt) bool, True = may attend: image<->image full, text->image full,
    text->text causal, image->text blocked (unilm/beit3 ``BEiT3ForCaptioning``)."""
    n = num_image + num_text
    mask = torch.zeros(n, n, dtype=torch.bool, device=device)
    mask[:num_image, :num_image] = True
    mask[num_image:, :num_image] = True
    mask[num_image:, num_image:] = torch.ones(num_text, num_text, dtype=torch.bool, device=device).tril()
    return mask


class CaptioningModel(TaskModel):
    """Fusion encoder with the captioning mask; ``mlm_head`` predicts masked caption tokens.

    Training (``image`` given, ``kv_cache`` None): logits of the ``masked_pos`` tokens (M, V), or of
    every text token when ``masked_pos`` is None. Incremental decoding (see ``captioning.py``): the
    first call takes the image and fills ``kv_cache``; later calls pass ``image=None``, only the new
    text tokens starting at position ``text_start``, and the cache, which holds the image.
    """

    task = "captioning"

    def __init__(self, cfg: BEiT3Config):
        super().__init__(cfg)
        self.mlm_head = nn.Linear(cfg.embed_dim, cfg.vocab_size)
        init_head(self.mlm_head)

    @property
    def num_image_tokens(self) -> int:
        return 1 + self.cfg.num_patches

    def forward(self, image: Optional[Tensor], text: Tensor, padding_mask: Optional[Tensor] = None,
                masked_pos: Optional[Tensor] = None, kv_cache: Optional[list] = None,
                text_start: int = 0) -> Tensor:
        Lt = text.shape[1]
        if image is not None:
            mask = captioning_attention_mask(self.num_image_tokens, Lt, text.device)
        else:  # new text tokens against [cached image | cached text | themselves]
            past = kv_cache[0]["k"].shape[2]
            mask = torch.ones(Lt, past + Lt, dtype=torch.bool, device=text.device)
            mask[:, past:] = torch.ones(Lt, Lt, dtype=torch.bool, device=text.device).tril()
        out = self.beit3.forward_streams(image=image, text=text, text_padding_mask=padding_mask,
                                         attn_mask=mask, kv_cache=kv_cache, text_start=text_start,
                                         fusion=True)
        txt = out.text  # (B, Lt, D)
        if masked_pos is not None:
            txt = txt[masked_pos]  # (M, D)
        return self.mlm_head(txt)

    def example_inputs(self, batch_size: int = 2) -> dict:
        text, pad = _example_text(self.cfg, batch_size)
        masked = torch.zeros_like(pad)
        masked[:, 2:4] = True
        return {"image": _example_image(self.cfg, batch_size), "text": text, "padding_mask": pad,
                "masked_pos": masked}


# -- NLVR2 ---------------------------------------------------------------------------------------
class TwoLayerMLP(nn.Module):
    """Official ``TwoLayerMLP``: LN -> Linear -> LN -> GELU -> Linear."""

    def __init__(self, in_features: int, hidden: int, out_features: int, eps: float):
        super().__init__()
        self.norm1 = nn.LayerNorm(in_features, eps=eps)
        self.dense1 = nn.Linear(in_features, hidden)
        self.norm2 = nn.LayerNorm(hidden, eps=eps)
        self.dense2 = nn.Linear(hidden, out_features)

    def forward(self, x: Tensor) -> Tensor:
        return self.dense2(F.gelu(self.norm2(self.dense1(self.norm1(x)))))


class NLVR2Model(TaskModel):
    """Each image is fused with the sentence (one batched call of 2B pairs); the vision CLS and the
    text BOS of both fusions are concatenated (4D) and classified by a two-layer MLP."""

    task = "nlvr2"

    def __init__(self, cfg: BEiT3Config, num_classes: int = 2):
        super().__init__(cfg, num_classes=num_classes)
        d = cfg.embed_dim
        self.head = TwoLayerMLP(4 * d, 2 * d, num_classes, cfg.layer_norm_eps)
        init_head(self.head, scale_last=(self.head.dense1, self.head.dense2))

    def forward(self, image: Tensor, image2: Tensor, text: Tensor, padding_mask: Tensor) -> Tensor:
        """-> logits (B, 2)."""
        B = text.shape[0]
        img, txt = self.encode(image=torch.cat([image, image2]), text=torch.cat([text, text]),
                               text_padding_mask=torch.cat([padding_mask, padding_mask]))
        pair = torch.cat([img[:, 0], txt[:, 0]], dim=-1)  # (2B, 2D)
        return self.head(torch.cat([pair[:B], pair[B:]], dim=-1))  # (B, 4D) -> (B, 2)

    def example_inputs(self, batch_size: int = 2) -> dict:
        text, pad = _example_text(self.cfg, batch_size)
        return {"image": _example_image(self.cfg, batch_size), "image2": _example_image(self.cfg, batch_size),
                "text": text, "padding_mask": pad}


# -- which parameters a task reaches -------------------------------------------------------------
def probe_config(cfg: BEiT3Config) -> BEiT3Config:
    """The same layout, depth and expert placement at toy width: parameter names do not depend on
    width, so a forward/backward of this model tells which names a task reaches, in milliseconds."""
    return cfg.replace(embed_dim=8, num_heads=1, ffn_dim=8, patch_size=cfg.patch_size,
                       img_size=2 * cfg.patch_size, vocab_size=min(cfg.vocab_size, 64),
                       max_text_positions=16, drop_path_rate=0.0, attn_dropout=0.0)


def unreached_parameters(model: TaskModel) -> list[str]:
    """Names of the parameters that get no gradient from ``model``'s task (e.g. the language experts
    for classification, the VL-FFN for retrieval, the mask token for all), found on a toy-width twin
    in eval mode (no drop path)."""
    twin = type(model)(probe_config(model.cfg), **model.head_args).eval()
    torch.manual_seed(0)
    out = twin(**twin.example_inputs())
    loss = sum(v.float().sum() for v in (out.values() if isinstance(out, dict) else [out]))
    loss.backward()
    names = [n for n, p in twin.named_parameters() if p.grad is None]
    real = dict(model.named_parameters())
    missing = [n for n in names if n not in real]
    if missing:
        raise RuntimeError(f"probe model has parameters the real one lacks: {missing[:5]}")
    return names
