"""Procedural multi-object scenes: 128x128 images of 2-5 coloured shapes, with questions about specific objects.

Everything is drawn here from a seed (no downloads). Each item is one question about one scene:

- ``color``:       what color is the <shape>?                   (the shape occurs once)
- ``shape``:       what shape is the <color> object?            (the colour occurs once)
- ``exists``:      is there a <color> <shape>?                  (yes / no, drawn half and half)
- ``count_shape``: how many <shape>s are there?                 (0-5)
- ``count_all``:   how many objects are there?                  (2-5)
- ``left_of``:     what color is the object left of the <shape>?  (exactly one object has its centre left of it)
- ``above``:       what color is the object above the <shape>?    (exactly one object has its centre above it)

Every question has exactly one answer, one word long. ``.mask`` (bool, HxW) marks the pixels of the objects the
question is about: the asked object(s) and, for the spatial questions, the reference object too; for counts the
counted objects (empty when the count is 0); for a "no" to ``exists`` the objects that share the asked colour
or the asked shape (what one has to look at to say no; possibly empty).

``sample(n, seed)`` is deterministic: item ``i`` depends only on ``(seed, i)``, so a longer sample extends a
shorter one. The bundled model trains on scenes of ``TRAIN_SEED`` and is evaluated on ``sample(EVAL_SIZE,
EVAL_SEED)``; fresh held-out questions come from any other seed.
"""

from __future__ import annotations

import hashlib
import random
from dataclasses import dataclass

import numpy as np
from PIL import Image, ImageDraw

IMAGE_SIZE = 128
SHAPES = ("circle", "square", "rectangle", "triangle", "cross")
PLURALS = {"circle": "circles", "square": "squares", "rectangle": "rectangles", "triangle": "triangles",
           "cross": "crosses"}
COLORS = ("red", "green", "blue", "black", "gray", "teal", "brown", "yellow")  # easy-vqa's eight
RGB = {
    "red": (215, 35, 35),
    "green": (40, 160, 50),
    "blue": (35, 65, 215),
    "black": (25, 25, 25),
    "gray": (128, 128, 128),
    "teal": (0, 128, 128),
    "brown": (135, 80, 35),
    "yellow": (240, 205, 0),
}
KINDS = ("color", "shape", "exists", "count_shape", "count_all", "left_of", "above")
MIN_OBJECTS, MAX_OBJECTS = 2, 5
MIN_SIZE, MAX_SIZE = 14, 36  # the longer side of an object's box, pixels
GAP = 2  # free pixels between the boxes of two objects
SPATIAL_MARGIN = 4  # centres closer than this along the axis make "left of" / "above" ambiguous: not asked

TRAIN_SEED = 0  # training scenes: scene(TRAIN_SEED, i) for i = 0, 1, 2, ...
EVAL_SEED = 1  # the fixed evaluation set: sample(EVAL_SIZE, EVAL_SEED)
EVAL_SIZE = 700


@dataclass(frozen=True)
class SceneObject:
    shape: str
    color: str
    box: tuple[int, int, int, int]  # x0, y0, x1, y1 (exclusive), pixels

    @property
    def center(self) -> tuple[float, float]:
        x0, y0, x1, y1 = self.box
        return (x0 + x1) / 2, (y0 + y1) / 2


@dataclass(frozen=True)
class Scene:
    image: Image.Image  # RGB, IMAGE_SIZE x IMAGE_SIZE
    objects: tuple[SceneObject, ...]
    object_map: np.ndarray  # int8 [H, W]: -1 background, k = pixel of objects[k]

    def mask_of(self, indices) -> np.ndarray:
        """Bool [H, W]: the pixels of the objects with these indices."""
        return np.isin(self.object_map, list(indices))


@dataclass(frozen=True)
class Item:
    image: Image.Image
    question: str
    answer: str
    mask: np.ndarray  # bool [H, W]: pixels of the objects the question is about
    kind: str  # one of KINDS
    scene: Scene


# ----------------------------------------------------------------------------- drawing


def _draw_shape(draw: ImageDraw.ImageDraw, shape: str, box: tuple[int, int, int, int], fill) -> None:
    x0, y0, x1, y1 = box
    w, h = x1 - x0, y1 - y0
    if shape == "circle":
        draw.ellipse((x0, y0, x1 - 1, y1 - 1), fill=fill)
    elif shape in ("square", "rectangle"):
        draw.rectangle((x0, y0, x1 - 1, y1 - 1), fill=fill)
    elif shape == "triangle":
        draw.polygon([(x0 + (w - 1) / 2, y0), (x1 - 1, y1 - 1), (x0, y1 - 1)], fill=fill)
    elif shape == "cross":
        arm = max(3, round(w / 3))
        cx0, cy0 = x0 + (w - arm) // 2, y0 + (h - arm) // 2
        draw.rectangle((cx0, y0, cx0 + arm - 1, y1 - 1), fill=fill)
        draw.rectangle((x0, cy0, x1 - 1, cy0 + arm - 1), fill=fill)
    else:
        raise ValueError(f"unknown shape {shape!r}")


