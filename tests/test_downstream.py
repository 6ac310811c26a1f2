"""Downstream index builders and readers on tiny raw files written in the official raw formats."""
import json
import pickle
import shutil
import warnings

import numpy as np
import pytest
import torch
from PIL import Image
from torch.utils.data import DataLoader

from beit3.cli.data import downstream_main as main
from beit3.data.downstream import CaptioningDataset, CIFARDataset, ClassificationDataset, ImageLoadError, NLVR2Dataset, RetrievalDataset, VQADataset, build_all_indexes, build_answer_vocab, build_retrieval_index, read_jsonl, split_rest_val, vqa_soft_score
from beit3.data.downstream.build import build_vqa_index, nlvr2_image_prefix, scan_image_ids
from beit3.data.text_tokenizer import TextTokenizer, train_spm
from beit3.data.vqa_normalize import normalize_answer

MIN_COUNT = 2  # the tiny vocabulary: answers given as multiple_choice_answer at least twice
VQA_QUESTIONS = {  # split -> [(question_id, image_id, question, answers, multiple_choice_answer)]
    "train": [
        (101, 1, "How many dogs are there?", ["2"] * 4 + ["Two"] + ["no"] * 2 + ["black"] + ["many"] * 2, "2"),
        (102, 1, "What color is the cat?", ["black"] * 10, "black"),
        (103, 2, "Is it raining?", ["no"] * 9 + ["yes"], "no"),
        (104, 3, "What is on the table?", ["a dog."] * 3 + ["rare thing"] * 7, "dog"),
        (105, 4, "Is this image missing?", ["yes"] * 10, "yes"),  # image 4 is not on disk
        (106, 3, "What is strange?", ["zebra stripes"] * 10, "zebra stripes"),  # answer below min count
    ],
    "val": [
        (201, 10, "How many cats are there?", ["2"] * 10, "2"),
        (202, 11, "What color is the dog?", ["black"] * 10, "black"),
        (203, 12, "Is it sunny?", ["yes"] * 5 + ["no"] * 5, "yes"),
        (204, 13, "What animal is this?", ["dog"] * 10, "dog"),
        (205, 14, "Is there a car?", ["no"] * 10, "no"),
        (206, 15, "How many birds are there?", ["2"] * 10, "2"),
        (207, 10, "Is the cat sleeping?", ["yes"] * 10, "yes"),
    ],
    "test": [(301, 20, "What is the man holding?", None, None), (302, 21, "Is it night?", None, None)],
    "test-dev": [(401, 20, "What is the man holding?", None, None)],
}
VQA_IMAGE_IDS = {"train": (1, 2, 3), "val": tuple(range(10, 16)), "test": (20, 21)}
COCO_DIRS = {"train": "train2014", "val": "val2014", "test": "test2015"}
YEARS = {"train": "train2014", "val": "val2014", "test": "test2015", "test-dev": "test-dev2015"}
KARPATHY = [  # (filepath, image id, split, captions)
    ("train2014", 1, "train", ["A dog runs on the grass.", "A brown dog plays outside."]),
    ("val2014", 10, "restval", ["A cat sleeps on a bed.", "A black cat is sleeping."]),
    ("val2014", 11, "val", ["A dog sits near a car.", "The dog is black."]),
    ("val2014", 12, "val", ["People walk in the sun.", "A sunny street with people."]),
    ("val2014", 13, "test", ["A dog looks at the camera.", "A small dog.", "A dog in a room."]),
]
NLVR2 = {  # raw file -> [(identifier, directory, sentence, label)]
    "train": [("train-10-0-0", 3, "The left image contains two dogs.", "True"),
              ("train-10-0-1", 3, "There is a cat in the right image.", "False"),
              ("train-11-1-0", 5, "Both images show birds.", "True")],
    "dev": [("dev-0-0-0", None, "One image has a car.", "False")],
    "test1": [("test1-7-2-1", None, "A man holds a dog.", "True")],
}
NLVR2_DIRS = {"train": "images/train", "dev": "dev", "test1": "test1"}
FILLER = ("a the of in on with dog cat bird car man people street grass sun room bed table camera "
          "black brown small sunny sleeping runs walks sits looks holds plays two left right image "
          "images show contains both there is are how many what color animal raining night").split()


