import io
import json
import os
import tarfile

import numpy as np
import pytest
import webdataset as wds
from PIL import Image

from beit3.cli.data import shards_main as main
from beit3.data.shards import MANIFEST, ShardError, manifest_shards, read_manifest, sniff_image_format, write_shards


def _image_bytes(fmt: str, seed: int, size=(20, 16)) -> bytes:
    arr = np.random.default_rng(seed).integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, format=fmt)
    return buf.getvalue()


def _read_all(paths):
    samples = []
    for p in paths:
        samples += list(wds.WebDataset(p, shardshuffle=False, empty_check=False))
    return samples


@pytest.fixture
def image_dir(tmp_path):
    d = tmp_path / "imgs"
    (d / "sub").mkdir(parents=True)
    files = {"a.png": _image_bytes("PNG", 0), "b.jpg": _image_bytes("JPEG", 1),
             "sub/c.webp": _image_bytes("WEBP", 2), "sub/d.png": _image_bytes("JPEG", 3)}  # JPEG named .png
    for name, data in files.items():
        (d / name).write_bytes(data)
    (d / "broken.png").write_bytes(b"not an image at all")
    (d / "notes.txt").write_text("ignored")
    return d, files


def test_sniff_image_format():
    assert sniff_image_format(_image_bytes("PNG", 0)) == "png"
    assert sniff_image_format(_image_bytes("JPEG", 0)) == "jpg"
    assert sniff_image_format(_image_bytes("WEBP", 0)) == "webp"
    assert sniff_image_format(b"GIF89a....") is None


def test_image_folder_round_trip(tmp_path, image_dir):
    d, files = image_dir
    out = tmp_path / "shards"
    entry = write_shards(out, images=d, shard_size=3)
    # sorted walk: a.png, b.jpg, broken.png (skipped), sub/c.webp, sub/d.png
    assert entry["num_samples"] == 4 and entry["skipped"] == 1 and entry["content"] == "images"
    assert [s["samples"] for s in entry["shards"]] == [3, 1]
    assert [s["name"] for s in entry["shards"]] == ["images-000000.tar", "images-000001.tar"]
    for s in entry["shards"]:
        assert s["bytes"] == os.path.getsize(out / s["name"])
    assert entry["num_bytes"] == sum(s["bytes"] for s in entry["shards"])
    samples = _read_all(manifest_shards(out, "images"))
    assert [s["__key__"] for s in samples] == ["000000000", "000000001", "000000002", "000000003"]
    # bytes unchanged, member extension = the bytes' real format (d.png holds a JPEG)
    expected = [("png", files["a.png"]), ("jpg", files["b.jpg"]), ("webp", files["sub/c.webp"]),
                ("jpg", files["sub/d.png"])]
    for sample, (ext, data) in zip(samples, expected):
        assert sample[ext] == data
    assert json.loads((out / MANIFEST).read_text())["kinds"]["images"] == entry


def test_captions_and_texts(tmp_path, image_dir):
    d, files = image_dir
    lines = [{"image": "imgs/a.png", "caption": " a red circle "}, {"image": "imgs/b.jpg", "caption": ""},
             {"image": "imgs/missing.png", "caption": "gone"}, {"caption": "no image key"},
             {"image": "imgs/sub/c.webp", "caption": "two squares"}]
    jsonl = tmp_path / "pairs.jsonl"
    jsonl.write_text("\n".join(json.dumps(x) for x in lines) + "\nnot json\n\n")
    out = tmp_path / "shards"
    pairs = write_shards(out, captions=jsonl, shard_size=10)
    assert pairs["num_samples"] == 2 and pairs["skipped"] == 4  # empty, missing, no key, not JSON
    samples = _read_all(manifest_shards(out, "pairs"))
    assert [(s["txt"], s.get("png") or s.get("webp")) for s in samples] == [
        (b"a red circle", files["a.png"]), (b"two squares", files["sub/c.webp"])]

    txt = tmp_path / "corpus.txt"
    txt.write_bytes(b"first line\n\n  second line  \nbad \xff\xfe bytes\nthird\n")
    texts = write_shards(out, texts=[txt], shard_size=2)
    assert texts["num_samples"] == 3 and texts["skipped"] == 1
    assert [s["txt"] for s in _read_all(manifest_shards(out, "texts"))] == [b"first line", b"second line", b"third"]
    # one manifest for the folder, both kinds in it
    assert set(read_manifest(out)["kinds"]) == {"pairs", "texts"}