def _box_size(rng: random.Random, shape: str) -> tuple[int, int]:
    if shape == "rectangle":  # clearly not square: short side 45-60% of the long one
        long = rng.randint(20, MAX_SIZE)
        short = max(9, round(long * rng.uniform(0.45, 0.6)))
        return (long, short) if rng.random() < 0.5 else (short, long)
    side = rng.randint(MIN_SIZE, MAX_SIZE)
    return side, side


def _apart(a: tuple[int, int, int, int], b: tuple[int, int, int, int]) -> bool:
    return a[2] + GAP <= b[0] or b[2] + GAP <= a[0] or a[3] + GAP <= b[1] or b[3] + GAP <= a[1]


def render(objects: list[SceneObject] | tuple[SceneObject, ...], background=(245, 245, 240),
           jitter: random.Random | None = None) -> Scene:
    """Draw objects (boxes must not overlap) on a plain background; `jitter` varies each object's RGB a little."""
    image = Image.new("RGB", (IMAGE_SIZE, IMAGE_SIZE), tuple(background))
    object_map = np.full((IMAGE_SIZE, IMAGE_SIZE), -1, dtype=np.int8)
    for k, obj in enumerate(objects):
        if obj.shape not in SHAPES or obj.color not in COLORS:
            raise ValueError(f"unknown object {obj}")
        x0, y0, x1, y1 = obj.box
        if not (0 <= x0 < x1 <= IMAGE_SIZE and 0 <= y0 < y1 <= IMAGE_SIZE):
            raise ValueError(f"box {obj.box} outside the {IMAGE_SIZE}x{IMAGE_SIZE} image")
        for other in objects[:k]:
            if not _apart(obj.box, other.box):
                raise ValueError(f"boxes {other.box} and {obj.box} overlap")
        stencil = Image.new("L", (IMAGE_SIZE, IMAGE_SIZE), 0)
        _draw_shape(ImageDraw.Draw(stencil), obj.shape, obj.box, 255)
        stencil_pixels = np.array(stencil) > 0
        object_map[stencil_pixels] = k
        rgb = RGB[obj.color]
        if jitter is not None:
            rgb = tuple(min(255, max(0, c + jitter.randint(-12, 12))) for c in rgb)
        image.paste(Image.new("RGB", image.size, rgb), (0, 0), stencil)
    return Scene(image, tuple(objects), object_map)


def random_scene(rng: random.Random) -> Scene:
    """2-5 objects of random shape, colour and size at random free places on a random light background."""
    while True:
        count = rng.randint(MIN_OBJECTS, MAX_OBJECTS)
        objects: list[SceneObject] = []
        for _ in range(count):
            shape, color = rng.choice(SHAPES), rng.choice(COLORS)
            w, h = _box_size(rng, shape)
            for _attempt in range(50):
                x0, y0 = rng.randint(0, IMAGE_SIZE - w), rng.randint(0, IMAGE_SIZE - h)
                box = (x0, y0, x0 + w, y0 + h)
                if all(_apart(box, o.box) for o in objects):
                    objects.append(SceneObject(shape, color, box))
                    break
        if len(objects) == count:
            break
    background = tuple(rng.randint(228, 255) for _ in range(3))
    return render(objects, background, jitter=rng)


# ----------------------------------------------------------------------------- questions


def _indices(scene: Scene, shape: str | None = None, color: str | None = None) -> list[int]:
    return [k for k, o in enumerate(scene.objects)
            if (shape is None or o.shape == shape) and (color is None or o.color == color)]


def _only_neighbour(scene: Scene, ref: int, axis: int) -> int | None:
    """The one object whose centre is left of (axis 0) / above (axis 1) the reference's, if exactly one is and
    no other centre is within SPATIAL_MARGIN of the reference's along that axis; else None."""
    ref_c = scene.objects[ref].center[axis]
    before = []
    for k, o in enumerate(scene.objects):
        if k == ref:
            continue
        delta = ref_c - o.center[axis]
        if abs(delta) < SPATIAL_MARGIN:
            return None
        if delta > 0:
            before.append(k)
    return before[0] if len(before) == 1 else None


