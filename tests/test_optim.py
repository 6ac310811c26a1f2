"""The optimizer recipe: layer-wise lr decay and the head lr multiplier, which parameters are decayed,
and the warmup + cosine schedule, with exact numbers and against unilm/beit3's rules written out
here (``optim_factory.py``, ``run_beit3_finetuning.py``, ``utils.cosine_scheduler``)."""
from __future__ import annotations

import math

import pytest
import torch

from beit3 import BEiT3Config
from beit3.model.heads import CaptioningModel, ImageClassifier, NLVR2Model, RetrievalModel, VQAModel
from beit3.jobs.finetune.recipes import FinetuneConfig
from beit3.jobs.finetune.run import freeze_unreached, optimizer_setup
from beit3.jobs.pretrain.objective import MaskedDataModeling
from beit3.trainer.optim import build_optimizer, build_scheduler, cosine_lr_lambda, param_groups
from beit3.weights.official import convert_ours_to_official

HEADS = {"vqa": lambda c: VQAModel(c, num_answers=5), "retrieval": RetrievalModel, "captioning": CaptioningModel,
         "classification": lambda c: ImageClassifier(c, num_classes=3), "nlvr2": NLVR2Model}


def _tiny(layout="paper"):
    extra = {"vl_layers": 0} if layout == "released" else {}
    return BEiT3Config.from_preset("tiny", layout=layout, vocab_size=100, img_size=32, **extra)


def _scales(groups) -> dict[str, float]:
    return {n: g["lr_scale"] for g in groups for n in g["names"]}


def _decays(groups) -> dict[str, float]:
    return {n: g["weight_decay"] for g in groups for n in g["names"]}


# -- unilm/beit3 optim_factory.py, as it is there --------------------------------------------------
def unilm_get_num_layer_for_vit(var_name, num_max_layer):
    if "embed" in var_name:
        return 0
    elif var_name in ("cls_token", "mask_token", "pos_embed", "language_pos_embed",
                      "word_embeddings.weight", "vision_cls_token", "vision_pos_embed"):
        return 0
    elif var_name.startswith("patch_embed"):
        return 0
    elif var_name.startswith("rel_pos_bias"):
        return num_max_layer - 1
    elif "layers." in var_name:
        return int(var_name.split("layers.")[1].split(".")[0]) + 1
    else:
        return num_max_layer - 1


def unilm_get_is_head_flag_for_vit(var_name, num_max_layer):
    return 1 if var_name.startswith("head") else 0


def unilm_lr_scale(official_name: str, depth: int, layer_decay: float, task_head_lr_weight: float) -> float:
    """run_beit3_finetuning.py: a LayerDecayValueAssigner of layer_decay ** (depth + 1 - i) when
    layer_decay < 1, else one of [1, task_head_lr_weight] by the head flag when that is > 1."""
    if layer_decay < 1.0:
        values = [layer_decay ** (depth + 1 - i) for i in range(depth + 2)]
        return values[unilm_get_num_layer_for_vit(official_name, len(values))]
    if task_head_lr_weight > 1:
        values = [1.0, task_head_lr_weight]
        return values[unilm_get_is_head_flag_for_vit(official_name, len(values))]
    return 1.0


def _official_names(name: str, p: torch.Tensor) -> list[str]:
    if name.startswith("beit3."):
        return list(convert_ours_to_official({name[len("beit3."):]: p.detach()}))
    return [name]  # the heads carry unilm's names (heads.py)