def _png(path, value, size=8):
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.full((size, size + 2, 3), value % 256, dtype=np.uint8)).save(path)


def _write_vqa_raw(raw, with_year):
    raw.mkdir(parents=True, exist_ok=True)
    for split, rows in VQA_QUESTIONS.items():
        tag = YEARS[split] if with_year else split
        qs = [{"image_id": i, "question": q, "question_id": qid} for qid, i, q, _, _ in rows]
        (raw / f"v2_OpenEnded_mscoco_{tag}_questions.json").write_text(json.dumps({"questions": qs}))
        if rows[0][3] is not None:
            anns = [{"question_id": qid, "image_id": i, "multiple_choice_answer": mca, "question_type": "what",
                     "answer_type": "other", "answers": [{"answer": a, "answer_confidence": "yes", "answer_id": k + 1}
                                                        for k, a in enumerate(ans)]}
                    for qid, i, _, ans, mca in rows]
            (raw / f"v2_mscoco_{tag}_annotations.json").write_text(json.dumps({"annotations": anns}))


def _write_world(root, coco_layout=True):
    """Raw files + images; ``coco_layout`` False gives the synthetic world's names and folders."""
    for split, ids in VQA_IMAGE_IDS.items():
        for i in ids:
            if coco_layout:
                _png(root / COCO_DIRS[split] / f"COCO_{COCO_DIRS[split]}_{i:012d}.jpg", i)
            else:
                _png(root / "images" / split / f"{i:06d}.png", i)
    _write_vqa_raw(root / "raw" / "vqa", with_year=coco_layout)
    images = [{"filepath": fp if coco_layout else f"images/{fp[:-4]}",
               "filename": f"COCO_{fp}_{i:012d}.jpg" if coco_layout else f"{i:06d}.png",
               "split": split, "imgid": k, "cocoid": i, "sentences": [{"raw": c, "sentid": 0} for c in caps]}
              for k, (fp, i, split, caps) in enumerate(KARPATHY)]
    (root / "raw" / "dataset_coco.json").write_text(json.dumps({"images": images, "dataset": "coco"}))
    (root / "raw" / "nlvr2").mkdir(parents=True)
    for name, rows in NLVR2.items():
        lines = []
        for ident, directory, sentence, label in rows:
            entry = {"identifier": ident, "sentence": sentence, "label": label, "synset": "dog", "query": "x"}
            sub = NLVR2_DIRS[name] if coco_layout else f"images/{name}"
            if directory is not None:
                entry["directory"] = directory
                sub = f"{sub}/{directory}"
            lines.append(json.dumps(entry))
            for k in (0, 1):
                _png(root / sub / f"{ident.rsplit('-', 1)[0]}-img{k}.png", 40 + k)
        (root / "raw" / "nlvr2" / f"{name}.json").write_text("\n".join(lines) + "\n")
    for split, n in (("train", 2), ("val", 1)):
        for c, cls in enumerate(("cat", "dog")):
            for k in range(n):
                _png(root / "classification" / split / cls / f"{k}.png", 100 * c + k)
    (root / "classification" / "val" / "cat" / "notes.txt").write_text("not an image")


def _corpus():
    texts = [q for rows in VQA_QUESTIONS.values() for _, _, q, _, _ in rows]
    texts += [c for *_, caps in KARPATHY for c in caps] + [s for rows in NLVR2.values() for _, _, s, _ in rows]
    rng = np.random.default_rng(0)
    texts += [" ".join(rng.choice(FILLER, size=8)).capitalize() + "." for _ in range(300)]
    return texts


@pytest.fixture(scope="module")
def spm_path(tmp_path_factory):
    d = tmp_path_factory.mktemp("spm")
    (d / "corpus.txt").write_text("\n".join(_corpus()) + "\n")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # the tiny corpus gives fewer pieces than asked
        return train_spm([str(d / "corpus.txt")], str(d / "tiny"), vocab_size=150, num_threads=1)


