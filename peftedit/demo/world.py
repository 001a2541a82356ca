"""The demo world: coloured shapes on a white 64x64 canvas, its prompts, a seeded generator and an analytic reader.

Everything here is pure numpy + PIL so tests and benchmarks can draw and read scenes without a model.
"""

from __future__ import annotations

import random
from collections import deque
from dataclasses import dataclass, field

import numpy as np
from PIL import Image, ImageDraw

IMAGE_SIZE = 64
BACKGROUND = (255, 255, 255)
COLORS: dict[str, tuple[int, int, int]] = {
    "red": (220, 40, 40),
    "green": (40, 170, 60),
    "blue": (40, 90, 220),
    "yellow": (235, 200, 30),
    "purple": (140, 60, 190),
}
SHAPES = ("circle", "square", "triangle")
SIZES: dict[str, int] = {"small": 14, "large": 26}  # bounding-box side in pixels
POSITIONS: dict[str, int] = {"left": 16, "center": 32, "right": 48}  # bounding-box centre x
CENTER_Y = 32
JITTER = 2  # max offset (pixels) of a box centre in x and y
WHERE = {"left": "on the left", "right": "on the right", "center": "in the center"}
JOINER = " and "
WORDS = tuple(
    dict.fromkeys(["a", "on", "the", "in", "and", *COLORS, *SHAPES, *SIZES, *POSITIONS]),
)


@dataclass(frozen=True)
class WorldObject:
    """One filled shape; ``dx``/``dy`` are the jitter of its box centre and do not take part in equality."""

    color: str
    shape: str
    size: str
    position: str
    dx: int = field(default=0, compare=False)
    dy: int = field(default=0, compare=False)

    def __post_init__(self) -> None:
        for name, value, allowed in (
            ("color", self.color, COLORS),
            ("shape", self.shape, SHAPES),
            ("size", self.size, SIZES),
            ("position", self.position, POSITIONS),
        ):
            if value not in allowed:
                raise ValueError(f"{name} {value!r} is not one of {', '.join(allowed)}")

    def box(self) -> tuple[int, int, int, int]:
        """Inclusive pixel box (x0, y0, x1, y1) of the shape."""
        side = SIZES[self.size]
        x0 = POSITIONS[self.position] + self.dx - side // 2
        y0 = CENTER_Y + self.dy - side // 2
        return x0, y0, x0 + side - 1, y0 + side - 1

    def prompt(self) -> str:
        return f"a {self.size} {self.color} {self.shape} {WHERE[self.position]}"


@dataclass(frozen=True)
class Scene:
    """One object anywhere, or two objects: the first on the left, the second on the right."""

    objects: tuple[WorldObject, ...]

    def __post_init__(self) -> None:
        positions = tuple(o.position for o in self.objects)
        if len(self.objects) == 2 and positions != ("left", "right"):
            raise ValueError(f"a two-object scene needs (left, right) objects, got {positions}")
        if len(self.objects) not in (1, 2):
            raise ValueError(f"a scene holds one or two objects, got {len(self.objects)}")

    def prompt(self) -> str:
        return JOINER.join(o.prompt() for o in self.objects)

    def draw(self) -> Image.Image:
        """The scene as a 64x64 RGB image."""
        image = Image.new("RGB", (IMAGE_SIZE, IMAGE_SIZE), BACKGROUND)
        pen = ImageDraw.Draw(image)
        for obj in self.objects:
            x0, y0, x1, y1 = obj.box()
            fill = COLORS[obj.color]
            if obj.shape == "circle":
                pen.ellipse((x0, y0, x1, y1), fill=fill)
            elif obj.shape == "square":
                pen.rectangle((x0, y0, x1, y1), fill=fill)
            else:
                pen.polygon([((x0 + x1) / 2, y0), (x0, y1), (x1, y1)], fill=fill)
        return image


def parse_prompt(text: str) -> Scene:
    """The scene a full world prompt describes; ValueError on any text outside the world grammar."""
    parts = text.strip().split(JOINER)
    objects = []
    for part in parts:
        words = part.split()
        if len(words) < 5 or words[0] != "a":
            raise ValueError(f"not a world prompt: {text!r} (expected 'a SIZE COLOR SHAPE on the left|right…')")
        where = " ".join(words[4:])
        position = next((p for p, w in WHERE.items() if w == where), None)
        size, color, shape = words[1:4]
        if position is None or size not in SIZES or color not in COLORS or shape not in SHAPES:
            raise ValueError(f"not a world prompt: {part!r} in {text!r}")
        objects.append(WorldObject(color, shape, size, position))
    return Scene(tuple(objects))


def random_object(rng: random.Random, position: str) -> WorldObject:
    """A random object at ``position`` with random jitter."""
    return WorldObject(
        color=rng.choice(list(COLORS)),
        shape=rng.choice(SHAPES),
        size=rng.choice(list(SIZES)),
        position=position,
        dx=rng.randint(-JITTER, JITTER),
        dy=rng.randint(-JITTER, JITTER),
    )


