"""Writing result files: atomically, so an interrupted benchmark never leaves half a JSON file that looks complete."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from peftedit import files


def write_json(path: str | Path, data: Any) -> Path:
    """Write ``data`` as indented JSON (values JSON cannot hold, such as paths, as strings) through a temporary file
    and a rename; returns the path."""
    return files.write_json(path, data, default=str)


def publish(path: str | Path, rows: list[dict], table: str) -> list[dict]:
    """Write ``rows`` (as :func:`write_json`), print ``table`` and where they went; returns ``rows``."""
    path = write_json(path, rows)
    print(table)
    print(f"wrote {len(rows)} rows to {path}")
    return rows
