"""Initialisation, BEiT v2 patch aggregation, weight decay and pretraining augmentation against ports
of the reference code (unilm beit/beit2/beit3, torchscale), written here from that code."""
from __future__ import annotations

import math
import random

import pytest
import torch
import torch.nn.functional as F
from PIL import Image
from timm.layers import trunc_normal_ as timm_trunc_normal_
from torch import nn
from torchvision import transforms as T
from torchvision.transforms import functional as TF

from beit3 import BEiT3, BEiT3Config
from beit3.weights.official import convert_ours_to_official
from beit3.data.pretrain_loader import PretrainDataConfig
from beit3.data.transforms import PretrainImageTransform
from beit3.model.heads import RetrievalModel
from beit3.jobs.pretrain.objective import MaskedDataModeling
from beit3.trainer.optim import param_groups

STD = 0.02


def _small(layout="released", **kw):
    sizes = dict(vocab_size=100, depth=3, vl_layers=0 if layout == "released" else 1, embed_dim=64, num_heads=2,
                 ffn_dim=128, img_size=32)
    return BEiT3Config.from_preset("tiny", layout=layout, **{**sizes, **kw})


# -- initialisation ----------------------------------------------------------------------------------
def unilm_trunc_normal_(tensor, mean=0.0, std=1.0):
    """beit/beit2 ``modeling_pretrain.trunc_normal_`` and beit3 ``modeling_utils.trunc_normal_``."""
    timm_trunc_normal_(tensor, mean=mean, std=std, a=-std, b=std)


def _initialised(model: BEiT3) -> torch.Tensor:
    """Every tensor the init draws: linear, conv and embedding weights, positions, CLS and mask tokens."""
    ws = [m.weight for m in model.modules() if isinstance(m, (nn.Linear, nn.Conv2d, nn.Embedding))]
    e = model.vision_embed
    ws += [e.cls_token, e.mask_token, e.pos_embed, model.text_embed.pos_embed]
    return torch.cat([w.detach().reshape(-1) for w in ws])


def test_weights_are_unilms_truncated_normal():
    assert all(BEiT3Config.from_preset(p).init_std == STD for p in ("base", "large", "giant"))
    torch.manual_seed(0)
    ours = _initialised(BEiT3(BEiT3Config.from_preset("tiny", vocab_size=500, init_std=STD)))
    ref = torch.empty(ours.numel())
    unilm_trunc_normal_(ref, std=STD)
    assert ours.abs().max() <= STD and ref.abs().max() <= STD  # cut at one standard deviation
    # 0.0108: the std of a normal cut at +-1 sigma, not the 0.02 of a plain normal (timm's default cut).
    assert ours.std().item() == pytest.approx(ref.std().item(), rel=0.01)
    assert ours.std().item() == pytest.approx(0.02 * 0.5396, rel=0.01)


def test_subln_scales_what_torchscale_scales():
    """torchscale ``Encoder.__init__`` with ``subln``: every parameter whose official name holds fc1,
    fc2, out_proj or v_proj is multiplied by sqrt(log(2 N)); nothing else changes."""
    for layout in ("released", "paper"):
        cfg = _small(layout).replace(vl_layers=0)
        torch.manual_seed(0)
        plain = convert_ours_to_official(BEiT3(cfg).state_dict())
        torch.manual_seed(0)
        scaled = convert_ours_to_official(BEiT3(cfg.replace(subln_init_scale=True)).state_dict())
        gain = math.sqrt(math.log(cfg.depth * 2))
        touched = 0
        for name, p in plain.items():
            if any(k in name for k in ("fc1", "fc2", "out_proj", "v_proj")):
                torch.testing.assert_close(scaled[name], p * gain, rtol=1e-6, atol=0)
                touched += p.abs().sum() > 0
            else:
                assert torch.equal(scaled[name], p), name
        assert touched == cfg.depth * 2 * 4  # 4 weight matrices per expert per layer
    vl = _small("paper")
    torch.manual_seed(0)
    a = BEiT3(vl)
    torch.manual_seed(0)
    b = BEiT3(vl.replace(subln_init_scale=True))
    torch.testing.assert_close(b.layers[2].ffn_vl.fc2.weight, a.layers[2].ffn_vl.fc2.weight * math.sqrt(math.log(6)))


def test_pretraining_defaults_to_subln_and_finetuning_to_unilms_wrapper():
    from beit3.cli.pretrain import build_parser, config_from_args
    assert config_from_args(build_parser().parse_args([])).model.init_scheme == "subln"
    assert config_from_args(build_parser().parse_args(["--init-scheme", "plain"])).model.init_scheme == "plain"
    # unilm/beit3's BEiT3Wrapper re-initialises every Linear after torchscale's Sub-LN scaling.
    assert BEiT3Config.from_preset("base").subln_init_scale is False


