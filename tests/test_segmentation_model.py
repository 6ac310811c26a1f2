"""Dense features (``forward_intermediates``), the multi-scale adapter, UperNet, the loss, sliding windows."""
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from beit3 import BEiT3, BEiT3Config, PRESETS
from beit3.weights.backbones import vision_encoder
from beit3.model.heads import unreached_parameters
from beit3.jobs.finetune.init_weights import apply_init, load_init
from beit3.model.segmentation import SegmentationModel, default_out_indices, segmentation_loss, slide_logits, sync_batchnorm, window_boxes
from beit3.jobs.finetune.run import freeze_unreached
from beit3.model.upernet import FCNHead, MultiScaleAdapter, UPerHead
from beit3.model.intermediates import tokens_to_map
from beit3.trainer.optim import layer_id, param_groups, poly_lr_lambda
from beit3.weights import to_official

pytestmark = pytest.mark.usefixtures("one_thread")
LAYOUTS = ["paper", "released"]


def small(layout, **kw):
    return BEiT3Config.from_preset("tiny", layout=layout, embed_dim=64, num_heads=4, ffn_dim=128, depth=4,
                                   vl_layers=1, img_size=32, patch_size=8, vocab_size=50, **kw)


def randomized(cfg, seed=5):
    torch.manual_seed(seed)
    model = BEiT3(cfg).eval()
    with torch.no_grad():  # random norms too, so that "with the final norm" differs from "without"
        for name, p in model.named_parameters():
            if p.dim() == 1 and "norm" in name:
                p.copy_(1.0 + 0.3 * torch.randn_like(p) if name.endswith("weight") else 0.3 * torch.randn_like(p))
    return model


# -- forward_intermediates ---------------------------------------------------------------------------
@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("preset", sorted(PRESETS))
def test_intermediate_maps_have_timm_shapes_for_every_preset(preset, layout):
    """Every preset's width and patch, both layouts, at a small input (two patches a side), on the
    meta device (no weights); depth cut to 4 layers (building giant's 40 takes seconds even there)."""
    cfg = BEiT3Config.from_preset(preset, layout=layout, img_size=2 * PRESETS[preset]["patch_size"], depth=4,
                                  vl_layers=1)
    with torch.device("meta"):
        model, enc = BEiT3(cfg), vision_encoder(BEiT3(cfg))
        image = torch.empty(2, 3, cfg.img_size, cfg.img_size)
        final, maps = model.forward_intermediates(image, indices=default_out_indices(cfg.depth))
        timm_final, timm_maps = enc.forward_intermediates(image, indices=default_out_indices(cfg.depth))
        nlc = model.forward_intermediates(image, indices=2, output_fmt="NLC", intermediates_only=True)
    d = cfg.embed_dim
    assert final.shape == timm_final.shape == (2, 5, d)
    assert [m.shape for m in maps] == [m.shape for m in timm_maps] == [(2, d, 2, 2)] * 4
    assert [m.shape for m in nlc] == [(2, 4, d)] * 2


@pytest.mark.parametrize("layout", LAYOUTS)
def test_last_map_is_the_plain_forwards_patch_tokens(layout):
    cfg = small(layout)
    model = randomized(cfg)
    enc = vision_encoder(model)
    image = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        tokens = model(image=image)  # (2, 1 + 16, D) after the final norm
        final, (last,) = model.forward_intermediates(image, indices=1, norm=True)
        raw = model.forward_intermediates(image, indices=[-1], intermediates_only=True)[0]
        before_norm = model.forward_streams(image=image, out_layers=[3]).hidden[3][0]
        enc_final, enc_maps = enc.forward_intermediates(image, indices=[1, 3], norm=True)
        ours = model.forward_intermediates(image, indices=[3, 1], norm=True, intermediates_only=True)
    assert torch.equal(final, tokens)
    assert torch.equal(last, tokens_to_map(tokens[:, 1:], (4, 4)))
    assert last[1, :, 2, 3].equal(tokens[1, 1 + 2 * 4 + 3])  # row-major grid: patch (2, 3)
    assert torch.equal(raw, tokens_to_map(before_norm[:, 1:], (4, 4))) and not torch.allclose(raw, last)
    # the timm encoder built from the same weights: same maps, in layer order whatever the order asked
    assert (enc_final - tokens).abs().max() < 1e-5
    for a, b in zip(enc_maps, ours):
        assert (a - b).abs().max() < 1e-5


