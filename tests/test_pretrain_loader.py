"""The mixed pretraining loader: batch format, sharding over ranks, determinism, exact resume, bad data."""
import io
import json
import logging
import tarfile

import numpy as np
import pytest
from bad_shards import png as _png, write_bad_shards, write_tar as _write_tar
import torch
import webdataset as wds
from PIL import Image
from torchvision import transforms as T
from torchvision.transforms import functional as TF

from beit3.cli.pretrain import build_parser, config_from_args
from beit3.data.pretrain_loader import PretrainDataConfig, PretrainLoader, ShardStream, SkipLog
from beit3.data.shards import write_shards
from beit3.data.synthetic.world import make_synthetic_world
from beit3.data.text_tokenizer import TextTokenizer
from beit3.data.transforms import RandomResizedCropTwoViews, build_cls_transform, build_vl_transform

PARTS = ("images", "texts", "pairs")


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    out = tmp_path_factory.mktemp("loader") / "w"
    make_synthetic_world(out, num_images=60, seed=0, shards_per_kind=8)
    return out


def _cfg(shards_dir, **kw) -> PretrainDataConfig:
    base = dict(shards_dir=str(shards_dir), batch_images=3, batch_texts=2, batch_pairs=4, img_size=32,
                patch_size=8, tokenizer_img_size=16, max_text_len=20, num_masking_patches=6, shuffle_buffer=8)
    return PretrainDataConfig(**{**base, **kw})


def _take(loader, n):
    it = iter(loader)
    return [next(it) for _ in range(n)]


def _assert_same(a: list[dict], b: list[dict]) -> None:
    assert len(a) == len(b)
    for x, y in zip(a, b):
        assert x.keys() == y.keys() and x["stats"] == y["stats"]
        for part in PARTS:
            if part in x:
                assert x[part].keys() == y[part].keys()
                for k in x[part]:
                    assert torch.equal(x[part][k], y[part][k]), (part, k)


def _shard_texts(world, kind) -> dict[str, str]:
    """``shard.tar:key`` -> text of every sample of ``kind``."""
    out = {}
    for tar in sorted((world / "shards").glob(f"{kind}-*.tar")):
        for s in wds.WebDataset(str(tar), shardshuffle=False):
            out[f"{tar.name}:{s['__key__']}"] = s["txt"].decode()
    return out


