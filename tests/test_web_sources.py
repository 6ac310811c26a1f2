"""Pretraining from the data people have: img2dataset shards as they are, over HTTP from a local
server (one shard dropping the connection mid-file, one missing), local brace patterns and text
files, mixed by weight, resumed exactly; and the captions formats of ``beit3 data shards``."""
import csv
import functools
import http.server
import io
import json
import os
import tarfile
import threading
from itertools import islice

import numpy as np
import pytest
from PIL import Image

from pretrain_fixtures import WORDS

from beit3.data.pretrain_loader import PretrainDataConfig, PretrainLoader
from beit3.data.shards import write_shards
from beit3.data.sources import DataSourceError, RetryPolicy, Shard, SkipLog, parse_spec, read_samples, resolve_source
from beit3.cli.pretrain import main as pretrain_main

pytestmark = pytest.mark.usefixtures("one_thread")
BROKEN, MISSING = "00003.tar", "00004.tar"


def _jpeg(seed: int, size: int = 40) -> bytes:
    rng = np.random.default_rng(seed)
    buf = io.BytesIO()
    Image.fromarray(rng.integers(0, 256, (size, size, 3), dtype=np.uint8)).save(buf, "JPEG")
    return buf.getvalue()


def _caption(seed: int) -> str:
    return " ".join(np.random.default_rng(seed).choice(WORDS, size=5))


def write_img2dataset(folder, shards: int, per_shard: int, seed: int = 0, json_only_from: int = 3, prefix: str = ""):
    """``00000.tar`` ...: KEY.jpg, KEY.txt, KEY.json as img2dataset writes them (samples from
    ``json_only_from`` on carry their caption in the json alone), and ``00000_stats.json``."""
    os.makedirs(folder, exist_ok=True)
    for s in range(shards):
        with tarfile.open(os.path.join(folder, f"{prefix}{s:05d}.tar"), "w") as tar:
            for i in range(per_shard):
                key, n = f"{s:05d}{i:04d}", seed + s * per_shard + i
                members = {"jpg": _jpeg(n), "json": json.dumps({"caption": _caption(n), "key": key}).encode()}
                if i < json_only_from:
                    members["txt"] = _caption(n).encode()
                for ext, data in members.items():
                    info = tarfile.TarInfo(f"{key}.{ext}")
                    info.size = len(data)
                    tar.addfile(info, io.BytesIO(data))
        with open(os.path.join(folder, f"{prefix}{s:05d}_stats.json"), "w") as f:
            json.dump({"count": per_shard, "successes": per_shard}, f)


class Handler(http.server.SimpleHTTPRequestHandler):
    """Serves a folder; ``BROKEN`` is cut off after half its bytes (the connection drops)."""

    def log_message(self, *args):
        pass

    def do_GET(self):
        if not self.path.endswith(BROKEN):
            return super().do_GET()
        data = open(os.path.join(self.directory, BROKEN), "rb").read()
        self.send_response(200)
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data[: len(data) // 2])
        self.wfile.flush()
        self.close_connection = True


@pytest.fixture(scope="module")
def served(tmp_path_factory):
    root = tmp_path_factory.mktemp("web")
    write_img2dataset(root / "pairs", shards=6, per_shard=4)
    os.remove(root / "pairs" / MISSING)  # the server answers 404
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0),
                                             functools.partial(Handler, directory=str(root / "pairs")))
    threading.Thread(target=server.serve_forever, daemon=True).start()
    write_img2dataset(root / "images", shards=4, per_shard=6, seed=1000, prefix="img")
    with open(root / "corpus.txt", "w") as f:
        f.writelines(_caption(5000 + i) + "\n" for i in range(120))
    yield root, f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()


def test_spec_and_local_sources(served, tmp_path):
    root, _ = served
    assert parse_spec("pipe:aws s3 cp s3://b/{0..3}.tar -::0.25") == ("pipe:aws s3 cp s3://b/{0..3}.tar -", 0.25)
    assert parse_spec("/data/a.tar") == ("/data/a.tar", 1.0)
    with pytest.raises(DataSourceError, match="weight -1 must be positive"):
        parse_spec("/data/a.tar::-1")
    pairs = resolve_source("pairs", str(root / "images" / "img{00000..00003}.tar"))
    assert (len(pairs.shards), pairs.samples, pairs.count_note) == (4, 24, "img2dataset *_stats.json")
    # A text file is cut into byte ranges on line boundaries: every line read once, by one shard.
    texts = resolve_source("texts", str(root / "corpus.txt"), min_shards=5)
    lines = [s["txt"].decode() for shard in texts.shards for s in read_samples(shard, SkipLog())]
    assert len(texts.shards) == 5 and texts.samples == 120
    assert lines == open(root / "corpus.txt").read().split("\n")[:-1]
    # A folder of images is cut into chunks of files.
    folder = tmp_path / "imgs"
    folder.mkdir()
    for i in range(7):
        (folder / f"{i}.jpg").write_bytes(_jpeg(i))
    images = resolve_source("images", str(folder), min_shards=3)
    keys = sorted(s["__key__"] for shard in images.shards for s in read_samples(shard, SkipLog()))
    assert len(images.shards) == 3 and keys == [str(i) for i in range(7)]
    with pytest.raises(DataSourceError, match="matches no file"):
        resolve_source("pairs", str(root / "nothing-{0..2}.tar"))