def test_stop_early_prefix_tokens_and_pruning():
    cfg = small("released")
    model = randomized(cfg)
    enc = vision_encoder(model)
    image = torch.randn(1, 3, 32, 32)
    with torch.no_grad():
        full = model.forward_intermediates(image, indices=[1], intermediates_only=True)[0]
        early_final, (early,) = model.forward_intermediates(image, indices=[1], stop_early=True)
        second = model.forward_streams(image=image, out_layers=[1])
        (pair,) = model.forward_intermediates(image, indices=[1], return_prefix_tokens=True, intermediates_only=True)
        before = enc.forward_intermediates(image, indices=[1], intermediates_only=True)[0]
        assert enc.prune_intermediate_layers([1]) == [1] and len(enc.vit.blocks) == 2
        after = enc.forward_intermediates(image, indices=[1], intermediates_only=True)[0]
    assert torch.equal(early, full)
    assert torch.equal(early_final, model.norm((second.hidden[1][0], None))[0])  # normed after layer 1
    assert torch.equal(pair[0], full) and torch.equal(pair[1], second.hidden[1][0][:, :1])  # the CLS token
    assert torch.equal(after, before)
    with pytest.raises(ValueError, match="indices \\[4\\]"):
        model.forward_intermediates(image, indices=[4])
    with pytest.raises(ValueError, match="output_fmt"):
        model.forward_intermediates(image, output_fmt="NHWC")


@pytest.mark.parametrize("source", ["official", "saved", "run"])
def test_encoder_from_loaded_weights_gives_the_same_maps(source, tmp_path):
    """A backbone built from an official checkpoint, a saved model folder or a run folder holding one
    (a pretraining run's final/) reads the same maps as the model the weights came from."""
    cfg = small("released")
    model = randomized(cfg)
    if source == "official":
        path = tmp_path / "official.pth"
        torch.save({"model": to_official(model)}, path)
        enc = vision_encoder(str(path), cfg)
    else:
        model.save_pretrained(str(tmp_path / "run" / "final"))
        enc = vision_encoder(str(tmp_path / "run" / ("final" if source == "saved" else "")))
    image = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        want = model.forward_intermediates(image, indices=[0, 1, 2, 3], intermediates_only=True)
        got = enc.forward_intermediates(image, indices=[0, 1, 2, 3], intermediates_only=True)
    assert enc.cfg.embed_dim == 64 and enc.cfg.depth == 4
    for a, b in zip(got, want):
        assert (a - b).abs().max() < 1e-5


# -- adapter and heads -------------------------------------------------------------------------------
def test_default_layers_are_beits():
    assert default_out_indices(12) == [3, 5, 7, 11]  # BEiT base (configs: out_indices)
    assert default_out_indices(24) == [7, 11, 15, 23]  # BEiT large
    assert default_out_indices(4) == [0, 1, 2, 3]


@pytest.mark.parametrize("patch,ops", [(16, ["ConvTranspose2d", "BatchNorm2d", "GELU", "ConvTranspose2d"]),
                                       (8, ["ConvTranspose2d"])])
def test_adapter_gives_strides_4_to_32(patch, ops):
    adapter = MultiScaleAdapter(32, patch)
    grid = 64 // patch
    maps = adapter([torch.randn(2, 32, grid, grid) for _ in range(4)])
    assert [m.shape[-1] for m in maps] == [16, 8, 4, 2]  # 64 px at strides 4, 8, 16, 32
    assert [type(m).__name__ for m in adapter.fpn1] == ops
    pool = adapter.fpn4 if patch == 16 else adapter.fpn3
    assert isinstance(pool, nn.MaxPool2d) and pool.kernel_size == 2


def test_upernet_has_mmsegs_parameter_count():
    """UPerHead(768 -> 768, 150 classes) and FCNHead(768 -> 256), every conv without bias before its
    BatchNorm, counted from mmseg's layer list by hand."""
    d, c, k = 768, 768, 150
    conv_bn = lambda cin, cout, ks: cin * cout * ks * ks + 2 * cout  # noqa: E731
    ppm = 4 * conv_bn(d, c, 1) + conv_bn(d + 4 * c, c, 3)
    fpn = 3 * conv_bn(d, c, 1) + 3 * conv_bn(c, c, 3) + conv_bn(4 * c, c, 3)
    with torch.device("meta"):
        head, aux = UPerHead(d, c, k), FCNHead(d, 256, k)
    assert sum(p.numel() for p in head.parameters()) == ppm + fpn + c * k + k == 67_963_542
    assert sum(p.numel() for p in aux.parameters()) == conv_bn(d, 256, 3) + 256 * k + k
    maps = [torch.randn(1, 16, s, s) for s in (16, 8, 4, 2)]
    assert UPerHead(16, 8, 5).eval()(maps).shape == (1, 5, 16, 16)