@pytest.fixture(scope="module")
def tok(spm_path):
    return TextTokenizer(spm_path)


@pytest.fixture(scope="module")
def world(tmp_path_factory, spm_path):
    """The official (COCO) layout, indexes built through the command line."""
    root = tmp_path_factory.mktemp("world")
    _write_world(root)
    base = ["--data-root", str(root), "--spm", spm_path]
    assert main(["vqa", "--raw", str(root / "raw" / "vqa"), *base, "--min-answer-count", str(MIN_COUNT),
                 "--rest-val-images", "2", "--seed", "0"]) == 0
    assert main(["retrieval", "--raw", str(root / "raw" / "dataset_coco.json"), *base]) == 0
    assert main(["captioning", "--raw", str(root / "raw" / "dataset_coco.json"), *base]) == 0
    assert main(["nlvr2", "--raw", str(root / "raw" / "nlvr2"), *base]) == 0
    assert main(["imagenet", "--raw", str(root / "classification"), "--data-root", str(root)]) == 0
    return root


def _by_qid(path):
    return {it["qid"]: it for it in read_jsonl(path)}


# --------------------------------------------------------------------------- answers
@pytest.mark.parametrize("raw, expected", [
    ("Two", "2"), ("dont", "don't"), ("a dog.", "dog"), ("1,000", "1000"), ("The Cat", "cat"),
    ("yes!", "yes"), ("3.5", "3.5"), ("t-shirt", "t shirt"), ("hot dog ?", "hot dog"), ("none", "0"),
    ("isnt it", "isn't it"), ("u.s.a.", "usa"), ("black and white", "black and white"), ("Ten", "10"),
])
def test_official_answer_normalisation(raw, expected):
    assert normalize_answer(raw) == expected


def test_soft_score_table():
    assert [vqa_soft_score(n) for n in range(11)] == [0.0, 0.3, 0.6, 0.9] + [1.0] * 7


def test_answer_vocabulary_min_count():
    anns = [{"multiple_choice_answer": a} for a in ["Two", "2", "2", "dog", "a dog", "cat", "yes", "Yes."]]
    assert build_answer_vocab(anns, min_count=2) == {"2": 0, "dog": 1, "yes": 2}
    assert build_answer_vocab(anns, min_count=3) == {"2": 0}
    assert build_answer_vocab(anns, min_count=1) == {"2": 0, "dog": 1, "cat": 2, "yes": 3}


# --------------------------------------------------------------------------- VQA index
def test_vqa_index(world, tok):
    labels = [json.loads(line) for line in (world / "answer2label.txt").read_text().splitlines()]
    assert labels == [{"answer": a, "label": i} for i, a in enumerate(["2", "black", "no", "dog", "yes"])]
    train = _by_qid(world / "vqa.train.jsonl")
    assert sorted(train) == [101, 102, 103, 104]  # 105: image missing, 106: answer not in vocabulary
    # 101: "2" x4 + "Two" -> 5 annotators (1.0), "no" x2 (0.6), "black" x1 (0.3), "many" out of vocabulary
    assert dict(zip(train[101]["labels"], train[101]["scores"])) == {0: 1.0, 2: 0.6, 1: 0.3}
    assert dict(zip(train[104]["labels"], train[104]["scores"])) == {3: 0.9}  # "a dog." x3
    assert train[103]["image_path"] == "train2014/COCO_train2014_000000000002.jpg"
    for qid, _, question, _, _ in VQA_QUESTIONS["train"][:4]:
        seg = train[qid]["text_segment"]
        assert tok.bos_id not in seg and tok.eos_id not in seg
        assert tok.decode([tok.bos_id, *seg, tok.eos_id]) == question
    test = _by_qid(world / "vqa.test.jsonl")
    assert sorted(test) == [301, 302] and all(it["labels"] == [] == it["scores"] for it in test.values())
    assert _by_qid(world / "vqa.test-dev.jsonl")[401]["image_path"] == "test2015/COCO_test2015_000000000020.jpg"


