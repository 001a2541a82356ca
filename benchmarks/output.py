"""Writing result files: atomically, so an interrupted benchmark never leaves half a JSON file that looks complete."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from peftedit.files import write_atomic


def write_json(path: str | Path, data: Any) -> Path:
    """Write ``data`` as indented JSON (values JSON cannot hold, such as paths, as strings) through a temporary file
    and a rename; returns the path."""
    text = json.dumps(data, indent=2, default=str) + "\n"
    return write_atomic(path, lambda tmp: tmp.write_text(text, encoding="utf-8"))


def publish(path: str | Path, rows: list[dict], table: str) -> list[dict]:
    """Write ``rows`` (as :func:`write_json`), print ``table`` and where they went; returns ``rows``."""
    path = write_json(path, rows)
    print(table)
    print(f"wrote {len(rows)} rows to {path}")
    return rows
