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
    world.json                             the arguments and the counts ("complete": false while
                                           it is being written)

Index files for fine-tuning come from ``beit3.data.downstream.build_all_indexes(output_dir/raw,
output_dir, spm)`` (use a small ``min_answer_count`` for small worlds).
"""
from __future__ import annotations

import argparse
import io
import itertools
import json
import math
import os
import shutil
import sys
import time
import warnings
from collections import Counter
from dataclasses import asdict, dataclass, field
from functools import partial
from pathlib import Path
from typing import Callable

import numpy as np
from PIL import Image, ImageDraw

from .shards import write_shards
from .text_tokenizer import train_spm

WORLD_VERSION = 2  # bump when the generated content changes: cached worlds are keyed on it

COLORS = {"red": (220, 30, 30), "green": (30, 160, 50), "blue": (30, 70, 225),
          "yellow": (240, 215, 30), "purple": (140, 50, 185), "orange": (245, 130, 20)}
SHAPES = ("circle", "square", "triangle")
SIZE_RANGES = {"small": (0.14, 0.19), "large": (0.33, 0.40)}  # box side / shorter image side
# Area of a shape relative to its box: the "largest object" that names the class is unambiguous
# because every other object is at least this much smaller (a small square never ties a large triangle).
AREA_FACTOR = {"circle": math.pi / 4, "square": 1.0, "triangle": 0.5}
LARGEST_MARGIN = 1.25
BACKGROUNDS = {"noise": "noisy", "stripes": "striped", "gradient": "shaded"}
CLASSES = tuple(f"{c}_{s}" for c in COLORS for s in SHAPES)
NUMBER_WORDS = ("zero", "one", "two", "three", "four", "five", "six")
SPLITS = ("train", "val", "test")
NLVR2_SPLITS = {"train": "train", "val": "dev", "test": "test1"}
SPM_VOCAB_SIZE = 400  # soft limit: the world's ~100 words support a few hundred pieces
# BPE: on a corpus this small and repetitive sentencepiece's unigram keeps ~100 pieces and splits
# common words ("left" -> "le" "f" "t"); BPE keeps every word whole. (BEiT-3's beit3.spm is unigram.)
SPM_MODEL_TYPE = "bpe"


# --------------------------------------------------------------------------- scenes
@dataclass(frozen=True)
class Shape:
    shape: str
    color: str
    size: str
    box: tuple[int, int, int, int]  # x0, y0, x1, y1 (inclusive), a square

    @property
    def side(self) -> int:
        return self.box[2] - self.box[0] + 1

    @property
    def area(self) -> float:
        return AREA_FACTOR[self.shape] * self.side ** 2

    @property
    def center(self) -> tuple[int, int]:
        """A pixel well inside the drawn shape (the centroid for a triangle)."""
        x0, y0, x1, y1 = self.box
        cy = y0 + 2 * (y1 - y0) // 3 if self.shape == "triangle" else (y0 + y1) // 2
        return (x0 + x1) // 2, cy

    @property
    def name(self) -> str:
        return f"{self.color} {self.shape}"

    def left_of(self, other: "Shape") -> bool:
        return self.box[2] < other.box[0]

    def above(self, other: "Shape") -> bool:
        return self.box[3] < other.box[1]

    def to_dict(self) -> dict:
        return {"shape": self.shape, "color": self.color, "size": self.size, "box": list(self.box),
                "center": list(self.center)}


@dataclass
class Scene:
    width: int
    height: int
    background: str
    objects: list[Shape] = field(default_factory=list)

    @property
    def label(self) -> str:
        top = max(self.objects, key=lambda o: o.area)
        return f"{top.color}_{top.shape}"

    def count(self, shape: str | None = None, color: str | None = None) -> int:
        return sum((shape is None or o.shape == shape) and (color is None or o.color == color)
                   for o in self.objects)

    def unique(self, shape: str | None = None, color: str | None = None) -> Shape | None:
        hits = [o for o in self.objects if (shape is None or o.shape == shape) and (color is None or o.color == color)]
        return hits[0] if len(hits) == 1 else None

    def to_dict(self) -> dict:
        return {"width": self.width, "height": self.height, "background": self.background,
                "label": self.label, "objects": [o.to_dict() for o in self.objects]}


def _rng(seed: int, *key: int) -> np.random.Generator:
    """An independent generator per (seed, purpose, item): changing one part leaves the rest as is."""
    return np.random.default_rng([seed, *key])


def _pick(rng: np.random.Generator, options):
    options = list(options)
    return options[int(rng.integers(len(options)))]


def sample_scene(rng: np.random.Generator, width: int, height: int, main_class: str | None = None) -> Scene:
    """1-3 non-overlapping shapes; the first is large and has the strictly largest area."""
    scene = Scene(width, height, _pick(rng, BACKGROUNDS))
    color, shape = (main_class or _pick(rng, CLASSES)).split("_")
    scene.objects.append(_place(rng, scene, shape, color, "large"))
    main_area = scene.objects[0].area
    for _ in range(int(rng.integers(0, 3))):
        if rng.random() < 0.25:  # repeat a shape and colour so that counting captions occur
            shape, color = scene.objects[-1].shape, scene.objects[-1].color
        else:
            shape, color = _pick(rng, SHAPES), _pick(rng, COLORS)
        size = _pick(rng, SIZE_RANGES)
        obj = _place(rng, scene, shape, color, size)
        if obj is not None and obj.area * LARGEST_MARGIN > main_area:
            obj = _place(rng, scene, shape, color, "small")
        if obj is not None and obj.area * LARGEST_MARGIN <= main_area:
            scene.objects.append(obj)
    order = rng.permutation(len(scene.objects))  # captions list objects in this order
    scene.objects = [scene.objects[i] for i in order]
    return scene


def _place(rng: np.random.Generator, scene: Scene, shape: str, color: str, size: str) -> Shape | None:
    """The shape at a random free spot (2 px apart from the others), or None after 100 tries."""
    lo, hi = SIZE_RANGES[size]
    side = max(6, int(round(rng.uniform(lo, hi) * min(scene.width, scene.height))))
    for _ in range(100):
        x0 = int(rng.integers(1, scene.width - side))
        y0 = int(rng.integers(1, scene.height - side))
        box = (x0, y0, x0 + side - 1, y0 + side - 1)
        if all(_apart(box, o.box, 2) for o in scene.objects):
            return Shape(shape, color, size, box)
    return None


def _apart(a: tuple, b: tuple, gap: int) -> bool:
    return a[2] + gap < b[0] or b[2] + gap < a[0] or a[3] + gap < b[1] or b[3] + gap < a[1]


# --------------------------------------------------------------------------- rendering
def render_scene(scene: Scene, rng: np.random.Generator) -> Image.Image:
    img = Image.fromarray(_background(rng, scene.background, scene.width, scene.height))
    draw = ImageDraw.Draw(img)
    for o in scene.objects:
        x0, y0, x1, y1 = o.box
        fill = COLORS[o.color]
        if o.shape == "circle":
            draw.ellipse(o.box, fill=fill)
        elif o.shape == "square":
            draw.rectangle(o.box, fill=fill)
        else:
            draw.polygon([(x0, y1), (x1, y1), ((x0 + x1) / 2, y0)], fill=fill)
    return img


def _background(rng: np.random.Generator, kind: str, w: int, h: int) -> np.ndarray:
    """(h, w, 3) uint8: muted, low-saturation tones, so the shapes' colours stay unambiguous."""
    def tone():
        return rng.integers(80, 180) + rng.integers(-15, 16, size=3)

    base = tone().astype(np.float32)
    if kind == "noise":
        return np.clip(base + rng.standard_normal((h, w, 3), dtype=np.float32) * 12, 0, 255).astype(np.uint8)
    theta = rng.uniform(0, np.pi)
    along = (np.arange(w, dtype=np.float32)[None, :] * np.cos(theta)
             + np.arange(h, dtype=np.float32)[:, None] * np.sin(theta))[..., None]
    if kind == "stripes":
        period = rng.uniform(6, 14)
        out = base + rng.uniform(15, 30) * np.sign(np.sin(2 * np.pi * along / period))
    else:
        t = (along - along.min()) / max(float(along.max() - along.min()), 1.0)
        out = base * (1 - t) + tone().astype(np.float32) * t
    return np.clip(out, 0, 255).astype(np.uint8)