def test_rest_val_reproducible_and_disjoint(world):
    val = read_jsonl(world / "vqa.val.jsonl")
    trainable, rest = read_jsonl(world / "vqa.trainable_val.jsonl"), read_jsonl(world / "vqa.rest_val.jsonl")
    assert len(val) == 7 and len({it["image_path"] for it in rest}) == 2
    assert {it["image_path"] for it in rest}.isdisjoint({it["image_path"] for it in trainable})
    assert sorted(it["qid"] for it in rest + trainable) == sorted(it["qid"] for it in val)
    assert split_rest_val(val, 2, seed=0) == (trainable, rest)  # the files were drawn with seed 0
    draws = [split_rest_val(val, 2, seed=s)[1] for s in range(5)]
    assert {it["qid"] for it in split_rest_val(val[::-1], 2, seed=0)[1]} == {it["qid"] for it in rest}
    assert len({tuple(it["qid"] for it in d) for d in draws}) > 1  # the seed matters


def test_builders_are_idempotent(world, spm_path, capsys):
    before = {p.name: p.read_bytes() for p in world.glob("*.json*")}
    assert main(["vqa", "--raw", str(world / "raw" / "vqa"), "--data-root", str(world), "--spm", spm_path,
                 "--min-answer-count", str(MIN_COUNT), "--rest-val-images", "2"]) == 0
    assert main(["nlvr2", "--raw", str(world / "raw" / "nlvr2"), "--data-root", str(world), "--spm", spm_path]) == 0
    assert {p.name: p.read_bytes() for p in world.glob("*.json*")} == before
    out = capsys.readouterr().out
    assert "vqa.train.jsonl: 4 questions on 3 images" in out and "1 dropped (image not found)" in out


# --------------------------------------------------------------------------- COCO / NLVR2 / ImageNet indexes
def test_coco_retrieval_folds_restval_into_train(world, tok):
    train = read_jsonl(world / "coco_retrieval.train.jsonl")
    assert [it["image_id"] for it in train] == [0, 0, 1, 1]
    assert train[2]["image_path"] == "val2014/COCO_val2014_000000000010.jpg"  # the restval image
    assert [tok.decode([0, *it["text_segment"], 2]) for it in train] == KARPATHY[0][3] + KARPATHY[1][3]
    assert [len(read_jsonl(world / f"coco_retrieval.{s}.jsonl")) for s in ("val", "test")] == [4, 3]


def test_flickr30k_retrieval(tmp_path, tok):
    images = [{"filename": f"{k}.jpg", "split": split, "imgid": k, "sentences": [{"raw": "A dog."}] * n}
              for k, (split, n) in enumerate([("train", 2), ("test", 1), ("train", 3), ("val", 1)])]
    (tmp_path / "dataset_flickr30k.json").write_text(json.dumps({"images": images, "dataset": "flickr30k"}))
    counts = build_retrieval_index(tmp_path / "dataset_flickr30k.json", tok, tmp_path, task="flickr30k")
    assert counts == {"flickr30k.train.jsonl": 5, "flickr30k.val.jsonl": 1, "flickr30k.test.jsonl": 1}
    train = read_jsonl(tmp_path / "flickr30k.train.jsonl")
    assert [(it["image_path"], it["image_id"]) for it in train] == \
        [("flickr30k-images/0.jpg", 0)] * 2 + [("flickr30k-images/2.jpg", 1)] * 3


def test_coco_captioning_index_and_ground_truth(world):
    train = read_jsonl(world / "coco_captioning.train.jsonl")
    assert [it["image_id"] for it in train] == [1, 1, 10, 10]
    val = read_jsonl(world / "coco_captioning.val.jsonl")
    assert val == [{"image_path": f"val2014/COCO_val2014_{i:012d}.jpg", "text_segment": None, "image_id": i}
                   for i in (11, 12)]
    gt = json.loads((world / "coco_karpathy_test_gt.json").read_text())
    assert gt["images"] == [{"id": 13}]
    assert [(a["image_id"], a["caption"], a["id"]) for a in gt["annotations"]] == \
        [(13, c, k) for k, c in enumerate(KARPATHY[4][3])]


