"""The synthetic CoIN-like suite `coin-mini`: seven small VQA tasks rendered with PIL, in order.

Modelled on CoIN's task mix (classification, attribute naming, counting, OCR, grounding), sized so
that one task trains in a few minutes on 2 CPU cores. Three design constraints shape it:

* The task locator needs a signal, so tasks differ in image style and instruction wording.
* Forgetting must be real, so `shape-name` and `color-name` ask different questions about the
  *same kind* of image: naive sequential fine-tuning on one overwrites the other.
* PGKE must face both of its decisions: `hue-name` is a skill the lineage already has
  (color-name's, other samples and wording: it should need no new expert), `count-color` one it
  lacks (counting the shapes of one colour). They come last, and every task draws from its own
  random stream, so the first five tasks' bundles stay byte-identical.

It also writes `pretrain/`, a captioning corpus over every image style whose descriptions mention
every attribute the tasks ask about (colour, shape, count, letter, region): the frozen base must
already see and say all of them, or experts trained over it have nothing to build on.
"""

from __future__ import annotations

import random
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from PIL import Image, ImageDraw, ImageFont

from cmoe.config import BaseModelConfig

from cmoe.data.writer import Record, write_bundle

# px; measured on a tiny LLaVA with 8-px patches: shape naming stalled at 60-76 % at 32 px,
# reached 93 % at 64 px
SIZE = 64

# Few, well-separated values per attribute: the suite tests continual learning, not perception,
# and the base must master every value within its few-minute pretraining budget.
COLORS = {
    "red": (215, 40, 40),
    "green": (40, 165, 60),
    "blue": (45, 80, 220),
    "yellow": (235, 200, 30),
}
SHAPES = ("circle", "square", "triangle", "cross")
LETTERS = tuple("AEHKTX")  # visually distinct capitals; a 64 px OCR task, not a font zoo
COUNT_WORDS = ("one", "two", "three", "four")
REGIONS = ("top left", "top right", "bottom left", "bottom right")
CARD_COLORS = ((250, 200, 210), (200, 240, 215), (200, 225, 250), (245, 230, 190))  # pastel pink, mint, sky, sand

# ---------------------------------------------------------------------------------------------
# Drawing primitives


def _draw_shape(draw: ImageDraw.ImageDraw, shape: str, cx: float, cy: float, r: float, fill: tuple) -> None:
    """Draw `shape` centred at (cx, cy) with half-size r."""
    if shape == "circle":
        draw.ellipse((cx - r, cy - r, cx + r, cy + r), fill=fill)
    elif shape == "square":
        s = r * 0.85  # a square of the same half-size looks bigger than the circle; even them out
        draw.rectangle((cx - s, cy - s, cx + s, cy + s), fill=fill)
    elif shape == "triangle":
        draw.polygon([(cx, cy - r), (cx + r, cy + r * 0.8), (cx - r, cy + r * 0.8)], fill=fill)
    elif shape == "cross":
        w = r * 0.38
        draw.rectangle((cx - r, cy - w, cx + r, cy + w), fill=fill)
        draw.rectangle((cx - w, cy - r, cx + w, cy + r), fill=fill)
    else:
        raise ValueError(f"unknown shape {shape!r}")


def _jitter(rng: random.Random, rgb: tuple, amount: int = 18) -> tuple:
    return tuple(max(0, min(255, c + rng.randint(-amount, amount))) for c in rgb)


def _background(rng: random.Random, base: tuple) -> Image.Image:
    return Image.new("RGB", (SIZE, SIZE), _jitter(rng, base, 8))


@dataclass
class Scene:
    """What was drawn, so questions and captions are derived from one source of truth."""

    style: str  # plain | multi | card | grid
    image: Image.Image
    shapes: list[tuple[str, str]]  # (color, shape) per drawn object
    letter: str | None = None
    region: str | None = None
    target: str | None = None  # the value a question is about ("{target}" in its wording), e.g. a colour


def plain_scene(rng: random.Random) -> Scene:
    """One mid-size shape on a near-white background."""
    img = _background(rng, (248, 248, 248))
    color, shape = rng.choice(list(COLORS)), rng.choice(SHAPES)
    r = rng.uniform(13, 18)  # big enough to span several 16-px patches: shape is the hardest attribute
    cx, cy = rng.uniform(r + 2, SIZE - r - 2), rng.uniform(r + 2, SIZE - r - 2)
    _draw_shape(ImageDraw.Draw(img), shape, cx, cy, r, _jitter(rng, COLORS[color]))
    return Scene("plain", img, [(color, shape)])


