"""A style-shifted evaluation suite: coin-mini's attributes drawn by another renderer, in styles pretraining never used.

Does the base *see*, or has it only learned coin-mini's renderer? Every image here is rasterised
with numpy from signed shape tests, 4x supersampled (anti-aliased edges; PIL's ImageDraw draws
coin-mini), on backgrounds no pretraining image has (gradients, noise, stripes, dark tones), with
shapes rotated, stretched or hollow, colours in other shades of the same four names, a few grey
distractors, and letters drawn from a stroke font instead of PIL's bitmap font. The questions are
the base's own pretraining notes ("Describe the color." -> "color: red."): every one needs the
image, so a base that sees beats the text-only answer prior (the most frequent answer per
question text) by a wide margin, and one that does not stays at it.

Deterministic for a seed (Python's and numpy's generators, seeded per split).
"""

from __future__ import annotations

import math
import random
from pathlib import Path

import numpy as np
from PIL import Image

from cmoe.data.synth import COUNT_WORDS, LETTERS, REGIONS, SHAPES, SIZE
from cmoe.data.writer import Record, write_bundle

SUPERSAMPLE = 4
# Other shades of coin-mini's four colour names (coin-mini: one pure-ish tone each).
SHADES = {
    "red": ((190, 20, 60), (250, 85, 55)),
    "green": ((25, 115, 45), (70, 195, 100)),
    "blue": ((25, 45, 150), (85, 145, 245)),
    "yellow": ((250, 225, 70), (215, 165, 0)),
}
# Stroke font: segments in a unit box (x right, y down), for coin-mini's letters.
STROKES = {
    "A": ((0, 1, 0.5, 0), (0.5, 0, 1, 1), (0.22, 0.6, 0.78, 0.6)),
    "E": ((0, 0, 0, 1), (0, 0, 1, 0), (0, 0.5, 0.8, 0.5), (0, 1, 1, 1)),
    "H": ((0, 0, 0, 1), (1, 0, 1, 1), (0, 0.5, 1, 0.5)),
    "K": ((0, 0, 0, 1), (1, 0, 0, 0.6), (0.35, 0.38, 1, 1)),
    "T": ((0, 0, 1, 0), (0.5, 0, 0.5, 1)),
    "X": ((0, 0, 1, 1), (1, 0, 0, 1)),
}
ATTRIBUTES = ("color", "shape", "position", "count", "letter")


def _grid() -> tuple[np.ndarray, np.ndarray]:
    """Pixel-centre coordinates of the supersampled canvas, in output pixels."""
    n = SIZE * SUPERSAMPLE
    c = (np.arange(n) + 0.5) / SUPERSAMPLE
    return np.meshgrid(c, c)  # x, y


def _inside(shape: str, u: np.ndarray, v: np.ndarray, r: float) -> np.ndarray:
    """Boolean mask of `shape` of half-size r in local (rotated, centred) coordinates u, v."""
    if shape == "circle":
        return u * u + v * v <= r * r
    if shape == "square":
        return np.maximum(np.abs(u), np.abs(v)) <= r * 0.85
    if shape == "triangle":  # apex up, base at v = 0.8 r, as coin-mini's proportions
        return (v <= 0.8 * r) & (np.abs(u) <= (v + r) / 1.8)
    if shape == "cross":
        w = r * 0.38
        return ((np.abs(u) <= r) & (np.abs(v) <= w)) | ((np.abs(u) <= w) & (np.abs(v) <= r))
    raise ValueError(f"unknown shape {shape!r}")


def _shape_mask(rng: random.Random, shape: str, cx: float, cy: float, r: float) -> np.ndarray:
    """A rotated, possibly stretched, filled or hollow shape: coverage in [0, 1] per output pixel."""
    x, y = _grid()
    angle = rng.uniform(0, 2 * math.pi) if shape != "circle" else 0.0
    stretch = rng.uniform(0.8, 1.25)
    cos, sin = math.cos(angle), math.sin(angle)
    u = ((x - cx) * cos + (y - cy) * sin) / stretch
    v = (-(x - cx) * sin + (y - cy) * cos) * stretch
    mask = _inside(shape, u, v, r)
    if rng.random() < 0.35:  # hollow: an outline of 2-3 px
        mask &= ~_inside(shape, u, v, r - rng.uniform(2.0, 3.0))
    return _downsample(mask)


def _letter_mask(rng: random.Random, letter: str) -> np.ndarray:
    """`letter` in the stroke font, slightly rotated, 26-40 px tall, near the centre."""
    x, y = _grid()
    h = rng.uniform(26, 40)
    w = h * rng.uniform(0.6, 0.8)
    cx, cy = SIZE / 2 + rng.uniform(-6, 6), SIZE / 2 + rng.uniform(-6, 6)
    angle = rng.uniform(-0.25, 0.25)
    cos, sin = math.cos(angle), math.sin(angle)
    thick = rng.uniform(2.0, 3.5)
    mask = np.zeros_like(x, dtype=bool)
    for x0, y0, x1, y1 in STROKES[letter]:
        ends = []
        for px, py in ((x0, y0), (x1, y1)):
            lx, ly = (px - 0.5) * w, (py - 0.5) * h
            ends.append((cx + lx * cos - ly * sin, cy + lx * sin + ly * cos))
        (ax, ay), (bx, by) = ends
        dx, dy = bx - ax, by - ay
        t = np.clip(((x - ax) * dx + (y - ay) * dy) / (dx * dx + dy * dy), 0, 1)
        mask |= (x - ax - t * dx) ** 2 + (y - ay - t * dy) ** 2 <= (thick / 2) ** 2
    return _downsample(mask)