# -- layer-wise lr decay ---------------------------------------------------------------------------
def test_layer_decay_scales_with_known_numbers():
    """depth 4, decay 0.5, head x 20: embeddings 0.5^5, layer i 0.5^(4 - i), the final norm, the
    pooler and the task head 1: under layer decay unilm ignores the head weight (it takes one or the
    other, never their product)."""
    model = VQAModel(_tiny(), num_answers=5)
    cfg = FinetuneConfig(task="vqa", layer_decay=0.5, head_lr_scale=20.0)
    _, groups = optimizer_setup(model, cfg, total_steps=100, warmup_steps=10)
    assert model.cfg.depth == 4
    got = _scales(groups)
    assert got.keys() == {n for n, _ in model.named_parameters()}
    for name, scale in got.items():
        if name.startswith(("beit3.vision_embed.", "beit3.text_embed.")):
            want = 0.03125
        elif name.startswith("beit3.layers."):
            want = {0: 0.0625, 1: 0.125, 2: 0.25, 3: 0.5}[int(name.split(".")[2])]
        elif name.startswith(("beit3.norm.", "pooler.")):
            want = 1.0
        else:
            assert name.startswith("head."), name
            want = 1.0  # not 20 x 1
        assert scale == pytest.approx(want, rel=1e-12), name
    # One group per (decay, scale): 6 scales (embeddings, 4 layers, top with the head) x 2 decays.
    assert len(groups) == 12
    per_scale = {}
    for g in groups:
        per_scale[g["lr_scale"]] = per_scale.get(g["lr_scale"], 0) + len(g["params"])
    # Tensors: embeddings 7 (CLS, mask, positions, patch weight and bias, text positions, tokens);
    # final norm 4 + pooler 4; head 6 (Linear, LayerNorm, Linear).
    layers = [sum(1 for n, _ in model.named_parameters() if n.startswith(f"beit3.layers.{i}.")) for i in range(4)]
    assert layers == [24, 24, 24, 32]  # 8 attention + 2 experts x 8; the VL layer has a third expert
    assert per_scale == {0.03125: 7, 0.0625: 24, 0.125: 24, 0.25: 24, 0.5: 32, 1.0: 14}
    # Without decay the head weight applies: 20 on the head's 6 tensors, 1 everywhere else.
    _, groups = optimizer_setup(model, FinetuneConfig(task="vqa", head_lr_scale=20.0), 100, 10)
    assert {n: s for n, s in _scales(groups).items() if s != 1.0} == {
        n: 20.0 for n, _ in model.named_parameters() if n.startswith("head.")}
    assert len(groups) == 4


@pytest.mark.parametrize("task", sorted(HEADS))
def test_layer_decay_and_head_lr_are_unilms(task):
    """Each parameter's lr scale equals unilm's for its official name: the released layout, every
    task head, the settings the recipes use (one of layer decay and head lr at a time) and both at
    once (then unilm takes the layer decay alone)."""
    model = HEADS[task](_tiny("released"))
    depth = model.cfg.depth
    for layer_decay, head in ((0.65, 1.0), (1.0, 20.0), (1.0, 1.0), (0.65, 20.0)):
        cfg = FinetuneConfig(task=task, layer_decay=layer_decay, head_lr_scale=head)
        _, groups = optimizer_setup(model, cfg, total_steps=100, warmup_steps=10)
        got = _scales(groups)
        assert len(got) == sum(1 for _ in model.parameters())
        for name, p in model.named_parameters():
            want = {unilm_lr_scale(o, depth, layer_decay, head) for o in _official_names(name, p)}
            assert len(want) == 1, name
            assert got[name] == pytest.approx(want.pop(), rel=1e-12), (layer_decay, head, name)
        if head != 1.0 and layer_decay == 1.0:  # retrieval's and captioning's heads are not named ``head``
            assert max(got.values()) == (head if task in ("vqa", "classification", "nlvr2") else 1.0)
        if layer_decay != 1.0:
            assert min(got.values()) == pytest.approx(layer_decay ** (depth + 1))


def test_every_recipe_sets_at_most_one_of_layer_decay_and_head_lr():
    """unilm applies --task_head_lr_weight only without layer decay, and so does ours (beit3 finetune
    refuses both at once): a recipe sets at most one of them."""
    from beit3.jobs.finetune.recipes import RECIPES
    both = [n for n, r in RECIPES.items()
            if r.get("layer_decay", 1.0) != 1.0 and r.get("head_lr_scale", 1.0) != 1.0]
    assert both == []
    assert sum(r.get("head_lr_scale", 1.0) != 1.0 for r in RECIPES.values()) == 2  # vqa-base, vqa-large


