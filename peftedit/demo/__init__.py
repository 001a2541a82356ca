"""The built-in demo: a tiny Stable Diffusion model trained on a world of coloured shapes, and that world."""

from pathlib import Path

from .world import (
    COLORS,
    POSITIONS,
    SHAPES,
    SIZES,
    WORDS,
    Scene,
    WorldObject,
    all_single_scenes,
    parse_prompt,
    random_scene,
    random_scenes,
    read_objects,
    read_scene,
)

DEMO_MODEL_DIR = Path(__file__).parent / "model"
DEMO_SETTINGS_FILE = "peftedit_demo.json"

__all__ = [
    "COLORS",
    "DEMO_MODEL_DIR",
    "DEMO_SETTINGS_FILE",
    "POSITIONS",
    "SHAPES",
    "SIZES",
    "WORDS",
    "Scene",
    "WorldObject",
    "all_single_scenes",
    "parse_prompt",
    "random_scene",
    "random_scenes",
    "read_objects",
    "read_scene",
]
