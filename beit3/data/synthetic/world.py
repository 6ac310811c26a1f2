"""A small synthetic world of coloured shapes, written in the public raw formats of the BEiT-3 tasks.

Each picture shows 1-3 flat-coloured shapes (circle, square, triangle; six colours; small or large)
that never overlap, on a muted noise, stripes or gradient background. Every text is computed from
the scene, so captions, answers and labels can be learnt from the pixels: "a red circle to the left
of a small blue square", "two green triangles", "how many squares are there?" -> "2". The same seed
gives byte-identical files; ``make_synthetic_world`` takes seconds on a CPU.

Layout of ``output_dir``::

    images/{train,val,test}/NNNNNN.png     the pictures (NNNNNN = image id, 80/10/10 split;
                                           .jpg with image_format="jpg"); width and height
                                           drawn in [image_size, max_image_size]
    scenes.json                            scene metadata: per image its split, file, size,
                                           background, class label and objects (shape, color,
                                           size, box [x0, y0, x1, y1], center: a pixel inside
                                           the shape); the NLVR2 image pairs likewise
    raw/vqa/v2_OpenEnded_mscoco_{split}_questions.json, v2_mscoco_{split}_annotations.json
                                           VQA v2 format; 10 answers a question, a few annotators
                                           disagree or write "Two"/"yes." (soft scores, answer
                                           normalisation). Test annotations exist here too,
                                           unlike the real VQA test set.
    raw/dataset_coco.json                  Karpathy-split format (retrieval and captioning),
                                           filepath images/{split}, cocoid = image id
    raw/nlvr2/{train,dev,test1}.json       NLVR2 JSON lines as in the real data: a set is one
                                           statement (drawn uniformly, whatever the images) with
                                           two image pairs, one it is true of and one it is false
                                           of, so the text alone scores 0.5; identifier
                                           {split}-{set}-{pair}-0, the pair's images
                                           images/train/{directory}/{split}-{set}-{pair}-img{0,1}.png
                                           (train) and images/{dev,test1}/... (official layout)
    classification/{train,val}/{class}/NNNNNN.png
                                           ImageFolder tree; class = "{color}_{shape}" of the
                                           largest object (18 classes, cycled so that every split
                                           of >= 18 images holds all of them)
    corpus.txt                             text corpus: captions of unrendered scenes and facts
                                           ("a triangle has three corners")
    pretrain_pairs.jsonl                   {"image", "caption"} for every train caption
    spm/synthetic.model                    SentencePiece BPE (XLM-R id layout) trained on the
                                           corpus and every text of the world: a piece a word,
                                           a few hundred pieces
    shards/{images,texts,pairs}-NNNNNN.tar, shards/manifest.json
                                           pretraining shards: images/train (NLVR2 train pairs
                                           included), corpus.txt, pretrain_pairs.jsonl
    ADEChallengeData2016/                  per-pixel class masks of the train and val pictures in
                                           ADE20K's layout (``segmentation.py``): 0 background,
                                           1..18 the {color}_{shape} classes
    world.json                             the arguments and the counts ("complete": false while
                                           it is being written)

Index files for fine-tuning come from ``beit3.data.downstream.build_all_indexes(output_dir/raw,
output_dir, spm)`` (use a small ``min_answer_count`` for small worlds).
"""
from __future__ import annotations

import json
import math
import os
import shutil
import warnings
from dataclasses import asdict, dataclass
from pathlib import Path

from PIL import Image

try:  # needs protobuf (a tensorboard dependency); without it the model keeps its training paths
    from sentencepiece import sentencepiece_model_pb2
except ImportError:
    sentencepiece_model_pb2 = None

from beit3.data.shards import write_shards
from beit3.data.text_tokenizer import train_spm
from beit3.data.synthetic.language import annotator_answers, ask, corpus_sentences, describe, nlvr2_set
from beit3.data.synthetic.render import encode_image, render_scene
from beit3.data.synthetic.scenes import CLASSES, COLORS, Scene, sample_scene, scene_size, seeded_rng
from beit3.data.synthetic.segmentation import FOLDER as SEGMENTATION_FOLDER, write_segmentation

WORLD_VERSION = 2  # bump when the generated content changes: cached worlds are keyed on it
SPLITS = ("train", "val", "test")
NLVR2_SPLITS = {"train": "train", "val": "dev", "test": "test1"}
SPM_VOCAB_SIZE = 400  # soft limit: the world's ~100 words support a few hundred pieces
# BPE: on a corpus this small and repetitive sentencepiece's unigram keeps ~100 pieces and splits
# common words ("left" -> "le" "f" "t"); BPE keeps every word whole. (BEiT-3's beit3.spm is unigram.)
SPM_MODEL_TYPE = "bpe"