def _downsample(mask: np.ndarray) -> np.ndarray:
    n = SIZE
    return mask.reshape(n, SUPERSAMPLE, n, SUPERSAMPLE).mean(axis=(1, 3))


def _background(rng: random.Random, noise: np.random.Generator) -> np.ndarray:
    """A gradient, noisy or striped background (light or dark), (SIZE, SIZE, 3) float in [0, 255]."""
    dark = rng.random() < 0.3
    lo, hi = (20, 80) if dark else (170, 235)
    c0 = np.array([rng.uniform(lo, hi) for _ in range(3)])
    c1 = np.array([rng.uniform(lo, hi) for _ in range(3)])
    kind = rng.choice(("gradient", "noise", "stripes"))
    y, x = np.mgrid[0:SIZE, 0:SIZE] / (SIZE - 1)
    if kind == "gradient":
        a = rng.uniform(0, 2 * math.pi)
        t = np.clip((x - 0.5) * math.cos(a) + (y - 0.5) * math.sin(a) + 0.5, 0, 1)
    elif kind == "stripes":
        period = rng.uniform(6, 12) / SIZE
        t = ((x + y) / period % 1.0 < 0.5).astype(float) * 0.35
    else:
        t = np.full((SIZE, SIZE), 0.5)
    img = c0 + (c1 - c0) * t[..., None]
    if kind == "noise":
        img = img + noise.normal(0, 14, img.shape)
    return img


def _paint(img: np.ndarray, mask: np.ndarray, rgb: tuple) -> None:
    img[:] = img * (1 - mask[..., None]) + np.array(rgb, dtype=float) * mask[..., None]


def _shade(rng: random.Random, color: str) -> tuple:
    base = rng.choice(SHADES[color])
    return tuple(min(255, max(0, c + rng.randint(-12, 12))) for c in base)


def _clutter(rng: random.Random, img: np.ndarray, n: int) -> None:
    """`n` small grey specks: distractors that are not shapes (and are never counted)."""
    x, y = _grid()
    for _ in range(n):
        cx, cy, r = rng.uniform(2, SIZE - 2), rng.uniform(2, SIZE - 2), rng.uniform(0.8, 1.5)
        grey = rng.choice((110, 140, 170))
        _paint(img, _downsample((x - cx) ** 2 + (y - cy) ** 2 <= r * r), (grey, grey, grey))


def _to_image(img: np.ndarray) -> Image.Image:
    return Image.fromarray(np.clip(np.rint(img), 0, 255).astype(np.uint8), "RGB")


def styleshift_record(rng: random.Random, noise: np.random.Generator, attribute: str) -> Record:
    """One image and its pretraining-style note about `attribute` (one of ATTRIBUTES)."""
    img = _background(rng, noise)
    if attribute == "letter":
        value = rng.choice(LETTERS)
        ink = (rng.randint(10, 50),) * 3 if img.mean() > 128 else (rng.randint(215, 250),) * 3
        _paint(img, _letter_mask(rng, value), ink)
        value = value.lower()
    elif attribute == "count":
        n = rng.randint(1, len(COUNT_WORDS))
        cells = rng.sample(range(16), n)  # a 4x4 grid this time (coin-mini: 3x3)
        for cell in cells:
            r = rng.uniform(5, 7)
            cx = (cell % 4 + 0.5) * SIZE / 4 + rng.uniform(-2, 2)
            cy = (cell // 4 + 0.5) * SIZE / 4 + rng.uniform(-2, 2)
            color = rng.choice(list(SHADES))
            _paint(img, _shape_mask(rng, rng.choice(SHAPES), cx, cy, r), _shade(rng, color))
        value = COUNT_WORDS[n - 1]
    else:
        color, shape = rng.choice(list(SHADES)), rng.choice(SHAPES)
        if attribute == "position":  # a small shape in one quadrant, without coin-mini's guide lines
            q = rng.randrange(4)
            r = rng.uniform(7, 11)
            cx = (q % 2 + 0.5) * SIZE / 2 + rng.uniform(-5, 5)
            cy = (q // 2 + 0.5) * SIZE / 2 + rng.uniform(-5, 5)
        else:
            r = rng.uniform(10, 22)
            lo, hi = r * 0.9 + 2, SIZE - r * 0.9 - 2
            cx, cy = rng.uniform(lo, hi), rng.uniform(lo, hi)
        _paint(img, _shape_mask(rng, shape, cx, cy, r), _shade(rng, color))
        value = REGIONS[q] if attribute == "position" else color if attribute == "color" else shape
    _clutter(rng, img, rng.randint(0, 4))
    return Record(_to_image(img), f"Describe the {attribute}.", f"{attribute}: {value}.")


def styleshift_split(seed: int, split: str, n: int) -> list[Record]:
    """`n` records of one split, the attributes in turn (balanced), deterministic for (seed, split)."""
    rng = random.Random(f"{seed}/styleshift/{split}")
    noise = np.random.default_rng(rng.getrandbits(64))
    return [styleshift_record(rng, noise, ATTRIBUTES[i % len(ATTRIBUTES)]) for i in range(n)]


def write_styleshift_suite(out: Path, seed: int = 0, n_train: int = 200, n_test: int = 500) -> Path:
    """Write the style-shifted suite as a bundle (train: for a text-only prior or probing; test: scored)."""
    spec = {"name": "styleshift", "format_version": 1, "metric": "exact_match",
            "description": "coin-mini's attributes drawn by another renderer in unseen styles; the base's own notes."}
    return write_bundle(Path(out), spec, {split: styleshift_split(seed, split, n)
                                          for split, n in (("train", n_train), ("test", n_test))})
