"""Writing files so that an interrupted run never leaves a half-written one that looks complete; names from words."""

from __future__ import annotations

import os
import re
import uuid
from collections.abc import Callable
from pathlib import Path


def slug(*parts: str, limit: int = 60) -> str:
    """A folder-friendly name from words."""
    text = "-".join(re.sub(r"[^a-z0-9]+", "-", p.lower()).strip("-") for p in parts if p)
    return text[:limit].strip("-") or "edit"


def write_atomic(path: str | Path, write: Callable[[Path], object]) -> Path:
    """``write(tmp)`` into a hidden file beside ``path``, then rename it into place (the suffix is kept, so writers
    that pick a format by it, like Pillow's, see the real one)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.parent / f".{path.name}.partial-{uuid.uuid4().hex[:8]}{path.suffix}"
    try:
        write(tmp)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    return path


def save_image_atomic(image, path: str | Path) -> Path:
    """Save a PIL image via a temporary file and a rename."""
    return write_atomic(path, image.save)