def test_nlvr2_index(world, tok):
    train = read_jsonl(world / "nlvr2.train.index.jsonl")
    assert [it["label"] for it in train] == [1, 0, 1]
    assert train[1]["image_path"] == "images/train/3/train-10-0-img0.png"
    assert train[1]["image2_path"] == "images/train/3/train-10-0-img1.png"
    assert tok.decode([0, *train[2]["text_segment"], 2]) == "Both images show birds."
    dev = read_jsonl(world / "nlvr2.dev.index.jsonl")
    assert dev == [{"image_path": "dev/dev-0-0-img0.png", "image2_path": "dev/dev-0-0-img1.png",
                    "text_segment": dev[0]["text_segment"], "label": 0, "identifier": "dev-0-0-0"}]
    assert read_jsonl(world / "nlvr2.test-P.index.jsonl")[0]["image_path"] == "test1/test1-7-2-img0.png"


def test_nlvr2_flat_train_folder_rule(tmp_path):
    entry = {"identifier": "train-5-1-0", "directory": 9}
    (tmp_path / "images" / "train").mkdir(parents=True)
    assert nlvr2_image_prefix(entry, "images/train", tmp_path) == "images/train/train-5-1"  # no 9/ folder
    (tmp_path / "images" / "train" / "9").mkdir()
    assert nlvr2_image_prefix(entry, "images/train", tmp_path) == "images/train/9/train-5-1"


def test_imagenet_index_matches_folder_reader(world):
    train = read_jsonl(world / "imagenet.train.index.jsonl")
    assert train == [{"image_path": f"classification/train/{c}/{k}.png", "label": lab}
                     for lab, c in enumerate(("cat", "dog")) for k in range(2)]
    assert len(read_jsonl(world / "imagenet.val.index.jsonl")) == 2  # notes.txt skipped
    by_index = ClassificationDataset(world, "train")
    by_folder = ClassificationDataset(world / "classification", "train")
    assert [lab for _, lab in by_index.samples] == [lab for _, lab in by_folder.samples] == [0, 0, 1, 1]
    assert by_folder.classes == ["cat", "dog"] and by_index.num_classes == 2
    a, b = by_index[3], by_folder[3]
    assert a["label"] == b["label"] == 1 and torch.equal(a["image"], b["image"])


def test_build_all_indexes_on_synthetic_layout(tmp_path, world, spm_path):
    _write_world(tmp_path, coco_layout=False)
    counts = build_all_indexes(tmp_path / "raw", tmp_path, spm_path, seed=0, min_answer_count=MIN_COUNT,
                               rest_val_images=2)
    assert counts["vqa.train.jsonl"] == 4 and counts["nlvr2.train.index.jsonl"] == 3
    assert counts["coco_retrieval.train.jsonl"] == 4 and counts["imagenet.val.index.jsonl"] == 2
    assert counts["vqa.test-dev.jsonl"] == 1 and "vqa.rest_val.jsonl" in counts
    strip = lambda items: [{k: v for k, v in it.items() if k != "image_path"} for it in items]  # noqa: E731
    for name in ("vqa.train.jsonl", "vqa.rest_val.jsonl", "answer2label.txt", "coco_captioning.train.jsonl"):
        assert strip(read_jsonl(tmp_path / name)) == strip(read_jsonl(world / name)), name
    assert read_jsonl(tmp_path / "vqa.train.jsonl")[0]["image_path"] == "images/train/000001.png"
    assert read_jsonl(tmp_path / "nlvr2.dev.index.jsonl")[0]["image_path"] == "images/dev/dev-0-0-img0.png"


def test_scan_image_ids(tmp_path):
    for name in ("COCO_val2014_000000000042.jpg", "000007.png", "train-1-0-img0.png", "notes.txt"):
        _png(tmp_path / "d" / name, 1) if name.endswith(("jpg", "png")) else (tmp_path / "d" / name).write_text("x")
    assert scan_image_ids(tmp_path, "d") == {42: "d/COCO_val2014_000000000042.jpg", 7: "d/000007.png"}
    with pytest.raises(FileNotFoundError, match="nothere"):
        scan_image_ids(tmp_path, "nothere")