def test_frozen_parameters_get_no_group_and_lr_reaches_the_optimizer():
    """Classification freezes the language experts (and the VL FFN it never reaches) before the
    groups are built; each AdamW group's lr is the peak lr times its scale."""
    model = ImageClassifier(_tiny(), num_classes=3)
    frozen = freeze_unreached(model, linear_probe=False)
    cfg = FinetuneConfig(task="classification", layer_decay=0.5, lr=1e-3)
    _, groups = optimizer_setup(model, cfg, total_steps=100, warmup_steps=10)
    grouped = {n for g in groups for n in g["names"]}
    assert frozen and not grouped & set(frozen)
    assert grouped | set(frozen) == {n for n, _ in model.named_parameters()}
    opt = build_optimizer(groups, lr=1e-3)
    lr_of = {id(p): g["lr"] for g in opt.param_groups for p in g["params"]}
    for name, p in model.named_parameters():
        if name in grouped:
            assert lr_of[id(p)] == pytest.approx(1e-3 * _scales(groups)[name], rel=1e-12), name
        else:
            assert id(p) not in lr_of, name
    assert lr_of[id(model.beit3.layers[0].attn.qkv.shared.weight)] == pytest.approx(1e-3 * 0.5 ** 4)


# -- weight decay ----------------------------------------------------------------------------------
def test_no_weight_decay_rules_and_group_counts_of_pretraining():
    """The module pretraining optimizes (tiny backbone + MLM/MIM heads): 1-D tensors, biases, the
    vision position table, the CLS token -> 0; every other matrix -> the configured decay.
    Counted by hand: the backbone's decayed tensors are the patch projection, the token table,
    the text position table and the mask token (4), per layer qkv + proj + 2 experts x (fc1, fc2)
    (6 x 4 layers) and the VL expert's fc1, fc2 (2): 30, plus the two heads' weights: 32. Not
    decayed: CLS, vision positions, patch bias (3), per layer 6 attention + 2 x 6 expert 1-D
    tensors (18 x 4), the VL expert's 6, the final norms' 4: 85, plus the heads' biases: 87."""
    model = MaskedDataModeling(_tiny(), num_visual_tokens=256)
    groups = param_groups(model, weight_decay=0.05)
    assert sorted((g["weight_decay"], g["lr_scale"], len(g["params"])) for g in groups) == [(0.0, 1.0, 87),
                                                                                            (0.05, 1.0, 32)]
    decays = _decays(groups)
    for name, p in model.named_parameters():
        exempt = p.ndim == 1 or name.endswith((".bias", "vision_embed.pos_embed", "vision_embed.cls_token"))
        assert decays[name] == (0.0 if exempt else 0.05), name
    assert decays["model.vision_embed.mask_token"] == 0.05 and decays["model.text_embed.pos_embed"] == 0.05
    assert decays["model.vision_embed.cls_token"] == 0.0 and decays["model.vision_embed.pos_embed"] == 0.0


def test_retrieval_logit_scale_is_not_decayed_and_adamw_honours_the_groups():
    model = RetrievalModel(_tiny())
    cfg = FinetuneConfig(task="retrieval", weight_decay=0.2)
    _, groups = optimizer_setup(model, cfg, total_steps=100, warmup_steps=10)
    decays = _decays(groups)
    assert decays["logit_scale"] == 0.0 and decays["vision_head.weight"] == decays["language_head.weight"] == 0.2
    # The backbone's 30 + the two projection heads; the backbone's 85 + logit_scale.
    assert sum(len(g["params"]) for g in groups if g["weight_decay"]) == 32
    assert sum(len(g["params"]) for g in groups if not g["weight_decay"]) == 86

    # With zero gradients Adam's update is 0, so one step leaves only the decoupled decay:
    # decayed tensors shrink by exactly (1 - lr x wd), the others stay bit for bit.
    lr = 0.1
    opt = build_optimizer(groups, lr=lr)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    for p in model.parameters():
        p.grad = torch.zeros_like(p)
    opt.step()
    for name, p in model.named_parameters():
        if decays[name]:
            torch.testing.assert_close(p.detach(), before[name] * (1 - lr * 0.2), rtol=1e-6, atol=0, msg=name)
        else:
            assert torch.equal(p.detach(), before[name]), name