def encode_image(img: Image.Image, fmt: str) -> bytes:
    buf = io.BytesIO()
    if fmt == "png":
        img.save(buf, format="PNG", compress_level=3)  # level 3: about as small as 6, twice as fast
    else:
        img.save(buf, format="JPEG", quality=95)
    return buf.getvalue()


# --------------------------------------------------------------------------- captions
def an(phrase: str) -> str:
    """The phrase with its indefinite article: "a red circle", "an orange square"."""
    return ("an " if phrase[0] in "aeiou" else "a ") + phrase


def _join(phrases: list[str]) -> str:
    return phrases[0] if len(phrases) == 1 else ", ".join(phrases[:-1]) + " and " + phrases[-1]


def _relations(a: Shape, b: Shape) -> list[str]:
    rel = []
    if a.left_of(b):
        rel.append("to the left of")
    if b.left_of(a):
        rel.append("to the right of")
    if a.above(b):
        rel.append("above")
    if b.above(a):
        rel.append("below")
    return rel


def caption_candidates(scene: Scene) -> list[str]:
    """Every true description the grammar makes of the scene."""
    objs, bg = scene.objects, BACKGROUNDS[scene.background]
    out = []
    for o in objs:
        out += [f"a {o.size} {o.name}", f"{an(o.name)} on a {bg} background"]
    if len(objs) == 1:
        o = objs[0]
        out += [f"a single {o.name}", f"one {o.size} {o.name}", f"only {an(o.name)}",
                f"a {o.size} {o.name} on a {bg} background"]
    else:
        out.append(f"{NUMBER_WORDS[len(objs)]} shapes: " + _join([an(o.name) for o in objs]))
        out.append(_join([f"a {o.size} {o.name}" for o in objs]) + f" on a {bg} background")
    for (color, shape), k in Counter((o.color, o.shape) for o in objs).items():
        if k > 1:
            out.append(f"{NUMBER_WORDS[k]} {color} {shape}s")
    for shape, k in Counter(o.shape for o in objs).items():
        if k > 1:
            out.append(f"{NUMBER_WORDS[k]} {shape}s")
    for a, b in itertools.permutations(objs, 2):
        out += [f"{an(a.name)} {rel} a {b.size} {b.name}" for rel in _relations(a, b)]
    return list(dict.fromkeys(out))  # twin objects give the same phrase twice


