"""Domain-randomised pretraining scenes: coin-mini's four scene kinds, drawn with far more variety.

A base pretrained only on coin-mini's renderer learns that renderer (one size range, upright
shapes, one tone per colour, plain backgrounds, one font) and not shapes, counts and letters: on
images drawn another way it answers at the text-only prior (docs/method.md, "Does the base
see?"). These scenes keep coin-mini's attribute values and its scene kinds (so captions and
attribute notes are derived the same way, `cmoe.data.synth.caption`) but randomise everything
else: shapes rotated, stretched or hollow, sizes from small to large, wider tints and shades of
each colour name, solid or two-tone backgrounds light or dark, grey line clutter, shapes counted
anywhere in the image instead of on a grid, quadrants with or without guide lines, and letters
rotated, in several sizes and stroke weights, light on dark or dark on light, sometimes drawn
at twice the size and downsampled (soft edges).

The style-shifted check (`cmoe.data.styleshift`) stays a style none of this uses: another
rasteriser (numpy coverage, 4x supersampled), gradient, noise and stripe backgrounds, speck
clutter, a stroke font, counts on a 4x4 grid.
"""

from __future__ import annotations

import math
import random

from PIL import Image, ImageDraw, ImageFont

from cmoe.data.synth import COLORS, COUNT_WORDS, LETTERS, REGIONS, SHAPES, SIZE, Scene

_FONTS: dict[int, ImageFont.FreeTypeFont] = {}


def _outline(shape: str, r: float) -> list[tuple[float, float]]:
    """The shape's polygon in local coordinates (centre 0, y down), coin-mini's proportions."""
    if shape == "circle":
        return [(r * math.cos(2 * math.pi * i / 36), r * math.sin(2 * math.pi * i / 36)) for i in range(36)]
    if shape == "square":
        s = r * 0.85
        return [(-s, -s), (s, -s), (s, s), (-s, s)]
    if shape == "triangle":
        return [(0, -r), (r, r * 0.8), (-r, r * 0.8)]
    if shape == "cross":
        w = r * 0.38
        return [(-w, -r), (w, -r), (w, -w), (r, -w), (r, w), (w, w), (w, r), (-w, r), (-w, w), (-r, w), (-r, -w),
                (-w, -w)]
    raise ValueError(f"unknown shape {shape!r}")


def _color(rng: random.Random, name: str) -> tuple[int, int, int]:
    """A tint or shade of colour `name`: mixed with white or black by up to 25 %, jittered."""
    rgb = COLORS[name]
    mix, toward = rng.uniform(0, 0.25), (255 if rng.random() < 0.5 else 0)
    return tuple(max(0, min(255, round(c + (toward - c) * mix) + rng.randint(-25, 25))) for c in rgb)


def _background(rng: random.Random, scale: int) -> tuple[Image.Image, bool]:
    """A solid or two-tone background, light (70 %) or dark; (image, is_dark)."""
    dark = rng.random() < 0.3
    lo, hi = (15, 90) if dark else (150, 250)
    n = SIZE * scale
    img = Image.new("RGB", (n, n), tuple(rng.randint(lo, hi) for _ in range(3)))
    if rng.random() < 0.35:  # two tones split by a random straight edge
        a, b = (rng.uniform(0, n), 0), (rng.uniform(0, n), n)
        corner = [(0, 0), a, b, (0, n)] if rng.random() < 0.5 else [a, (n, 0), (n, n), b]
        ImageDraw.Draw(img).polygon(corner, fill=tuple(rng.randint(lo, hi) for _ in range(3)))
    return img, dark


def _clutter(rng: random.Random, draw: ImageDraw.ImageDraw, scale: int) -> None:
    """Zero to three thin grey line segments: distractors that are neither shapes nor letters."""
    n = SIZE * scale
    for _ in range(rng.randint(0, 3)):
        x, y = rng.uniform(0, n), rng.uniform(0, n)
        a, length = rng.uniform(0, math.pi), rng.uniform(4, 10) * scale
        grey = rng.randint(100, 180)
        draw.line((x, y, x + length * math.cos(a), y + length * math.sin(a)), fill=(grey,) * 3, width=scale)


