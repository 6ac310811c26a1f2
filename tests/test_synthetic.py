"""The synthetic world: deterministic, texts true of the pixels, raw files in the public formats."""
import json
import os
import re
import runpy
import signal
import sys
import time
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import torch
import webdataset as wds
from PIL import Image

from beit3.data.synthetic.scenes import COLORS, SHAPES
from beit3.data.synthetic.language import NLVR2_STATEMENTS
from beit3.cli.data import synthetic_main as main
from beit3.data.synthetic.world import WorldConfig, make_synthetic_world, split_sizes, write_nlvr2
from beit3.data.text_tokenizer import TextTokenizer
from beit3.data.vqa_normalize import normalize_answer

N, SEED, CAPTIONS, QUESTIONS = 40, 3, 5, 4
C, S = "|".join(COLORS), "|".join(SHAPES)
NUM = {"one": 1, "two": 2, "three": 3}


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    out = tmp_path_factory.mktemp("world") / "w"
    start = time.perf_counter()
    counts = make_synthetic_world(out, num_images=N, seed=SEED, captions_per_image=CAPTIONS,
                                  questions_per_image=QUESTIONS)
    seconds = time.perf_counter() - start
    scenes = json.loads((out / "scenes.json").read_text())
    return out, counts, seconds, {im["image_id"]: im for im in scenes["images"]}, scenes