def describe(scene: Scene, rng: np.random.Generator, n: int) -> list[str]:
    """``n`` captions, distinct while the grammar has enough of them."""
    cands = caption_candidates(scene)
    idx = rng.choice(len(cands), size=n, replace=n > len(cands))
    return [cands[i] for i in idx]


# --------------------------------------------------------------------------- VQA
def _q_color(scene, rng):
    shapes = [s for s in SHAPES if scene.unique(shape=s)]
    if shapes:
        s = _pick(rng, shapes)
        return f"what color is the {s}?", scene.unique(shape=s).color, "other", "what color is the"


def _q_count(scene, rng):
    if rng.random() < 0.3:
        return "how many shapes are there?", str(len(scene.objects)), "number", "how many"
    s = _pick(rng, SHAPES)
    return f"how many {s}s are there?", str(scene.count(shape=s)), "number", "how many"


def _q_exists(scene, rng):
    if rng.random() < 0.5:
        o = _pick(rng, scene.objects)
        color, shape = o.color, o.shape
    else:
        color, shape = _pick(rng, [(c, s) for c in COLORS for s in SHAPES if not scene.count(s, c)])
    answer = "yes" if scene.count(shape, color) else "no"
    return f"is there {an(color)} {shape}?", answer, "yes/no", "is there a"


def _q_shape_of_color(scene, rng):
    colors = [c for c in COLORS if scene.unique(color=c)]
    if colors:
        c = _pick(rng, colors)
        return f"what shape is the {c} object?", scene.unique(color=c).shape, "other", "what shape is the"


def _identifiable(scene) -> list[Shape]:
    return [o for o in scene.objects if scene.unique(o.shape, o.color) is o]


def _q_left_of(scene, rng):
    cands = [b for b in _identifiable(scene) if sum(o.left_of(b) for o in scene.objects) == 1]
    if cands:
        b = _pick(rng, cands)
        a = next(o for o in scene.objects if o.left_of(b))
        return f"what shape is to the left of the {b.name}?", a.shape, "other", "what shape is"


def _q_is_left(scene, rng):
    ids = _identifiable(scene)
    pairs = [(a, b) for a, b in itertools.permutations(ids, 2) if a.left_of(b)]
    if pairs:
        a, b = pairs[int(rng.integers(len(pairs)))]
        if rng.random() < 0.5:
            return f"is the {a.name} to the left of the {b.name}?", "yes", "yes/no", "is the"
        return f"is the {b.name} to the left of the {a.name}?", "no", "yes/no", "is the"


def _q_size(scene, rng):
    ids = _identifiable(scene)
    if ids:
        o = _pick(rng, ids)
        return f"what size is the {o.name}?", o.size, "other", "what size is the"


QUESTIONS = (_q_color, _q_count, _q_exists, _q_shape_of_color, _q_left_of, _q_is_left, _q_size)
ANSWER_SETS = (tuple(COLORS), SHAPES, ("yes", "no"), tuple(SIZE_RANGES))