def question_about(scene: Scene, kind: str, rng: random.Random) -> tuple[str, str, list[int]] | None:
    """One question of `kind` about the scene as (question, answer, indices of the objects it is about), or None
    where the scene has no question of that kind with a unique answer."""
    objects = scene.objects
    unique_shapes = [s for s in SHAPES if len(_indices(scene, shape=s)) == 1]
    if kind == "color":
        if not unique_shapes:
            return None
        shape = rng.choice(unique_shapes)
        k = _indices(scene, shape=shape)[0]
        return f"what color is the {shape}?", objects[k].color, [k]
    if kind == "shape":
        unique_colors = [c for c in COLORS if len(_indices(scene, color=c)) == 1]
        if not unique_colors:
            return None
        color = rng.choice(unique_colors)
        k = _indices(scene, color=color)[0]
        return f"what shape is the {color} object?", objects[k].shape, [k]
    if kind == "exists":
        if rng.random() < 0.5:
            k = rng.randrange(len(objects))
            shape, color = objects[k].shape, objects[k].color
            return f"is there a {color} {shape}?", "yes", _indices(scene, shape, color)
        absent = [(c, s) for c in COLORS for s in SHAPES if not _indices(scene, s, c)]
        # half of the "no" questions name a colour and a shape that are both in the scene, on different objects
        mixed = [(c, s) for c, s in absent if _indices(scene, color=c) and _indices(scene, shape=s)]
        color, shape = rng.choice(mixed if mixed and rng.random() < 0.5 else absent)
        related = sorted(set(_indices(scene, color=color)) | set(_indices(scene, shape=shape)))
        return f"is there a {color} {shape}?", "no", related
    if kind == "count_shape":
        present = sorted({o.shape for o in objects})
        shape = rng.choice(present) if rng.random() < 0.5 else rng.choice(SHAPES)
        counted = _indices(scene, shape=shape)
        return f"how many {PLURALS[shape]} are there?", str(len(counted)), counted
    if kind == "count_all":
        return "how many objects are there?", str(len(objects)), list(range(len(objects)))
    if kind in ("left_of", "above"):
        axis = 0 if kind == "left_of" else 1
        options = []
        for shape in unique_shapes:
            ref = _indices(scene, shape=shape)[0]
            other = _only_neighbour(scene, ref, axis)
            if other is not None:
                options.append((shape, ref, other))
        if not options:
            return None
        shape, ref, other = rng.choice(options)
        where = "left of" if kind == "left_of" else "above"
        return f"what color is the object {where} the {shape}?", objects[other].color, sorted([ref, other])
    raise ValueError(f"kind must be one of {', '.join(KINDS)}, got {kind!r}")


def make_item(scene: Scene, kind: str, rng: random.Random) -> Item | None:
    asked = question_about(scene, kind, rng)
    if asked is None:
        return None
    question, answer, indices = asked
    return Item(scene.image, question, answer, scene.mask_of(indices), kind, scene)


def _rng(seed: int, index: int, stream: str) -> random.Random:
    return random.Random(f"corematching-scenes:{stream}:{seed}:{index}")


def scene(seed: int, index: int) -> Scene:
    """Scene `index` of the scene stream of `seed` (the training scenes are scene(TRAIN_SEED, i))."""
    return random_scene(_rng(seed, index, "scene"))


def questions_for(scene_: Scene, rng: random.Random, per_kind: int = 2) -> list[Item]:
    """Up to `per_kind` distinct questions of every kind about one scene (the training questions)."""
    items, asked = [], set()
    for kind in KINDS:
        for _ in range(per_kind):
            item = make_item(scene_, kind, rng)
            if item is not None and item.question not in asked:
                asked.add(item.question)
                items.append(item)
    return items


def sample(n: int, seed: int) -> list[Item]:
    """`n` items, one question each about its own scene; the kinds are drawn uniformly (a scene without a
    question of the drawn kind is replaced by the next scene of the same item's stream). Deterministic:
    item i depends only on (seed, i)."""
    if not isinstance(n, int) or n < 0:
        raise ValueError(f"n must be a non-negative int, got {n!r}")
    if not isinstance(seed, int):
        raise ValueError(f"seed must be an int, got {seed!r}")
    items = []
    for i in range(n):
        rng = _rng(seed, i, "item")
        kind = rng.choice(KINDS)
        while (item := make_item(random_scene(rng), kind, rng)) is None:
            pass
        items.append(item)
    return items


def image_digest(image: Image.Image) -> str:
    """A fingerprint of an image's pixels (to check that no evaluation image is a training image)."""
    return hashlib.sha1(image.tobytes()).hexdigest()
