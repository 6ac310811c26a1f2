"""Official unilm/beit3 checkpoints: torchscale's BEiT3 and ours compute the same function, both ways."""
import argparse
import os
import warnings

import pytest
import torch
import torch.nn.functional as F

from beit3 import BEiT3, BEiT3Config
from beit3.weights import UnsafeCheckpointError, convert_official_to_ours, convert_ours_to_official, from_official, infer_config_from_official, load_checkpoint_file, load_official, split_official_state_dict, to_official

with warnings.catch_warnings():
    warnings.simplefilter("ignore", FutureWarning)  # torchscale imports timm.models.layers
    from torchscale.architecture.config import EncoderConfig
    from torchscale.model.BEiT3 import BEiT3 as TorchscaleBEiT3

DIM, HEADS, FFN, DEPTH, IMG, PATCH, VOCAB = 64, 4, 96, 2, 32, 8, 100
TOL = 1e-5


def torchscale_model(normalize_output=True, img_size=IMG):
    args = EncoderConfig(img_size=img_size, patch_size=PATCH, vocab_size=VOCAB, multiway=True,
                         layernorm_embedding=False, normalize_output=normalize_output, no_output_layer=True,
                         encoder_embed_dim=DIM, encoder_attention_heads=HEADS, encoder_ffn_embed_dim=FFN,
                         encoder_layers=DEPTH)
    return TorchscaleBEiT3(args).eval()


def randomize(model):
    """Every tensor random, LayerNorms included, so a mis-mapped tensor changes the output."""
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for name, p in model.named_parameters():
            noise = torch.randn(p.shape, generator=g)
            is_norm_weight = p.dim() == 1 and name.endswith("weight") and "proj" not in name and "fc" not in name
            p.copy_(1.0 + 0.2 * noise if is_norm_weight else 0.2 * noise)
    return model


def our_config(img_size=IMG, **kw):
    return BEiT3Config(layout="released", embed_dim=DIM, depth=DEPTH, num_heads=HEADS, ffn_dim=FFN, vl_layers=0,
                       img_size=img_size, patch_size=PATCH, vocab_size=VOCAB, **kw)


@pytest.fixture(scope="module")
def ts():
    torch.manual_seed(0)
    return randomize(torchscale_model())