def ask(scene: Scene, rng: np.random.Generator, n: int) -> list[tuple[str, str, str, str]]:
    """``n`` distinct (question, answer, answer_type, question_type), of different kinds first;
    counting and existence questions, which every scene supports, fill up the rest."""
    out, seen = [], set()

    def add(q):
        if q is not None and q[0] not in seen and len(out) < n:
            seen.add(q[0])
            out.append(q)

    for k in rng.permutation(len(QUESTIONS)):
        add(QUESTIONS[k](scene, rng))
    for _ in range(50):
        if len(out) == n:
            break
        add((_q_count, _q_exists)[int(rng.integers(2))](scene, rng))
    return out


def annotator_answers(rng: np.random.Generator, answer: str) -> list[tuple[str, str]]:
    """Ten (answer, confidence): most annotators are right, up to three pick a wrong answer of the
    same type, and some spell the right one differently ("Two", "yes.")."""
    wrong = int(rng.choice(4, p=[0.6, 0.25, 0.1, 0.05]))
    out = []
    for i in range(10):
        if i < wrong:
            out.append((_wrong_answer(rng, answer), "maybe"))
        elif rng.random() < 0.15:
            out.append((_respell(rng, answer), "yes"))
        else:
            out.append((answer, "yes"))
    order = rng.permutation(10)
    return [out[i] for i in order]


def _wrong_answer(rng: np.random.Generator, answer: str) -> str:
    if answer.isdigit():
        return str(max(0, int(answer) + _pick(rng, (-1, 1))))
    options = next(s for s in ANSWER_SETS if answer in s)
    return _pick(rng, [a for a in options if a != answer])


def _respell(rng: np.random.Generator, answer: str) -> str:
    if answer.isdigit():
        return NUMBER_WORDS[int(answer)].capitalize()
    return _pick(rng, (answer.capitalize(), answer + "."))


# --------------------------------------------------------------------------- NLVR2
def _contains(side: str, shape: str, color: str, left: Scene, right: Scene) -> bool:
    return (left if side == "left" else right).count(shape, color) > 0


def _both_contain(shape: str, left: Scene, right: Scene) -> bool:
    return left.count(shape) > 0 and right.count(shape) > 0


def _exactly(n: int, shape: str, left: Scene, right: Scene) -> bool:
    return left.count(shape) + right.count(shape) == n


def _more_shapes(side: str, left: Scene, right: Scene) -> bool:
    a, b = (left, right) if side == "left" else (right, left)
    return len(a.objects) > len(b.objects)


def _nlvr2_statements() -> dict[str, Callable[[Scene, Scene], bool]]:
    """Every statement text and its truth test on (left, right); img0 is "the left image"."""
    out = {}
    for cls in CLASSES:
        color, shape = cls.split("_")
        for side in ("left", "right"):
            out[f"the {side} image contains {an(color)} {shape}"] = partial(_contains, side, shape, color)
    for shape in SHAPES:
        out[f"both images contain a {shape}"] = partial(_both_contain, shape)
        for n in (1, 2, 3):
            text = (f"there are exactly {NUMBER_WORDS[n]} {shape}s in the two images" if n > 1
                    else f"there is exactly one {shape} in the two images")
            out[text] = partial(_exactly, n, shape)
    for side, other in (("left", "right"), ("right", "left")):
        out[f"the {side} image has more shapes than the {other} image"] = partial(_more_shapes, side)
    return out


NLVR2_STATEMENTS = _nlvr2_statements()
NLVR2_MAX_DRAWS = 1000  # image pairs drawn for one statement (~500 per wanted truth) before re-drawing it


def nlvr2_candidates(left: Scene, right: Scene) -> list[tuple[str, bool]]:
    """(statement, truth) about a pair, for every statement text."""
    return [(text, is_true(left, right)) for text, is_true in NLVR2_STATEMENTS.items()]


def nlvr2_set(rng: np.random.Generator, cfg: "WorldConfig") -> tuple[str, dict[bool, tuple[Scene, Scene]]]:
    """One NLVR2 set as in the real data: a statement drawn uniformly from the texts, and image pairs
    drawn until one makes it true and one false ({True: (left, right), False: (left, right)}).
    The text alone then says nothing about the label."""
    for _ in range(100):
        statement = _pick(rng, NLVR2_STATEMENTS)
        found: dict[bool, tuple[Scene, Scene]] = {}
        for _ in range(NLVR2_MAX_DRAWS):
            pair = tuple(sample_scene(rng, *_scene_size(rng, cfg)) for _ in range(2))
            found.setdefault(NLVR2_STATEMENTS[statement](*pair), pair)
            if len(found) == 2:
                return statement, found
    raise RuntimeError(f"no NLVR2 statement could be made both true and false with image size {cfg.image_size}")