def random_scene(rng: random.Random, two_object_fraction: float = 0.5) -> Scene:
    """A random scene: two objects (left, right) with probability ``two_object_fraction``, else one anywhere."""
    if rng.random() < two_object_fraction:
        return Scene((random_object(rng, "left"), random_object(rng, "right")))
    return Scene((random_object(rng, rng.choice(list(POSITIONS))),))


def random_scenes(count: int, seed: int, two_object_fraction: float = 0.5) -> list[Scene]:
    """``count`` scenes, the same for the same seed."""
    rng = random.Random(seed)
    return [random_scene(rng, two_object_fraction) for _ in range(count)]


def all_single_scenes() -> list[Scene]:
    """Every single-object scene without jitter (5 colours x 3 shapes x 2 sizes x 3 positions = 90)."""
    return [Scene((WorldObject(c, s, z, p),)) for p in POSITIONS for z in SIZES for c in COLORS for s in SHAPES]


# ---- reader -------------------------------------------------------------------------------------------------

COLOR_TOLERANCE = 90.0  # max RGB distance from a palette colour for a pixel to count as that colour
MIN_PIXELS = 25  # components smaller than this are specks (a small circle has ~150 pixels)
SIZE_SPLIT = (SIZES["small"] + SIZES["large"]) / 2  # box side separating small from large
SQUARE_FILL = 0.9  # fill ratio of the bounding box above which a shape is a square (circle ~0.79, triangle ~0.5)
TRIANGLE_TOP_RATIO = 0.6  # top-half/bottom-half pixel ratio below which a shape is a triangle (circle ~1)
POSITION_SPLIT = ((POSITIONS["left"] + POSITIONS["center"]) / 2, (POSITIONS["center"] + POSITIONS["right"]) / 2)


def _label_pixels(image: Image.Image) -> np.ndarray:
    """Per pixel: palette index of the nearest colour within tolerance, else -1 (background or unknown)."""
    pixels = np.asarray(image.convert("RGB"), dtype=np.float32)
    palette = np.array([BACKGROUND, *COLORS.values()], dtype=np.float32)
    dist = np.linalg.norm(pixels[:, :, None, :] - palette[None, None], axis=-1)
    nearest = dist.argmin(-1)
    ok = dist.min(-1) <= COLOR_TOLERANCE
    return np.where(ok & (nearest > 0), nearest - 1, -1)


def _components(mask: np.ndarray) -> list[np.ndarray]:
    """4-connected components of a boolean mask, each as an (N, 2) array of (y, x)."""
    seen = np.zeros_like(mask)
    out = []
    height, width = mask.shape
    for y, x in zip(*np.nonzero(mask), strict=True):
        if seen[y, x]:
            continue
        seen[y, x] = True
        queue, members = deque([(y, x)]), []
        while queue:
            cy, cx = queue.popleft()
            members.append((cy, cx))
            for ny, nx in ((cy - 1, cx), (cy + 1, cx), (cy, cx - 1), (cy, cx + 1)):
                if 0 <= ny < height and 0 <= nx < width and mask[ny, nx] and not seen[ny, nx]:
                    seen[ny, nx] = True
                    queue.append((ny, nx))
        out.append(np.array(members))
    return out


def _read_component(color: str, points: np.ndarray) -> WorldObject:
    ys, xs = points[:, 0], points[:, 1]
    y0, y1, x0, x1 = ys.min(), ys.max(), xs.min(), xs.max()
    width, height = x1 - x0 + 1, y1 - y0 + 1
    fill = len(points) / (width * height)
    middle = (y0 + y1) / 2
    top, bottom = (ys < middle).sum(), (ys > middle).sum()
    if fill >= SQUARE_FILL:
        shape = "square"
    elif top < TRIANGLE_TOP_RATIO * max(bottom, 1):
        shape = "triangle"
    else:
        shape = "circle"
    size = "large" if max(width, height) >= SIZE_SPLIT else "small"
    center_x = (x0 + x1 + 1) / 2
    position = "left" if center_x < POSITION_SPLIT[0] else "right" if center_x > POSITION_SPLIT[1] else "center"
    dx = int(round(center_x - POSITIONS[position]))
    dy = int(round((y0 + y1 + 1) / 2 - CENTER_Y))
    return WorldObject(color, shape, size, position, dx=dx, dy=dy)


def read_objects(image: Image.Image) -> list[WorldObject]:
    """Every object found in ``image`` (specks ignored), sorted left to right."""
    labels = _label_pixels(image)
    found = []
    for index, color in enumerate(COLORS):
        for points in _components(labels == index):
            if len(points) >= MIN_PIXELS:
                found.append(_read_component(color, points))
    return sorted(found, key=lambda o: o.dx + POSITIONS[o.position])


def read_scene(image: Image.Image) -> Scene:
    """The scene drawn in ``image``; ValueError when it holds no object, more than two, or two not left/right."""
    objects = read_objects(image)
    try:
        return Scene(tuple(objects))
    except ValueError as err:
        raise ValueError(f"image does not show a world scene: {err}") from None
