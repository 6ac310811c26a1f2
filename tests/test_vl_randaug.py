"""The vision-language RandAugment is unilm/beit3's: its op list, magnitudes and probabilities, each
op measured against a port of unilm's op table (beit3/randaug.py, microsoft/unilm 768a3c8) on
fixed images. The port writes unilm's OpenCV calls in numpy (no cv2 here): warpAffine as an
inverse map with bilinear sampling and a constant border, calcHist as a bincount, filter2D as a
3x3 sum on the interior."""
import numpy as np
import pytest
import torch
from PIL import Image

from beit3.data.randaug import VL_OPS, RandomAugment, apply_op, magnitude
from beit3.data.transforms import build_vl_transform

# -- the port --------------------------------------------------------------------------------------
MAX_LEVEL, TRANSLATE_CONST, REPLACE = 10, 10, (128, 128, 128)
UNILM_AUGS = ['Identity', 'AutoContrast', 'Equalize', 'Brightness', 'Sharpness',
              'ShearX', 'ShearY', 'TranslateX', 'TranslateY', 'Rotate']  # datasets.build_transform
SIGNED = ('ShearX', 'ShearY', 'TranslateX', 'TranslateY', 'Rotate')  # their level_to_args draw a sign


def u_autocontrast(img):
    out = np.empty_like(img)
    for c in range(3):
        ch = img[..., c]
        # unilm takes high/low as uint8 scalars and negates low, which wraps; the intent (its
        # docstring: "same output as PIL.ImageOps.autocontrast") is the integer.
        high, low = int(ch.max()), int(ch.min())
        if high <= low:
            table = np.arange(256)
        else:
            scale = 255 / (high - low)
            table = np.arange(256) * scale - low * scale
            table[table < 0], table[table > 255] = 0, 255
        out[..., c] = table.clip(0, 255).astype(np.uint8)[ch]
    return out