def test_http_reads_retry_then_give_up_and_count(served):
    root, url = served
    waits = []
    retry = RetryPolicy(retries=2, backoff=0.01, sleep=waits.append)
    skips = SkipLog()
    good = list(read_samples(Shard(f"{url}/00000.tar"), skips, retry))
    assert len(good) == 4 and not skips.failed and waits == []
    broken = list(read_samples(Shard(f"{url}/{BROKEN}"), skips, retry))
    assert len(broken) < 4 and len({s["__key__"] for s in broken}) == len(broken)  # nothing twice
    assert waits == [0.01, 0.02]  # two retries with exponential backoff
    assert list(read_samples(Shard(f"{url}/{MISSING}"), skips, retry)) == []
    assert set(skips.failed) == {f"{url}/{BROKEN}", f"{url}/{MISSING}"}
    assert skips.failed[f"{url}/{MISSING}"] == "curl exit 22 (HTTP error status)"  # the 404
    assert skips.failed[f"{url}/{BROKEN}"] == "curl exit 18 (transfer cut short)"


def _cfg(url, root, **kw) -> PretrainDataConfig:
    base = dict(pair_shards=[f"{url}/{{00000..00005}}.tar"], image_shards=[str(root / "images/img{00000..00003}.tar")],
                text_shards=[str(root / "corpus.txt")], batch_images=2, batch_texts=2, batch_pairs=4,
                img_size=32, patch_size=8, tokenizer_img_size=16, max_text_len=16, shuffle_buffer=4,
                shard_retries=1, retry_backoff=0.01, max_bad_shard_fraction=0.5)
    return PretrainDataConfig(**{**base, **kw})


def test_weighted_mixture_is_deterministic_and_resumes_exactly(served, assets):
    root, url = served
    spm, _ = assets
    cfg = _cfg(url, root, batch_pairs=8, batch_images=0, batch_texts=0,
               pair_shards=[f"{url}/{{00000..00002}}.tar::3", str(root / "images/img{00000..00003}.tar::1")])
    run = list(islice(PretrainLoader(cfg, spm), 12))
    shards = [k.split(":")[0] for b in run for k in b["stats"]["keys"]["pairs"]]
    web = sum(not name.startswith("img") for name in shards)
    assert len(shards) == 96 and 60 <= web <= 84  # 3:1 -> 72 expected, +-3 sigma
    again = [b["stats"]["keys"] for b in islice(PretrainLoader(cfg, spm), 12)]
    assert again == [b["stats"]["keys"] for b in run]  # deterministic for the seed
    first = PretrainLoader(cfg, spm)
    list(islice(first, 5))
    resumed = PretrainLoader(cfg, spm)
    resumed.load_state_dict(first.state_dict())
    assert [b["stats"]["keys"] for b in islice(resumed, 7)] == [b["stats"]["keys"] for b in run[5:]]


def _pretrain(out, url, root, assets, *extra):
    spm, tok = assets
    return pretrain_main([
        "--preset", "tiny", "--output", str(out), "--spm", spm, "--tokenizer", tok, "--no-tensorboard",
        "--pair-shards", f"{url}/{{00000..00005}}.tar", "--image-shards", str(root / "images/img{00000..00003}.tar"),
        "--text-shards", str(root / "corpus.txt"), "--batch-images", "2", "--batch-texts", "2", "--batch-pairs", "4",
        "--steps", "6", "--save-every", "3", "--log-every", "1", "--warmup-steps", "2", "--shard-retries", "1",
        "--retry-backoff", "0.01", "--max-bad-shard-fraction", "0.5", *extra])


def _metrics(out):
    with open(out / "metrics.jsonl") as f:
        return [json.loads(line) for line in f if '"step"' in line]


