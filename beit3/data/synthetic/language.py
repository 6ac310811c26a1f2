"""Everything said about a scene, computed from it: captions, VQA questions with ten annotators'
answers, NLVR2 statements about two scenes, and a text corpus.
"""
from __future__ import annotations

import itertools
from collections import Counter
from functools import partial
from typing import Callable

import numpy as np

from beit3.data.synthetic.scenes import BACKGROUNDS, CLASSES, COLORS, NUMBER_WORDS, SHAPES, SIZE_RANGES, Scene, Shape, pick, sample_scene, scene_size


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
        s = pick(rng, shapes)
        return f"what color is the {s}?", scene.unique(shape=s).color, "other", "what color is the"


def _q_count(scene, rng):
    if rng.random() < 0.3:
        return "how many shapes are there?", str(len(scene.objects)), "number", "how many"
    s = pick(rng, SHAPES)
    return f"how many {s}s are there?", str(scene.count(shape=s)), "number", "how many"


def _q_exists(scene, rng):
    if rng.random() < 0.5:
        o = pick(rng, scene.objects)
        color, shape = o.color, o.shape
    else:
        color, shape = pick(rng, [(c, s) for c in COLORS for s in SHAPES if not scene.count(s, c)])
    answer = "yes" if scene.count(shape, color) else "no"
    return f"is there {an(color)} {shape}?", answer, "yes/no", "is there a"


def _q_shape_of_color(scene, rng):
    colors = [c for c in COLORS if scene.unique(color=c)]
    if colors:
        c = pick(rng, colors)
        return f"what shape is the {c} object?", scene.unique(color=c).shape, "other", "what shape is the"


def _identifiable(scene) -> list[Shape]:
    return [o for o in scene.objects if scene.unique(o.shape, o.color) is o]


def _q_left_of(scene, rng):
    cands = [b for b in _identifiable(scene) if sum(o.left_of(b) for o in scene.objects) == 1]
    if cands:
        b = pick(rng, cands)
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
        o = pick(rng, ids)
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
        return str(max(0, int(answer) + pick(rng, (-1, 1))))
    options = next(s for s in ANSWER_SETS if answer in s)
    return pick(rng, [a for a in options if a != answer])


def _respell(rng: np.random.Generator, answer: str) -> str:
    if answer.isdigit():
        return NUMBER_WORDS[int(answer)].capitalize()
    return pick(rng, (answer.capitalize(), answer + "."))


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


def nlvr2_set(rng: np.random.Generator, min_side: int, max_side: int) -> tuple[str, dict[bool, tuple[Scene, Scene]]]:
    """One NLVR2 set as in the real data: a statement drawn uniformly from the texts, and image pairs
    drawn until one makes it true and one false ({True: (left, right), False: (left, right)}).
    The text alone then says nothing about the label."""
    for _ in range(100):
        statement = pick(rng, NLVR2_STATEMENTS)
        found: dict[bool, tuple[Scene, Scene]] = {}
        for _ in range(NLVR2_MAX_DRAWS):
            pair = tuple(sample_scene(rng, *scene_size(rng, min_side, max_side)) for _ in range(2))
            found.setdefault(NLVR2_STATEMENTS[statement](*pair), pair)
            if len(found) == 2:
                return statement, found
    raise RuntimeError(f"no NLVR2 statement could be made both true and false with image sides {min_side}-{max_side}")


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
            out.append(pick(rng, caption_candidates(scene)))
        elif u < 0.8:
            out.append(pick(rng, FACTS))
        elif u < 0.9:
            a, b = int(rng.integers(0, 4)), int(rng.integers(0, 4))
            out.append(f"{NUMBER_WORDS[a]} plus {NUMBER_WORDS[b]} is {NUMBER_WORDS[a + b]}")
        else:
            out.append(f"{pick(rng, COLORS)} is a color and a {pick(rng, SHAPES)} is a shape")
    return out
