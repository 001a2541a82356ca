"""Many edits in one run: the model loads once and each entry of a list becomes an edit folder.

A list is a JSON array of objects. TEdBench's ``input_list.json`` reads as it is::

    [{"img_name": "dog2_standing.png", "target_text": "A photo of a sitting dog."}, ...]

Keys: ``image`` (or ``img_name``), a path relative to the images folder; ``target`` (or ``target_text``), Imagic's
target text or the prompt an inversion is edited to (optional there); ``source`` (or ``source_text``), what the photo
shows (inversions need it; Imagic does not use it). Entry ``i`` is saved as ``<out>/<iii>-<image>-<prompt>/``; an
inversion with a target also renders its Prompt-to-Prompt edit beside it as ``<iii>-<image>-<prompt>.png``.

Runs resume: an entry whose folder already holds its edit is not redone (``--overwrite`` redoes it). An entry that
fails (a NaN loss, a bad photo) is recorded and the run goes on. ``<out>/batch.json`` says what became of every entry
and is rewritten after each one.
"""

from __future__ import annotations

import json
import logging
import os
import time
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from .artifact_checks import INVERSIONS
from .artifacts import Artifact, check_replaceable
from .diffusion import require_text
from .errors import ArtifactError, PeftEditError
from .files import save_image_atomic, slug, write_atomic
from .images import open_image
from .methods import imagic, nulltext
from .methods.common import check_base
from .methods.imagic import ImagicConfig
from .methods.nulltext import NullTextConfig
from .models import Model

log = logging.getLogger("peftedit")

KEYS = {
    "image": "image",
    "img_name": "image",
    "target": "target",
    "target_text": "target",
    "source": "source",
    "source_text": "source",
}
SUMMARY_FILE = "batch.json"
DONE, EARLIER, FAILED = "done", "done earlier", "failed"


@dataclass(frozen=True)
class Item:
    """One entry of a batch: the photo and its prompts (``index`` counts from 1, as the list is read)."""

    index: int
    image: Path
    target: str | None = None
    source: str | None = None

    @property
    def name(self) -> str:
        """The entry's folder name: its number, the photo's name and its prompt."""
        return f"{self.index:03d}-{slug(self.image.stem, self.target or self.source or '')}"


def method_of(config: ImagicConfig | NullTextConfig) -> str:
    """``imagic``, or the inversion a null-text config runs."""
    if isinstance(config, ImagicConfig):
        return "imagic"
    if isinstance(config, NullTextConfig):
        return config.method
    raise TypeError(f"config must be an ImagicConfig or a NullTextConfig, not {type(config).__name__}")


