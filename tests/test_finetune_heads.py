"""Fine-tuning heads: official names and shapes, official weights round trip, routing, features."""
import math

import pytest
import torch

from beit3 import BEiT3Config
from beit3.weights.official import convert_ours_to_official
from beit3.model.heads import CLIP_LOGIT_SCALE_MAX, LOGIT_SCALE_INIT, CaptioningModel, ImageClassifier, NLVR2Model, RetrievalModel, VQAModel, captioning_attention_mask, unreached_parameters
from beit3.jobs.finetune.init_weights import apply_init, load_init
from beit3.jobs.finetune.run import freeze_unreached

D, A, C, V = 64, 7, 5, 100  # width, answers, classes, vocabulary

# Non-backbone parameter names and shapes of unilm/beit3 modeling_finetune.py for each task.
OFFICIAL_HEADS = {
    "classification": (ImageClassifier, {"num_classes": C}, {
        "fc_norm.weight": (D,), "fc_norm.bias": (D,), "head.weight": (C, D), "head.bias": (C,)}),
    "vqa": (VQAModel, {"num_answers": A}, {
        "pooler.norm.weight": (D,), "pooler.norm.bias": (D,), "pooler.dense.weight": (D, D),
        "pooler.dense.bias": (D,), "head.0.weight": (2 * D, D), "head.0.bias": (2 * D,),
        "head.1.weight": (2 * D,), "head.1.bias": (2 * D,), "head.3.weight": (A, 2 * D), "head.3.bias": (A,)}),
    "retrieval": (RetrievalModel, {}, {
        "vision_head.weight": (D, D), "language_head.weight": (D, D), "logit_scale": ()}),
    "captioning": (CaptioningModel, {}, {"mlm_head.weight": (V, D), "mlm_head.bias": (V,)}),
    "nlvr2": (NLVR2Model, {}, {
        "head.norm1.weight": (4 * D,), "head.norm1.bias": (4 * D,), "head.dense1.weight": (2 * D, 4 * D),
        "head.dense1.bias": (2 * D,), "head.norm2.weight": (2 * D,), "head.norm2.bias": (2 * D,),
        "head.dense2.weight": (2, 2 * D), "head.dense2.bias": (2,)}),
}
LAYOUTS = ["paper", "released"]


def _cfg(layout, **kw):
    """Three layers (the last with a VL-FFN in the paper layout), 4 x 4 patches: small and fast."""
    return BEiT3Config.from_preset("tiny", layout=layout, vocab_size=V, depth=3, vl_layers=1, embed_dim=D,
                                   num_heads=2, ffn_dim=2 * D, img_size=32, max_text_positions=32, **kw)


def _model(task, layout, seed=0):
    torch.manual_seed(seed)
    cls, kwargs, _ = OFFICIAL_HEADS[task]
    return cls(_cfg(layout), **kwargs).eval()


def _out(model, inputs):
    with torch.no_grad():
        out = model(**inputs)
    return out if isinstance(out, dict) else {"logits": out}


@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("task", sorted(OFFICIAL_HEADS))
def test_head_names_and_shapes_are_the_official_ones(task, layout):
    model = _model(task, layout)
    heads = {k: tuple(v.shape) for k, v in model.state_dict().items() if not k.startswith("beit3.")}
    assert heads == OFFICIAL_HEADS[task][2]
    assert all(k.startswith("beit3.") for k in model.state_dict() if k not in heads)


@pytest.mark.parametrize("task", sorted(OFFICIAL_HEADS))
def test_official_checkpoint_round_trip(task, tmp_path):
    """Our task model -> an official-format file (torchscale names + head names) -> a fresh model:
    the same weights and the same outputs."""
    src = _model(task, "released", seed=0)
    sd = src.state_dict()
    backbone = {k[len("beit3."):]: v for k, v in sd.items() if k.startswith("beit3.")}
    official = {**convert_ours_to_official(backbone), **{k: v for k, v in sd.items() if not k.startswith("beit3.")}}
    assert any(k.startswith("beit3.encoder.layers.0.self_attn.q_proj.A") for k in official)
    torch.save({"model": official}, tmp_path / "official.pth")

    init = load_init(str(tmp_path / "official.pth"))
    assert init.source_format == "official"
    dst = _model(task, "released", seed=1)
    report = apply_init(dst, init)
    assert sorted(report.heads_loaded) == sorted(OFFICIAL_HEADS[task][2]) and not report.missing
    for k, v in dst.state_dict().items():
        torch.testing.assert_close(v, sd[k], rtol=0, atol=0, msg=k)
    inputs = src.example_inputs(2)
    for k, v in _out(src, inputs).items():
        torch.testing.assert_close(_out(dst, inputs)[k], v)