def inputs(B=3, L=7):
    g = torch.Generator().manual_seed(2)
    image = torch.randn(B, 3, IMG, IMG, generator=g)
    text = torch.randint(3, VOCAB, (B, L), generator=g)
    pad = torch.zeros(B, L, dtype=torch.bool)
    pad[1, 4:] = True
    pad[2, 2:] = True
    image_mask = torch.rand(B, (IMG // PATCH) ** 2, generator=g) < 0.4
    return image, text, pad, image_mask


def causal_blocked(n_img, n_txt):
    """unilm's captioning mask (1 = may not attend): image <-> image, text -> image, causal text."""
    L = n_img + n_txt
    allowed = torch.zeros(L, L, dtype=torch.bool)
    allowed[:n_img, :n_img] = True
    allowed[n_img:, :n_img] = True
    allowed[n_img:, n_img:] = torch.tril(torch.ones(n_txt, n_txt, dtype=torch.bool))
    return ~allowed


def assert_same_outputs(ours, ts):
    image, text, pad, image_mask = inputs()
    n_img = 1 + (IMG // PATCH) ** 2
    blocked = causal_blocked(n_img, text.shape[1])
    cases = {
        "vision": (dict(image=image), dict(visual_tokens=image)),
        "text": (dict(text=text, text_padding_mask=pad), dict(textual_tokens=text, text_padding_position=pad)),
        "fusion": (dict(image=image, text=text, text_padding_mask=pad),
                   dict(visual_tokens=image, textual_tokens=text, text_padding_position=pad)),
        "masked vision": (dict(image=image, image_mask=image_mask),
                          dict(visual_tokens=image, vision_masked_position=image_mask)),
        "causal fusion": (dict(image=image, text=text, text_padding_mask=pad, attn_mask=~blocked),
                          dict(visual_tokens=image, textual_tokens=text, text_padding_position=pad,
                               attn_mask=blocked.float())),
    }
    with torch.no_grad():
        for mode, (a, b) in cases.items():
            x, y = ours(**a), ts(**b)["encoder_out"]
            assert x.shape == y.shape, mode
            diff = (x - y).abs().max().item()
            assert diff <= TOL, f"{mode}: max abs diff {diff}"
            assert y.abs().max() > 0.1  # the comparison is about real values


def test_official_checkpoint_matches_torchscale_in_every_mode(ts):
    official = {"beit3." + k: v for k, v in ts.state_dict().items()}
    model = from_official({"model": official}, our_config()).eval()
    assert_same_outputs(model, ts)


def test_to_official_loads_strictly_into_torchscale_with_equal_outputs():
    torch.manual_seed(3)
    ours = randomize(BEiT3(our_config())).eval()
    sd = to_official(ours)
    assert all(k.startswith("beit3.") for k in sd)
    ts = torchscale_model()
    result = ts.load_state_dict({k[len("beit3."):]: v for k, v in sd.items()}, strict=True)
    assert not result.missing_keys and not result.unexpected_keys
    assert_same_outputs(ours, ts.eval())


def test_conversion_round_trip_is_exact(ts):
    official = ts.state_dict()
    ours = convert_official_to_ours(official)
    assert ours["layers.1.attn.qkv.B.weight"].shape == (3 * DIM, DIM)
    k_rows = ours["layers.1.attn.qkv.B.weight"][DIM:2 * DIM]
    assert torch.equal(k_rows, official["encoder.layers.1.self_attn.k_proj.B.weight"])
    back = convert_ours_to_official(ours, prefix="")
    assert sorted(back) == sorted(official)
    assert all(torch.equal(back[k], official[k]) for k in official)


def test_normalize_output_false_checkpoints_load_without_a_final_norm():
    torch.manual_seed(4)
    ts = randomize(torchscale_model(normalize_output=False))
    loaded = load_official({"model": {"beit3." + k: v for k, v in ts.state_dict().items()}}, our_config())
    assert not any(k.startswith("norm.") for k in loaded.model.state_dict())
    assert_same_outputs(loaded.model.eval(), ts)


def test_other_image_size_interpolates_only_patch_rows(ts):
    official = {"beit3." + k: v for k, v in ts.state_dict().items()}
    model = from_official(official, our_config(img_size=48))
    old = ts.state_dict()["encoder.embed_positions.A.weight"]  # (3 + 16, D)
    new = model.vision_embed.pos_embed.detach()  # (3 + 36, D)
    assert new.shape == (3 + 36, DIM)
    assert torch.equal(new[:3], old[:3])  # the 2 unused rows and CLS
    grid = old[3:].reshape(1, 4, 4, DIM).permute(0, 3, 1, 2)
    expected = F.interpolate(grid, size=(6, 6), mode="bicubic", align_corners=False)
    expected = expected.permute(0, 2, 3, 1).reshape(36, DIM)
    assert torch.allclose(new[3:], expected, atol=1e-6)
    assert not torch.allclose(new[3:19], old[3:])  # really resampled


def test_heads_are_returned_under_their_official_names(ts):
    heads = {"fc_norm.weight": torch.ones(DIM), "head.weight": torch.randn(5, DIM), "head.bias": torch.zeros(5),
             "pooler.dense.weight": torch.randn(DIM, DIM), "logit_scale": torch.tensor(2.6)}
    sd = {**{"beit3." + k: v for k, v in ts.state_dict().items()}, **heads}
    backbone, split_heads = split_official_state_dict(sd)
    assert sorted(split_heads) == sorted(heads) and len(backbone) == len(ts.state_dict())
    loaded = load_official({"module": sd}, our_config())
    assert sorted(loaded.heads) == sorted(heads)
    assert all(torch.equal(loaded.heads[k], v) for k, v in heads.items())
    assert loaded.missing == [] and loaded.unexpected == []


def test_unexpected_and_missing_keys_are_named(ts):
    sd = {"beit3." + k: v for k, v in ts.state_dict().items()}
    sd["beit3.encoder.layers.0.self_attn.rel_bias.A.weight"] = torch.zeros(3)
    with pytest.raises(ValueError, match=r"unexpected keys: beit3\.encoder\.layers\.0\.self_attn\.rel_bias"):
        from_official(sd, our_config())
    with pytest.warns(UserWarning, match="unexpected keys"):
        loaded = load_official(sd, our_config(), strict=False)
    assert loaded.unexpected == ["beit3.encoder.layers.0.self_attn.rel_bias.A.weight"]

    del sd["beit3.encoder.layers.0.self_attn.rel_bias.A.weight"]
    del sd["beit3.encoder.layers.1.ffn.B.fc2.bias"]
    with pytest.raises(ValueError, match=r"missing keys: layers\.1\.ffn\.B\.fc2\.bias"):
        from_official(sd, our_config())
    with pytest.warns(UserWarning, match="missing keys"):
        loaded = load_official(sd, our_config(), strict=False)
    assert loaded.missing == ["layers.1.ffn.B.fc2.bias"]
    assert torch.equal(loaded.model.layers[1].ffn.B.fc2.weight, ts.state_dict()["encoder.layers.1.ffn.B.fc2.weight"])


def _official_meta(preset):
    with torch.device("meta"):
        model = BEiT3(BEiT3Config.from_preset(preset, layout="released"))
    return to_official(model)


def test_base_checkpoint_into_tiny_config_fails_clearly():
    sd = _official_meta("base")
    with pytest.raises(ValueError) as err:
        from_official(sd, "tiny")
    msg = str(err.value)
    assert "checkpoint embed_dim 768 (base?) but config embed_dim 192 (tiny)" in msg
    assert "checkpoint depth 12 (base?) but config depth 4 (tiny)" in msg


def test_infer_config_from_official_base():
    cfg = infer_config_from_official(_official_meta("base"))
    assert (cfg.preset, cfg.layout, cfg.embed_dim, cfg.depth) == ("base", "released", 768, 12)
    assert (cfg.num_heads, cfg.ffn_dim) == (12, 3072)
    assert (cfg.img_size, cfg.patch_size, cfg.vocab_size, cfg.max_text_positions) == (224, 16, 64010, 1024)


# -- safe loading ------------------------------------------------------------------------------------
class WritesFileWhenUnpickled:
    def __init__(self, path):
        self.path = path

    def __reduce__(self):
        return os.mkdir, (self.path,)


def test_pickled_code_is_not_run_by_default(tmp_path):
    marker = str(tmp_path / "pwned")
    path = tmp_path / "evil.pth"
    torch.save({"model": {"w": torch.zeros(1)}, "payload": WritesFileWhenUnpickled(marker)}, path)
    with pytest.raises(UnsafeCheckpointError, match="allow_pickle=True"):
        load_checkpoint_file(str(path))
    assert not os.path.exists(marker)
    with pytest.warns(UserWarning, match="allow_pickle=True"):
        load_checkpoint_file(str(path), allow_pickle=True)
    assert os.path.exists(marker)  # the payload is real: opting in runs it


def test_finetune_checkpoint_with_namespace_needs_opt_in(tmp_path, ts):
    path = tmp_path / "finetuned.pth"
    sd = {"beit3." + k: v for k, v in ts.state_dict().items()}
    torch.save({"model": sd, "args": argparse.Namespace(lr=1e-3, model="beit3_tiny"), "epoch": 3}, path)
    with pytest.raises(UnsafeCheckpointError, match=r"argparse\.Namespace.*allow_pickle=True"):
        from_official(str(path), our_config())
    with pytest.warns(UserWarning, match="full unpickling"):
        model = from_official(str(path), our_config(), allow_pickle=True)
    assert torch.equal(model.text_embed.tokens.weight, ts.text_embed.weight)