# --------------------------------------------------------------------------- corpus
FACTS = ("a circle has no corners", "a square has four corners", "a triangle has three corners",
         "a square has four equal sides", "a triangle has three sides", "a circle is round",
         "shapes can be small or large", "a picture can have a noisy, striped or shaded background")


def corpus_sentences(rng: np.random.Generator, n: int) -> list[str]:
    """Captions of unrendered scenes (60%) and facts and sums (40%)."""
    out = []
    for _ in range(n):
        u = rng.random()
        if u < 0.6:
            scene = sample_scene(rng, 96, 96)
            out.append(_pick(rng, caption_candidates(scene)))
        elif u < 0.8:
            out.append(_pick(rng, FACTS))
        elif u < 0.9:
            a, b = int(rng.integers(0, 4)), int(rng.integers(0, 4))
            out.append(f"{NUMBER_WORDS[a]} plus {NUMBER_WORDS[b]} is {NUMBER_WORDS[a + b]}")
        else:
            out.append(f"{_pick(rng, COLORS)} is a color and a {_pick(rng, SHAPES)} is a shape")
    return out


# --------------------------------------------------------------------------- the world on disk
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


def _scene_size(rng: np.random.Generator, cfg: WorldConfig) -> tuple[int, int]:
    w, h = rng.integers(cfg.image_size, cfg.max_image_size + 1, size=2)
    return int(w), int(h)


def _save(img: Image.Image, out: Path, rel: str, fmt: str) -> None:
    (out / rel).parent.mkdir(parents=True, exist_ok=True)
    (out / rel).write_bytes(encode_image(img, fmt))


def make_images(out: Path, cfg: WorldConfig) -> list[WorldImage]:
    images = []
    for i, split, pos in _splits(cfg.num_images):
        rng = _rng(cfg.seed, 1, i)
        # the class (largest object) cycles within each split, so every split of >= 18 images has all
        scene = sample_scene(rng, *_scene_size(rng, cfg), main_class=CLASSES[pos % len(CLASSES)])
        rel = f"images/{split}/{i + 1:06d}.{cfg.image_format}"
        _save(render_scene(scene, rng), out, rel, cfg.image_format)
        captions = describe(scene, _rng(cfg.seed, 2, i), cfg.captions_per_image)
        questions = ask(scene, _rng(cfg.seed, 3, i), cfg.questions_per_image)
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
                           for j, (a, conf) in enumerate(annotator_answers(_rng(seed, 4, qid), answer))]
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
        rng, name = _rng(cfg.seed, 5, j), NLVR2_SPLITS[split]
        statement, found = nlvr2_set(rng, cfg)
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
    corpus = corpus_sentences(_rng(cfg.seed, 6), cfg.num_corpus_lines)
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
    try:
        from sentencepiece import sentencepiece_model_pb2  # needs protobuf (a tensorboard dependency)
    except ImportError:
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
                 "pretrain_pairs.jsonl", "world.json")


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
    _write_json({"config": asdict(cfg), "counts": counts, "spm": os.path.relpath(spm, out), "complete": True},
                out / "world.json")
    return counts


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="beit3 data synthetic", description="Write the synthetic world "
                                     "(images, raw task annotations, corpus, SentencePiece model, shards).")
    parser.add_argument("--output", required=True, help="new or empty folder (or a previous world, replaced)")
    parser.add_argument("--num-images", type=int, default=2000)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--image-size", type=int, default=64, help="shortest image side in pixels")
    parser.add_argument("--max-image-size", type=int, default=None, help="longest side (default 1.5 x --image-size)")
    parser.add_argument("--image-format", choices=("png", "jpg"), default="png")
    parser.add_argument("--num-nlvr2-pairs", type=int, default=None)
    parser.add_argument("--shards-per-kind", type=int, default=32)
    args = parser.parse_args(argv)
    start = time.perf_counter()
    from ..errors import UserError
    from ..files import check_output_dir
    try:
        check_output_dir(args.output)
        counts = make_synthetic_world(args.output, args.num_images, args.image_size, args.seed,
                                      max_image_size=args.max_image_size, image_format=args.image_format,
                                      num_nlvr2_pairs=args.num_nlvr2_pairs, shards_per_kind=args.shards_per_kind)
    except (ValueError, FileExistsError, UserError) as e:
        print(f"beit3 data synthetic: error: {e}", file=sys.stderr)
        return 2
    print(f"synthetic world in {args.output} ({time.perf_counter() - start:.1f}s): "
          + ", ".join(f"{k} {v}" for k, v in counts.items()))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