def test_vqa_builder_errors_name_the_problem(tmp_path, tok):
    with pytest.raises(FileNotFoundError, match="VQA train questions"):
        build_vqa_index(tmp_path, tmp_path, tok)
    _write_vqa_raw(tmp_path / "vqa", with_year=True)
    with pytest.raises(ValueError, match="lower --min-answer-count"):
        build_vqa_index(tmp_path / "vqa", tmp_path, tok)  # nothing is answered 9 times here
    with pytest.raises(FileNotFoundError, match="--images-dir train=DIR"):
        build_vqa_index(tmp_path / "vqa", tmp_path, tok, min_answer_count=MIN_COUNT)
    (tmp_path / "train2014").mkdir()  # a folder without the right images
    with pytest.raises(FileNotFoundError, match=r"none of the images of its 6 questions is in .*train2014"):
        build_vqa_index(tmp_path / "vqa", tmp_path, tok, min_answer_count=MIN_COUNT)


# --------------------------------------------------------------------------- readers
def test_vqa_reader(world, tok):
    ds = VQADataset(world, "train", max_len=12)
    assert len(ds) == 4 + len(read_jsonl(world / "vqa.trainable_val.jsonl")) and ds.num_answers == 5
    item = ds[0]  # question 101
    seg = read_jsonl(world / "vqa.train.jsonl")[0]["text_segment"]
    n = len(seg) + 2
    assert item["image"].shape == (3, 8, 10) and item["image"].dtype == torch.float32
    assert item["text"].dtype == torch.long and item["padding_mask"].dtype == torch.bool
    assert item["text"][:n].tolist() == [tok.bos_id, *seg, tok.eos_id]
    assert item["text"][n:].eq(tok.pad_id).all() and item["padding_mask"].tolist() == [False] * n + [True] * (12 - n)
    assert item["labels"].tolist() == pytest.approx([1.0, 0.3, 0.6, 0.0, 0.0]) and item["qid"] == 101
    batch = next(iter(DataLoader(ds, batch_size=3)))
    assert batch["text"].shape == (3, 12) and batch["labels"].shape == (3, 5)
    assert batch["image"].shape == (3, 3, 8, 10)
    assert batch["qid"].tolist() == [101, 102, 103]
    test = VQADataset(world, "test", max_len=12)
    assert "labels" not in test[0] and test[1]["qid"] == 302


def test_text_truncation_keeps_bos_and_eos(world, tok):
    seg = read_jsonl(world / "vqa.train.jsonl")[0]["text_segment"]
    assert len(seg) > 3
    item = VQADataset(world, "train", max_len=5)[0]
    assert item["text"].tolist() == [tok.bos_id, *seg[:3], tok.eos_id] and not item["padding_mask"].any()


def test_retrieval_captioning_nlvr2_readers(world):
    ret = RetrievalDataset(world, "val", task="coco_retrieval", max_len=16)
    assert len(ret) == 4 and [ret[i]["image_id"] for i in range(4)] == [0, 0, 1, 1]
    assert ret[0]["text"].shape == ret[0]["padding_mask"].shape == (16,)
    cap_train, cap_val = CaptioningDataset(world, "train"), CaptioningDataset(world, "val")
    assert set(cap_train[0]) == {"image", "text", "padding_mask", "image_id"}
    assert set(cap_val[0]) == {"image", "image_id"} and cap_val[1]["image_id"] == 12
    nlvr = NLVR2Dataset(world, "train", max_len=16)
    batch = next(iter(DataLoader(nlvr, batch_size=3)))
    assert batch["image"].shape == batch["image2"].shape == (3, 3, 8, 10)
    assert batch["label"].tolist() == [1, 0, 1] and batch["identifier"][2] == "train-11-1-0"
    assert batch["image2"][0, 0, 0, 0].item() == pytest.approx(41 / 255)  # img1 was painted 41