def _draw_in_cell(rng: random.Random, draw: ImageDraw.ImageDraw, cell: int, color: str, shape: str) -> None:
    """A small shape in cell `cell` of a 3x3 grid over the image."""
    r = rng.uniform(6, 8)
    cx = (cell % 3 + 0.5) * SIZE / 3 + rng.uniform(-2, 2)
    cy = (cell // 3 + 0.5) * SIZE / 3 + rng.uniform(-2, 2)
    _draw_shape(draw, shape, cx, cy, r, _jitter(rng, COLORS[color]))


def multi_scene(rng: random.Random) -> Scene:
    """One to four small shapes on a beige background, placed in distinct cells of a 3x3 grid."""
    img = _background(rng, (236, 228, 210))
    n = rng.randint(1, len(COUNT_WORDS))
    cells = rng.sample(range(9), n)
    draw, shapes = ImageDraw.Draw(img), []
    for cell in cells:
        color, shape = rng.choice(list(COLORS)), rng.choice(SHAPES)
        _draw_in_cell(rng, draw, cell, color, shape)
        shapes.append((color, shape))
    return Scene("multi", img, shapes)


def color_count_scene(rng: random.Random) -> Scene:
    """A multi scene with one to four shapes of a target colour among up to two of other colours."""
    img = _background(rng, (236, 228, 210))
    target = rng.choice(list(COLORS))
    others = [c for c in COLORS if c != target]
    colors = [target] * rng.randint(1, len(COUNT_WORDS)) + [rng.choice(others) for _ in range(rng.randint(0, 2))]
    rng.shuffle(colors)
    draw, shapes = ImageDraw.Draw(img), []
    for cell, color in zip(rng.sample(range(9), len(colors)), colors):
        shape = rng.choice(SHAPES)
        _draw_in_cell(rng, draw, cell, color, shape)
        shapes.append((color, shape))
    return Scene("multi", img, shapes, target=target)


_FONT_CACHE: dict[int, ImageFont.FreeTypeFont] = {}


def card_scene(rng: random.Random) -> Scene:
    """A dark capital letter on a pastel card with a border: the OCR-like style."""
    img = _background(rng, rng.choice(CARD_COLORS))
    draw = ImageDraw.Draw(img)
    draw.rectangle((1, 1, SIZE - 2, SIZE - 2), outline=(90, 90, 90), width=2)
    letter, size = rng.choice(LETTERS), rng.randint(34, 44)
    font = _FONT_CACHE.setdefault(size, ImageFont.load_default(size=size))
    pos = (SIZE / 2 + rng.uniform(-5, 5), SIZE / 2 + rng.uniform(-5, 5))
    draw.text(pos, letter, font=font, fill=_jitter(rng, (25, 25, 25), 15), anchor="mm")
    return Scene("card", img, [], letter=letter)


def grid_scene(rng: random.Random) -> Scene:
    """One small shape in one quadrant of a white field split by grey guide lines."""
    img = _background(rng, (255, 255, 255))
    draw = ImageDraw.Draw(img)
    draw.line((SIZE / 2, 0, SIZE / 2, SIZE), fill=(150, 150, 150), width=1)
    draw.line((0, SIZE / 2, SIZE, SIZE / 2), fill=(150, 150, 150), width=1)
    q = rng.randrange(4)
    color, shape = rng.choice(list(COLORS)), rng.choice(SHAPES)
    r = rng.uniform(8, 11)
    cx = (q % 2 + 0.5) * SIZE / 2 + rng.uniform(-4, 4)
    cy = (q // 2 + 0.5) * SIZE / 2 + rng.uniform(-4, 4)
    _draw_shape(draw, shape, cx, cy, r, _jitter(rng, COLORS[color]))
    return Scene("grid", img, [(color, shape)], region=REGIONS[q])


# ---------------------------------------------------------------------------------------------
# Tasks: a scene style + question wordings + the answer derived from the scene


@dataclass(frozen=True)
class TaskDef:
    name: str
    description: str
    metric: str
    scene: Callable[[random.Random], Scene]
    questions: tuple[str, ...]  # paraphrases; one is drawn per example; "{target}" = the scene's target
    answer: Callable[[Scene], str]
    extra_answers: Callable[[Scene], list[str]] = lambda s: []
    # Wordings no bundle ever uses: to measure how the task locator copes with re-worded questions
    # (benchmarks/locator_wording.py).
    unseen_questions: tuple[str, ...] = ()


def _count_digits(s: Scene) -> list[str]:
    n = len(s.shapes)
    return [COUNT_WORDS[n - 1], str(n)]


def _target_count(s: Scene) -> int:
    return sum(color == s.target for color, _ in s.shapes)


COIN_MINI: tuple[TaskDef, ...] = (
    TaskDef(
        "shape-name", "Classify the shape in the picture (ImageNet-like).", "exact_match", plain_scene,
        ("What shape is shown in the picture?", "Which shape is this?", "Name the shape you see."),
        lambda s: s.shapes[0][1],
        unseen_questions=("what shape is this?", "Identify the shape.", "Which figure is drawn?"),
    ),
    TaskDef(
        "color-name", "Name the colour of the shape (same images as shape-name, another question).",
        "exact_match", plain_scene,
        ("What color is the shape?", "Which color does the object have?", "Tell me the color of the figure."),
        lambda s: s.shapes[0][0],
        unseen_questions=("what color is the shape?", "What colour is it?", "Which color is the figure?"),
    ),
    TaskDef(
        "count-shapes", "Count the objects in a small scene (VQAv2/GQA-like counting).", "exact_match",
        multi_scene,
        ("How many shapes are there?", "Count the objects in the image.", "How many figures can you count?"),
        lambda s: COUNT_WORDS[len(s.shapes) - 1], _count_digits,
        unseen_questions=("How many objects do you see?", "count the shapes.", "What is the number of figures?"),
    ),
    TaskDef(
        "read-letter", "Read the capital letter printed on a card (OCR-VQA / TextVQA-like).", "exact_match",
        card_scene,
        ("Which letter is printed on the card?", "What letter is written here?", "Read the text on the card."),
        lambda s: s.letter.lower(),
        unseen_questions=("What letter is on the card?", "which letter do you see?", "What does the card say?"),
    ),
    TaskDef(
        "locate-shape", "Say which quadrant holds the shape (coarse grounding).", "exact_match", grid_scene,
        ("In which corner is the shape?", "Where is the object located?", "Which quadrant contains the figure?"),
        lambda s: s.region,
        unseen_questions=("Where is the shape?", "In which quadrant is the object?", "Which corner holds the figure?"),
    ),
    # A task the lineage already knows: color-name's skill on other samples, in other words. PGKE
    # should learn it without new experts (its router and locator VAE only).
    TaskDef(
        "hue-name", "Name the hue of the figure: color-name's skill again, other samples and wording.",
        "exact_match", plain_scene,
        ("Which hue does this figure have?", "Name the hue of the object.", "What hue is painted here?"),
        lambda s: s.shapes[0][0],
        unseen_questions=("What is the hue?", "Which hue is shown?", "Say the hue of the shape."),
    ),
    # A task that needs a new skill: counting only the shapes of one colour (no pretraining caption
    # or earlier task ties colour to count in a scene of several shapes).
    TaskDef(
        "count-color", "Count the shapes of one colour among others (compositional counting).", "exact_match",
        color_count_scene,
        ("Tally the {target} ones.", "What number of {target} items do you spot?", "{target} pieces: how many?"),
        lambda s: COUNT_WORDS[_target_count(s) - 1], lambda s: [COUNT_WORDS[_target_count(s) - 1], str(_target_count(s))],
        # fixed colours: the locator benchmark only routes these wordings, it does not score answers
        unseen_questions=("How many red things?", "Number of blue objects?", "Count every green one."),
    ),
)

SUITES = {"coin-mini": COIN_MINI}

# ---------------------------------------------------------------------------------------------
# Pretraining corpus: captions and terse attribute notes, naming every attribute tasks ask about
#
# Two "views" per image, in a dialect of their own: a full caption ("Describe the image." ->
# "a red circle.") and an attribute note ("Describe the color." -> "color: red."). The notes put
# each attribute at the first answer position, so the base learns to *attend* to every attribute
# on request; the tasks later ask in other words and expect other answer formats, which is what
# experts over the frozen base must learn.

CAPTION_PROMPTS = ("Describe the image.", "What does the picture show?", "Write a short caption.")


def _a(word: str) -> str:
    return f"an {word}" if word[0] in "aeiou" else f"a {word}"


def caption(s: Scene) -> str:
    """A one-line description of the scene."""
    if s.style == "card":
        return f"the letter {s.letter.lower()} on a card."
    if s.style == "multi":
        n = len(s.shapes)
        return f"{COUNT_WORDS[n - 1]} {'shape' if n == 1 else 'shapes'}."
    color, shape = s.shapes[0]
    return f"{_a(color)} {shape} in the {s.region}." if s.style == "grid" else f"{_a(color)} {shape}."


def attribute_notes(s: Scene) -> dict[str, str]:
    """Attribute name -> value for every attribute this style of scene shows."""
    if s.style == "card":
        return {"letter": s.letter.lower()}
    if s.style == "multi":
        return {"count": COUNT_WORDS[len(s.shapes) - 1]}
    notes = {"color": s.shapes[0][0], "shape": s.shapes[0][1]}
    return {**notes, "position": s.region} if s.style == "grid" else notes


PRETRAIN_STYLES = (plain_scene, multi_scene, card_scene, grid_scene)


PRETRAIN_KINDS = ("plain", "multi", "card", "grid")  # the scene kinds of PRETRAIN_STYLES, in order


def _pretrain_records(rng: random.Random, n: int, varied_share: float = 0.0) -> list[Record]:
    from cmoe.data.varied import varied_scene  # varied builds on this module's scenes: import when used

    out = []
    for i in range(n):
        k = i % len(PRETRAIN_STYLES)
        varied = varied_share > 0 and rng.random() < varied_share  # share 0: coin-mini's renderer, bit for bit
        s = varied_scene(rng, PRETRAIN_KINDS[k]) if varied else PRETRAIN_STYLES[k](rng)
        if rng.random() < 0.4:
            out.append(Record(s.image, rng.choice(CAPTION_PROMPTS), caption(s)))
        else:
            attr, value = rng.choice(sorted(attribute_notes(s).items()))
            out.append(Record(s.image, f"Describe the {attr}.", f"{attr}: {value}."))
    return out


def _task_records(task: TaskDef, rng: random.Random, n: int) -> list[Record]:
    out = []
    for _ in range(n):
        s = task.scene(rng)
        ans = task.answer(s)
        extra = task.extra_answers(s)
        out.append(Record(s.image, rng.choice(task.questions).format(target=s.target), ans, extra))
    return out


def caption_attributes(text: str) -> list[str]:
    """The attribute words (colour, shape, count, letter, region) a caption states, in order."""
    words = text.lower().rstrip(".").replace(",", "").replace(":", "").split()
    vocab = set(COLORS) | set(SHAPES) | set(COUNT_WORDS)
    found, i = [], 0
    while i < len(words):
        pair = " ".join(words[i:i + 2])
        if pair in REGIONS:
            found.append(pair)
            i += 2
            continue
        if words[i] in vocab or (i > 0 and words[i - 1] == "letter"):
            found.append(words[i])
        i += 1
    return found


def write_pretrain_corpus(out: Path, seed: int = 0, n_train: int = 8000, n_test: int = 300,
                          varied_share: float = 0.0) -> Path:
    """Write the captioning corpus the tiny base is pretrained on (every style, every attribute).

    A `varied_share` of the training images is drawn by `cmoe.data.varied` (domain-randomised);
    the test split stays coin-mini's renderer, so held-out scores compare across corpora.
    """
    pre = {"train": _pretrain_records(random.Random(f"{seed}/pretrain/train"), n_train, varied_share),
           "test": _pretrain_records(random.Random(f"{seed}/pretrain/test"), n_test)}
    spec = {"name": "pretrain-captions", "format_version": 1, "metric": "exact_match",
            "description": "Captions naming colour, shape, count, letter and region of every image style."}
    return write_bundle(Path(out), spec, pre)


def synth_suite(
    out: Path, suite: str = "coin-mini", seed: int = 0, n_train: int = 1200, n_test: int = 200,
    n_pretrain: int = 8000, varied_share: float = BaseModelConfig().varied_share,
) -> list[Path]:
    """Write the suite's task bundles (`NN-name/`, in order) and `pretrain/` under `out`."""
    if suite not in SUITES:
        raise ValueError(f"unknown suite {suite!r}; known: {', '.join(SUITES)}")
    # Every split must hold a row (the validator refuses an empty one); nothing is written otherwise.
    for what, n in (("train", n_train), ("test", n_test), ("pretrain", n_pretrain)):
        if n < 1:
            raise ValueError(f"--{what} must be at least 1 (got {n}): a bundle's splits cannot be empty")
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    paths = []
    for i, task in enumerate(SUITES[suite]):
        # One independent stream per task and split: adding a task never changes another's data.
        recs = {split: _task_records(task, random.Random(f"{seed}/{task.name}/{split}"), n)
                for split, n in (("train", n_train), ("test", n_test))}
        spec = {"name": task.name, "description": task.description, "format_version": 1, "metric": task.metric}
        paths.append(write_bundle(out / f"{i + 1:02d}-{task.name}", spec, recs))
    write_pretrain_corpus(out / "pretrain", seed, n_pretrain, varied_share=varied_share)
    return paths