# -- the schedule ----------------------------------------------------------------------------------
def unilm_cosine_scheduler(base_value, final_value, total_steps, warmup_steps):
    """utils.cosine_scheduler with warmup_steps and start_warmup_value 0, without numpy."""
    warmup = [base_value * i / (warmup_steps - 1) for i in range(warmup_steps)]  # np.linspace(0, base, W)
    n = total_steps - warmup_steps
    return warmup + [final_value + 0.5 * (base_value - final_value) * (1 + math.cos(math.pi * i / n))
                     for i in range(n)]


def test_cosine_schedule_exact_values():
    """Warmup 10, 110 steps, min ratio 0.1. The warmup climbs (step + 1) / W, so the first step
    already moves the weights (unilm's linspace starts at 0); from the last warmup step on it is
    unilm's cosine exactly."""
    f = cosine_lr_lambda(warmup_steps=10, total_steps=110, min_ratio=0.1)
    assert f(0) == pytest.approx(0.1, rel=1e-6)
    assert f(4) == pytest.approx(0.5, rel=1e-6)  # mid-warmup
    assert f(9) == f(10) == 1.0  # peak at the end of the warmup and the start of the decay
    assert f(35) == pytest.approx(0.1 + 0.9 * 0.5 * (1 + math.sqrt(0.5)), rel=1e-6)  # a quarter of the decay
    assert f(60) == pytest.approx((1.0 + 0.1) / 2, rel=1e-6)  # halfway: (peak + min) / 2
    assert f(110) == pytest.approx(0.1, rel=1e-6) and f(500) == pytest.approx(0.1, rel=1e-6)  # min, and stays
    assert all(f(s + 1) < f(s) for s in range(10, 110))
    ref = unilm_cosine_scheduler(1.0, 0.1, total_steps=110, warmup_steps=10)
    for step in range(9, 110):
        assert f(step) == pytest.approx(ref[step], rel=1e-9), step
    assert ref[0] == 0.0 and f(0) == 0.1
    # No warmup: the cosine from step 0.
    assert cosine_lr_lambda(0, 100, 0.0)(0) == 1.0 and cosine_lr_lambda(0, 100, 0.0)(50) == pytest.approx(0.5)


def test_scheduler_drives_each_group_from_its_scaled_lr():
    """The torch LambdaLR on the built AdamW, stepped as the engine steps it: every group follows
    peak x lr_scale x the schedule, ending at min_lr x lr_scale (unilm's final value, scaled)."""
    torch.manual_seed(0)
    model = VQAModel(_tiny(), num_answers=5)
    cfg = FinetuneConfig(task="vqa", layer_decay=0.5, lr=1e-3, min_lr=1e-5)
    opt_cfg, groups = optimizer_setup(model, cfg, total_steps=110, warmup_steps=10)
    assert (opt_cfg.warmup_steps, opt_cfg.total_steps) == (10, 110)
    assert opt_cfg.lr * opt_cfg.min_lr_ratio == pytest.approx(1e-5, rel=1e-12)
    opt = build_optimizer(groups, lr=opt_cfg.lr)
    sched = build_scheduler(opt, opt_cfg.warmup_steps, opt_cfg.total_steps, opt_cfg.min_lr_ratio)
    scales = [g["lr_scale"] for g in groups]
    seen = {}
    for step in range(111):
        seen[step] = [g["lr"] for g in opt.param_groups]
        opt.step()
        sched.step()
    peak = 1e-3
    want = {0: peak / 10, 4: peak / 2, 9: peak, 10: peak, 60: (peak + 1e-5) / 2, 110: 1e-5}
    for step, lr in want.items():
        for got, scale in zip(seen[step], scales):
            assert got == pytest.approx(lr * scale, rel=1e-6), (step, scale)
    top = scales.index(1.0)
    assert [seen[s][top] for s in (0, 9, 60, 110)] == pytest.approx([1e-4, 1e-3, 5.05e-4, 1e-5], rel=1e-6)