def test_max_bytes_and_rewrite_replaces_stale_shards(tmp_path):
    txt = tmp_path / "t.txt"
    txt.write_text("".join(f"sentence number {i} " + "x" * 600 + "\n" for i in range(10)))
    out = tmp_path / "s"
    entry = write_shards(out, texts=[txt], shard_size=100, max_bytes=3000)
    # ~619 payload bytes a sample: a shard closes once its payload reaches 3000 bytes, after 5
    assert [s["samples"] for s in entry["shards"]] == [5, 5]
    write_shards(out, images=None, texts=[txt], kind="other", shard_size=100)
    entry = write_shards(out, texts=[txt], shard_size=10)
    assert sorted(p.name for p in out.glob("*.tar")) == ["other-000000.tar", "texts-000000.tar"]
    assert set(read_manifest(out)["kinds"]) == {"other", "texts"} and entry["num_samples"] == 10
    with tarfile.open(out / "texts-000000.tar") as tf:
        assert {m.mtime for m in tf.getmembers()} == {0}  # reproducible bytes


def test_errors(tmp_path, capsys):
    with pytest.raises(ShardError, match="nope: no such directory"):
        write_shards(tmp_path / "o", images=tmp_path / "nope")
    with pytest.raises(ShardError, match="missing.jsonl: no such file"):
        write_shards(tmp_path / "o", captions=tmp_path / "missing.jsonl")
    with pytest.raises(ShardError, match="exactly one"):
        write_shards(tmp_path / "o", images=tmp_path, texts=["x"])
    empty = tmp_path / "empty"
    empty.mkdir()
    (empty / "x.png").write_bytes(b"garbage")
    with pytest.raises(ShardError, match=r"no images samples in .*empty \(1 inputs skipped\)"):
        write_shards(tmp_path / "o", images=empty)
    assert not list((tmp_path / "o").glob("*.tar"))  # nothing half-written
    assert main(["--images", str(tmp_path / "nope"), "--output", str(tmp_path / "o")]) == 2
    assert "no such directory" in capsys.readouterr().err


def test_main(tmp_path, image_dir, capsys):
    d, _ = image_dir
    assert main(["--images", str(d), "--output", str(tmp_path / "o"), "--shard-size", "2", "--kind", "imgs"]) == 0
    assert "4 images samples in 2 shards" in capsys.readouterr().out
    assert len(manifest_shards(tmp_path / "o", "imgs")) == 2


# -- a bad input leaves the existing shards as they were -------------------------------------------
def _snapshot(folder):
    return {p.name: p.read_bytes() for p in sorted(folder.iterdir())}


@pytest.fixture
def filled(tmp_path, image_dir):
    """An output folder holding images, texts and pairs shards and their manifest."""
    d, _ = image_dir
    out = tmp_path / "out"
    write_shards(out, images=d, shard_size=2)
    (tmp_path / "corpus.txt").write_text("one\ntwo\nthree\n")
    write_shards(out, texts=[tmp_path / "corpus.txt"], shard_size=2)
    (tmp_path / "pairs.jsonl").write_text(json.dumps({"image": "imgs/a.png", "caption": "a"}) + "\n")
    write_shards(out, captions=tmp_path / "pairs.jsonl")
    return out