def _draw_shape(rng: random.Random, draw: ImageDraw.ImageDraw, shape: str, color: str, cx: float, cy: float,
                r: float, scale: int) -> None:
    """A rotated, stretched, filled or hollow `shape` of half-size r centred at (cx, cy) (output px)."""
    angle = rng.uniform(0, 2 * math.pi)
    stretch = rng.uniform(0.8, 1.25)
    cos, sin = math.cos(angle), math.sin(angle)
    pts = [((x * stretch * cos - y / stretch * sin + cx) * scale, (x * stretch * sin + y / stretch * cos + cy) * scale)
           for x, y in _outline(shape, r)]
    fill = _color(rng, color)
    if rng.random() < 0.3:
        draw.polygon(pts, outline=fill, width=rng.randint(2, 3) * scale)
    else:
        draw.polygon(pts, fill=fill)


def _finish(img: Image.Image, scale: int) -> Image.Image:
    return img if scale == 1 else img.resize((SIZE, SIZE), Image.Resampling.LANCZOS)


def varied_scene(rng: random.Random, kind: str) -> Scene:
    """One randomised scene of coin-mini's `kind` (plain, multi, card or grid), captioned like coin-mini's."""
    scale = 2 if rng.random() < 0.5 else 1  # half the images get soft (downsampled) edges
    img, dark = _background(rng, scale)
    draw = ImageDraw.Draw(img)
    shapes: list[tuple[str, str]] = []
    letter = region = None
    if kind == "card":
        letter = rng.choice(LETTERS)
        size = rng.randint(24, 46)
        font = _FONTS.setdefault(size * scale, ImageFont.load_default(size=size * scale))
        ink = (rng.randint(200, 250),) * 3 if dark else (rng.randint(10, 70),) * 3
        layer = Image.new("L", img.size, 0)
        pos = ((SIZE / 2 + rng.uniform(-8, 8)) * scale, (SIZE / 2 + rng.uniform(-8, 8)) * scale)
        weight = rng.randint(0, 2) * scale  # stroke width: thin to bold
        ImageDraw.Draw(layer).text(pos, letter, font=font, fill=255, anchor="mm", stroke_width=weight, stroke_fill=255)
        layer = layer.rotate(rng.uniform(-20, 20), resample=Image.Resampling.BILINEAR, center=pos)
        img.paste(Image.new("RGB", img.size, ink), mask=layer)
    elif kind == "multi":
        n = rng.randint(1, len(COUNT_WORDS))
        placed: list[tuple[float, float]] = []
        while len(placed) < n:  # anywhere, apart enough that shapes never touch (counting stays exact)
            p = (rng.uniform(8, SIZE - 8), rng.uniform(8, SIZE - 8))
            if all(math.dist(p, q) > 17 for q in placed):
                placed.append(p)
        for cx, cy in placed:
            color, shape = rng.choice(list(COLORS)), rng.choice(SHAPES)
            _draw_shape(rng, draw, shape, color, cx, cy, rng.uniform(5, 8), scale)
            shapes.append((color, shape))
    else:
        color, shape = rng.choice(list(COLORS)), rng.choice(SHAPES)
        if kind == "grid":
            q = rng.randrange(4)
            region = REGIONS[q]
            if rng.random() < 0.5:
                grey = (rng.randint(100, 180),) * 3
                draw.line((SIZE / 2 * scale, 0, SIZE / 2 * scale, SIZE * scale), fill=grey, width=scale)
                draw.line((0, SIZE / 2 * scale, SIZE * scale, SIZE / 2 * scale), fill=grey, width=scale)
            r = rng.uniform(7, 11)
            cx = (q % 2 + 0.5) * SIZE / 2 + rng.uniform(-5, 5)
            cy = (q // 2 + 0.5) * SIZE / 2 + rng.uniform(-5, 5)
        else:
            r = rng.uniform(9, 22)
            lo, hi = r * 1.1 + 1, SIZE - r * 1.1 - 1
            cx, cy = rng.uniform(lo, hi), rng.uniform(lo, hi)
        _draw_shape(rng, draw, shape, color, cx, cy, r, scale)
        shapes.append((color, shape))
    if kind != "card":
        _clutter(rng, draw, scale)
    return Scene(kind, _finish(img, scale), shapes, letter=letter, region=region)