def test_unreadable_images_are_named(world, tmp_path):
    root = tmp_path / "broken"
    shutil.copytree(world / "classification", root / "classification")
    (root / "classification" / "train" / "cat" / "0.png").write_bytes(b"not a png at all")
    (root / "imagenet.train.index.jsonl").write_text(
        json.dumps({"image_path": "classification/train/cat/0.png", "label": 0}) + "\n"
        + json.dumps({"image_path": "classification/train/cat/gone.png", "label": 0}) + "\n")
    ds = ClassificationDataset(root, "train")
    with pytest.raises(ImageLoadError, match=r"cannot decode image .*cat/0.png \(listed in .*imagenet.train"):
        ds[0]
    with pytest.raises(ImageLoadError, match=r"gone.png .*does not exist"):
        ds[1]
    with pytest.raises(FileNotFoundError, match="vqa.rest_val.jsonl"):
        VQADataset(root, "val")


# --------------------------------------------------------------------------- CIFAR
def _fake_cifar10(root, per_batch=2, n_test=3):
    rng = np.random.default_rng(0)
    d = root / "cifar-10-batches-py"
    d.mkdir(parents=True)
    batches = {}
    for name, n in [(f"data_batch_{i}", per_batch) for i in range(1, 6)] + [("test_batch", n_test)]:
        # the official batches are Python 2 pickles whose keys load as bytes
        batches[name] = {b"data": rng.integers(0, 256, (n, 3072), dtype=np.uint8),
                         b"labels": rng.integers(0, 10, n).tolist(), b"batch_label": name.encode()}
        (d / name).write_bytes(pickle.dumps(batches[name], protocol=2))
    (d / "batches.meta").write_bytes(pickle.dumps({b"label_names": [f"c{i}" for i in range(10)]}))
    return batches


def test_cifar10_pickles(tmp_path):
    batches = _fake_cifar10(tmp_path)
    train, test = CIFARDataset(tmp_path, train=True), CIFARDataset(tmp_path / "cifar-10-batches-py", train=False)
    assert len(train) == 10 and len(test) == 3 and train.classes[3] == "c3"
    row = batches["data_batch_2"][b"data"][1]  # item 3 = second image of batch 2
    item = train[3]
    assert item["label"] == batches["data_batch_2"][b"labels"][1]
    expected = torch.from_numpy(row.reshape(3, 32, 32).astype(np.float32) / 255)
    assert item["image"].shape == (3, 32, 32) and torch.allclose(item["image"], expected)


def test_cifar100_pickles(tmp_path):
    d = tmp_path / "cifar-100-python"
    d.mkdir()
    for name, n in (("train", 4), ("test", 2)):
        data = {"data": np.arange(n * 3072, dtype=np.int64).reshape(n, 3072) % 256, "fine_labels": list(range(n)),
                "coarse_labels": [0] * n}
        (d / name).write_bytes(pickle.dumps(data))
    ds = CIFARDataset(tmp_path, train=True)
    assert len(ds) == 4 and [ds[i]["label"] for i in range(4)] == [0, 1, 2, 3]
    with pytest.raises(FileNotFoundError, match="no CIFAR python batches"):
        CIFARDataset(tmp_path / "nothing")


# --------------------------------------------------------------------------- bad raw files, other forms
def test_vqa_annotation_without_answers_is_one_line(tmp_path, spm_path, capsys):
    _write_world(tmp_path)
    path = tmp_path / "raw" / "vqa" / "v2_mscoco_train2014_annotations.json"
    anns = json.loads(path.read_text())
    del anns["annotations"][2]["answers"]
    path.write_text(json.dumps(anns))
    rc = main(["vqa", "--raw", str(tmp_path / "raw" / "vqa"), "--data-root", str(tmp_path), "--spm", spm_path,
               "--min-answer-count", str(MIN_COUNT)])
    err = capsys.readouterr().err.strip()
    assert rc == 2 and len(err.splitlines()) == 1, err
    qid = anns["annotations"][2]["question_id"]
    assert err == (f"beit3 data downstream: error: {path}: annotations[2] (question_id {qid}) has no 'answers'; "
                   "a VQA v2 annotation needs question_id, multiple_choice_answer, answers")
    assert not (tmp_path / "vqa.train.jsonl").exists()