def _bad_inputs(tmp, d):
    """(flags, a text the one error line must hold) for inputs that are refused."""
    (tmp / "empty_dir").mkdir()
    (tmp / "zero.txt").write_bytes(b"")
    (tmp / "cut.json").write_text('{"images": [{"filename": "a.png", "sentences": [{"raw": "a"}')
    karpathy = {"images": [{"filepath": "imgs", "filename": "a.png", "sentences": [{"raw": "x"}]},
                           {"filepath": "imgs", "sentences": [{"raw": "no file name"}]}]}
    (tmp / "karpathy.json").write_text(json.dumps(karpathy))
    coco = {"images": [{"id": 1, "file_name": "imgs/a.png"}, {"file_name": "imgs/b.jpg"}],
            "annotations": [{"image_id": 1, "caption": "a"}]}
    (tmp / "coco.json").write_text(json.dumps(coco))
    (tmp / "nocaption.csv").write_text("url,title\nimgs/a.png,a red circle\n")
    # a good first row, then a Latin-1 line: the problem shows only once rows were written
    (tmp / "latin1.csv").write_bytes("url,caption\nimgs/a.png,a red circle\nimgs/b.jpg,caf\u00e9\n".encode("latin-1"))
    return [
        (["--images", str(tmp / "empty_dir")], "empty_dir: no .jpg/.jpeg/.png/.webp files"),
        (["--texts", str(tmp / "zero.txt")], "zero.txt (0 bytes): an empty file"),
        (["--captions", str(tmp / "cut.json")], "cut.json (60 bytes): not valid JSON"),
        (["--captions", str(tmp / "karpathy.json")], "karpathy.json: images[1] has no 'filename'"),
        (["--captions", str(tmp / "coco.json")], "coco.json: images[1] has no 'id'"),
        (["--captions", str(tmp / "nocaption.csv")], "nocaption.csv: no caption column"),
        (["--captions", str(tmp / "latin1.csv")], "latin1.csv: line 3 is not UTF-8 text (byte b'\\xe9'"),
    ]


def test_a_bad_input_changes_nothing_and_says_one_line(tmp_path, filled, image_dir, capsys):
    before = _snapshot(filled)
    assert {"images-000000.tar", "texts-000000.tar", "pairs-000000.tar", MANIFEST} <= set(before)
    capsys.readouterr()
    for flags, problem in _bad_inputs(tmp_path, image_dir[0]):
        assert main([*flags, "--output", str(filled)]) == 2, flags
        err = capsys.readouterr().err
        lines = [line for line in err.splitlines() if "error" in line or "Traceback" in line]
        assert lines == [lines[0]] and lines[0].startswith("beit3 data shards: error: "), err
        assert problem in lines[0], (problem, lines[0])
        assert _snapshot(filled) == before, flags  # shards and manifest byte-identical, no leftovers


def test_an_interrupted_write_keeps_the_old_set(tmp_path, filled, monkeypatch):
    """Killed (here: interrupted) half-way through the new shards: the old ones stay, the partial
    set is removed."""
    from beit3.data import shards
    before = _snapshot(filled)
    calls = []

    def stop_on_third(path):
        calls.append(path)
        if len(calls) == 3:
            raise KeyboardInterrupt
        return real(path)
    real = shards._image_fields
    monkeypatch.setattr(shards, "_image_fields", stop_on_third)
    with pytest.raises(KeyboardInterrupt):
        write_shards(filled, images=tmp_path / "imgs", shard_size=1)
    assert _snapshot(filled) == before


def test_a_damaged_manifest_entry_is_named(tmp_path, filled):
    manifest = json.loads((filled / MANIFEST).read_text())
    del manifest["kinds"]["texts"]["shards"][1]["name"]
    (filled / MANIFEST).write_text(json.dumps(manifest))
    with pytest.raises(ShardError, match=r"manifest.json: kinds.texts.shards\[1\] has no 'name'"):
        manifest_shards(filled, "texts")