@pytest.mark.parametrize("layout", LAYOUTS)
def test_every_trainable_parameter_gets_a_gradient(layout):
    cfg = small(layout)
    model = SegmentationModel(cfg, num_classes=5, channels=16, aux_channels=8).train()
    frozen = freeze_unreached(model, linear_probe=False)
    assert {n.split(".")[0] for n in frozen} == {"beit3"}  # adapter and heads all train
    assert "beit3.vision_embed.mask_token" in frozen and "beit3.norm.A.weight" in frozen  # read before the final norm
    assert any(".ffn.B." in n for n in frozen) and any("text_embed" in n for n in frozen)
    out = model(torch.randn(2, 3, 32, 32), aux=True)
    assert out["logits"].shape == (2, 5, 8, 8) and out["aux"].shape == (2, 5, 2, 2)
    (out["logits"].sum() + out["aux"].sum()).backward()
    missing = [n for n, p in model.named_parameters() if p.requires_grad and p.grad is None]
    assert missing == []
    assert sorted(unreached_parameters(model)) == sorted(frozen)


def test_layer_decay_puts_the_adapter_and_heads_at_full_lr():
    """BEiT's LayerDecayOptimizerConstructor: backbone layer l at decay^(depth + 1 - l), the adapter
    (its fpn1..4 live in the backbone there) and the heads at the top."""
    model = SegmentationModel(small("released"), num_classes=5, channels=16, aux_channels=8)
    depth = model.cfg.depth
    assert layer_id("adapter.fpn1.0.weight", depth) == layer_id("decode_head.psp.stages.0.1.conv.weight", depth) == 5
    assert layer_id("beit3.layers.2.ffn.A.fc1.weight", depth) == 3
    groups = param_groups(model, 0.05, 0.9, depth)
    scale = {n: g["lr_scale"] for g in groups for n in g["names"]}
    assert scale["decode_head.classifier.conv.weight"] == scale["adapter.fpn1.0.weight"] == 1.0
    assert scale["beit3.layers.0.ffn.A.fc1.weight"] == pytest.approx(0.9 ** 4)
    decay = {n: g["weight_decay"] for g in groups for n in g["names"]}
    assert decay["decode_head.fpn_bottleneck.bn.weight"] == 0.0
    assert decay["decode_head.fpn_bottleneck.conv.weight"] == 0.05


def test_poly_schedule_is_mmcvs():
    """BEiT's lr_config: poly (power 1, min 0) over 160k iterations, linear warmup of 1500 from 1e-6."""
    f = poly_lr_lambda(1500, 160_000)
    assert f(0) == pytest.approx(1e-6)
    assert f(750) == pytest.approx((1 - 750 / 160_000) * (1 - 0.5 * (1 - 1e-6)))
    assert f(1500) == pytest.approx(1 - 1500 / 160_000) and f(80_000) == pytest.approx(0.5)
    assert f(160_000) == 0.0


def test_sync_batchnorm_converts_every_batchnorm():
    model = SegmentationModel(small("released"), num_classes=5, channels=16, aux_channels=8)
    names = [n for n, m in model.named_modules() if isinstance(m, nn.BatchNorm2d)]
    synced = sync_batchnorm(model)
    assert len(names) == 4 + 1 + 3 + 3 + 1 + 1  # pyramid pooling 4 + 1, lateral 3, fpn 3, fusion 1, aux 1
    assert {type(dict(synced.named_modules())[n]).__name__ for n in names} == {"SyncBatchNormAct"}
    assert set(synced.state_dict()) == set(model.state_dict())  # a saved model loads either way


# -- loss and sliding windows ---------------------------------------------------------------------------
def test_loss_averages_over_scored_pixels_only():
    torch.manual_seed(0)
    logits = torch.randn(2, 4, 4, 4)
    target = torch.randint(0, 4, (2, 8, 8))
    target[0, :5] = 255
    up = F.interpolate(logits, size=(8, 8), mode="bilinear", align_corners=False)
    keep = target != 255
    per_pixel = -up.log_softmax(1).gather(1, target.clamp(max=3)[:, None])[:, 0]
    assert segmentation_loss(logits, target).item() == pytest.approx(per_pixel[keep].mean().item(), rel=1e-6)
    nothing = segmentation_loss(logits.requires_grad_(), torch.full((2, 8, 8), 255))
    assert nothing.item() == 0.0  # not nan: the step is not skipped as non-finite
    nothing.backward()