def test_nlvr2_as_one_json_array_gives_the_same_index(tmp_path, world, spm_path, capsys):
    shutil.copytree(world / "raw" / "nlvr2", tmp_path / "nlvr2")
    for name in ("train", "dev", "test1"):
        path = tmp_path / "nlvr2" / f"{name}.json"
        path.write_text(json.dumps([json.loads(line) for line in path.read_text().splitlines()], indent=1))
    assert main(["nlvr2", "--raw", str(tmp_path / "nlvr2"), "--data-root", str(world), "--spm", spm_path,
                 "--output", str(tmp_path)]) == 0
    for split in ("train", "dev", "test-P"):
        name = f"nlvr2.{split}.index.jsonl"
        assert read_jsonl(tmp_path / name) == read_jsonl(world / name), name
    entries = json.loads((tmp_path / "nlvr2" / "dev.json").read_text())
    del entries[0]["sentence"]
    (tmp_path / "nlvr2" / "dev.json").write_text(json.dumps(entries))
    capsys.readouterr()
    assert main(["nlvr2", "--raw", str(tmp_path / "nlvr2"), "--data-root", str(world), "--spm", spm_path,
                 "--output", str(tmp_path)]) == 2
    assert capsys.readouterr().err.strip() == \
        f"beit3 data downstream: error: {tmp_path / 'nlvr2' / 'dev.json'}[0]: NLVR2 entry without 'sentence'"


def test_index_files_record_and_check_their_tokenizer(tmp_path, world, spm_path, tok):
    """An index tokenized by one SentencePiece model is refused with another, naming both."""
    from beit3.data.downstream.provenance import INDEX_MANIFEST, recorded_tokenizer
    from beit3.data.text_tokenizer import TokenizerMismatchError, spm_digest
    record = recorded_tokenizer(world / "vqa.train.jsonl")
    assert record["text_tokenizer_sha256"] == spm_digest(spm_path) == tok.digest
    assert recorded_tokenizer(world / "answer2label.txt") is None  # no token ids in it
    assert recorded_tokenizer(world / "coco_captioning.val.jsonl") is None
    VQADataset(world, "train", tokenizer=tok)  # the same model: fine
    (tmp_path / "corpus.txt").write_text("\n".join(_corpus()[::-1]) + "\n")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        other = TextTokenizer(train_spm([str(tmp_path / "corpus.txt")], str(tmp_path / "other"), vocab_size=120,
                                        num_threads=1))
    with pytest.raises(TokenizerMismatchError) as e:
        VQADataset(world, "train", tokenizer=other)
    assert str(e.value) == (f"{world / 'vqa.train.jsonl'} was tokenized with {spm_path} (sha256 {tok.digest}), but "
                            f"the tokenizer here is {other.model_file} (sha256 {other.digest}); give that model as "
                            "--spm, or rebuild the index files with beit3 data downstream --spm (this one)")
    # Files without a record (unilm's, older ones) and files replaced since their record still load.
    copy = tmp_path / "copy"
    copy.mkdir()
    for name in ("nlvr2.train.index.jsonl", "nlvr2.dev.index.jsonl"):
        shutil.copy(world / name, copy / name)
    NLVR2Dataset(copy, "train", tokenizer=other)
    shutil.copy(world / INDEX_MANIFEST, copy / INDEX_MANIFEST)
    with pytest.raises(TokenizerMismatchError):
        NLVR2Dataset(copy, "train", tokenizer=other)
    with open(copy / "nlvr2.train.index.jsonl", "a") as f:
        f.write("\n")
    NLVR2Dataset(copy, "train", tokenizer=other)


def test_cifar_from_an_undecodable_image_is_one_line(tmp_path, world, capsys):
    from beit3.cli.data import cifar_main
    shutil.copytree(world / "classification", tmp_path / "src")
    bad = tmp_path / "src" / "train" / "dog" / "broken.png"
    bad.write_bytes(b"\x89PNG\r\n\x1a\n not really")
    assert cifar_main(["--src", str(tmp_path / "src"), "--output", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith(f"beit3 data cifar: error: {bad} (19 bytes): not a decodable image (") and \
        len(err.splitlines()) == 1, err
