"""The demo world: deterministic generator, reader agreement, prompt grammar."""

from __future__ import annotations

import re

import numpy as np
import pytest
from PIL import Image

from peftedit.demo.world import (
    BACKGROUND,
    COLORS,
    IMAGE_SIZE,
    Scene,
    WorldObject,
    all_single_scenes,
    parse_prompt,
    random_scenes,
    read_scene,
)

AGREEMENT_SCENES = 500
AGREEMENT_GOAL = 0.99


def test_generator_is_deterministic():
    a, b = random_scenes(50, seed=7), random_scenes(50, seed=7)
    assert [s.prompt() for s in a] == [s.prompt() for s in b]
    assert [[(o.dx, o.dy) for o in s.objects] for s in a] == [[(o.dx, o.dy) for o in s.objects] for s in b]
    assert np.array_equal(np.asarray(a[0].draw()), np.asarray(b[0].draw()))
    assert [s.prompt() for s in random_scenes(50, seed=8)] != [s.prompt() for s in a]


def test_drawing_follows_the_spec():
    image = Scene((WorldObject("red", "square", "large", "left"),)).draw()
    pixels = np.asarray(image)
    assert image.size == (IMAGE_SIZE, IMAGE_SIZE) and image.mode == "RGB"
    assert tuple(pixels[0, 0]) == BACKGROUND
    ys, xs = np.nonzero((pixels == COLORS["red"]).all(-1))
    assert xs.max() - xs.min() + 1 == 26 and ys.max() - ys.min() + 1 == 26
    assert (xs.min() + xs.max() + 1) / 2 == 16 and (ys.min() + ys.max() + 1) / 2 == 32


def test_reader_agrees_with_generator():
    scenes = random_scenes(AGREEMENT_SCENES, seed=0)
    good = sum(read_scene(s.draw()) == s for s in scenes)
    assert good / len(scenes) >= AGREEMENT_GOAL


def test_reader_reads_every_single_object_scene():
    for scene in all_single_scenes():
        assert read_scene(scene.draw()) == scene, scene.prompt()


def test_reader_ignores_specks_and_rejects_blank():
    """A blank picture is refused for holding no object (any ValueError passed, a crash in the reader too)."""
    scene = Scene((WorldObject("blue", "triangle", "small", "right"),))
    pixels = np.asarray(scene.draw()).copy()
    pixels[5:7, 5:7] = COLORS["green"]
    assert read_scene(Image.fromarray(pixels)) == scene
    blank = "^image does not show a world scene: a scene holds one or two objects, got 0$"
    with pytest.raises(ValueError, match=blank):
        read_scene(Image.new("RGB", (IMAGE_SIZE, IMAGE_SIZE), BACKGROUND))


def test_prompt_round_trip():
    for scene in random_scenes(200, seed=3):
        assert parse_prompt(scene.prompt()) == scene
    text = "a large red circle on the left and a small blue square on the right"
    assert parse_prompt(text).prompt() == text


NOT_A_PROMPT = "not a world prompt: "


@pytest.mark.parametrize(
    "text, said",
    [
        ("", NOT_A_PROMPT + "'' (expected"),
        ("a dog", NOT_A_PROMPT + "'a dog' (expected"),
        ("a large red circle", NOT_A_PROMPT + "'a large red circle' (expected"),
        ("a huge red circle on the left", NOT_A_PROMPT + "'a huge red circle on the left' in"),
        ("a large pink circle on the left", NOT_A_PROMPT + "'a large pink circle on the left' in"),
        ("a large red hexagon on the left", NOT_A_PROMPT + "'a large red hexagon on the left' in"),
        ("a large red circle on the top", NOT_A_PROMPT + "'a large red circle on the top' in"),
        (
            "a small blue square on the right and a large red circle on the left",
            "a two-object scene needs (left, right) objects, got ('right', 'left')",
        ),
        (
            "a large red circle on the left and a small blue square on the right and a small blue square on the right",
            "a scene holds one or two objects, got 3",
        ),
    ],
)
def test_parse_errors(text, said):
    """Each text is refused for its own reason (a bare ValueError check passed any failure, a crash included)."""
    with pytest.raises(ValueError, match="^" + re.escape(said)):
        parse_prompt(text)
