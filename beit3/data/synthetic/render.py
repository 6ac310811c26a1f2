"""Drawing a scene: flat-coloured shapes on a muted noise, stripes or gradient background."""
from __future__ import annotations

import io

import numpy as np
from PIL import Image, ImageDraw

from beit3.data.synthetic.scenes import COLORS, Scene


def render_scene(scene: Scene, rng: np.random.Generator) -> Image.Image:
    img = Image.fromarray(_background(rng, scene.background, scene.width, scene.height))
    draw = ImageDraw.Draw(img)
    for o in scene.objects:
        draw_shape(draw, o.shape, o.box, COLORS[o.color])
    return img


def draw_shape(draw: ImageDraw.ImageDraw, shape: str, box, fill) -> None:
    """One flat shape in its (x0, y0, x1, y1) box: the pictures and their class masks draw the same
    pixels."""
    x0, y0, x1, y1 = box
    if shape == "circle":
        draw.ellipse(tuple(box), fill=fill)
    elif shape == "square":
        draw.rectangle(tuple(box), fill=fill)
    else:
        draw.polygon([(x0, y1), (x1, y1), ((x0 + x1) / 2, y0)], fill=fill)


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