def test_windows_are_mmsegs():
    # an ADE20K validation image resized to 512 x 683: two windows of 512, the second ending at the border
    assert window_boxes(512, 683, 512, 341) == [(0, 512, 0, 512), (0, 512, 171, 683)]
    assert window_boxes(512, 2048, 512, 341) == [(0, 512, x, x + 512) for x in (0, 341, 682, 1023, 1364, 1536)]
    assert window_boxes(300, 300, 512, 341) == [(0, 300, 0, 300)]


@pytest.mark.parametrize("size", [(64, 64), (70, 130), (40, 100)])
def test_sliding_windows_of_a_pointwise_model_equal_the_whole_image(size):
    """A model that labels each pixel from its own colour gives the same logits window by window (each
    pixel the mean of equal values), padded where the image is smaller than a window."""
    class Pointwise(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv = nn.Conv2d(3, 5, 1)
            self.calls = 0

        def forward(self, image):
            self.calls += 1
            assert image.shape[-2:] == (64, 64)
            return self.conv(image)

    model = Pointwise()
    image = torch.randn(1, 3, *size)
    out = slide_logits(model, image, crop=64, stride=42)
    assert out.shape == (1, 5, *size) and model.calls == 1  # every window in one call
    assert (out - model.conv(image)).abs().max() < 1e-5


# -- initialisation from other checkpoints --------------------------------------------------------------
@pytest.mark.parametrize("source", ["official", "pretrain_final", "segmentation_best"])
def test_init_loads_the_backbone_from_any_source(source, tmp_path):
    cfg = small("released")
    if source == "segmentation_best":
        trained = SegmentationModel(cfg, num_classes=5, channels=16, aux_channels=8)
        trained.save_pretrained(str(tmp_path / "run" / "best"))
        path, want = tmp_path / "run", trained.state_dict()
    else:
        backbone = randomized(cfg)
        want = {"beit3." + k: v for k, v in backbone.state_dict().items()}
        if source == "official":
            path = tmp_path / "official.pth"
            torch.save({"model": to_official(backbone)}, path)
        else:
            path = tmp_path / "final"
            backbone.save_pretrained(str(path))
    init = load_init(str(path))
    torch.manual_seed(1)
    model = SegmentationModel(init.config, num_classes=5, channels=16, aux_channels=8)
    report = apply_init(model, init)
    got = model.state_dict()
    assert all(torch.equal(got[k], want[k]) for k in want if k.startswith("beit3.")), source
    heads = [k for k in want if not k.startswith("beit3.")]
    assert sorted(report.heads_loaded) == sorted(k for k in heads if k in init.heads)
    assert (len(report.heads_loaded) > 10) == (source == "segmentation_best")


# -- recipes -----------------------------------------------------------------------------------------
def test_ade20k_recipes_are_beit_v2s_and_settings_are_checked():
    from beit3.jobs.finetune.recipes import get_recipe

    base, large = get_recipe("ade20k-base"), get_recipe("ade20k-large")
    assert (base.lr, base.layer_decay, base.drop_path, base.decoder_channels) == (5e-5, 0.75, 0.15, 768)
    assert (large.lr, large.layer_decay, large.drop_path, large.decoder_channels) == (4e-5, 0.9, 0.2, 1024)
    for c in (base, large):
        assert (c.img_size, c.batch_size, c.max_steps, c.lr_schedule, c.stride, c.eval_batch) == (
            512, 2, 160_000, "poly", 341, 1)
        assert int(c.warmup_epochs * (20_210 // 16)) == 1500 and c.epochs * (20_210 // 16) >= 160_000
        assert (c.seg_scale, c.seg_ratio_range, c.cat_max_ratio, c.aux_channels, c.aux_weight) == (
            (2048, 512), (0.5, 2.0), 0.75, 256, 0.4)
    assert get_recipe("segmentation-tiny").stride == 42  # 2/3 of the 64 px crop, as 341 of 512
    for bad, match in [({"batch_size": 1}, "--batch-size must be >= 2"), ({"eval_batch_size": 4}, "one image at a time"),
                       ({"cat_max_ratio": 0.0}, "--cat-max-ratio"), ({"slide_stride": 600}, "--slide-stride"),
                       ({"lr_schedule": "step"}, "--lr-schedule"), ({"seg_ratio_range": (2.0, 0.5)}, "low end")]:
        with pytest.raises(ValueError, match=match):
            get_recipe("ade20k-base", **bad)