def read_list(path: str | Path, images: str | Path | None = None, method: str = "imagic") -> list[Item]:
    """The entries of a JSON list file, checked (see :func:`items_from`); ``images`` defaults to the list's folder."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"list not found: {path}")
    try:
        entries = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise PeftEditError(f"{path} is not a JSON list of edits ({err})") from None
    return items_from(entries, path.parent if images is None else images, method, where=str(path))


def items_from(entries: Any, images: str | Path = ".", method: str = "imagic", where: str = "list") -> list[Item]:
    """Items from parsed entries (see the module's docstring), every photo opened and every prompt checked, so a
    mistake in entry 90 stops the run before the model loads rather than after 89 edits."""
    if method != "imagic" and method not in INVERSIONS:
        raise PeftEditError(f"unknown method {method!r} (known: imagic, {', '.join(INVERSIONS)})")
    if not isinstance(entries, list) or not entries:
        raise PeftEditError(f"{where}: expected a non-empty JSON array of objects")
    items, sources_unused = [], False
    for index, entry in enumerate(entries, start=1):
        item = _item(entry, index, Path(images), method, f"{where}, entry {index}")
        sources_unused |= method == "imagic" and item.source is not None
        items.append(item)
    if sources_unused:
        log.warning("%s: Imagic does not use the source prompts; they are left out", where)
    return items


def _item(entry: Any, index: int, images: Path, method: str, where: str) -> Item:
    if not isinstance(entry, dict):
        raise PeftEditError(f'{where}: expected an object such as {{"image": ..., "target": ...}}')
    values: dict[str, str] = {}
    for key, value in entry.items():
        if key not in KEYS:
            raise PeftEditError(f"{where}: unknown key {key!r} (known: {', '.join(KEYS)})")
        if KEYS[key] in values:
            raise PeftEditError(f"{where}: {KEYS[key]} is given twice")
        if not isinstance(value, str):
            raise PeftEditError(f"{where}: {key} must be a string, not {type(value).__name__}")
        values[KEYS[key]] = value
    if "image" not in values:
        raise PeftEditError(f"{where}: no image")
    needed = "target" if method == "imagic" else "source"
    if needed not in values:
        raise PeftEditError(f"{where}: no {needed} prompt (a {method} edit needs one)")
    try:
        prompts = {k: require_text(values[k], f"the {k} prompt") for k in ("target", "source") if k in values}
        image = images / values["image"]
        open_image(image)
    except (PeftEditError, OSError) as err:
        raise PeftEditError(f"{where}: {' '.join(str(err).split())}") from None
    if method == "imagic":
        prompts.pop("source", None)
    return Item(index, image, prompts.get("target"), prompts.get("source"))


def run(
    model: Model,
    items: list[Item],
    config: ImagicConfig | NullTextConfig | None = None,
    runtime=None,
    out: str | Path = "adapters/batch",
    overwrite: bool = False,
    show_progress: bool = True,
) -> list[dict]:
    """Make every item's edit into ``out`` (Imagic with an :class:`ImagicConfig`, the inversion a
    :class:`NullTextConfig` names otherwise); returns what became of each, as written to ``out/batch.json``."""
    config = config or ImagicConfig()
    method = method_of(config)
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    records: list[dict] = []
    started = datetime.now(UTC).isoformat(timespec="seconds")
    for number, item in enumerate(items, start=1):
        log.info("[%d/%d] %s: %s", number, len(items), item.image.name, item.target or item.source)
        records.append(_one(model, item, method, config, runtime, out, overwrite, show_progress))
        _write_summary(out, method, model.name, started, records)
    return records


def _one(model, item: Item, method: str, config, runtime, out: Path, overwrite: bool, show: bool) -> dict:
    folder = out / item.name
    picture = out / f"{item.name}.png" if method != "imagic" and item.target else None
    record = {
        "index": item.index,
        "image": str(item.image),
        "source": item.source,
        "target": item.target,
        "folder": folder.name,
        "picture": picture.name if picture else None,
        "status": DONE,
        "seconds": None,
        "losses": None,
    }
    start = time.perf_counter()
    try:
        if os.path.lexists(folder) and not overwrite:
            artifact = _earlier(model, folder, item, method)
            record["status"] = EARLIER
        else:
            if picture is not None and picture.exists() and not overwrite:
                raise FileExistsError(f"{picture} already exists; pass --overwrite (overwrite=True) to redo it")
            check_replaceable(folder, overwrite)
            artifact = _make(model, item, method, config, runtime, show)
            artifact.save(folder, overwrite=overwrite)
        if picture is not None and (record["status"] == DONE or not picture.exists()):
            save_image_atomic(nulltext.edit(model, artifact, item.target, show_progress=show), picture)
        record["losses"] = artifact.meta.get("losses")
    except (PeftEditError, ValueError, OSError) as err:
        message = " ".join(str(err).split()) or type(err).__name__
        log.warning("entry %d failed: %s", item.index, message)
        record["status"] = f"{FAILED}: {message}"
    record["seconds"] = round(time.perf_counter() - start, 3)
    return record


def _make(model, item: Item, method: str, config, runtime, show: bool) -> Artifact:
    if method == "imagic":
        return imagic.fit(model, item.image, item.target, config, runtime, show_progress=show)
    return nulltext.invert(model, item.image, item.source, config, runtime, show_progress=show)


def _earlier(model: Model, folder: Path, item: Item, method: str) -> Artifact:
    """The edit an earlier run left in ``folder``, if it is this item's on this model; raises otherwise."""
    artifact = Artifact.load(folder)
    check_base(model, artifact)
    prompt = item.target if method == "imagic" else item.source
    made = artifact.meta["prompts"].get("target" if method == "imagic" else "source")
    if artifact.method != method or made != prompt:
        raise ArtifactError(
            f"{folder} holds another edit ({artifact.method}, {made!r}); pass --overwrite (overwrite=True) to redo it"
        )
    return artifact


def _write_summary(out: Path, method: str, base_model: str, started: str, records: list[dict]) -> None:
    counts: dict[str, int] = {DONE: 0, EARLIER: 0, FAILED: 0}
    for record in records:
        counts[record["status"].split(":")[0]] += 1
    summary = {
        "method": method,
        "base_model": base_model,
        "started": started,
        "updated": datetime.now(UTC).isoformat(timespec="seconds"),
        "counts": counts,
        "items": records,
    }
    text = json.dumps(summary, indent=2) + "\n"
    write_atomic(out / SUMMARY_FILE, lambda tmp: tmp.write_text(text, encoding="utf-8"))
