"""The official 64010-row text table: a model pretrained for a 64,000-piece SentencePiece model has
it, exports to unilm's shapes, and loads strictly into torchscale's BEiT3 (vocab_size=64010)."""
from __future__ import annotations

import warnings

import pytest
import torch

from pretrain_fixtures import IndexedBatches, run_args

from beit3 import BEiT3
from beit3.weights.official import load_backbone, official_vocab
from beit3.model.config import BEiT3Config, check_text_vocab, text_table_rows
from beit3.data.text_tokenizer import TextTokenizer
from beit3.cli.export import main as export_main
from beit3.cli.pretrain import check_args
from beit3.trainer.checkpoint import complete_checkpoints
from beit3.jobs.pretrain.loop import PretrainRun

with warnings.catch_warnings():
    warnings.simplefilter("ignore", FutureWarning)  # torchscale imports timm.models.layers
    from torchscale.architecture.config import EncoderConfig
    from torchscale.model.BEiT3 import BEiT3 as TorchscaleBEiT3


def spm_with_64000_pieces(src: str, dst: str) -> str:
    """``src`` grown to 64,000 pieces (as beit3.spm) with pieces no text produces."""
    from sentencepiece import sentencepiece_model_pb2 as pb
    proto = pb.ModelProto()
    with open(src, "rb") as f:
        proto.ParseFromString(f.read())
    i = 0
    while len(proto.pieces) < 64000:
        piece = proto.pieces.add()
        piece.piece, piece.score, piece.type = f"\u2581qqq{i}", -100.0, pb.ModelProto.SentencePiece.NORMAL
        i += 1
    with open(dst, "wb") as f:
        f.write(proto.SerializeToString())
    return dst


def test_table_rows_and_loud_mismatches():
    assert text_table_rows(64002) == 64010 and text_table_rows(404) == 404
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        check_text_vocab(64002, 64010)
        check_text_vocab(404, 404)
    with pytest.warns(UserWarning, match="64010 rows but a tokenizer of 404 ids gets 404"):
        check_text_vocab(404, 64010, "beit3_base_patch16_224.pth")
    with pytest.warns(UserWarning, match="64002 rows but a tokenizer of 64002 ids gets 64010"):
        check_text_vocab(64002, 64002)
    with pytest.raises(ValueError, match="has 64002 ids but the model's text embedding only 404 rows"):
        check_text_vocab(64002, 404)


def test_export_pads_a_64002_row_table_and_warns_on_other_sizes():
    table = torch.randn(64002, 8)
    out = official_vocab({"beit3.text_embed.weight": table, "mlm_head.weight": table, "mlm_head.bias": table[:, 0]})
    assert out["beit3.text_embed.weight"].shape == (64010, 8) and out["mlm_head.bias"].shape == (64010,)
    assert torch.equal(out["beit3.text_embed.weight"][:64002], table)
    assert not out["beit3.text_embed.weight"][64002:].any()  # rows no token id reaches
    with pytest.warns(UserWarning, match="has 404 rows, not the official 64010: unilm/beit3"):
        small = official_vocab({"beit3.text_embed.weight": torch.randn(404, 8)})
    assert small["beit3.text_embed.weight"].shape == (404, 8)


def test_loading_a_64002_row_checkpoint_as_base_fails_with_the_reason():
    cfg = BEiT3Config.from_preset("tiny", layout="released", vl_layers=0, vocab_size=64002, depth=1)
    with torch.device("meta"):
        sd = BEiT3(cfg).state_dict()
    sd = {k: torch.zeros(v.shape) for k, v in sd.items()}
    with pytest.raises(ValueError, match="checkpoint vocab_size 64002 but config vocab_size 64010.*pads it"):
        load_backbone(sd, cfg.replace(vocab_size=64010))


@pytest.fixture(scope="module")
def pretrained_64k(assets, tmp_path_factory):
    """One step of `beit3 pretrain --layout released` with a 64,000-piece SentencePiece model."""
    root = tmp_path_factory.mktemp("vocab")
    spm, tok = assets
    spm = spm_with_64000_pieces(spm, str(root / "spm64k.model"))
    assert TextTokenizer(spm).vocab_size == 64002
    out = root / "run"
    args = run_args(str(out), spm, tok, layout="released", steps=1, save_every=1, batch_images=2, batch_texts=2,
                    batch_pairs=2, log_every=1)
    run = PretrainRun(args, check_args(args, 1), "cpu", data=IndexedBatches(spm, 0, 1, 1, sizes=(2, 2, 2)))
    assert run.train() == 0
    return run, complete_checkpoints(str(out / "checkpoints"))[-1][1], spm


def test_pretraining_for_a_64000_piece_spm_exports_into_torchscale_strictly(pretrained_64k, tmp_path):
    run, ckpt, spm = pretrained_64k
    assert run.cfg.vocab_size == 64010 and run.cfg.subln_init_scale  # the official table, Magneto's init
    assert run.engine.module.mlm_head.out_features == 64010
    out = tmp_path / "beit3_tiny.pth"
    assert export_main(["--to", "official", ckpt, "-o", str(out)]) == 0
    sd = torch.load(out, weights_only=True)["model"]
    assert sd["beit3.text_embed.weight"].shape == (64010, 192)
    c = run.cfg
    ts = TorchscaleBEiT3(EncoderConfig(
        img_size=c.img_size, patch_size=c.patch_size, vocab_size=64010, multiway=True, layernorm_embedding=False,
        normalize_output=True, no_output_layer=True, encoder_embed_dim=c.embed_dim,
        encoder_attention_heads=c.num_heads, encoder_ffn_embed_dim=c.ffn_dim, encoder_layers=c.depth)).eval()
    result = ts.load_state_dict({k[len("beit3."):]: v for k, v in sd.items()}, strict=True)
    assert not result.missing_keys and not result.unexpected_keys
    ours = run.engine.module.model.eval()
    ids, pad = TextTokenizer(spm).batch_encode(["a red circle left of a small square", "two"], 12)
    image = torch.randn(2, 3, c.img_size, c.img_size)
    with torch.no_grad():
        mine = ours(image=image, text=ids, text_padding_mask=pad)
        theirs = ts(textual_tokens=ids, visual_tokens=image, text_padding_position=pad)["encoder_out"]
    torch.testing.assert_close(mine, theirs, atol=1e-5, rtol=1e-5)