def _files(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def test_counts_and_speed(world):
    out, counts, seconds, scenes, _ = world
    assert seconds < 20  # a 40-image world takes about a second
    sizes = split_sizes(N)
    assert sizes == {"train": 32, "val": 4, "test": 4}
    for split, n in sizes.items():
        assert len(list((out / "images" / split).glob("*.png"))) == n == counts[f"images_{split}"]
        assert sum(im["split"] == split for im in scenes.values()) == n
    assert counts["captions"] == N * CAPTIONS and counts["vqa_questions"] == N * QUESTIONS
    assert counts["nlvr2_pairs"] == N // 4
    assert len(list((out / "classification").rglob("*.png"))) == 36 == counts["classification_images"]
    assert json.loads((out / "world.json").read_text())["counts"] == counts


def test_deterministic_by_seed(world, tmp_path):
    out = world[0]
    make_synthetic_world(tmp_path / "again", num_images=N, seed=SEED, captions_per_image=CAPTIONS,
                         questions_per_image=QUESTIONS)
    first, second = _files(out), _files(tmp_path / "again")
    assert first.keys() == second.keys() and len(first) >= 200
    assert [k for k in first if first[k] != second[k]] == []  # images, JSON, spm model, shards
    make_synthetic_world(tmp_path / "other", num_images=N, seed=SEED + 1)
    other = _files(tmp_path / "other")
    assert other["images/train/000001.png"] != first["images/train/000001.png"]
    assert other["scenes.json"] != first["scenes.json"]


def _pixels(out: Path, rel: str) -> np.ndarray:
    with Image.open(out / rel) as im:
        return np.asarray(im.convert("RGB"))


def _objects_match_pixels(px: np.ndarray, scene: dict) -> None:
    for o in scene["objects"]:
        x, y = o["center"]
        assert tuple(px[y, x]) == COLORS[o["color"]], (scene, o)
    boxes = [o["box"] for o in scene["objects"]]
    for i, a in enumerate(boxes):  # shapes never overlap
        for b in boxes[i + 1:]:
            assert a[2] < b[0] or b[2] < a[0] or a[3] < b[1] or b[3] < a[1]


def test_pixels_match_scene_and_class(world):
    out, _, _, scenes, _ = world
    for im in scenes.values():
        px = _pixels(out, im["file"])
        assert px.shape == (im["height"], im["width"], 3) and 64 <= min(px.shape[:2]) <= max(px.shape[:2]) <= 96
        _objects_match_pixels(px, im)
        # the class is the colour+shape of the object covering the most pixels, counted in the image
        area = [int((px[o["box"][1]:o["box"][3] + 1, o["box"][0]:o["box"][2] + 1] == COLORS[o["color"]])
                    .all(-1).sum()) for o in im["objects"]]
        top = im["objects"][int(np.argmax(area))]
        assert im["label"] == f"{top['color']}_{top['shape']}"
        if im["split"] in ("train", "val"):
            assert (out / "classification" / im["split"] / im["label"] / os.path.basename(im["file"])).is_file()
    # classes cycle within a split: 32 train images cover all 18 classes
    assert len({im["label"] for im in scenes.values() if im["split"] == "train"}) == 18


def test_segmentation_masks_cover_exactly_the_shapes(world, tmp_path):
    """ADE20K's layout: the train and val pictures with one class id a pixel, 0 outside the shapes,
    k = the k-th {color}_{shape}; inside every shape's box the mask holds its id exactly where the
    picture has its flat colour."""
    out, counts, _, scenes, meta = world
    root = out / "ADEChallengeData2016"
    classes = meta["classes"]
    rows = (root / "objectInfo150.txt").read_text().splitlines()
    assert rows[0].split("\t") == ["Idx", "Ratio", "Train", "Val", "Name"]
    assert [r.split("\t")[4] for r in rows[1:]] == classes and len(classes) == 18
    pairs = 0
    for im in scenes.values():
        if im["split"] == "test":
            continue
        folder = {"train": "training", "val": "validation"}[im["split"]]
        name = os.path.basename(im["file"])
        assert (root / "images" / folder / name).read_bytes() == (out / im["file"]).read_bytes()
        mask = np.asarray(Image.open(root / "annotations" / folder / name))
        px = _pixels(out, im["file"])
        assert mask.shape == px.shape[:2] and mask.dtype == np.uint8
        inside = np.zeros(mask.shape, dtype=bool)
        for o in im["objects"]:
            x0, y0, x1, y1 = o["box"]
            k = classes.index(f"{o['color']}_{o['shape']}") + 1
            painted = (px[y0:y1 + 1, x0:x1 + 1] == COLORS[o["color"]]).all(-1)
            assert np.array_equal(mask[y0:y1 + 1, x0:x1 + 1] == k, painted), (im["file"], o)
            inside[y0:y1 + 1, x0:x1 + 1] = True
        assert (mask[~inside] == 0).all() and set(np.unique(mask)) - {0} == {
            classes.index(f"{o['color']}_{o['shape']}") + 1 for o in im["objects"]}
        pairs += 1
    assert pairs == counts["segmentation_images"] == 36
    # a world cached before the masks existed gets them on first use, the same bytes
    from beit3.data.synthetic.segmentation import write_segmentation
    assert write_segmentation(tmp_path, [dict(im, file=str(out / im["file"])) for im in scenes.values()]) == 36
    again = tmp_path / "ADEChallengeData2016" / "annotations" / "training"
    assert all((again / p.name).read_bytes() == p.read_bytes() for p in (root / "annotations" / "training").iterdir())


def test_a_world_cached_without_masks_gets_them_on_first_use(world, tmp_path, monkeypatch):
    import shutil
    from beit3.jobs.demo_assets import finetune_world, synthetic_root
    monkeypatch.setenv("BEIT3_CACHE", str(tmp_path))
    cached = Path(synthetic_root(SEED, N, 64)) / "world"
    shutil.copytree(world[0], cached)
    shutil.rmtree(cached / "ADEChallengeData2016")
    for marker in ("READY", "INDEXES_READY"):
        (cached / marker).touch()
    logged = []
    assets = finetune_world(SEED, N, 64, log=logged.append)
    assert assets.world == str(cached) and logged == [f"writing the segmentation masks into {cached} (once)"]
    masks = sorted(p.name for p in (cached / "ADEChallengeData2016/annotations/validation").iterdir())
    assert masks == sorted(p.name for p in (world[0] / "ADEChallengeData2016/annotations/validation").iterdir())
    finetune_world(SEED, N, 64, log=logged.append)
    assert len(logged) == 1  # complete: not written again


def _find(objs, color=None, shape=None, size=None):
    return [o for o in objs if (color in (None, o["color"])) and (shape in (None, o["shape"]))
            and (size in (None, o["size"]))]


def _left(a, b):
    return a["box"][2] < b["box"][0]


def _above(a, b):
    return a["box"][3] < b["box"][1]


RELATIONS = {"to the left of": _left, "to the right of": lambda a, b: _left(b, a), "above": _above,
             "below": lambda a, b: _above(b, a)}


def check_caption(caption: str, scene: dict) -> None:
    objs = scene["objects"]
    for size, color, shape in re.findall(rf"\b(?:(small|large) )?({C}) ({S})\b", caption):
        assert _find(objs, color, shape, size or None), caption
    for n, color, shape in re.findall(rf"\b(one|two|three) (?:({C}) )?({S})s\b", caption):
        assert len(_find(objs, color or None, shape)) == NUM[n], caption
    m = re.match(r"(two|three) shapes", caption)
    assert m is None or len(objs) == NUM[m.group(1)], caption
    for bg in re.findall(r"on a (\w+) background", caption):
        assert bg == {"noise": "noisy", "stripes": "striped", "gradient": "shaded"}[scene["background"]]
    for c1, s1, rel, size2, c2, s2 in re.findall(
            rf"an? ({C}) ({S}) (to the left of|to the right of|above|below) a (small|large) ({C}) ({S})", caption):
        assert any(RELATIONS[rel](a, b) for a in _find(objs, c1, s1) for b in _find(objs, c2, s2, size2)), caption
    assert not re.search(r"\ba [aeiou]", caption), caption  # "an orange", never "a orange"


def test_captions_describe_the_scene(world):
    out, _, _, scenes, _ = world
    karpathy = json.loads((out / "raw/dataset_coco.json").read_text())["images"]
    assert len(karpathy) == N and sum(len(e["sentences"]) for e in karpathy) == N * CAPTIONS
    relations = 0
    for entry in karpathy:
        scene = scenes[entry["cocoid"]]
        assert entry["split"] == scene["split"] and f"{entry['filepath']}/{entry['filename']}" == scene["file"]
        assert (out / entry["filepath"] / entry["filename"]).is_file()
        assert len({s["raw"] for s in entry["sentences"]}) == CAPTIONS  # distinct captions
        for sent in entry["sentences"]:
            assert sent["tokens"] == sent["raw"].split()
            check_caption(sent["raw"], scene)
            relations += any(r in sent["raw"] for r in RELATIONS)
    assert relations > 10  # the grammar's relations are exercised


def vqa_truth(question: str, scene: dict) -> str:
    """The answer, computed from the scene by a parser independent of the generator."""
    objs = scene["objects"]
    if m := re.fullmatch(rf"what color is the ({S})\?", question):
        (o,) = _find(objs, shape=m[1])
        return o["color"]
    if question == "how many shapes are there?":
        return str(len(objs))
    if m := re.fullmatch(rf"how many ({S})s are there\?", question):
        return str(len(_find(objs, shape=m[1])))
    if m := re.fullmatch(rf"is there an? ({C}) ({S})\?", question):
        return "yes" if _find(objs, m[1], m[2]) else "no"
    if m := re.fullmatch(rf"what shape is the ({C}) object\?", question):
        (o,) = _find(objs, color=m[1])
        return o["shape"]
    if m := re.fullmatch(rf"what shape is to the left of the ({C}) ({S})\?", question):
        (b,) = _find(objs, m[1], m[2])
        (a,) = [o for o in objs if _left(o, b)]
        return a["shape"]
    if m := re.fullmatch(rf"is the ({C}) ({S}) to the left of the ({C}) ({S})\?", question):
        (a,), (b,) = _find(objs, m[1], m[2]), _find(objs, m[3], m[4])
        return "yes" if _left(a, b) else "no"
    if m := re.fullmatch(rf"what size is the ({C}) ({S})\?", question):
        (o,) = _find(objs, m[1], m[2])
        return o["size"]
    raise AssertionError(f"unknown question {question!r}")


def test_vqa_files(world):
    out, _, _, scenes, _ = world
    disagreements = respellings = 0
    answer_types = Counter()
    for split in ("train", "val", "test"):
        qs = json.loads((out / f"raw/vqa/v2_OpenEnded_mscoco_{split}_questions.json").read_text())
        anns = json.loads((out / f"raw/vqa/v2_mscoco_{split}_annotations.json").read_text())
        assert qs["task_type"] == "Open-Ended" and len(qs["questions"]) == len(anns["annotations"])
        by_qid = {a["question_id"]: a for a in anns["annotations"]}
        for q in qs["questions"]:
            scene, ann = scenes[q["image_id"]], by_qid[q["question_id"]]
            assert scene["split"] == split and ann["image_id"] == q["image_id"]
            truth = vqa_truth(q["question"], scene)
            assert ann["multiple_choice_answer"] == truth
            answers = [a["answer"] for a in ann["answers"]]
            assert len(answers) == 10 and [a["answer_id"] for a in ann["answers"]] == list(range(1, 11))
            assert Counter(normalize_answer(a) for a in answers).most_common(1)[0][0] == truth
            disagreements += any(normalize_answer(a) != truth for a in answers)
            respellings += any(a != truth and normalize_answer(a) == truth for a in answers)
            answer_types[ann["answer_type"]] += 1
    assert disagreements > 10 and respellings > 10  # soft scores and normalisation are exercised
    assert set(answer_types) == {"yes/no", "number", "other"}


def nlvr2_truth(sentence: str, left: dict, right: dict) -> bool:
    sides = {"left": left["objects"], "right": right["objects"]}
    if m := re.fullmatch(rf"the (left|right) image contains an? ({C}) ({S})", sentence):
        return bool(_find(sides[m[1]], m[2], m[3]))
    if m := re.fullmatch(rf"both images contain an? ({S})", sentence):
        return all(_find(objs, shape=m[1]) for objs in sides.values())
    if m := re.fullmatch(rf"there (?:is|are) exactly (one|two|three) ({S})s? in the two images", sentence):
        return sum(len(_find(objs, shape=m[2])) for objs in sides.values()) == NUM[m[1]]
    if m := re.fullmatch(r"the (left|right) image has more shapes than the (left|right) image", sentence):
        return len(sides[m[1]]) > len(sides[m[2]])
    raise AssertionError(f"unknown statement {sentence!r}")


def _nlvr2_lines(out: Path, name: str) -> list[dict]:
    return [json.loads(line) for line in (out / f"raw/nlvr2/{name}.json").read_text().splitlines()]


def test_nlvr2_files(world):
    """Official layout: identifier {split}-{set}-{pair}-0, images {folder}/{split}-{set}-{pair}-img{0,1}.png;
    a set is one statement with a pair it is true of and a pair it is false of."""
    out, _, _, _, meta = world
    pairs = {p["identifier_prefix"]: p for p in meta["nlvr2"]}
    assert len(pairs) == len(meta["nlvr2"]) == N // 4
    sets = {}
    for name, n_sets in (("train", 3), ("dev", 1), ("test1", 1)):  # N // 4 = 10 pairs = 5 sets, 3/1/1
        lines = _nlvr2_lines(out, name)
        assert len(lines) == 2 * n_sets
        for entry in lines:
            assert re.fullmatch(rf"{name}-\d+-[01]-0", entry["identifier"])
            prefix = entry["identifier"].rsplit("-", 1)[0]
            pair = pairs[prefix]
            folder = f"images/train/{entry['directory']}" if name == "train" else f"images/{name}"
            assert pair["split"] == name and pair["folder"] == folder
            for side, key in (("img0", "left"), ("img1", "right")):
                _objects_match_pixels(_pixels(out, f"{folder}/{prefix}-{side}.png"), pair[key])
            assert entry["label"] == str(nlvr2_truth(entry["sentence"], pair["left"], pair["right"]))
            sets.setdefault(prefix.rsplit("-", 1)[0], []).append((entry["sentence"], entry["label"]))
    assert len(sets) == 5
    for items in sets.values():  # one statement, a true and a false pair
        assert len({s for s, _ in items}) == 1 and sorted(lab for _, lab in items) == ["False", "True"]


def test_nlvr2_has_no_wording_prior(tmp_path):
    """Every statement text is as often true as false in every split, so a text-only predictor
    scores exactly 0.5; the labels are the truth of the scenes, and the texts are varied."""
    pairs = write_nlvr2(tmp_path, WorldConfig(num_images=40, seed=SEED, num_nlvr2_pairs=201))
    assert len(pairs) == 200  # an odd count drops its last pair: a set needs a true and a false one
    scenes = {p["identifier_prefix"]: p for p in pairs}
    texts = set()
    for name, n_items in (("train", 160), ("dev", 20), ("test1", 20)):
        lines = _nlvr2_lines(tmp_path, name)
        assert len(lines) == n_items
        by_text = {}
        for entry in lines:
            pair = scenes[entry["identifier"].rsplit("-", 1)[0]]
            truth = nlvr2_truth(entry["sentence"], pair["left"], pair["right"])
            assert entry["label"] == str(truth)
            by_text.setdefault(entry["sentence"], Counter())[truth] += 1
        assert all(c[True] == c[False] for c in by_text.values()), name
        texts |= by_text.keys()
    assert len(texts) >= 35  # 100 sets drawn uniformly over the 50 texts
    assert len(NLVR2_STATEMENTS) == 50


def test_nlvr2_needs_a_set_per_split():
    with pytest.raises(ValueError, match="6 NLVR2 pairs"):
        WorldConfig(num_images=40, num_nlvr2_pairs=5)
    assert WorldConfig(num_images=6).num_nlvr2_pairs == 6


def test_spm_and_corpus(world):
    out = world[0]
    tok = TextTokenizer(out / "spm/synthetic.model")
    assert 100 <= tok.vocab_size <= 1000
    corpus = (out / "corpus.txt").read_text().splitlines()
    assert len(corpus) == 4 * N and any("corners" in line for line in corpus)
    karpathy = json.loads((out / "raw/dataset_coco.json").read_text())["images"]
    for text in corpus + [s["raw"] for e in karpathy for s in e["sentences"]]:
        ids = tok.encode(text)
        assert tok.unk_id not in ids and tok.decode(ids) == text
    assert len(tok.encode("a small orange triangle to the left of a large red circle")) == 14  # a piece a word


def test_pretraining_shards(world):
    out, counts, _, scenes, _ = world
    manifest = json.loads((out / "shards/manifest.json").read_text())["kinds"]
    n_train = split_sizes(N)["train"]
    assert manifest["images"]["num_samples"] == n_train + 2 * 6 == counts["shard_images"]  # + NLVR2 train pairs
    assert manifest["texts"]["num_samples"] == 4 * N and manifest["pairs"]["num_samples"] == n_train * CAPTIONS
    for kind, entry in manifest.items():
        assert len(entry["shards"]) == min(32, entry["num_samples"]) or kind != "pairs"
        assert all((out / "shards" / s["name"]).stat().st_size == s["bytes"] for s in entry["shards"])
    captions = {im["file"]: [] for im in scenes.values()}
    for line in (out / "pretrain_pairs.jsonl").read_text().splitlines():
        item = json.loads(line)
        captions[item["image"]].append(item["caption"])
    by_bytes = {(out / f).read_bytes(): f for f in captions}
    shard = out / "shards" / manifest["pairs"]["shards"][0]["name"]
    for sample in wds.WebDataset(str(shard), shardshuffle=False):
        assert sample["txt"].decode() in captions[by_bytes[sample["png"]]]


def test_downstream_builders_read_the_raw_files(world, tmp_path):
    from beit3.data.downstream import build_all_indexes
    out = world[0]
    counts = build_all_indexes(out / "raw", out, out / "spm/synthetic.model", min_answer_count=1,
                               rest_val_images=2, output_dir=tmp_path)
    n_train = split_sizes(N)["train"]
    assert counts["vqa.train.jsonl"] == n_train * QUESTIONS
    assert counts["coco_retrieval.train.jsonl"] == n_train * CAPTIONS
    assert counts["imagenet.train.index.jsonl"] == n_train
    pairs, tok = {p["identifier_prefix"]: p for p in world[4]["nlvr2"]}, TextTokenizer(out / "spm/synthetic.model")
    for split, n in (("train", 6), ("dev", 2), ("test-P", 2)):
        assert counts[f"nlvr2.{split}.index.jsonl"] == n
        for line in (tmp_path / f"nlvr2.{split}.index.jsonl").read_text().splitlines():
            item = json.loads(line)
            prefix = item["identifier"].rsplit("-", 1)[0]  # official: identifier minus its last field
            pair = pairs[prefix]
            assert item["image_path"] == f"{pair['folder']}/{prefix}-img0.png" and (out / item["image_path"]).is_file()
            assert item["image2_path"] == f"{pair['folder']}/{prefix}-img1.png" and (out / item["image2_path"]).is_file()
            sentence = tok.decode(item["text_segment"])
            assert item["label"] == int(nlvr2_truth(sentence, pair["left"], pair["right"]))


def test_cli_and_output_folder_rules(tmp_path, capsys, monkeypatch):
    assert main(["--output", str(tmp_path / "w"), "--num-images", "6", "--image-size", "48"]) == 0
    assert "images_train 4, images_val 1, images_test 1" in capsys.readouterr().out
    # rebuilding over a previous world replaces it; a folder holding something else is refused
    assert main(["--output", str(tmp_path / "w"), "--num-images", "5", "--image-format", "jpg"]) == 0
    assert len(list((tmp_path / "w/images/train").glob("*"))) == 3 + 1  # 3 jpg + NLVR2 folder 0
    (tmp_path / "other").mkdir()
    (tmp_path / "other/keep.txt").write_text("mine")
    assert main(["--output", str(tmp_path / "other"), "--num-images", "5"]) == 2
    assert "holds no synthetic world" in capsys.readouterr().err
    assert (tmp_path / "other/keep.txt").read_text() == "mine"
    wrapper = Path(__file__).parents[1] / "data_prep/make_synthetic.py"
    monkeypatch.setattr(sys, "argv", [str(wrapper), "--output", str(tmp_path / "v"), "--num-images", "4"])
    with pytest.raises(SystemExit) as exit_:
        runpy.run_path(str(wrapper), run_name="__main__")
    assert exit_.value.code == 0 and (tmp_path / "v/world.json").is_file()


def test_cached_world_is_keyed_on_the_generator_version(tmp_path, monkeypatch):
    """A world cached by an older generator is not reused; a complete one is not rebuilt."""
    from beit3.jobs.demo_assets import ensure_synthetic_world, synthetic_root
    from beit3.data.synthetic import world as synthetic

    monkeypatch.setenv("BEIT3_CACHE", str(tmp_path))
    current = synthetic_root(0, 40, 32)
    assert current == str(tmp_path / f"synthetic-v{synthetic.WORLD_VERSION}-s0-n40-px32")
    monkeypatch.setattr(synthetic, "WORLD_VERSION", synthetic.WORLD_VERSION + 1)
    assert synthetic_root(0, 40, 32) != current

    done = tmp_path / "done"
    done.mkdir()
    (done / "READY").touch()
    ensure_synthetic_world(str(done), 0, 40, 32, log=lambda *_: None)
    assert os.listdir(done) == ["READY"]
    fresh = tmp_path / "fresh"
    ensure_synthetic_world(str(fresh), 0, 40, 32, log=lambda *_: None)
    meta = json.loads((fresh / "world.json").read_text())
    assert (fresh / "READY").is_file() and meta["complete"] and len(list((fresh / "images/val").glob("*"))) == 4


def test_a_stopped_world_build_is_built_again(tmp_path, monkeypatch):
    from beit3.jobs.demo_assets import BuildStopped, ensure_synthetic_world
    from beit3.data.synthetic import world as synthetic

    real = synthetic.write_texts

    def stopped(*a, **kw):  # SIGTERM halfway: the images are written, the texts not yet
        os.kill(os.getpid(), signal.SIGTERM)
        return real(*a, **kw)
    monkeypatch.setattr(synthetic, "write_texts", stopped)
    lines = []
    with pytest.raises(BuildStopped, match=r"stopped by SIGTERM while building the synthetic world in .*next run"):
        ensure_synthetic_world(str(tmp_path / "w"), 0, 20, 32, log=lines.append)
    assert not (tmp_path / "w" / "READY").exists()
    monkeypatch.undo()
    ensure_synthetic_world(str(tmp_path / "w"), 0, 20, 32, log=lines.append)
    assert (tmp_path / "w" / "READY").is_file() and json.loads((tmp_path / "w" / "world.json").read_text())["complete"]
    assert "again: its last build was stopped" in lines[-1]


@pytest.mark.usefixtures("one_thread")
def test_a_stopped_demo_tokenizer_is_not_cached_and_the_next_run_finishes_it(tmp_path, monkeypatch, capsys):
    """SIGTERM during the demo's tokenizer build stops `beit3 pretrain --data synthetic` before it
    pretrains; the next call resumes the build from its checkpoint, to the uninterrupted weights."""
    import functools

    from safetensors.torch import load_file

    import beit3.jobs.demo_assets as assets

    from beit3.cli.pretrain import main as pretrain_main
    from beit3.jobs.tokenizer import train as tokenizer_train
    small = dict(seed=0, num_images=48, tokenizer_steps=6, tokenizer_batch=8)
    reference = tmp_path / "reference"
    monkeypatch.setenv("BEIT3_CACHE", str(reference))
    uninterrupted = assets.demo_assets(**small, log=lambda *_: None).tokenizer

    monkeypatch.setenv("BEIT3_CACHE", str(tmp_path / "cache"))
    monkeypatch.setattr(assets, "demo_assets", functools.partial(assets.demo_assets, **small))
    real, calls = tokenizer_train.TokenizerRun.step, []

    def step(self, images):
        calls.append(1)
        if len(calls) == 3:
            os.kill(os.getpid(), signal.SIGTERM)
        return real(self, images)
    monkeypatch.setattr(tokenizer_train.TokenizerRun, "step", step)
    out = tmp_path / "run"
    command = ["--preset", "tiny", "--data", "synthetic", "--steps", "1", "--batch-images", "2", "--batch-texts",
               "2", "--batch-pairs", "2", "--output", str(out), "--no-tensorboard"]
    assert pretrain_main(command) == 1
    err = capsys.readouterr().err
    line = "beit3 pretrain: error: stopped by SIGTERM at step 3 of 6 while building the tiny VQ-KD visual tokenizer"
    assert line in err and "next run resumes the build" in err and "Traceback" not in err
    tok_dir = assets.demo_assets(build=False).tokenizer
    assert not os.path.exists(os.path.join(tok_dir, "READY"))
    assert sorted(os.listdir(out)) == [".lock", "run.log"]  # no pretraining started; the error is in run.log
    assert "stopped by SIGTERM at step 3 of 6" in (out / "run.log").read_text()

    assert pretrain_main(command) == 0
    assert f"resuming the build of the tiny VQ-KD visual tokenizer in {tok_dir}: it stopped at step 3 of 6" \
        in capsys.readouterr().out
    assert os.path.isfile(os.path.join(tok_dir, "READY")) and len(calls) == 3 + 3
    a, b = (load_file(os.path.join(d, "model.safetensors")) for d in (uninterrupted, tok_dir))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert json.loads((out / "final" / "meta.json").read_text())["step"] == 1