@dataclass
class WorldImage:
    image_id: int
    split: str
    path: str  # relative to the world folder
    scene: Scene
    captions: list[str]
    questions: list[tuple[str, str, str, str]]


@dataclass
class WorldConfig:
    num_images: int = 2000
    image_size: int = 64  # shortest image side
    max_image_size: int | None = None  # longest; default 1.5 x image_size
    seed: int = 0
    captions_per_image: int = 5
    questions_per_image: int = 4
    # image pairs, two a set (a true and a false one; an odd count drops its last); default num_images // 4
    num_nlvr2_pairs: int | None = None
    num_corpus_lines: int | None = None  # default 4 x num_images
    image_format: str = "png"  # or "jpg"
    shards_per_kind: int = 32  # enough shards for ranks x dataloader workers to each read their own
    spm_vocab_size: int = SPM_VOCAB_SIZE

    def __post_init__(self):
        self.max_image_size = self.max_image_size or int(round(1.5 * self.image_size))
        self.num_nlvr2_pairs = self.num_nlvr2_pairs or max(6, self.num_images // 4)
        self.num_corpus_lines = self.num_corpus_lines or 4 * self.num_images
        if self.num_images < 3 or self.num_nlvr2_pairs < 6:
            raise ValueError(f"need >= 3 images (one per split) and >= 6 NLVR2 pairs (a set of two per "
                             f"split), got {self.num_images}, {self.num_nlvr2_pairs}")
        if not 32 <= self.image_size <= self.max_image_size:
            raise ValueError(f"need 32 <= image_size <= max_image_size, got {self.image_size}, {self.max_image_size}")
        if self.image_format not in ("png", "jpg"):
            raise ValueError(f"image_format must be 'png' or 'jpg', got {self.image_format!r}")


def split_sizes(n: int) -> dict[str, int]:
    """80/10/10 train/val/test, at least one item each."""
    held = max(1, round(0.1 * n))
    return {"train": n - 2 * held, "val": held, "test": held}


def _splits(n: int):
    """(index, split, position within the split) for n items in contiguous split blocks."""
    i = 0
    for split, size in split_sizes(n).items():
        for pos in range(size):
            yield i, split, pos
            i += 1


def _save(img: Image.Image, out: Path, rel: str, fmt: str) -> None:
    (out / rel).parent.mkdir(parents=True, exist_ok=True)
    (out / rel).write_bytes(encode_image(img, fmt))


def make_images(out: Path, cfg: WorldConfig) -> list[WorldImage]:
    images = []
    for i, split, pos in _splits(cfg.num_images):
        rng = seeded_rng(cfg.seed, 1, i)
        # the class (largest object) cycles within each split, so every split of >= 18 images has all
        scene = sample_scene(rng, *scene_size(rng, cfg.image_size, cfg.max_image_size), main_class=CLASSES[pos % len(CLASSES)])
        rel = f"images/{split}/{i + 1:06d}.{cfg.image_format}"
        _save(render_scene(scene, rng), out, rel, cfg.image_format)
        captions = describe(scene, seeded_rng(cfg.seed, 2, i), cfg.captions_per_image)
        questions = ask(scene, seeded_rng(cfg.seed, 3, i), cfg.questions_per_image)
        images.append(WorldImage(i + 1, split, rel, scene, captions, questions))
    return images


def _write_json(obj, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(obj) + "\n", encoding="utf-8")


def write_vqa(out: Path, images: list[WorldImage], seed: int) -> int:
    """VQA v2 question and annotation files per split; returns the number of questions."""
    total = 0
    for split in SPLITS:
        questions, annotations = [], []
        for im in (im for im in images if im.split == split):
            for k, (question, answer, answer_type, question_type) in enumerate(im.questions):
                qid = im.image_id * 1000 + k
                questions.append({"image_id": im.image_id, "question": question, "question_id": qid})
                answers = [{"answer": a, "answer_confidence": conf, "answer_id": j + 1}
                           for j, (a, conf) in enumerate(annotator_answers(seeded_rng(seed, 4, qid), answer))]
                annotations.append({"question_type": question_type, "multiple_choice_answer": answer,
                                    "answers": answers, "image_id": im.image_id, "answer_type": answer_type,
                                    "question_id": qid})
        info = {"description": "beit3 synthetic world, VQA v2 format", "version": "2.0"}
        _write_json({"info": info, "task_type": "Open-Ended", "data_type": "mscoco", "data_subtype": split,
                     "license": {}, "questions": questions},
                    out / "raw/vqa" / f"v2_OpenEnded_mscoco_{split}_questions.json")
        _write_json({"info": info, "data_type": "mscoco", "data_subtype": split, "license": {},
                     "annotations": annotations}, out / "raw/vqa" / f"v2_mscoco_{split}_annotations.json")
        total += len(questions)
    return total


def write_karpathy(out: Path, images: list[WorldImage]) -> None:
    entries, sentid = [], 0
    for imgid, im in enumerate(images):
        sentences = [{"tokens": c.split(), "raw": c, "imgid": imgid, "sentid": sentid + k}
                     for k, c in enumerate(im.captions)]
        entries.append({"filepath": f"images/{im.split}", "filename": os.path.basename(im.path),
                        "split": im.split, "sentences": sentences, "imgid": imgid, "cocoid": im.image_id,
                        "sentids": [s["sentid"] for s in sentences]})
        sentid += len(sentences)
    _write_json({"images": entries, "dataset": "coco"}, out / "raw/dataset_coco.json")


def write_nlvr2(out: Path, cfg: WorldConfig) -> list[dict]:
    """NLVR2 sets (see :func:`nlvr2_set`): one statement and two image pairs, the one it is true of
    and the one it is false of in random order, each with a single statement; returns one metadata
    record an image pair. ``num_nlvr2_pairs // 2`` sets, split 80/10/10 like the images."""
    pairs, lines = [], {name: [] for name in NLVR2_SPLITS.values()}
    for j, split, pos in _splits(cfg.num_nlvr2_pairs // 2):
        rng, name = seeded_rng(cfg.seed, 5, j), NLVR2_SPLITS[split]
        statement, found = nlvr2_set(rng, cfg.image_size, cfg.max_image_size)
        folder = f"images/train/{pos % 10}" if name == "train" else f"images/{name}"
        for k, label in enumerate(bool(t) for t in rng.permutation([True, False])):
            prefix = f"{name}-{pos}-{k}"  # official {split}-{set}-{pair}; the statement is -0
            left, right = found[label]
            for side, scene in (("img0", left), ("img1", right)):  # NLVR2 pair images are always PNG
                _save(render_scene(scene, rng), out, f"{folder}/{prefix}-{side}.png", "png")
            entry = {"identifier": f"{prefix}-0", "sentence": statement, "label": str(label),
                     "left_url": f"synthetic://{prefix}-img0", "right_url": f"synthetic://{prefix}-img1",
                     "writer": "synthetic", "synset": "shape", "query": "", "validation": {},
                     "extra_validations": {}}
            if name == "train":
                entry["directory"] = pos % 10
            lines[name].append(entry)
            pairs.append({"identifier_prefix": prefix, "split": name, "folder": folder,
                          "left": left.to_dict(), "right": right.to_dict()})
    for name, entries in lines.items():
        path = out / "raw/nlvr2" / f"{name}.json"
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text("".join(json.dumps(e) + "\n" for e in entries), encoding="utf-8")
    return pairs


def write_classification(out: Path, images: list[WorldImage]) -> int:
    """ImageFolder tree of the train and val images, one folder per class (hard links where possible)."""
    n = 0
    for im in (im for im in images if im.split in ("train", "val")):
        dest = out / "classification" / im.split / im.scene.label / os.path.basename(im.path)
        dest.parent.mkdir(parents=True, exist_ok=True)
        try:
            os.link(out / im.path, dest)
        except OSError:  # file systems without hard links
            shutil.copyfile(out / im.path, dest)
        n += 1
    return n


def write_texts(out: Path, images: list[WorldImage], pairs: list[dict], cfg: WorldConfig) -> str:
    """corpus.txt, pretrain_pairs.jsonl and the SentencePiece model; returns the model path."""
    corpus = corpus_sentences(seeded_rng(cfg.seed, 6), cfg.num_corpus_lines)
    (out / "corpus.txt").write_text("\n".join(corpus) + "\n", encoding="utf-8")
    with open(out / "pretrain_pairs.jsonl", "w", encoding="utf-8") as f:
        for im in (im for im in images if im.split == "train"):
            f.writelines(json.dumps({"image": im.path, "caption": c}) + "\n" for c in im.captions)
    # the tokenizer also sees every question, answer and statement, so none falls apart into letters
    texts = [c for im in images for c in im.captions] + [t for im in images for q in im.questions for t in q[:2]]
    for name in NLVR2_SPLITS.values():
        texts += [json.loads(line)["sentence"] for line in (out / "raw/nlvr2" / f"{name}.json").open(encoding="utf-8")]
    (out / "spm").mkdir(exist_ok=True)
    (out / "spm/world_text.txt").write_text("\n".join(texts) + "\n", encoding="utf-8")
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*supports only")  # a small world has few pieces
        model = train_spm([out / "corpus.txt", out / "spm/world_text.txt"], str(out / "spm/synthetic"),
                          vocab_size=cfg.spm_vocab_size, model_type=SPM_MODEL_TYPE, seed=cfg.seed,
                          num_threads=1)  # one thread: the same model bytes on every machine
    _relative_training_paths(model)
    return model


def _relative_training_paths(model: str) -> None:
    """sentencepiece records its input and output paths in the model; keep only the file names so
    that the same world written to another folder has the same bytes."""
    if sentencepiece_model_pb2 is None:
        return
    proto = sentencepiece_model_pb2.ModelProto()
    proto.ParseFromString(Path(model).read_bytes())
    names = [os.path.basename(p) for p in proto.trainer_spec.input]
    del proto.trainer_spec.input[:]
    proto.trainer_spec.input.extend(names)
    proto.trainer_spec.model_prefix = os.path.basename(proto.trainer_spec.model_prefix)
    Path(model).write_bytes(proto.SerializeToString())


def write_world_shards(out: Path, cfg: WorldConfig) -> dict[str, int]:
    """images/texts/pairs shards, ``shards_per_kind`` of each (fewer when there are fewer samples)."""
    sources = {"images": {"images": out / "images/train"}, "texts": {"texts": [out / "corpus.txt"]},
               "pairs": {"captions": out / "pretrain_pairs.jsonl"}}
    sizes = {"images": sum(1 for p in (out / "images/train").rglob("*") if p.is_file()),
             "texts": cfg.num_corpus_lines,
             "pairs": split_sizes(cfg.num_images)["train"] * cfg.captions_per_image}
    counts = {}
    for kind, source in sources.items():
        entry = write_shards(out / "shards", kind=kind, shard_size=math.ceil(sizes[kind] / cfg.shards_per_kind),
                             **source)
        counts[kind] = entry["num_samples"]
    return counts


WORLD_ENTRIES = ("images", "raw", "classification", "spm", "shards", "scenes.json", "corpus.txt",
                 "pretrain_pairs.jsonl", "world.json", SEGMENTATION_FOLDER)


def _prepare_output(out: Path) -> None:
    """An empty folder, or a previous world (its own entries are removed); anything else is an error."""
    if out.exists() and any(out.iterdir()):
        if not (out / "world.json").is_file():
            raise FileExistsError(f"{out} is not empty and holds no synthetic world (world.json); "
                                  "give an empty or new folder")
        for name in WORLD_ENTRIES:
            p = out / name
            if p.is_dir():
                shutil.rmtree(p)
            elif p.exists():
                p.unlink()
    out.mkdir(parents=True, exist_ok=True)


def make_synthetic_world(output_dir: str | os.PathLike, num_images: int = 2000, image_size: int = 64,
                         seed: int = 0, **kwargs) -> dict:
    """Write the world described in the module docstring; returns the counts (also in world.json).

    ``kwargs``: the other fields of :class:`WorldConfig` (max_image_size, captions_per_image,
    questions_per_image, num_nlvr2_pairs, num_corpus_lines, image_format, shards_per_kind,
    spm_vocab_size).
    """
    cfg = WorldConfig(num_images=num_images, image_size=image_size, seed=seed, **kwargs)
    out = Path(output_dir)
    _prepare_output(out)
    # marks the folder as a world from the start, so that a build cut short is replaced next time
    _write_json({"config": asdict(cfg), "complete": False}, out / "world.json")
    images = make_images(out, cfg)
    counts = {f"images_{s}": n for s, n in split_sizes(cfg.num_images).items()}
    counts["captions"] = sum(len(im.captions) for im in images)
    counts["vqa_questions"] = write_vqa(out, images, cfg.seed)
    write_karpathy(out, images)
    pairs = write_nlvr2(out, cfg)
    counts["nlvr2_pairs"] = len(pairs)
    counts["classification_images"] = write_classification(out, images)
    spm = write_texts(out, images, pairs, cfg)
    counts["corpus_lines"] = cfg.num_corpus_lines
    counts |= {f"shard_{k}": n for k, n in write_world_shards(out, cfg).items()}
    scenes = [{"image_id": im.image_id, "split": im.split, "file": im.path, **im.scene.to_dict()} for im in images]
    _write_json({"classes": list(CLASSES), "colors": COLORS, "images": scenes, "nlvr2": pairs}, out / "scenes.json")
    counts["segmentation_images"] = write_segmentation(out, scenes)
    _write_json({"config": asdict(cfg), "counts": counts, "spm": os.path.relpath(spm, out), "complete": True},
                out / "world.json")
    return counts
