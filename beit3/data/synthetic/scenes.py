"""Scenes of the synthetic world: 1-3 non-overlapping coloured shapes, and the world's vocabulary
of colours, shapes, sizes and backgrounds.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np

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


def scene_size(rng: np.random.Generator, min_side: int, max_side: int) -> tuple[int, int]:
    """Width and height drawn in [min_side, max_side]."""
    w, h = rng.integers(min_side, max_side + 1, size=2)
    return int(w), int(h)


def seeded_rng(seed: int, *key: int) -> np.random.Generator:
    """An independent generator per (seed, purpose, item): changing one part leaves the rest as is."""
    return np.random.default_rng([seed, *key])


def pick(rng: np.random.Generator, options):
    options = list(options)
    return options[int(rng.integers(len(options)))]


def sample_scene(rng: np.random.Generator, width: int, height: int, main_class: str | None = None) -> Scene:
    """1-3 non-overlapping shapes; the first is large and has the strictly largest area."""
    scene = Scene(width, height, pick(rng, BACKGROUNDS))
    color, shape = (main_class or pick(rng, CLASSES)).split("_")
    scene.objects.append(_place(rng, scene, shape, color, "large"))
    main_area = scene.objects[0].area
    for _ in range(int(rng.integers(0, 3))):
        if rng.random() < 0.25:  # repeat a shape and colour so that counting captions occur
            shape, color = scene.objects[-1].shape, scene.objects[-1].color
        else:
            shape, color = pick(rng, SHAPES), pick(rng, COLORS)
        size = pick(rng, SIZE_RANGES)
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