def u_equalize(img):
    out = np.empty_like(img)
    for c in range(3):
        ch = img[..., c]
        hist = np.bincount(ch.ravel(), minlength=256).astype(np.float32)
        step = np.sum(hist[hist != 0][:-1]) // 255
        if step == 0:
            out[..., c] = ch
            continue
        n = np.empty_like(hist)
        n[0], n[1:] = step // 2, hist[:-1]
        out[..., c] = (np.cumsum(n) // step).clip(0, 255).astype(np.uint8)[ch]
    return out


def u_brightness(img, factor):
    return (np.arange(256, dtype=np.float32) * factor).clip(0, 255).astype(np.uint8)[img]


def u_sharpness(img, factor):
    x = img.astype(np.float32)
    kernel = np.ones((3, 3), np.float32)
    kernel[1, 1] = 5
    kernel /= 13
    h, w = img.shape[:2]
    degenerate = sum(kernel[i, j] * x[i:h - 2 + i, j:w - 2 + j] for i in range(3) for j in range(3))
    degenerate = np.rint(degenerate)  # filter2D's uint8 output
    out = x.copy()
    out[1:-1, 1:-1] = degenerate + factor * (x[1:-1, 1:-1] - degenerate)
    return out.clip(0, 255).astype(np.uint8)  # unilm: astype without clip (wraps); see beit3.data.randaug


def u_warp(img, m, fill=REPLACE):
    """cv2.warpAffine(img, m, (W, H), borderValue=fill, flags=INTER_LINEAR)."""
    h, w = img.shape[:2]
    inv = np.linalg.inv(np.vstack([m, [0, 0, 1]]))[:2]
    ys, xs = np.mgrid[0:h, 0:w].astype(np.float64)
    sx, sy = inv[0, 0] * xs + inv[0, 1] * ys + inv[0, 2], inv[1, 0] * xs + inv[1, 1] * ys + inv[1, 2]
    x0, y0 = np.floor(sx).astype(int), np.floor(sy).astype(int)
    fx, fy = (sx - x0)[..., None], (sy - y0)[..., None]

    def at(y, x):
        inside = (x >= 0) & (x < w) & (y >= 0) & (y < h)
        v = img[y.clip(0, h - 1), x.clip(0, w - 1)].astype(np.float64)
        v[~inside] = fill
        return v
    out = ((1 - fx) * (1 - fy) * at(y0, x0) + fx * (1 - fy) * at(y0, x0 + 1)
           + (1 - fx) * fy * at(y0 + 1, x0) + fx * fy * at(y0 + 1, x0 + 1))
    return np.rint(out).clip(0, 255).astype(np.uint8)


def u_rotate(img, degree):
    h, w = img.shape[:2]
    cx, cy, a = w / 2, h / 2, np.deg2rad(degree)  # cv2.getRotationMatrix2D((W / 2, H / 2), degree, 1)
    al, be = np.cos(a), np.sin(a)
    return u_warp(img, np.float32([[al, be, (1 - al) * cx - be * cy], [-be, al, be * cx + (1 - al) * cy]]))


FUNC = {'Identity': lambda img: img, 'AutoContrast': u_autocontrast, 'Equalize': u_equalize,
        'Brightness': u_brightness, 'Sharpness': u_sharpness,
        'ShearX': lambda img, f: u_warp(img, np.float32([[1, f, 0], [0, 1, 0]])),
        'ShearY': lambda img, f: u_warp(img, np.float32([[1, 0, 0], [f, 1, 0]])),
        'TranslateX': lambda img, o: u_warp(img, np.float32([[1, 0, -o], [0, 1, 0]])),
        'TranslateY': lambda img, o: u_warp(img, np.float32([[1, 0, 0], [0, 1, -o]])),
        'Rotate': u_rotate}


def u_args(name, level, negative=False):
    """arg_dict[name](level) with the sign its np.random draw would give."""
    sign = -1 if negative else 1
    if name in ('Brightness', 'Sharpness'):
        return ((level / MAX_LEVEL) * 1.8 + 0.1,)
    if name in ('ShearX', 'ShearY'):
        return (sign * (level / MAX_LEVEL) * 0.3,)
    if name in ('TranslateX', 'TranslateY'):
        return (sign * (level / MAX_LEVEL) * float(TRANSLATE_CONST),)
    if name == 'Rotate':
        return (sign * (level / MAX_LEVEL) * 30,)
    return ()


def u_random_augment(img, n=2, m=7, augs=UNILM_AUGS):
    """RandomAugment.__call__ with np.random: the names it applied."""
    applied = []
    for name in np.random.choice(augs, n):
        if np.random.random() > 0.5:
            continue
        if name in SIGNED:
            np.random.random()  # the sign draw
        applied.append(str(name))
    return applied


# -- fixed images ----------------------------------------------------------------------------------
def _images():
    rng = np.random.default_rng(0)
    smooth = np.kron(rng.integers(30, 220, (6, 8, 3)), np.ones((8, 8, 1))).astype(np.uint8)  # 48 x 64 blocks
    ramp = np.stack([*np.meshgrid(np.linspace(20, 235, 64), np.linspace(40, 200, 48)), np.full((48, 64), 90.0)],
                    -1).astype(np.uint8)
    noisy = rng.integers(0, 256, (48, 64, 3)).astype(np.uint8)
    return {"blocks": smooth, "ramp": ramp, "noise": noisy}


CASES = [(name, neg) for name in VL_OPS for neg in ((False, True) if name in SIGNED else (False,))]


@pytest.mark.parametrize("name,negative", CASES)
def test_each_op_matches_unilms_op_table(name, negative):
    args = u_args(name, 7, negative)
    arg = magnitude(name, 7)
    ours_arg = None if arg is None else (-arg if negative else arg)
    assert (ours_arg,) == args or (arg is None and args == ())
    change = []
    for label, img in _images().items():
        ours = np.asarray(apply_op(Image.fromarray(img), name, ours_arg)).astype(int)
        ref = FUNC[name](img, *args).astype(int)
        diff = np.abs(ours - ref)
        # Equal but for the rounding of bilinear weights (OpenCV's fixed point): at most one level.
        assert diff.max() <= 1 and diff.mean() < 0.5, (label, diff.mean(), diff.max())
        change.append(np.abs(ours - img).mean())
    assert (max(change) > 5) == (name != "Identity"), change  # each op does something to some image


def test_policy_is_unilms():
    aug = RandomAugment()
    assert (aug.n, aug.m, list(aug.ops)) == (2, 7, UNILM_AUGS)
    torch.manual_seed(0)
    draws = [aug.draw() for _ in range(4000)]
    np.random.seed(0)
    ref = [u_random_augment(None) for _ in range(4000)]
    # applied ops per call: 0, 1, 2 with 1/4, 1/2, 1/4, in both
    for applied in ([len(d) for d in draws], [len(r) for r in ref]):
        share = np.bincount(applied, minlength=3) / 4000
        assert np.allclose(share, [0.25, 0.5, 0.25], atol=0.03), share
    names = [n for d in draws for n, _ in d]
    counts = np.array([names.count(op) for op in UNILM_AUGS])
    assert np.all(np.abs(counts - len(names) / 10) < 4 * np.sqrt(len(names) / 10)), counts  # uniform
    args = {(n, a) for d in draws for n, a in d}
    assert {a for n, a in args if n == "TranslateX"} == {7.0, -7.0}
    assert sorted(a for n, a in args if n == "Rotate") == pytest.approx([-21.0, 21.0])
    assert sorted(a for n, a in args if n in ("ShearX", "ShearY")) == pytest.approx([-0.21, -0.21, 0.21, 0.21])
    assert sorted(a for n, a in args if n in ("Brightness", "Sharpness")) == pytest.approx([1.36, 1.36])


def test_translation_is_seven_pixels_at_480():
    img = np.zeros((480, 480, 3), np.uint8)
    img[200:260, 100:160] = 255
    for d in (7.0, -7.0):
        out = np.asarray(apply_op(Image.fromarray(img), "TranslateX", d))
        cols = np.nonzero(out[230, :, 0] > 200)[0]
        assert (cols.min(), cols.max()) == (100 - int(d), 159 - int(d))
    # the whole fine-tuning transform uses it (timm's TranslateXRel moved up to ~151 px at 480)
    tf = build_vl_transform(480, train=True)
    aug = [t for t in tf.transforms if isinstance(t, RandomAugment)]
    assert len(aug) == 1 and aug[0].ops == tuple(UNILM_AUGS) and (aug[0].n, aug[0].m) == (2, 7)
    torch.manual_seed(1)
    out = tf(Image.fromarray(img))
    assert out.shape == (3, 480, 480)
