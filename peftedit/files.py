"""Writing files so that an interrupted run never leaves a half-written one that looks complete; names from words."""

from __future__ import annotations

import json
import math
import os
import re
import unicodedata
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any


def slug(*parts: str, limit: int = 60) -> str:
    """A folder-friendly name from words: lower case, accents on Latin letters dropped ("Café" -> "cafe"), letters,
    digits and marks of every other script kept ("一只猫", "ギター", "йод", "कुत्ता"), anything else a single dash."""
    words = []
    for part in parts:
        kept, base = [], ""
        for c in unicodedata.normalize("NFD", part.lower()):
            if unicodedata.combining(c) and base < "\u0250":  # an accent on a Latin letter
                continue
            word = unicodedata.category(c)[0] in "LNM"
            kept.append(c if word else "-")
            base = c if word and not unicodedata.combining(c) else base
        words.append(re.sub("-+", "-", unicodedata.normalize("NFC", "".join(kept))).strip("-"))
    return "-".join(w for w in words if w)[:limit].strip("-") or "edit"


# The most bytes a file name may take where the file system does not say (ext4, XFS and btrfs take 255).
NAME_MAX = 255
# Bytes of a name kept in the hidden temporary names made beside it: a name near NAME_MAX with ".partial-xxxxxxxx"
# added would not fit.
HIDDEN_NAME_BYTES = 100


def cut_to_bytes(text: str, limit: int) -> str:
    """The longest start of ``text`` that takes at most ``limit`` bytes in UTF-8 (no character cut in half)."""
    return text.encode("utf-8", "surrogateescape")[:limit].decode("utf-8", "ignore")


def hidden_name(name: str, kind: str, suffix: str = "") -> str:
    """A hidden name for a temporary beside ``name``, ``.<name>.<kind>-<8 hex digits><suffix>``, with ``name`` cut to
    ``HIDDEN_NAME_BYTES`` bytes so that it fits wherever ``name`` does."""
    return f".{cut_to_bytes(name, HIDDEN_NAME_BYTES)}.{kind}-{uuid.uuid4().hex[:8]}{suffix}"


def write_atomic(path: str | Path, write: Callable[[Path], object]) -> Path:
    """``write(tmp)`` into a hidden file beside ``path``, then rename it into place (the suffix is kept, so writers
    that pick a format by it, like Pillow's, see the real one)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.parent / hidden_name(path.name, "partial", path.suffix)
    try:
        write(tmp)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    return path


def finite_json(data: Any) -> Any:
    """``data`` with every NaN or infinite float made ``None``: Python writes them as ``NaN``/``Infinity``, which
    JSON does not have, so strict readers (JavaScript's ``JSON.parse``, jq, most other languages') refuse the file."""
    if isinstance(data, float) and not math.isfinite(data):
        return None
    if isinstance(data, dict):
        return {key: finite_json(value) for key, value in data.items()}
    if isinstance(data, list | tuple):
        return [finite_json(value) for value in data]
    return data


def write_json(path: str | Path, data: Any, default: Callable[[Any], Any] | None = None) -> Path:
    """``data`` as indented, strict JSON (NaN and infinities as null: see :func:`finite_json`), written atomically
    (``default`` turns values JSON cannot hold into ones it can)."""
    text = json.dumps(finite_json(data), indent=2, default=default, allow_nan=False) + "\n"
    return write_atomic(path, lambda tmp: tmp.write_text(text, encoding="utf-8"))


def save_image_atomic(image, path: str | Path) -> Path:
    """Save a PIL image via a temporary file and a rename."""
    return write_atomic(path, image.save)