@pytest.mark.parametrize("task", ["classification", "vqa"])
def test_official_checkpoint_without_final_norm_loads(task, tmp_path):
    """unilm builds classification and VQA with normalize_output=False: their checkpoints have no
    encoder.layer_norm, and our heads read the backbone before that norm, so nothing changes."""
    src = _model(task, "released", seed=0)
    sd = src.state_dict()
    backbone = {k[len("beit3."):]: v for k, v in sd.items() if k.startswith("beit3.") and not k.startswith("beit3.norm.")}
    official = {**convert_ours_to_official(backbone), **{k: v for k, v in sd.items() if not k.startswith("beit3.")}}
    torch.save({"model": official}, tmp_path / "official.pth")
    dst = _model(task, "released", seed=1)
    report = apply_init(dst, load_init(str(tmp_path / "official.pth")))
    assert report.missing and all(k.startswith("norm.") for k in report.missing)
    inputs = src.example_inputs(2)
    torch.testing.assert_close(_out(dst, inputs)["logits"], _out(src, inputs)["logits"])


@pytest.mark.parametrize("task,uses_final_norm", [("classification", False), ("vqa", False), ("retrieval", True),
                                                  ("captioning", True), ("nlvr2", True)])
def test_final_norm_is_used_exactly_where_unilm_uses_it(task, uses_final_norm):
    model = _model(task, "paper")
    with torch.no_grad():  # undo the 0.001 init scale of the classifiers, so outputs show changes
        for name, p in model.named_parameters():
            if not name.startswith("beit3.") and p.dim() == 2:
                p.normal_(0, 0.05)
    inputs = model.example_inputs(2)
    before = _out(model, inputs)
    with torch.no_grad():
        for p in model.beit3.norm.parameters():
            p.add_(torch.randn_like(p))
    after = _out(model, inputs)
    changed = any(not torch.allclose(before[k], after[k]) for k in before if before[k].dim() > 0)
    assert changed == uses_final_norm


def _language_params(model):
    return [n for n, _ in model.named_parameters()
            if n.startswith("beit3.text_embed.") or ".ffn.B." in n or ".attn.qkv.B." in n or ".attn.proj.B." in n
            or ".attn.norm.B." in n or ".attn.inner_norm.B." in n]


@pytest.mark.parametrize("layout", LAYOUTS)
def test_classification_gives_no_gradient_to_language_experts(layout):
    model = _model("classification", layout).train()
    frozen = set(freeze_unreached(model, linear_probe=False))
    language = _language_params(model)
    assert language and set(language) <= frozen
    assert not any(n.startswith("beit3.layers.") and ".ffn.A." in n for n in frozen)  # vision FFN trains
    model(**model.example_inputs(2)).square().sum().backward()
    for name, p in model.named_parameters():
        if name in language:
            assert p.grad is None and not p.requires_grad, name


@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("task", sorted(OFFICIAL_HEADS))
def test_every_trainable_parameter_gets_a_gradient(task, layout):
    """After freezing what the task never reaches, the rest all learn (no dead weights in AdamW)."""
    model = _model(task, layout)
    frozen = set(freeze_unreached(model, linear_probe=False))
    assert "beit3.vision_embed.mask_token" in frozen  # fine-tuning never masks patches
    out = model(**model.example_inputs(2))
    sum(v.float().sum() for v in (out.values() if isinstance(out, dict) else [out])).backward()
    dead = [n for n, p in model.named_parameters() if p.requires_grad and (p.grad is None or not p.grad.abs().sum())]
    assert not dead


def test_unreached_parameters_are_layout_specific():
    paper = set(unreached_parameters(_model("retrieval", "paper")))
    released = set(unreached_parameters(_model("retrieval", "released")))
    assert any(".ffn_vl." in n for n in paper)  # a dual encoder never routes to the VL-FFN
    assert released == {"beit3.vision_embed.mask_token"}
    vqa = set(unreached_parameters(_model("vqa", "released")))
    # VQA reads the vision CLS: the language stream's last attention output and FFN are never used.
    assert "beit3.layers.2.ffn.B.fc1.weight" in vqa and "beit3.layers.1.ffn.B.fc1.weight" not in vqa