# -- BEiT v2 patch aggregation ----------------------------------------------------------------------
def test_early_layers_are_beit2s():
    assert BEiT3Config.from_preset("base").early_layers == 9  # beit2 PRETRAINING.md --early_layers
    assert BEiT3Config.from_preset("large").early_layers == 21
    assert BEiT3Config.from_preset("giant").early_layers == 37
    assert BEiT3Config.from_preset("tiny").early_layers == 3
    assert BEiT3Config(depth=6).early_layers == 3  # depth - 3 by default
    with pytest.raises(ValueError, match="patch aggregation after 7 layers"):
        MaskedDataModeling(_small("paper", depth=6, aggregation_early_layers=7), 32, patch_aggregation=True)


def beit2_cls_pt_loss(mdm: MaskedDataModeling, image, bool_masked_pos, labels, early_layers):
    """unilm/beit2 ``VisionTransformerForMaskedImageModelingCLS.forward_features`` and ``forward``
    (shared_lm_head=True) and ``engine_for_pretraining`` (loss_1 + loss_2), over our backbone's
    layers, CLS head blocks, final norm and MIM head."""
    m = mdm.model
    x = (m.vision_embed(image, bool_masked_pos), None)
    for i, blk in enumerate(m.layers):
        x = blk(x, None, False)
        if i + 1 == early_layers:
            early_states = x[0][:, 1:]
    x = x[0]
    x_cls_pt = torch.cat([x[:, [0]], early_states], dim=1)
    for blk in mdm.aggregation.blocks:
        x_cls_pt = blk(x_cls_pt)
    norm = m.norm.A
    x, x_cls_pt = norm(x)[:, 1:], norm(x_cls_pt)[:, 1:]
    loss_1 = F.cross_entropy(mdm.mim_head(x[bool_masked_pos]), labels)
    loss_2 = F.cross_entropy(mdm.mim_head(x_cls_pt[bool_masked_pos]), labels)
    return loss_1, loss_2


def test_patch_aggregation_is_beit2s():
    cfg = _small("paper", depth=6, aggregation_early_layers=2)
    torch.manual_seed(0)
    mdm = MaskedDataModeling(cfg, 32, patch_aggregation=True).eval()
    with torch.no_grad():  # a final norm that is far from the identity: raw vs normed CLS differ
        for p in mdm.model.norm.parameters():
            p.add_(torch.randn_like(p) * 0.5)
    g = torch.Generator().manual_seed(1)
    image = torch.randn(3, 3, 32, 32, generator=g)
    mask = torch.rand(3, cfg.num_patches, generator=g) < 0.4
    targets = torch.randint(0, 32, (3, cfg.num_patches), generator=g)
    with torch.no_grad():
        loss, metrics = mdm({"images": {"image": image, "image_mask": mask}}, {"images": targets})
        loss_1, loss_2 = beit2_cls_pt_loss(mdm, image, mask, targets[mask], early_layers=2)
    assert metrics["loss/image"].item() == pytest.approx(loss_1.item(), rel=1e-5)
    assert metrics["loss/image_cls"].item() == pytest.approx(loss_2.item(), rel=1e-5)
    assert loss.item() == pytest.approx((loss_1 + loss_2).item(), rel=1e-5)  # summed, as beit2
    assert abs(loss_1.item() - loss_2.item()) > 1e-3  # two different predictions


def test_patch_aggregation_head_init_and_drop_path_are_beit2s():
    cfg = BEiT3Config.from_preset("tiny", depth=12, aggregation_early_layers=9, drop_path_rate=0.1, vocab_size=100)
    torch.manual_seed(0)
    head = MaskedDataModeling(cfg, 32, patch_aggregation=True).aggregation
    D, H = cfg.embed_dim, cfg.ffn_dim
    for i, blk in enumerate(head.blocks):
        # PyTorch's default Linear init (std 1/sqrt(3 fan_in)), then beit2's fix_init_cls_pt_weight.
        rescale = math.sqrt(2.0 * (9 + i + 1))
        assert blk.attn.proj.weight.std().item() == pytest.approx(1 / math.sqrt(3 * D) / rescale, rel=0.03)
        assert blk.mlp.fc2.weight.std().item() == pytest.approx(1 / math.sqrt(3 * H) / rescale, rel=0.03)
        assert blk.mlp.fc1.weight.std().item() == pytest.approx(1 / math.sqrt(3 * D), rel=0.03)
        assert not blk.attn.qkv.bias.any()  # beit2's q_bias and v_bias start at zero
        # beit2: dpr = linspace(0, drop_path, max(depth, early + 2)), blocks at early + i.
        assert blk.drop_path1.drop_prob == pytest.approx(0.1 * (9 + i) / 11)


# -- weight decay --------------------------------------------------------------------------------------
UNILM_SKIP = {"pos_embed", "cls_token", "beit3.encoder.embed_positions.A.weight", "beit3.vision_embed.cls_token",
              "logit_scale"}  # BEiT3Wrapper.no_weight_decay


def unilm_decays(name: str, shape) -> bool:
    """unilm/beit3 ``optim_factory.get_parameter_groups``."""
    return not (len(shape) == 1 or name.endswith(".bias") or name in UNILM_SKIP)