def test_pretrain_from_http_local_and_text_sources_resumes_exactly(served, assets, tmp_path, caplog):
    root, url = served
    assert _pretrain(tmp_path / "full", url, root, assets) == 0
    assert _pretrain(tmp_path / "split", url, root, assets, "--stop-after-steps", "3") == 0
    assert _pretrain(tmp_path / "split", url, root, assets, "--resume", "auto") == 0
    a, b = _metrics(tmp_path / "full"), _metrics(tmp_path / "split")
    assert [m["step"] for m in a] == [1, 2, 3, 4, 5, 6] == [m["step"] for m in b]
    for x, y in zip(a, b):
        for k in ("loss", "loss/image", "loss/text", "loss/pair"):
            assert x[k] == pytest.approx(y[k], rel=1e-5, abs=1e-6), (x["step"], k)
    # 24 pairs from 4-sample shards: every shard read; the broken and the missing one given up
    assert a[-1]["skipped_samples"] >= 2


def test_unreachable_source_fails_before_anything_is_written(served, assets, tmp_path, capsys):
    root, url = served
    out = tmp_path / "never"
    rc = _pretrain(out, "http://127.0.0.1:9", root, assets)  # port 9: nothing listens
    err = capsys.readouterr().err
    assert rc == 2 and not out.exists()
    assert "error: pairs source 'http://127.0.0.1:9/{00000..00005}.tar': no usable sample in its first 3" in err
    assert "curl exit 7 (connection refused)" in err and len(err.strip().splitlines()) == 1
    rc = pretrain_main(["--preset", "tiny", "--output", str(out), "--spm", assets[0], "--tokenizer", assets[1],
                        "--pair-shards", str(root / "nothing-{0..3}.tar")])
    assert rc == 2 and not out.exists() and "matches no file (4 paths, none exists)" in capsys.readouterr().err