def test_linear_probe_freezes_the_backbone_and_uses_batchnorm():
    torch.manual_seed(0)
    model = ImageClassifier(_cfg("paper"), C, linear_probe=True).train()
    frozen = freeze_unreached(model, linear_probe=True)
    trainable = sorted(n for n, p in model.named_parameters() if p.requires_grad)
    assert trainable == ["head.bias", "head.weight"]
    assert len(frozen) == sum(1 for n, _ in model.named_parameters() if n.startswith("beit3."))
    assert isinstance(model.fc_norm, torch.nn.BatchNorm1d) and model.fc_norm.weight is None


def test_classification_head_init_is_scaled_down():
    model = _model("classification", "paper")
    assert model.head.weight.abs().max() <= 0.02 * 0.001 + 1e-9  # truncated at +-std, times 0.001
    assert model.head.weight.std() > 0
    nl = _model("nlvr2", "paper")
    assert nl.head.dense1.weight.abs().max() <= 0.02 * 0.001 + 1e-9


def test_retrieval_features_are_normalised_and_scale_unclamped_as_unilm():
    model = _model("retrieval", "paper")
    out = _out(model, model.example_inputs(3))
    assert out["image"].shape == out["text"].shape == (3, D)
    torch.testing.assert_close(out["image"].norm(dim=-1), torch.ones(3))
    torch.testing.assert_close(out["text"].norm(dim=-1), torch.ones(3))
    assert out["scale"].item() == pytest.approx(1 / 0.07, rel=1e-5) and model.logit_scale.item() == pytest.approx(LOGIT_SCALE_INIT)
    clip = RetrievalModel(_cfg("paper"), logit_scale_max=CLIP_LOGIT_SCALE_MAX).eval()
    assert clip.head_args == {"logit_scale_max": 100.0}  # rebuilt with it by `beit3 evaluate`
    image = {"image": model.example_inputs(1)["image"]}
    with torch.no_grad():
        model.logit_scale.fill_(math.log(1000.0))
        clip.logit_scale.fill_(math.log(1000.0))
    assert _out(model, image)["scale"].item() == pytest.approx(1000.0, rel=1e-5)  # unilm: exp, no clamp
    assert _out(clip, image)["scale"].item() == pytest.approx(100.0)  # CLIP's clamp, --logit-scale-max 100


def test_nlvr2_equals_two_separate_fusions():
    model = _model("nlvr2", "paper")
    with torch.no_grad():  # make the head's output sensitive to its input
        model.head.dense1.weight.normal_(0, 0.02)
        model.head.dense2.weight.normal_(0, 0.02)
    x = model.example_inputs(3)
    x["padding_mask"][1, 4:] = True
    ref = []
    for img in (x["image"], x["image2"]):
        out = model.beit3.forward_streams(image=img, text=x["text"], text_padding_mask=x["padding_mask"])
        ref.append(torch.cat([out.image[:, 0], out.text[:, 0]], dim=-1))
    with torch.no_grad():
        expected = model.head(torch.cat(ref, dim=-1))
        torch.testing.assert_close(model(**x), expected, atol=1e-5, rtol=1e-4)


def test_vqa_pools_the_vision_cls_before_the_final_norm():
    model = _model("vqa", "released")
    x = model.example_inputs(2)
    with torch.no_grad():
        out = model.beit3.forward_streams(image=x["image"], text=x["text"], text_padding_mask=x["padding_mask"],
                                          out_layers=(2,))
        cls = out.hidden[2][0][:, 0]  # layer 2 = last of 3; vision stream; CLS
        pooled = torch.tanh(model.pooler.dense(model.pooler.norm(cls)))
        torch.testing.assert_close(model(**x), model.head(pooled))


def test_captioning_mask_matches_an_explicit_loop():
    ni, nt = 3, 4
    mask = captioning_attention_mask(ni, nt)
    for q in range(ni + nt):
        for k in range(ni + nt):
            q_img, k_img = q < ni, k < ni
            expected = (k_img) or (not q_img and k <= q)
            assert bool(mask[q, k]) == expected, (q, k)