def test_weight_decay_follows_unilm_by_exact_name():
    model = RetrievalModel(_small("released"))
    groups = param_groups(model, weight_decay=0.05)
    decayed = {n for g in groups if g["weight_decay"] > 0 for n in g["names"]}
    checked = 0
    for name, p in model.named_parameters():
        if name.startswith("beit3."):
            official = convert_ours_to_official({name[len("beit3."):]: p.detach()})
        else:
            official = {name: p.detach().reshape(()) if name == "logit_scale" else p.detach()}  # unilm: shape ()
        expected = {unilm_decays(k, v.shape) for k, v in official.items()}
        assert len(expected) == 1, official.keys()
        assert (name in decayed) == expected.pop(), name
        checked += 1
    assert checked == len(list(model.parameters()))
    assert "beit3.text_embed.pos_embed" in decayed and "beit3.vision_embed.mask_token" in decayed
    assert "beit3.vision_embed.pos_embed" not in decayed and "logit_scale" not in decayed


# -- pretraining augmentation ------------------------------------------------------------------------
def beit2_crop_params(img, scale, ratio=(3 / 4, 4 / 3)):
    """beit2 ``RandomResizedCropAndInterpolationWithTwoPic.get_params`` (Python's ``random``)."""
    area = img.size[0] * img.size[1]
    for _ in range(10):
        target_area = random.uniform(*scale) * area
        aspect_ratio = math.exp(random.uniform(math.log(ratio[0]), math.log(ratio[1])))
        w = int(round(math.sqrt(target_area * aspect_ratio)))
        h = int(round(math.sqrt(target_area / aspect_ratio)))
        if w <= img.size[0] and h <= img.size[1]:
            return random.randint(0, img.size[1] - h), random.randint(0, img.size[0] - w), h, w
    in_ratio = img.size[0] / img.size[1]
    w, h = img.size
    if in_ratio < min(ratio):
        h = int(round(w / min(ratio)))
    elif in_ratio > max(ratio):
        w = int(round(h * max(ratio)))
    return (img.size[1] - h) // 2, (img.size[0] - w) // 2, h, w


def beit2_augmentation(img, size, second_size, crop):
    """beit2 ``DataAugmentationForBEiT`` (mean = std = 0.5, bicubic both views) for given crop params."""
    common = T.Compose([T.ColorJitter(0.4, 0.4, 0.4), T.RandomHorizontalFlip(p=0.5)])
    img = common(img)
    i, j, h, w = crop
    a = TF.resized_crop(img, i, j, h, w, [size, size], T.InterpolationMode.BICUBIC)
    b = TF.resized_crop(img, i, j, h, w, [second_size, second_size], T.InterpolationMode.BICUBIC)
    return T.Normalize((0.5,) * 3, (0.5,) * 3)(TF.to_tensor(a)), TF.to_tensor(b)


def _picture(seed=0):
    g = torch.Generator().manual_seed(seed)
    return Image.fromarray((torch.rand(60, 80, 3, generator=g) * 255).byte().numpy())


def test_image_views_are_beit2s(monkeypatch):
    cfg = PretrainDataConfig()
    assert (cfg.crop_scale, cfg.hflip, cfg.color_jitter) == ((0.08, 1.0), 0.5, 0.4)  # image-only: BEiT's
    assert (cfg.pair_crop_scale, cfg.pair_hflip) == ((0.5, 1.0), 0.0)  # pairs: their captions say left/right
    ours = PretrainImageTransform(48, 32, cfg.crop_scale, cfg.color_jitter, cfg.hflip)
    img = _picture()
    flips = 0
    for seed in range(8):
        random.seed(seed)
        crop = beit2_crop_params(img, (0.08, 1.0))
        monkeypatch.setattr(T.RandomResizedCrop, "get_params", staticmethod(lambda *a, crop=crop: crop))
        torch.manual_seed(seed)
        view, tok = ours(img)
        torch.manual_seed(seed)
        ref_view, ref_tok = beit2_augmentation(img, 48, 32, crop)
        assert torch.equal(view, ref_view) and torch.equal(tok, ref_tok)
        torch.manual_seed(seed)  # replay the jitter's draws, then the flip's
        T.ColorJitter(0.4, 0.4, 0.4).get_params([0.6, 1.4], [0.6, 1.4], [0.6, 1.4], None)
        flips += bool(torch.rand(1) < 0.5)
    assert 0 < flips < 8  # both branches of the flip were compared


def test_crop_boxes_follow_beit2s_distribution():
    img = _picture()
    random.seed(0)
    torch.manual_seed(0)
    ref = [beit2_crop_params(img, (0.08, 1.0)) for _ in range(3000)]
    ours = [T.RandomResizedCrop.get_params(img, [0.08, 1.0], [3 / 4, 4 / 3]) for _ in range(3000)]

    def stats(boxes):
        area = torch.tensor([h * w / (60 * 80) for _, _, h, w in boxes])
        aspect = torch.tensor([math.log(w / h) for _, _, h, w in boxes])
        return area.mean().item(), area.std().item(), aspect.mean().item()

    for a, b in zip(stats(ours), stats(ref)):
        assert a == pytest.approx(b, abs=0.02)
