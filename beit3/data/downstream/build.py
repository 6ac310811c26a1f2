"""Builders of the unilm/beit3 downstream index files from the public raw annotation files.

Every index is JSON lines, one example a line, written into the data root next to the images
(image paths are relative to it), exactly as unilm/beit3 ``datasets.py`` writes them:

- VQAv2 ``vqa.{train,val,trainable_val,rest_val,test,test-dev}.jsonl`` ``{image_path,
  text_segment, labels, scores, qid}`` and ``answer2label.txt`` (``{"answer", "label"}`` lines);
- retrieval ``coco_retrieval.{train,val,test}.jsonl`` / ``flickr30k.{...}.jsonl`` ``{image_path,
  text_segment, image_id}``, one line per caption, ``image_id`` the image's rank in its split;
- captioning ``coco_captioning.{train,val,test}.jsonl`` ``{image_path, text_segment, image_id}``
  (``text_segment`` null for val/test: one line per image) plus ``coco_karpathy_{val,test}_gt.json``,
  and ``nocaps.{val,test}.jsonl``;
- NLVR2 ``nlvr2.{train,dev,test-P}.index.jsonl`` ``{image_path, image2_path, text_segment, label,
  identifier}``; ImageNet ``imagenet.{train,val}.index.jsonl`` ``{image_path, label}``.

``text_segment`` holds sentencepiece ids *without* ``<s>``/``</s>`` (``tokenize`` +
``convert_tokens_to_ids``); the readers add them. Which SentencePiece model wrote them is recorded
in ``index_manifest.json`` beside the files (``provenance``) and checked when they are read. Outputs are deterministic, so re-running a
builder rewrites identical files.
"""
from __future__ import annotations

import json
import os
import random
import re
from collections import Counter
from collections.abc import Iterable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

from torchvision.datasets.folder import IMG_EXTENSIONS

from beit3.data.downstream.provenance import record_tokenizer
from beit3.data.text_tokenizer import TextTokenizer
from beit3.data.vqa_normalize import normalize_answer

VQA_SPLITS = ("train", "val", "test", "test-dev")
# unilm/beit3 VQAv2Dataset.get_score: soft target from the number of annotators giving the answer.
VQA_SOFT_SCORES = (0.0, 0.3, 0.6, 0.9)
# Where each VQA split's images are looked for, first existing wins: COCO's own folders, then the
# same under images/, then images/{train,val,test} (test-dev questions are on test2015 images).
VQA_IMAGE_DIR_CANDIDATES = {
    "train": ("train2014", "images/train2014", "images/train"),
    "val": ("val2014", "images/val2014", "images/val"),
    "test": ("test2015", "images/test2015", "images/test"),
    "test-dev": ("test2015", "images/test2015", "images/test"),
}
FLICKR_IMAGE_DIR = "flickr30k-images"  # unilm/beit3's folder for the Flickr30k images
KARPATHY_SPLITS = {"train": ("train", "restval"), "val": ("val",), "test": ("test",)}
# NLVR2 raw file -> index split name, and the official image folder of each (unilm/beit3
# NLVR2Dataset.make_dataset_index: train images sit in images/train/{directory}/).
NLVR2_SPLITS = {"train": "train", "dev": "dev", "test1": "test-P"}
NLVR2_IMAGE_DIR_CANDIDATES = {"train": ("images/train",), "dev": ("dev", "images/dev"),
                              "test1": ("test1", "images/test1")}


# --------------------------------------------------------------------------- shared helpers
def write_jsonl(items: Iterable[Mapping[str, Any]], path: str | os.PathLike) -> int:
    """Write one JSON object a line, atomically (a crash never leaves half an index); returns the count."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    n = 0
    with open(tmp, "w", encoding="utf-8") as f:
        for item in items:
            f.write(json.dumps(item) + "\n")
            n += 1
    os.replace(tmp, path)
    return n


def write_index(items: Iterable[Mapping[str, Any]], path: str | os.PathLike,
                tokenizer: TextTokenizer | None = None) -> int:
    """``write_jsonl``, then record which tokenizer wrote the file's ``text_segment`` ids (None:
    it holds none) in the folder's ``index_manifest.json`` (``provenance``)."""
    n = write_jsonl(items, path)
    record_tokenizer(path, tokenizer)
    return n