# --------------------------------------------------------------------------- format
def test_batch_format(world):
    spm = world / "spm/synthetic.model"
    tok = TextTokenizer(spm)
    batches = _take(PretrainLoader(_cfg(world / "shards"), spm), 8)
    sources = {"texts": _shard_texts(world, "texts"), "pairs": _shard_texts(world, "pairs")}
    masked = {"texts": [], "pairs": []}
    for b in batches:
        assert set(b) == {*PARTS, "stats"} and b["stats"]["skipped"] == 0
        im = b["images"]
        assert im["image"].shape == (3, 3, 32, 32) and im["image"].dtype == torch.float32
        assert im["tokenizer_image"].shape == (3, 3, 16, 16) and im["image_mask"].shape == (3, 16)
        assert -1 <= im["image"].min() and im["image"].max() <= 1  # mean = std = 0.5
        assert 0 <= im["tokenizer_image"].min() and im["tokenizer_image"].max() <= 1  # raw pixels
        assert im["image_mask"].dtype == torch.bool and im["image_mask"].sum(1).tolist() == [6, 6, 6]
        assert set(b["pairs"]) == {"image", "text", "padding_mask", "labels"}  # pair images not masked
        for part, n in (("texts", 2), ("pairs", 4)):
            t = b[part]
            longest = int((~t["padding_mask"]).sum(1).max())
            width = min(20, -(-longest // 8) * 8)  # the longest text, rounded up to 8, at most max_text_len
            assert t["text"].shape == t["labels"].shape == t["padding_mask"].shape == (n, width)
            assert t["text"].dtype == t["labels"].dtype == torch.long and t["padding_mask"].dtype == torch.bool
            chosen = t["labels"] != -100
            assert not (chosen & t["padding_mask"]).any()
            assert not (t["text"][~chosen] == tok.mask_id).any()  # [MASK] only where a label is
            original = torch.where(chosen, t["labels"], t["text"])
            for row, key in enumerate(b["stats"]["keys"][part]):  # labels are the true ids
                ids = tok.encode(sources[part][key], max_len=20)
                assert original[row, :len(ids)].tolist() == ids and t["padding_mask"][row].sum() == width - len(ids)
            masked[part].append(chosen.sum() / (~t["padding_mask"]).sum())
    text_rate, pair_rate = (float(torch.stack(masked[p]).mean()) for p in ("texts", "pairs"))
    assert 0.1 < text_rate < 0.35 and 0.35 < pair_rate < 0.65  # 15% (+1 per text) vs 50%


def test_text_padding_cuts_only_padding(world):
    """"longest" drops only all-padding columns: same tokens, masks and labels as "max", fewer
    FLOPs, and the same MLM loss and gradients from a model."""
    from beit3.model.config import BEiT3Config
    from beit3.trainer.flops import pretrain_flops_breakdown
    from beit3.jobs.pretrain.objective import MaskedDataModeling

    spm = world / "spm/synthetic.model"
    kw = dict(batch_images=0, batch_texts=6, batch_pairs=6, max_text_len=32)
    short = _take(PretrainLoader(_cfg(world / "shards", **kw), spm), 4)
    full = _take(PretrainLoader(_cfg(world / "shards", text_padding="max", **kw), spm), 4)
    widths = [b[p]["text"].shape[1] for b in short for p in ("texts", "pairs")]
    assert all(w % 8 == 0 and w < 32 for w in widths), widths  # synthetic texts are ~11 tokens
    assert all(b[p]["text"].shape[1] == 32 for b in full for p in ("texts", "pairs"))
    for s, f in zip(short, full):
        for part in ("texts", "pairs"):
            w = s[part]["text"].shape[1]
            for k in ("text", "padding_mask", "labels"):
                assert torch.equal(s[part][k], f[part][k][:, :w]), (part, k)
            assert f[part]["padding_mask"][:, w:].all() and (f[part]["labels"][:, w:] == -100).all()

    cfg = BEiT3Config.from_preset("tiny", img_size=32, patch_size=8, vocab_size=TextTokenizer(spm).vocab_size)
    torch.manual_seed(0)
    model = MaskedDataModeling(cfg, num_visual_tokens=64)
    results = []
    for b in (short[0], full[0]):
        model.zero_grad()
        loss, _ = model({k: b[k] for k in ("texts", "pairs")}, {})
        loss.backward()
        grads = torch.cat([p.grad.flatten() for p in model.parameters() if p.grad is not None])
        results.append((loss.detach(), grads, pretrain_flops_breakdown(cfg, b, 64)["total"]))
    (loss_s, grad_s, flops_s), (loss_f, grad_f, flops_f) = results
    assert torch.allclose(loss_s, loss_f, rtol=1e-5) and torch.allclose(grad_s, grad_f, rtol=1e-4, atol=1e-6)
    assert flops_s < 0.9 * flops_f  # texts of ~11 tokens padded to 16 or 24 instead of 32
    with pytest.raises(ValueError, match="--text-padding must be one of longest, max, got 'shortest'"):
        _cfg(world / "shards", text_padding="shortest").validate()


def _job_batch(world, *flags) -> dict:
    """The first batch of the loader that ``beit3 pretrain`` builds from these flags: the resolved
    settings' data part, handed to the loader as it is."""
    cfg = config_from_args(build_parser().parse_args(["--preset", "tiny", "--data", str(world / "shards"),
                                                      "--batch-images", "4", "--batch-texts", "4", "--batch-pairs",
                                                      "4", *flags])).resolved("cpu")
    return next(iter(PretrainLoader(cfg.data, world / "spm/synthetic.model")))


def _whole_image_view(world, key: str) -> torch.Tensor:
    """The sample ``shard.tar:key``'s picture resized whole to tiny's 64 px, normalised as the views."""
    shard, name = key.split(":")
    with tarfile.open(world / "shards" / shard) as tar:
        img = Image.open(io.BytesIO(tar.extractfile(f"{name}.png").read())).convert("RGB")
    view = TF.resize(img, [64, 64], T.InterpolationMode.BICUBIC)
    return TF.normalize(TF.to_tensor(view), [0.5] * 3, [0.5] * 3)


def test_masking_and_crop_settings_of_the_command_line_reach_the_batches(world):
    default = _job_batch(world)
    assert default["images"]["image_mask"].sum(1).tolist() == [26] * 4  # 40% of tiny's 8x8 grid
    b = _job_batch(world, "--image-mask-ratio", "0.25", "--text-mask-prob", "1", "--pair-text-mask-prob", "0",
                   "--pair-crop-scale", "1", "1", "--color-jitter", "0")
    assert b["images"]["image_mask"].sum(1).tolist() == [16] * 4  # 25% of 64 patches
    texts, pairs = b["texts"], b["pairs"]
    # every token but <s> and </s> masked; a pair's text gets the one token no text goes without
    assert (texts["labels"] != -100).sum(1).tolist() == ((~texts["padding_mask"]).sum(1) - 2).tolist()
    assert (pairs["labels"] != -100).sum(1).tolist() == [1] * 4
    # pairs cropped to the whole picture (scale 1): the resized picture itself; images still BEiT's crops
    for i, key in enumerate(b["stats"]["keys"]["pairs"]):
        torch.testing.assert_close(pairs["image"][i], _whole_image_view(world, key), atol=1e-6, rtol=0)
    assert not any(torch.allclose(b["images"]["image"][i], _whole_image_view(world, key), atol=1e-2)
                   for i, key in enumerate(b["stats"]["keys"]["images"]))


def test_optional_parts(world):
    spm = world / "spm/synthetic.model"
    b = _take(PretrainLoader(_cfg(world / "shards", batch_texts=0, mask_pair_images=True), spm), 1)[0]
    assert set(b) == {"images", "pairs", "stats"}
    assert set(b["pairs"]) == {"image", "tokenizer_image", "image_mask", "text", "padding_mask", "labels"}
    assert b["pairs"]["image_mask"].sum(1).tolist() == [6] * 4
    default = PretrainLoader(_cfg(world / "shards", num_masking_patches=None, img_size=48, tokenizer_img_size=48), spm)
    assert _take(default, 1)[0]["images"]["image_mask"].sum(1).tolist() == [14] * 3  # round(0.4 * 36)


def test_two_views_share_one_crop():
    yy, xx = np.mgrid[0:96, 0:128]
    img = Image.fromarray(np.stack([xx * 2, yy * 2, (xx + yy)], -1).astype(np.uint8))
    crop = RandomResizedCropTwoViews(64, 32, scale=(0.1, 0.5))
    torch.manual_seed(0)
    view, second = crop(img)
    assert view.size == (64, 64) and second.size == (32, 32)
    small = np.asarray(view.resize((32, 32), Image.BICUBIC), dtype=float)
    assert np.abs(small - np.asarray(second, dtype=float)).mean() < 2  # the same box, resized twice
    torch.manual_seed(1)
    other = crop(img)[1]
    assert np.abs(small - np.asarray(other, dtype=float)).mean() > 10


def test_finetuning_transforms():
    half = np.zeros((50, 100, 3), np.uint8)
    half[:, :50] = 255
    out = build_vl_transform(32, train=False)(Image.fromarray(half))  # resize to 32x32, no crop
    assert out.shape == (3, 32, 32)
    assert torch.allclose(out[:, :, :15], torch.ones(3, 32, 15))
    assert torch.allclose(out[:, :, 17:], -torch.ones(3, 32, 15))
    grey = Image.fromarray(np.full((40, 60, 3), 128, np.uint8))
    cls = build_cls_transform(32 + 16, train=False)(grey)
    mean, std = torch.tensor([0.485, 0.456, 0.406]), torch.tensor([0.229, 0.224, 0.225])
    assert cls.shape == (3, 48, 48) and torch.allclose(cls[:, 0, 0], (128 / 255 - mean) / std, atol=1e-5)
    torch.manual_seed(0)
    assert build_vl_transform(32, train=True)(grey).shape == (3, 32, 32)
    assert build_cls_transform(48, train=True)(grey).shape == (3, 48, 48)


# --------------------------------------------------------------------------- sharding and determinism
def _shards_seen(batches, part):
    return {key.split(":")[0] for b in batches for key in b["stats"]["keys"][part]}


def test_ranks_read_disjoint_shards(world):
    spm = world / "spm/synthetic.model"
    cfg = _cfg(world / "shards")
    seen = [_take(PretrainLoader(cfg, spm, rank=r, world_size=2), 6) for r in range(2)]
    for part in PARTS:
        a, b = _shards_seen(seen[0], part), _shards_seen(seen[1], part)
        assert a and b and not a & b, part
    # every epoch, the readers (ranks x workers) split the shards into disjoint sets covering all
    shards = [f"s{i}" for i in range(10)]
    for epoch in range(3):
        parts = [ShardStream("texts", shards, r, 4, 0, 1, SkipLog()).epoch_shards(epoch) for r in range(4)]
        assert sorted(i for p in parts for i in p) == list(range(10))
    assert parts != [ShardStream("texts", shards, r, 4, 0, 1, SkipLog()).epoch_shards(0) for r in range(4)]


def test_deterministic_by_seed(world):
    spm = world / "spm/synthetic.model"
    a, b = (_take(PretrainLoader(_cfg(world / "shards"), spm), 3) for _ in range(2))
    _assert_same(a, b)
    c = _take(PretrainLoader(_cfg(world / "shards", seed=1), spm), 3)
    assert c[0]["stats"]["keys"] != a[0]["stats"]["keys"]
    assert not torch.equal(c[0]["images"]["image"], a[0]["images"]["image"])


def test_training_rng_untouched(world):
    loader = iter(PretrainLoader(_cfg(world / "shards"), world / "spm/synthetic.model"))
    torch.manual_seed(123)
    expected = torch.rand(3)
    torch.manual_seed(123)
    next(loader)
    assert torch.equal(torch.rand(3), expected)


@pytest.mark.parametrize("workers", [0, 2])
def test_resume_continues_the_stream_exactly(world, workers):
    spm, cfg = world / "spm/synthetic.model", _cfg(world / "shards", num_workers=workers)
    full = _take(PretrainLoader(cfg, spm), 7)
    first = PretrainLoader(cfg, spm)
    _assert_same(_take(first, 3), full[:3])
    state = json.loads(json.dumps(first.state_dict()))  # plain JSON: fits any checkpoint
    resumed = PretrainLoader(cfg, spm)
    resumed.load_state_dict(state)
    _assert_same(_take(resumed, 4), full[3:])
    if workers:  # each worker reads its own shards
        texts = [b["stats"]["keys"]["texts"][0].split(":")[0] for b in full]
        assert texts[0::2] != texts[1::2]


def _interleave(per_rank: list[list[dict]]) -> list[dict]:
    """Rank r's i-th batch is global micro-batch r + world * i."""
    return [b for group in zip(*per_rank) for b in group]


def _assert_same_samples(a: list[dict], b: list[dict]) -> None:
    """Same samples, augmentation and masks (the per-process stats differ by design)."""
    assert len(a) == len(b)
    for x, y in zip(a, b):
        assert x["stats"]["keys"] == y["stats"]["keys"]
        for part in PARTS:
            for k in x.get(part, {}):
                assert torch.equal(x[part][k], y[part][k]), (part, k)


@pytest.mark.parametrize("before,after,workers", [(2, 1, 0), (1, 2, 0), (2, 1, 1)])
def test_the_stream_continues_exactly_on_another_world_size(world, before, after, workers, caplog):
    """The global stream does not depend on how it is split: resumed on another number of ranks it
    goes on with the very batches an uninterrupted run gets (1 -> 2: both ranks share the one
    reader, each keeping its half)."""
    spm, cfg = world / "spm/synthetic.model", _cfg(world / "shards", num_workers=workers)
    streams = before * max(1, workers)
    reference = _take(PretrainLoader(cfg, spm, streams=streams), 8)
    first = [PretrainLoader(cfg, spm, rank=r, world_size=before) for r in range(before)]
    done = _interleave([_take(loader, 4 // before) for loader in first])
    states = json.loads(json.dumps([loader.state_dict() for loader in first]))
    resumed = [PretrainLoader(cfg, spm, rank=r, world_size=after) for r in range(after)]
    with caplog.at_level(logging.WARNING):
        for loader in resumed:
            loader.load_state_dict(states)
            assert loader.streams == streams
    assert ("reads 2x the data it trains on" in caplog.text) == (after > streams)
    _assert_same_samples(done + _interleave([_take(loader, 4 // after) for loader in resumed]), reference)
    if before > 1:  # one rank's state cannot carry the others' readers
        with pytest.raises(ValueError, match="pass every rank's state"):
            PretrainLoader(cfg, spm, rank=0, world_size=after).load_state_dict(states[-1:])


# --------------------------------------------------------------------------- epochs and bad data
@pytest.fixture
def tiny(tmp_path, world):
    """12 images, texts and pairs in 4 shards of 3 each."""
    imgs = tmp_path / "imgs"
    imgs.mkdir()
    for i in range(12):
        (imgs / f"{i:02d}.png").write_bytes(_png(i))
    (tmp_path / "t.txt").write_text("".join(f"a red circle number {i}\n" for i in range(12)))
    (tmp_path / "p.jsonl").write_text("".join(json.dumps({"image": f"imgs/{i:02d}.png", "caption": f"two squares {i}"})
                                              + "\n" for i in range(12)))
    out = tmp_path / "shards"
    write_shards(out, images=imgs, shard_size=3)
    write_shards(out, texts=[tmp_path / "t.txt"], shard_size=3)
    write_shards(out, captions=tmp_path / "p.jsonl", shard_size=3)
    return out, world / "spm/synthetic.model"


def test_epochs_cover_every_sample_and_reshuffle(tiny):
    shards, spm = tiny
    cfg = _cfg(shards, batch_images=2, batch_texts=2, batch_pairs=2)
    full = _take(PretrainLoader(cfg, spm), 14)
    for part in PARTS:
        keys = [k for b in full for k in b["stats"]["keys"][part]]
        assert sorted(keys[:12]) == sorted(keys[12:24]) and len(set(keys[:12])) == 12  # one epoch = 6 batches
        assert keys[:12] != keys[12:24]
    assert [b["stats"]["epochs"]["images"] for b in full] == [0] * 6 + [1] * 6 + [2] * 2
    loader = PretrainLoader(cfg, spm)
    _take(loader, 5)
    resumed = PretrainLoader(cfg, spm)
    resumed.load_state_dict(loader.state_dict())
    _assert_same(_take(resumed, 9), full[5:])


@pytest.fixture
def bad(tmp_path, world):
    d = tmp_path / "bad"
    write_bad_shards(d)
    return d, world / "spm/synthetic.model"


def test_bad_data_is_skipped_counted_and_reported(bad, caplog):
    d, spm = bad
    # in shard order (no shuffle buffer) every bad sample has a good one after it, so the counts
    # are exact at each epoch's end
    # One of the three image shards is truncated: given up on, which the default budget (10% of a
    # source's shards) would not tolerate.
    cfg = _cfg(d, batch_images=3, batch_texts=2, batch_pairs=2, shuffle_buffer=1, max_bad_shard_fraction=0.5)
    with caplog.at_level(logging.WARNING, logger="beit3.data"):
        batches = _take(PretrainLoader(cfg, spm), 6)
    one_epoch = {str(d / "images-000001.tar"): 1, str(d / "images-000002.tar"): 1, str(d / "pairs-000000.tar"): 2}
    assert batches[2]["stats"]["skipped_per_shard"] == one_epoch and batches[2]["stats"]["skipped"] == 4
    assert batches[5]["stats"]["skipped_per_shard"] == {k: 2 * v for k, v in one_epoch.items()}  # counted again
    assert all(b["images"]["image"].shape[0] == 3 for b in batches)  # the run goes on with full batches
    logged = "\n".join(r.getMessage() for r in caplog.records)
    for why in ("images-000001.tar (1 so far): undecodable image b2.png",
                "images-000002.tar (1 so far): shard given up: ReadError",
                "pairs-000000.tar (1 so far): empty text", "pairs-000000.tar (2 so far): text p3.txt is not UTF-8"):
        assert why in logged
    # a resumed loader neither re-counts nor re-warns what the saved run already met
    first = PretrainLoader(cfg, spm)
    _take(first, 4)
    resumed = PretrainLoader(cfg, spm)
    resumed.load_state_dict(first.state_dict())
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="beit3.data"):
        _assert_same(_take(resumed, 2), batches[4:])  # stats included
    assert len(caplog.records) == batches[5]["stats"]["skipped"] - batches[3]["stats"]["skipped"] > 0


def test_clear_errors_at_start(bad, tiny, tmp_path, caplog):
    d, spm = bad
    with pytest.raises(ValueError, match="nowhere does not exist"):
        PretrainLoader(_cfg(tmp_path / "nowhere"), spm)
    with pytest.raises(ValueError, match=r"matches no file \(2 paths, none exists\)"):
        PretrainLoader(_cfg(d, image_shards=str(d / "images-{000008..000009}.tar")), spm)
    # Gaps in a numbered pattern (a failed download) are left out with a warning naming the first.
    with caplog.at_level(logging.WARNING, logger="beit3.data"):
        loader = PretrainLoader(_cfg(d, image_shards=str(d / "images-{000000..000009}.tar")), spm)
    assert len(loader.shards["images"]) == 3 and "7 of 10 paths do not exist" in caplog.text
    assert "images-000003.tar" in caplog.text
    assert len(PretrainLoader(_cfg(d, image_shards=str(d / "images-{000000..000001}.tar")), spm).shards["images"]) == 2
    (tmp_path / "notexts").mkdir()
    (tmp_path / "notexts/images-000000.tar").write_bytes((d / "images-000000.tar").read_bytes())
    with pytest.raises(ValueError, match="no texts-\\*.tar shards"):
        PretrainLoader(_cfg(tmp_path / "notexts"), spm)
    _write_tar(tmp_path / "junk.tar", [{"__key__": "x", "png": b"junk"}])
    with pytest.raises(ValueError, match=r"junk.tar': no usable sample in its first 1 shard\(s\)"):
        PretrainLoader(_cfg(d, image_shards=[str(tmp_path / "junk.tar")]), spm)
    with pytest.raises(ValueError, match="has 2 shards for 3 readers"):
        PretrainLoader(_cfg(d), spm, rank=0, world_size=3)
    with pytest.raises(ValueError, match="not a multiple of patch_size"):
        PretrainLoader(_cfg(d, img_size=30), spm)
    shards, _ = tiny
    with pytest.raises(FileNotFoundError, match="missing.model"):
        PretrainLoader(_cfg(shards), tmp_path / "missing.model")


def test_state_from_another_setup_restarts_at_a_new_epoch(tiny, caplog):
    shards, spm = tiny
    cfg = _cfg(shards, batch_images=2, batch_texts=2, batch_pairs=2)
    old = PretrainLoader(cfg, spm)
    _take(old, 7)  # into epoch 1
    other = PretrainLoader(_cfg(shards, batch_images=2, batch_texts=2, batch_pairs=2, seed=5), spm)
    with caplog.at_level(logging.WARNING):
        other.load_state_dict(old.state_dict())
    assert "different seed" in caplog.text
    assert _take(other, 1)[0]["stats"]["epochs"] == {"images": 2, "texts": 2, "pairs": 2}