def test_shard_writer_reads_coco_karpathy_and_tables(tmp_path):
    """The same six pairs from each captions format people have give the same shards' captions."""
    images = tmp_path / "train2014"
    images.mkdir()
    names = [f"COCO_{i}.jpg" for i in range(3)]
    for i, n in enumerate(names):
        (images / n).write_bytes(_jpeg(i))
    pairs = [(names[i // 2], f"caption {i}") for i in range(6)]
    coco = {"images": [{"id": 10 + i, "file_name": n} for i, n in enumerate(names)],
            "annotations": [{"image_id": 10 + names.index(n), "id": j, "caption": c} for j, (n, c) in enumerate(pairs)]}
    (tmp_path / "coco.json").write_text(json.dumps(coco))
    karpathy = {"images": [{"filepath": "train2014", "filename": n, "split": "train" if i < 2 else "val",
                            "sentences": [{"raw": c} for m, c in pairs if m == n]} for i, n in enumerate(names)]}
    (tmp_path / "karpathy.json").write_text(json.dumps(karpathy))
    for suffix, delim in ((".csv", ","), (".tsv", "\t")):
        with open(tmp_path / f"table{suffix}", "w", newline="") as f:
            w = csv.writer(f, delimiter=delim)
            w.writerow(["url", "caption"])
            w.writerows([(f"train2014/{n}", c) for n, c in pairs] + [("train2014/missing.jpg", "gone")])
    import pyarrow as pa
    import pyarrow.parquet as pq
    pq.write_table(pa.table({"filepath": [n for n, _ in pairs], "text": [c for _, c in pairs]}),
                   tmp_path / "table.parquet")

    def captions(source, **options):
        out = tmp_path / f"out-{os.path.basename(source)}"
        entry = write_shards(out, captions=source, caption_options=options)
        import webdataset as wds
        got = sorted(s["txt"].decode() for tar in sorted(out.glob("pairs-*.tar"))
                     for s in wds.WebDataset(str(tar), shardshuffle=False))
        return got, entry["skipped"]

    want = sorted(c for _, c in pairs)
    assert captions(tmp_path / "coco.json", image_root=images) == (want, 0)
    assert captions(tmp_path / "karpathy.json") == (want, 0)
    assert captions(tmp_path / "karpathy.json", split=["train"]) == (sorted(c for n, c in pairs if n != names[2]), 0)
    assert captions(tmp_path / "table.csv") == (want, 1)  # the missing image: skipped and counted
    assert captions(tmp_path / "table.tsv") == (want, 1)
    assert captions(tmp_path / "table.parquet", image_root=images) == (want, 0)


def test_data_dir_of_img2dataset_shards_fails_early_with_the_way_out(served, assets, tmp_path, capsys):
    root, _ = served
    out = tmp_path / "run"
    rc = pretrain_main(["--preset", "tiny", "--data", str(root / "images"), "--spm", assets[0],
                        "--tokenizer", assets[1], "--output", str(out)])
    err = capsys.readouterr().err
    assert rc == 2 and not out.exists()
    assert "has no images-*.tar shards" in err and "--image-shards" in err and "{00000..00099}.tar" in err


def test_too_many_failed_shards_stop_the_run_with_one_line(served, assets):
    """2 of 6 shards fail: within a budget of half the shards (the tests above), but with 10% (0.6
    shards) the first one given up stops the reader, naming the source and the shard."""
    root, url = served
    cfg = _cfg(url, root, batch_images=0, batch_texts=0, max_bad_shard_fraction=0.1)
    with pytest.raises(DataSourceError, match=r"pairs source '.*\{00000..00005\}.tar': 1 of 6 shards failed "
                                              r"\(more than the allowed 0.6\); first: http://127.0.0.1:\d+/0000[34].tar: curl exit"):
        list(islice(PretrainLoader(cfg, assets[0]), 10))


def test_shards_output_that_is_a_file_is_refused_before_reading(tmp_path, capsys):
    from beit3.cli.data import shards_main
    (tmp_path / "out").write_text("not a folder")
    (tmp_path / "t.txt").write_text("one line\n")
    assert shards_main(["--texts", str(tmp_path / "t.txt"), "--output", str(tmp_path / "out")]) == 2
    assert "exists and is not a folder" in capsys.readouterr().err


def write_img2dataset_files(folder, per_folder: int = 5, folders: int = 2):
    """img2dataset's ``--output_format files``: 00000/000000001.jpg + .txt + .json, 00000_stats.json;
    the second folder's samples carry their caption in the json alone."""
    captions = {}
    for s in range(folders):
        sub = folder / f"{s:05d}"
        sub.mkdir(parents=True)
        for i in range(per_folder):
            key, n = f"{s:05d}{i:04d}", s * per_folder + i
            (sub / f"{key}.jpg").write_bytes(_jpeg(n))
            (sub / f"{key}.json").write_text(json.dumps({"caption": _caption(n), "key": key}))
            if s == 0:
                (sub / f"{key}.txt").write_text(_caption(n))
            captions[f"{s:05d}/{key}"] = _caption(n)
        (folder / f"{s:05d}_stats.json").write_text(json.dumps({"successes": per_folder}))
    (folder / "00000" / "nocaption.jpg").write_bytes(_jpeg(99))  # an image without a caption: not a pair
    return captions


def test_img2dataset_files_layout_is_a_pairs_source(tmp_path, assets):
    captions = write_img2dataset_files(tmp_path / "cc")
    source = resolve_source("pairs", str(tmp_path / "cc"), min_shards=3)
    assert (len(source.shards), source.samples, source.count_note) == (3, 10, "image files with captions")
    from beit3.data.pretrain_loader import decode_image, decode_text
    got = {s["__key__"]: decode_text(s) for shard in source.shards for s in read_samples(shard, SkipLog())}
    assert got == captions
    assert all(decode_image(s).size == (40, 40) for s in read_samples(source.shards[0], SkipLog()))
    cfg = PretrainDataConfig(pair_shards=[str(tmp_path / "cc")], batch_images=0, batch_texts=0, batch_pairs=4,
                             img_size=32, patch_size=8, tokenizer_img_size=16, max_text_len=16, shuffle_buffer=4)
    batch = next(iter(PretrainLoader(cfg, assets[0])))
    assert batch["pairs"]["image"].shape == (4, 3, 32, 32) and batch["stats"]["skipped"] == 0
    empty = tmp_path / "only-images"
    empty.mkdir()
    (empty / "a.jpg").write_bytes(_jpeg(1))
    with pytest.raises(DataSourceError, match="a folder without .tar shards or image files with a KEY.txt or "
                                              "KEY.json caption beside them"):
        resolve_source("pairs", str(empty))


def test_a_manifest_entry_without_a_name_is_one_line(tmp_path, assets, capsys):
    (tmp_path / "corpus.txt").write_text("".join(_caption(i) + "\n" for i in range(20)))
    write_shards(tmp_path / "shards", texts=[tmp_path / "corpus.txt"], shard_size=5)
    manifest = json.loads((tmp_path / "shards" / "manifest.json").read_text())
    del manifest["kinds"]["texts"]["shards"][2]["name"]
    (tmp_path / "shards" / "manifest.json").write_text(json.dumps(manifest))
    out = tmp_path / "run"
    rc = pretrain_main(["--preset", "tiny", "--data", str(tmp_path / "shards"), "--spm", assets[0],
                        "--tokenizer", assets[1], "--output", str(out), "--batch-images", "0", "--batch-pairs", "0"])
    err = capsys.readouterr().err.strip()
    assert rc == 2 and not out.exists()
    assert err == (f"beit3 pretrain: error: {tmp_path / 'shards' / 'manifest.json'}: kinds.texts.shards[2] has no "
                   "'name' (a file name in the folder); rewrite it with beit3 data shards")