def write_json(obj: Any, path: str | os.PathLike) -> None:
    """``json.dump`` atomically."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(obj), encoding="utf-8")
    os.replace(tmp, path)


def read_jsonl(path: str | os.PathLike) -> list[dict]:
    """Items of a JSON-lines index; a bad line is an error naming the file and line."""
    return [item for _, item in _json_lines(path)]


def read_records(path: str | os.PathLike) -> list[tuple[str, Any]]:
    """``(where, entry)`` of a file of JSON lines or of one JSON array (NLVR2 is published as
    lines, some copies hold an array); ``where`` is ``path:line`` or ``path[i]``."""
    with open(path, "rb") as f:
        head = f.read(4096).lstrip()
    if head.startswith(b"["):
        entries = load_json(path)
        if not isinstance(entries, list):  # "[" starts a list, but be exact about the message
            raise ValueError(f"{path}: expected a JSON array or JSON lines")
        return [(f"{path}[{i}]", e) for i, e in enumerate(entries)]
    return [(f"{path}:{lineno}", item) for lineno, item in _json_lines(path)]


def _json_lines(path: str | os.PathLike) -> Iterator[tuple[int, Any]]:
    with open(path, "rb") as f:
        for lineno, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                yield lineno, json.loads(line)
            except json.JSONDecodeError as e:
                raise ValueError(f"{path}:{lineno}: not a JSON line ({e})") from None
            except UnicodeDecodeError as e:
                raise ValueError(f"{path}:{lineno}: not UTF-8 text (byte {e.start} of the line)") from None


def load_json(path: str | os.PathLike, key: str | None = None) -> Any:
    """``json.load`` with errors that name the file; with ``key`` the file must be an object holding it."""
    try:
        with open(path, encoding="utf-8") as f:
            data = json.load(f)
    except FileNotFoundError:
        raise FileNotFoundError(f"raw annotation file {path} does not exist") from None
    except json.JSONDecodeError as e:
        raise ValueError(f"{path} is not valid JSON: {e}") from e
    except UnicodeDecodeError as e:
        raise ValueError(f"{path} is not UTF-8 text (byte {e.start})") from None
    if key is not None and not (isinstance(data, dict) and key in data):
        raise ValueError(f"{path}: expected a JSON object with a {key!r} field")
    return data if key is None else data[key]


def text_segment(tokenizer: TextTokenizer, text: str) -> list[int]:
    """Token ids of ``text`` without ``<s>``/``</s>``, as the official index files store them."""
    return tokenizer.encode(text)[1:-1]


def _rel(path: str | os.PathLike, data_root: str | os.PathLike) -> str:
    rel = os.path.relpath(path, data_root)
    if rel.startswith(".."):
        raise ValueError(f"{path} is not under the data root {data_root}; index image paths are "
                         "stored relative to it")
    return Path(rel).as_posix()


def first_existing_dir(data_root: str | os.PathLike, candidates: Sequence[str]) -> str | None:
    """The first of ``candidates`` (relative to ``data_root``) that is a directory, else None."""
    return next((c for c in candidates if os.path.isdir(os.path.join(data_root, c))), None)


def scan_image_ids(data_root: str | os.PathLike, rel_dir: str) -> dict[int, str]:
    """``{image_id: relative path}`` of the images in ``data_root/rel_dir``.

    As unilm/beit3 does for COCO, the id is the number after the last ``_`` of the file stem
    (``COCO_train2014_000000000009.jpg`` -> 9), or the whole stem when it is a number
    (``000042.png`` -> 42); other files are ignored.
    """
    folder = os.path.join(data_root, rel_dir)
    if not os.path.isdir(folder):
        raise FileNotFoundError(f"image folder {folder} does not exist")
    found: dict[int, str] = {}
    for name in sorted(os.listdir(folder)):
        stem, ext = os.path.splitext(name)
        tail = stem.rsplit("_", 1)[-1]
        if ext.lower() not in IMG_EXTENSIONS or not tail.isdigit():
            continue
        path = f"{Path(rel_dir).as_posix()}/{name}"
        if found.setdefault(int(tail), path) != path:
            raise ValueError(f"{folder}: images {found[int(tail)]} and {path} both have id {int(tail)}")
    return found


# --------------------------------------------------------------------------- VQAv2
def vqa_soft_score(count: int) -> float:
    """Soft target of an answer given by ``count`` of the annotators: 0, 0.3, 0.6, 0.9, then 1.0."""
    return VQA_SOFT_SCORES[count] if count < len(VQA_SOFT_SCORES) else 1.0


def build_answer_vocab(annotations: Iterable[Mapping[str, Any]], min_count: int = 9) -> dict[str, int]:
    """``{answer: label}`` over the normalised ``multiple_choice_answer`` seen at least ``min_count``
    times, labelled in order of first appearance (as unilm/beit3; 3129 answers on train2014+val2014)."""
    counts = Counter(normalize_answer(a["multiple_choice_answer"]) for a in annotations)
    return {ans: i for i, ans in enumerate(a for a, n in counts.items() if n >= min_count)}


def answer_targets(answers: Iterable[Mapping[str, Any]],
                   ans2label: Mapping[str, int]) -> tuple[list[int], list[float]]:
    """``(labels, scores)`` of one question from its annotators' answers (answers outside the
    vocabulary dropped). Annotator answers are normalised too, so "Two" counts for "2"; unilm/beit3
    counts them raw, which on the real (already cleaned) VQA answers makes no difference."""
    counts = Counter(normalize_answer(a["answer"]) for a in answers)
    labels = [ans2label[a] for a in counts if a in ans2label]
    return labels, [vqa_soft_score(counts[a]) for a in counts if a in ans2label]


def split_rest_val(items: Sequence[dict], num_images: int, seed: int) -> tuple[list[dict], list[dict]]:
    """Split val items by image into ``(trainable_val, rest_val)``; ``rest_val`` holds the items of
    ``num_images`` images drawn by ``seed`` (unilm/beit3, after ViLT, holds out 1000 images)."""
    images = sorted({it["image_path"] for it in items})
    random.Random(seed).shuffle(images)
    held_out = set(images[:num_images])
    return ([it for it in items if it["image_path"] not in held_out],
            [it for it in items if it["image_path"] in held_out])


def find_vqa_files(raw_dir: str | os.PathLike) -> dict[str, dict[str, Path]]:
    """``{split: {"questions": path, "annotations": path?}}`` for the VQA files in ``raw_dir``.

    Accepts the official names (``v2_OpenEnded_mscoco_train2014_questions.json``,
    ``v2_mscoco_val2014_annotations.json``, ``..._test-dev2015_...``) and the same without the year.
    """
    found: dict[str, dict[str, Path]] = {}
    for split in VQA_SPLITS:
        for kind, pattern in (("questions", f"v2_OpenEnded_mscoco_{split}(\\d{{4}})?_questions\\.json"),
                              ("annotations", f"v2_mscoco_{split}(\\d{{4}})?_annotations\\.json")):
            hits = sorted(p for p in Path(raw_dir).glob("*.json") if re.fullmatch(pattern, p.name))
            if len(hits) > 1:
                raise ValueError(f"{raw_dir}: several VQA {split} {kind} files: {[h.name for h in hits]}")
            if hits:
                found.setdefault(split, {})[kind] = hits[0]
    return found


def _vqa_split_items(questions: list[dict], annotations: list[dict] | None, images: Mapping[int, str],
                     tokenizer: TextTokenizer, ans2label: Mapping[str, int], name: str) -> tuple[list[dict], Counter]:
    by_qid = {a["question_id"]: a for a in annotations or ()}
    qids = {q["question_id"] for q in questions}
    unknown, unanswered = set(by_qid) - qids, (qids - set(by_qid)) if annotations is not None else set()
    if unknown or unanswered:
        raise ValueError(f"VQA {name}: the questions and annotations files disagree: annotations for "
                         f"unknown question ids {sorted(unknown)[:5]}, questions without annotations "
                         f"{sorted(unanswered)[:5]}")
    items, dropped = [], Counter()
    for q in questions:
        if q["image_id"] not in images:
            dropped["image not found"] += 1
            continue
        labels, scores = [], []
        if annotations is not None:
            labels, scores = answer_targets(by_qid[q["question_id"]]["answers"], ans2label)
            if not labels:  # unilm/beit3 drops training questions with no answer in the vocabulary
                dropped["no answer in the vocabulary"] += 1
                continue
        items.append({"image_path": images[q["image_id"]], "text_segment": text_segment(tokenizer, q["question"]),
                      "labels": labels, "scores": scores, "qid": q["question_id"]})
    return items, dropped


VQA_QUESTION_KEYS = ("question_id", "image_id", "question")
VQA_ANNOTATION_KEYS = ("question_id", "multiple_choice_answer", "answers")


def _vqa_entries(path: Path, key: str, required: Sequence[str]) -> list[dict]:
    """The ``key`` list of a VQA questions or annotations file, each entry holding ``required``
    (and, for annotations, a list of ``{"answer": ...}``); otherwise an error naming the entry."""
    entries = load_json(path, key)
    if not isinstance(entries, list):
        raise ValueError(f"{path}: {key!r} is a {type(entries).__name__}, not a list")
    for i, entry in enumerate(entries):
        where = f"{path}: {key}[{i}]"
        if not isinstance(entry, dict):
            raise ValueError(f"{where} is a {type(entry).__name__}, not an object")
        missing = [k for k in required if k not in entry]
        if missing:
            qid = f" (question_id {entry['question_id']})" if "question_id" in entry else ""
            raise ValueError(f"{where}{qid} has no {', '.join(repr(k) for k in missing)}; a VQA v2 {key[:-1]} "
                             f"needs {', '.join(required)}")
        answers = entry.get("answers", [])
        if not isinstance(answers, list) or not all(isinstance(a, dict) and "answer" in a for a in answers):
            raise ValueError(f"{where} (question_id {entry['question_id']}): 'answers' must be a list of "
                             "{'answer': ...} objects")
    return entries


def _vqa_image_dir(split: str, data_root: str | os.PathLike, image_dirs: Mapping[str, str] | None) -> str:
    rel_dir = (image_dirs or {}).get(split) or first_existing_dir(data_root, VQA_IMAGE_DIR_CANDIDATES[split])
    if rel_dir is None:
        raise FileNotFoundError(f"no image folder for VQA {split} under {data_root}; tried "
                                f"{VQA_IMAGE_DIR_CANDIDATES[split]} (set it with --images-dir {split}=DIR)")
    return rel_dir


def build_vqa_index(raw_dir: str | os.PathLike, data_root: str | os.PathLike, tokenizer: TextTokenizer,
                    output_dir: str | os.PathLike | None = None, image_dirs: Mapping[str, str] | None = None,
                    min_answer_count: int = 9, rest_val_images: int = 1000, seed: int = 0) -> dict[str, int]:
    """Write the VQAv2 index files and ``answer2label.txt``; returns ``{file name: items}``.

    ``image_dirs`` maps a split to its image folder relative to ``data_root`` (default: the first
    existing of ``VQA_IMAGE_DIR_CANDIDATES``); questions whose image is not there are dropped and
    counted, as unilm/beit3 indexes only the images it finds. train and val files are required,
    test and test-dev are indexed when present.
    """
    files = find_vqa_files(raw_dir)
    for split in ("train", "val"):
        if set(files.get(split, {})) != {"questions", "annotations"}:
            raise FileNotFoundError(f"{raw_dir}: need the VQA {split} questions and annotations files "
                                    f"(v2_OpenEnded_mscoco_{split}2014_questions.json, "
                                    f"v2_mscoco_{split}2014_annotations.json)")
    annotations = {s: _vqa_entries(files[s]["annotations"], "annotations", VQA_ANNOTATION_KEYS)
                   for s in ("train", "val")}
    ans2label = build_answer_vocab(annotations["train"] + annotations["val"], min_answer_count)
    if not ans2label:
        raise ValueError(f"{raw_dir}: no answer is the multiple_choice_answer of >= {min_answer_count} "
                         "questions; lower --min-answer-count for a small data set")
    out, counts = Path(output_dir or data_root), {}
    split_items = {}
    for split in (s for s in VQA_SPLITS if "questions" in files.get(s, {})):
        rel_dir = _vqa_image_dir(split, data_root, image_dirs)
        questions = _vqa_entries(files[split]["questions"], "questions", VQA_QUESTION_KEYS)
        items, dropped = _vqa_split_items(questions, annotations.get(split), scan_image_ids(data_root, rel_dir),
                                          tokenizer, ans2label, split)
        if questions and dropped["image not found"] == len(questions):
            raise FileNotFoundError(f"VQA {split}: none of the images of its {len(questions)} questions is in "
                                    f"{Path(data_root, rel_dir)} (set the folder with --images-dir {split}=DIR)")
        counts[f"vqa.{split}.jsonl"] = write_index(items, out / f"vqa.{split}.jsonl", tokenizer)
        print(f"vqa.{split}.jsonl: {len(items)} questions on {len({i['image_path'] for i in items})} "
              f"images from {rel_dir}" + "".join(f"; {n} dropped ({why})" for why, n in dropped.items()))
        split_items[split] = items
    trainable, rest = split_rest_val(split_items["val"], rest_val_images, seed)
    counts["vqa.trainable_val.jsonl"] = write_index(trainable, out / "vqa.trainable_val.jsonl", tokenizer)
    counts["vqa.rest_val.jsonl"] = write_index(rest, out / "vqa.rest_val.jsonl", tokenizer)
    counts["answer2label.txt"] = write_jsonl(({"answer": a, "label": i} for a, i in ans2label.items()),
                                             out / "answer2label.txt")
    print(f"vqa: {len(ans2label)} answers seen >= {min_answer_count} times; rest_val {len(rest)} questions "
          f"({min(rest_val_images, len({i['image_path'] for i in split_items['val']}))} images, seed {seed}), "
          f"trainable_val {len(trainable)}")
    return counts


# --------------------------------------------------------------------------- Karpathy splits
def _karpathy_image_path(image: Mapping[str, Any], image_dir: str | None) -> str:
    folder = image_dir if image_dir is not None else image.get("filepath", "")
    return Path(folder, image["filename"]).as_posix()


def _karpathy_images(karpathy_json: str | os.PathLike) -> list[dict]:
    images = load_json(karpathy_json, "images")
    for i, im in enumerate(images):
        if not {"filename", "split", "sentences"} <= set(im):
            raise ValueError(f"{karpathy_json}: images[{i}] needs 'filename', 'split' and 'sentences', "
                             f"got keys {sorted(im)}")
    return images


def build_retrieval_index(karpathy_json: str | os.PathLike, tokenizer: TextTokenizer,
                          output_dir: str | os.PathLike, task: str = "coco_retrieval",
                          image_dir: str | None = None) -> dict[str, int]:
    """Write ``{task}.{train,val,test}.jsonl`` from a Karpathy split JSON (restval folded into train).

    One item per caption; ``image_id`` is the image's rank within the split, as unilm/beit3 uses
    it to find the positive pairs. Image paths are ``image_dir/filename`` when ``image_dir`` is
    given, else ``filepath/filename`` (COCO); Flickr30k entries, which have no ``filepath``,
    default to ``flickr30k-images/``.
    """
    images, counts = _karpathy_images(karpathy_json), {}
    if image_dir is None and task == "flickr30k" and not any("filepath" in im for im in images):
        image_dir = FLICKR_IMAGE_DIR
    for name, splits in KARPATHY_SPLITS.items():
        items, paths = [], {}
        for im in (im for im in images if im["split"] in splits):
            path = _karpathy_image_path(im, image_dir)
            rank = paths.setdefault(path, len(paths))
            items += [{"image_path": path, "text_segment": text_segment(tokenizer, s["raw"]), "image_id": rank}
                      for s in im["sentences"]]
        counts[f"{task}.{name}.jsonl"] = write_index(items, Path(output_dir) / f"{task}.{name}.jsonl", tokenizer)
        print(f"{task}.{name}.jsonl: {len(items)} captions of {len(paths)} images")
    return counts


def build_captioning_index(karpathy_json: str | os.PathLike, tokenizer: TextTokenizer,
                           output_dir: str | os.PathLike, image_dir: str | None = None) -> dict[str, int]:
    """Write ``coco_captioning.{train,val,test}.jsonl`` and the ``coco_karpathy_{val,test}_gt.json``
    references (COCO caption format). ``image_id`` is ``cocoid`` (``imgid`` when absent)."""
    images, counts, out = _karpathy_images(karpathy_json), {}, Path(output_dir)
    for name, splits in KARPATHY_SPLITS.items():
        chosen = [im for im in images if im["split"] in splits]
        if name == "train":
            items = [{"image_path": _karpathy_image_path(im, image_dir),
                      "text_segment": text_segment(tokenizer, s["raw"]), "image_id": _image_id(im)}
                     for im in chosen for s in im["sentences"]]
        else:
            items = [{"image_path": _karpathy_image_path(im, image_dir), "text_segment": None,
                      "image_id": _image_id(im)} for im in chosen]
            gt = out / f"coco_karpathy_{name}_gt.json"
            counts[gt.name] = _write_caption_gt(chosen, gt)
        counts[f"coco_captioning.{name}.jsonl"] = write_index(items, out / f"coco_captioning.{name}.jsonl",
                                                              tokenizer if name == "train" else None)
        print(f"coco_captioning.{name}.jsonl: {len(items)} items of {len(chosen)} images")
    return counts


def _image_id(image: Mapping[str, Any]) -> int:
    return image["cocoid"] if "cocoid" in image else image["imgid"]


def _write_caption_gt(images: Sequence[Mapping[str, Any]], path: Path) -> int:
    anns = [{"image_id": _image_id(im), "caption": s["raw"]} for im in images for s in im["sentences"]]
    write_json({"annotations": [dict(a, id=i) for i, a in enumerate(anns)],
                "images": [{"id": _image_id(im)} for im in images]}, path)
    return len(anns)


def build_nocaps_index(nocaps_json: str | os.PathLike, split: str, output_dir: str | os.PathLike) -> dict[str, int]:
    """Write ``nocaps.{split}.jsonl`` (``image_path`` = ``{split}/{file_name}``, ``image_id`` = ``id``)
    from ``nocaps_val_4500_captions.json`` / ``nocaps_test_image_info.json``; with the val captions
    also ``nocaps_val_gt.json``."""
    data = load_json(nocaps_json)
    if not isinstance(data, dict) or not isinstance(data.get("images"), list):
        raise ValueError(f"{nocaps_json}: expected the nocaps JSON object with an 'images' list")
    items = [{"image_path": f"{split}/{im['file_name']}", "text_segment": None, "image_id": im["id"]}
             for im in data["images"]]
    out, counts = Path(output_dir), {}
    counts[f"nocaps.{split}.jsonl"] = write_index(items, out / f"nocaps.{split}.jsonl")
    if data.get("annotations"):
        gt = {"annotations": data["annotations"], "images": [{"id": im["id"]} for im in data["images"]]}
        write_json(gt, out / f"nocaps_{split}_gt.json")
        counts[f"nocaps_{split}_gt.json"] = len(data["annotations"])
    print(f"nocaps.{split}.jsonl: {len(items)} images")
    return counts


# --------------------------------------------------------------------------- NLVR2
def nlvr2_image_prefix(entry: Mapping[str, Any], base: str, data_root: str | os.PathLike) -> str:
    """``{base}[/{directory}]/{identifier without its last field}``: the official train layout keeps
    images in numbered sub-folders (``images/train/17/``), named by the entry's ``directory``;
    the sub-folder is used when the entry names one and it exists (or nothing exists yet)."""
    name = entry["identifier"].rsplit("-", 1)[0]  # train-10171-0-0 -> train-10171-0
    if "directory" in entry:
        sub = f"{base}/{entry['directory']}"
        if os.path.isdir(os.path.join(data_root, sub)) or not os.path.isdir(os.path.join(data_root, base)):
            return f"{sub}/{name}"
    return f"{base}/{name}"


NLVR2_KEYS = ("identifier", "sentence", "label")


def _check_nlvr2_entry(entry: Any, where: str) -> None:
    if not isinstance(entry, dict):
        raise ValueError(f"{where}: an NLVR2 entry must be an object, got a {type(entry).__name__}")
    missing = [k for k in NLVR2_KEYS if k not in entry]
    if missing:
        raise ValueError(f"{where}: NLVR2 entry without {', '.join(repr(k) for k in missing)}")
    if not isinstance(entry["identifier"], str) or not isinstance(entry["sentence"], str):
        raise ValueError(f"{where}: NLVR2 'identifier' and 'sentence' must be strings")


def _nlvr2_label(entry: Mapping[str, Any], where: str) -> int:
    label = entry.get("label")
    if label in ("True", "true", True):
        return 1
    if label in ("False", "false", False):
        return 0
    raise ValueError(f"{where}: NLVR2 label must be 'True' or 'False', got {label!r}")


def build_nlvr2_index(raw_dir: str | os.PathLike, data_root: str | os.PathLike, tokenizer: TextTokenizer,
                      output_dir: str | os.PathLike | None = None) -> dict[str, int]:
    """Write ``nlvr2.{train,dev,test-P}.index.jsonl`` from the NLVR2 JSON-lines ``train.json``,
    ``dev.json``, ``test1.json`` in ``raw_dir`` (or its ``nlvr2/data/``); missing files are skipped.

    Image folders (relative to ``data_root``), first existing wins: train ``images/train``, dev
    ``dev`` then ``images/dev``, test1 ``test1`` then ``images/test1``; the pair's files are
    ``{prefix}-img0.png`` and ``{prefix}-img1.png`` (see :func:`nlvr2_image_prefix`).
    """
    raw = Path(raw_dir)
    if not (raw / "train.json").exists() and (raw / "nlvr2" / "data").is_dir():
        raw = raw / "nlvr2" / "data"  # a clone of the official lil-lab/nlvr repository
    counts = {}
    for raw_name, split in NLVR2_SPLITS.items():
        path = raw / f"{raw_name}.json"
        if not path.exists():
            continue
        candidates = NLVR2_IMAGE_DIR_CANDIDATES[raw_name]
        base = first_existing_dir(data_root, candidates) or candidates[0]
        items = []
        for where, entry in read_records(path):
            _check_nlvr2_entry(entry, where)
            prefix = nlvr2_image_prefix(entry, base, data_root)
            items.append({"image_path": f"{prefix}-img0.png", "image2_path": f"{prefix}-img1.png",
                          "text_segment": text_segment(tokenizer, entry["sentence"]),
                          "label": _nlvr2_label(entry, where), "identifier": entry["identifier"]})
        name = f"nlvr2.{split}.index.jsonl"
        counts[name] = write_index(items, Path(output_dir or data_root) / name, tokenizer)
        print(f"{name}: {len(items)} pairs, images under {base}")
    if not counts:
        raise FileNotFoundError(f"{raw_dir}: no NLVR2 train.json, dev.json or test1.json")
    return counts


# --------------------------------------------------------------------------- ImageNet
def find_classes(folder: str | os.PathLike) -> list[str]:
    """Sorted class sub-folder names (the order ``torchvision.datasets.ImageFolder`` labels them in)."""
    if not os.path.isdir(folder):
        raise FileNotFoundError(f"class folder tree {folder} does not exist")
    classes = sorted(e.name for e in os.scandir(folder) if e.is_dir())
    if not classes:
        raise ValueError(f"{folder} has no class sub-folders (expected {folder}/<class>/<image>)")
    return classes


def build_imagenet_index(train_dir: str | os.PathLike, val_dir: str | os.PathLike,
                         data_root: str | os.PathLike, output_dir: str | os.PathLike | None = None) -> dict[str, int]:
    """Write ``imagenet.{train,val}.index.jsonl`` ``{image_path, label}`` from two ImageFolder trees
    (labels from the sorted train class names; image files only, recursively, sorted)."""
    classes = find_classes(train_dir)
    counts = {}
    for split, folder in (("train", train_dir), ("val", val_dir)):
        items = []
        for label, cls in enumerate(classes):
            for root, _, names in sorted(os.walk(os.path.join(folder, cls), followlinks=True)):
                items += [{"image_path": _rel(os.path.join(root, n), data_root), "label": label}
                          for n in sorted(names) if os.path.splitext(n)[1].lower() in IMG_EXTENSIONS]
        name = f"imagenet.{split}.index.jsonl"
        counts[name] = write_index(items, Path(output_dir or data_root) / name)
        print(f"{name}: {len(items)} images in {len(classes)} classes")
    return counts
