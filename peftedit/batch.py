"""Many edits in one run: the model loads once and each entry of a list becomes an edit folder.

A list is a JSON array of objects. TEdBench's ``input_list.json`` reads as it is::

    [{"img_name": "dog2_standing.png", "target_text": "A photo of a sitting dog."}, ...]

Keys: ``image`` (or ``img_name``), a path relative to the images folder; ``target`` (or ``target_text``), Imagic's
target text or the prompt an inversion is edited to (optional there); ``source`` (or ``source_text``), what the photo
shows (inversions need it; Imagic does not use it). Entry ``i`` is saved as ``<out>/<iii>-<image>-<prompt>/``, the
prompt being Imagic's target or an inversion's source; an inversion with a target also renders its Prompt-to-Prompt
edit beside it as ``<iii>-<image>-<prompt>.png`` (again when a resumed run's target changed).

Runs resume: an entry whose folder already holds its edit (same method, prompt, photo and base model) is not redone,
even when the settings changed (a warning names them; ``--overwrite`` redoes it). An entry that fails (a NaN loss, a
folder holding another edit) is recorded and the run goes on. ``<out>/batch.json`` lists every entry of the run
(``pending`` until it is reached, ``interrupted`` for the one a Ctrl-C stopped) and those of earlier runs into the same
folder, and is rewritten after each one.
At the end ``<out>/batch.png`` shows the run: a row per entry with its preview grid (and P2P edit), or what failed.
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

from PIL import Image
from PIL.PngImagePlugin import PngInfo

from .artifact_checks import INVERSIONS
from .artifacts import EDIT_FILE, PREVIEW_FILE, Artifact, check_replaceable
from .config import to_dict
from .diffusion import require_text
from .errors import ArtifactError, PeftEditError, one_line, shorten
from .files import save_image_atomic, slug, write_atomic, write_json
from .images import file_sha256, open_image, read_picture, sheet
from .methods import imagic, nulltext
from .methods.common import call_runtime, check_base, check_steps
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
SHEET_FILE = "batch.png"
PICTURE_TAG = "peftedit.target"  # a P2P picture's PNG text: the target it was rendered for
DONE, EARLIER, FAILED, PENDING, INTERRUPTED = "done", "done earlier", "failed", "pending", "interrupted"
REPORTED_MISTAKES = 3  # a list with more bad entries names this many in its one-line error
# The runtime settings that change what an edit comes out as: an earlier edit made with others is kept, with a warning.
RESULT_RUNTIME = ("seed", "optimizer")


@dataclass(frozen=True)
class Item:
    """One entry of a batch: the photo and its prompts (``index`` counts from 1, as the list is read)."""

    index: int
    image: Path
    target: str | None = None
    source: str | None = None

    @property
    def name(self) -> str:
        """The entry's folder name: its number, the photo's name and the prompt its edit is made from (an inversion's
        source, so a new target reuses the inversion; Imagic's target, its items having no source)."""
        return f"{self.index:03d}-{slug(self.image.stem, self.source or self.target or '')}"


def method_of(config: ImagicConfig | NullTextConfig) -> str:
    """``imagic``, or the inversion a null-text config runs."""
    if isinstance(config, ImagicConfig):
        return "imagic"
    if isinstance(config, NullTextConfig):
        return config.method
    raise TypeError(f"config must be an ImagicConfig or a NullTextConfig, not {type(config).__name__}")


def needed_prompt(method: str) -> str:
    """The prompt an entry must have: Imagic's target, an inversion's source."""
    if method == "imagic":
        return "target"
    if method in INVERSIONS:
        return "source"
    raise PeftEditError(f"unknown method {method!r} (known: imagic, {', '.join(INVERSIONS)})")


def recipe_table(method: str) -> str:
    """The recipe table a method's settings live in: ``imagic``, or ``nulltext`` for every inversion."""
    needed_prompt(method)  # raises for an unknown method
    return imagic.METHOD if method == imagic.METHOD else nulltext.TABLE


def read_list(
    path: str | Path, images: str | Path | None = None, method: str = "imagic", limit: int | None = None
) -> list[Item]:
    """The entries of a JSON list file, checked (see :func:`items_from`); ``images`` defaults to the list's folder."""
    path = Path(path)
    if path.is_dir():
        raise PeftEditError(f"{path} is a folder; give the JSON list file")
    if not path.is_file():
        raise FileNotFoundError(f"list not found: {path}")
    try:  # utf-8-sig: lists saved with a byte-order mark read too
        entries = json.loads(path.read_text(encoding="utf-8-sig"), object_pairs_hook=_no_repeated_keys)
    except (json.JSONDecodeError, UnicodeDecodeError, PeftEditError) as err:
        raise PeftEditError(f"{path} is not a JSON list of edits ({err})") from None
    return items_from(entries, path.parent if images is None else images, method, str(path), limit)


def _no_repeated_keys(pairs: list[tuple[str, Any]]) -> dict:
    keys = [k for k, _ in pairs]
    repeated = sorted({k for k in keys if keys.count(k) > 1})
    if repeated:
        raise PeftEditError(f"an object gives {', '.join(map(repr, repeated))} twice")
    return dict(pairs)


def items_from(
    entries: Any,
    images: str | Path | None = None,
    method: str = "imagic",
    where: str = "list",
    limit: int | None = None,
) -> list[Item]:
    """Items from parsed entries (see the module's docstring; the first ``limit`` only), every photo opened and every
    prompt checked, so a mistake in entry 90 stops the run before the model loads rather than after 89 edits. Every
    bad entry is found: the error counts them and names the first few."""
    needed_prompt(method)
    folder = Path("." if images is None else images)
    if not folder.is_dir():
        if folder.exists():
            raise PeftEditError(f"images folder {folder} is a file, not a folder")
        raise PeftEditError(f"images folder not found: {folder}")
    if not isinstance(entries, list) or not entries:
        raise PeftEditError(f"{where}: expected a non-empty JSON array of objects")
    items, mistakes, missing = [], [], 0
    for index, entry in enumerate(entries[:limit], start=1):
        try:
            items.append(_item(entry, index, folder, method))
        except (PeftEditError, OSError) as err:
            mistakes.append(f"entry {index}: {one_line(err)}")
            missing += isinstance(err, FileNotFoundError)
    if mistakes:
        for mistake in mistakes:  # the line below names a few; --debug lists them all (one fix-and-rerun, not many)
            log.debug("%s: %s", where, mistake)
        unnamed = len(mistakes) - REPORTED_MISTAKES
        more = f" (and {unnamed} more; --debug lists them all)" if unnamed > 0 else ""
        count = f"{len(mistakes)} bad entries: " if len(mistakes) > 1 else ""
        # No photo found at all: most likely the wrong folder (TEdBench's list sits beside its originals/, not in it)
        hint = (
            f"; none of the photos is in {folder}: give their folder with --images (images=)"
            if missing == len(entries[:limit]) > 1
            else ""
        )
        raise PeftEditError(f"{where}: {count}{'; '.join(mistakes[:REPORTED_MISTAKES])}{more}{hint}")
    if method == "imagic" and any(item.source for item in items):
        log.warning("%s: Imagic does not use the source prompts; they are left out", where)
        items = [Item(item.index, item.image, item.target) for item in items]
    return items


def _item(entry: Any, index: int, images: Path, method: str) -> Item:
    if not isinstance(entry, dict):
        raise PeftEditError('expected an object such as {"image": ..., "target": ...}')
    values: dict[str, str] = {}
    for key, value in entry.items():
        if key not in KEYS:
            raise PeftEditError(f"unknown key {key!r} (known: {', '.join(KEYS)})")
        if KEYS[key] in values:
            raise PeftEditError(f"{KEYS[key]} is given twice")
        if not isinstance(value, str):
            raise PeftEditError(f"{key} must be a string, not {type(value).__name__}")
        values[KEYS[key]] = value
    if "image" not in values:
        raise PeftEditError("no image")
    _require(values, method)
    prompts = {k: require_text(values[k], f"the {k} prompt") for k in ("target", "source") if k in values}
    image = images / values["image"]
    open_image(image)
    return Item(index, image, prompts.get("target"), prompts.get("source"))


def _require(prompts: dict, method: str) -> None:
    needed = needed_prompt(method)
    if prompts.get(needed) is None:
        what = "an Imagic edit" if method == "imagic" else f"a {method} inversion"
        raise PeftEditError(f"no {needed} prompt ({what} needs one)")


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
    if method == "imagic":  # Imagic has no source prompt: items_from drops it, and so must items made in code
        items = [Item(item.index, item.image, item.target) for item in items]
    for item in items:  # items read for another method lack the prompt this one needs
        try:
            _require({"target": item.target, "source": item.source}, method)
        except PeftEditError as err:
            raise PeftEditError(f"entry {item.index}: {err} (read the list with method={method!r})") from None
    check_steps(model, *config.sampling_steps())  # once, not as every entry's failure
    runtime = call_runtime(model, runtime)  # once: what each entry is made with, and earlier ones are compared to
    out = Path(out)
    check_batch_folder(out)
    out.mkdir(parents=True, exist_ok=True)
    previous = {r["folder"]: r for r in _previous_records(out)}
    records = [_carried(_record(item, method), previous.get(item.name), out) for item in items]
    names = {record["folder"] for record in records}
    earlier = [r for folder, r in previous.items() if folder not in names]
    started = datetime.now(UTC).isoformat(timespec="seconds")
    _write_summary(out, method, model.name, started, records, earlier)
    for number, item in enumerate(items, start=1):
        prompt = item.target if method == "imagic" else item.source
        log.info("[%d/%d] %s: %s", number, len(items), item.image.name, shorten(prompt, 80))
        try:
            records[number - 1] = _one(model, item, method, config, runtime, out, overwrite, show_progress)
        except KeyboardInterrupt:
            records[number - 1] = {**records[number - 1], "status": INTERRUPTED}
            _write_summary(out, method, model.name, started, records, earlier)
            raise
        _write_summary(out, method, model.name, started, records, earlier)
    overview = contact_sheet(out, records)
    if overview is not None:
        save_image_atomic(overview, out / SHEET_FILE)
    return records


def contact_sheet(out: Path, records: list[dict]) -> Image.Image | None:
    """One row per finished entry (its preview grid, then its edit picture where there is one) and a line per failed
    one: the batch at a glance. None when no entry has finished or failed."""
    rows = []
    for record in records:
        status = record["status"]
        prompt = record["target"] or record["source"]
        caption = f"{record['index']:03d}  {Path(record['image']).name}: {shorten(prompt, 100)}"
        if status.startswith(FAILED):
            rows.append((f"{caption}  {shorten(status, 140)}", [], "firebrick"))
        elif status in (DONE, EARLIER):
            names = [f"{record['folder']}/{PREVIEW_FILE}", record["picture"]]
            pictures = [p for p in (read_picture(out / name) for name in names if name) if p is not None]
            rows.append((caption if pictures else f"{caption}  (no preview to show)", pictures, "black"))
    return sheet(rows) if rows else None


def check_batch_folder(out: Path) -> None:
    """Raise unless ``out`` can hold a batch: not a file, not an edit folder, ``batch.json`` not a folder."""
    if out.exists() and not out.is_dir():
        raise PeftEditError(f"{out} is a file; the batch's edits go into a folder")
    if (out / EDIT_FILE).exists():
        raise PeftEditError(f"{out} is an edit folder; give the batch a folder of its own")
    if (out / SUMMARY_FILE).exists() and not (out / SUMMARY_FILE).is_file():
        raise PeftEditError(f"{out / SUMMARY_FILE} is not a file; the batch writes its summary there")


def _record(item: Item, method: str) -> dict:
    picture = f"{item.name}.png" if method != "imagic" and item.target else None
    return {
        "index": item.index,
        "image": str(item.image),
        "source": item.source,
        "target": item.target,
        "folder": item.name,
        "picture": picture,
        "status": PENDING,
        "seconds": None,
        "losses": None,
    }


def _previous_records(out: Path) -> list[dict]:
    """The records an earlier run into ``out`` left in its summary (none when there is no readable one)."""
    path = out / SUMMARY_FILE
    if not path.is_file():
        return []
    try:
        summary = json.loads(path.read_text(encoding="utf-8"))
        records = [*summary["items"], *summary.get("earlier_items", [])]
        return [r for r in records if isinstance(r, dict) and isinstance(r["folder"], str)]
    except (json.JSONDecodeError, UnicodeDecodeError, KeyError, TypeError) as err:
        log.warning("%s is not a batch summary (%s); it is replaced", path, err)
        return []


def _carried(record: dict, previous: dict | None, out: Path) -> dict:
    """``record`` before its entry is reached: finished, as an earlier run recorded, while its folder is there (so a
    summary read after an interrupt does not understate what is done); pending otherwise."""
    finished = previous is not None and str(previous.get("status")) in (DONE, EARLIER)
    if not finished or not (out / record["folder"]).is_dir():
        return record
    return {**record, "status": EARLIER, "seconds": previous.get("seconds"), "losses": previous.get("losses")}


def _one(model, item: Item, method: str, config, runtime, out: Path, overwrite: bool, show: bool) -> dict:
    record = {**_record(item, method), "status": DONE}
    folder = out / item.name
    picture = out / record["picture"] if record["picture"] else None
    start = time.perf_counter()
    try:
        if not overwrite:
            _rename_legacy(model, item, method, config, runtime, out)
        if os.path.lexists(folder) and not overwrite:
            artifact = _earlier(model, folder, item, method, config, runtime)
            record["status"] = EARLIER
        else:
            if picture is not None and not overwrite:
                _rendered_for(picture)  # raises for a picture batch did not render; its own is rendered again
            check_replaceable(folder, overwrite)
            artifact = _make(model, item, method, config, runtime, show)
            artifact.save(folder, overwrite=overwrite)
        if picture is not None and (record["status"] == DONE or _rendered_for(picture) != item.target):
            image = nulltext.edit(model, artifact, item.target, show_progress=show)
            tag = PngInfo()
            tag.add_text(PICTURE_TAG, item.target)
            write_atomic(picture, lambda tmp: image.save(tmp, pnginfo=tag))
        record["losses"] = artifact.meta.get("losses")
    except (PeftEditError, ValueError, OSError) as err:
        message = one_line(err)
        log.warning("entry %d failed: %s", item.index, message)
        record["status"] = f"{FAILED}: {message}"
    record["seconds"] = round(time.perf_counter() - start, 3)
    return record


def _rename_legacy(model, item: Item, method: str, config, runtime, out: Path) -> None:
    """An inversion with a target that a batch before 2026-11-24 named after the target: renamed (with its P2P
    picture) to the source-named folder this version looks for, when it holds this entry's inversion, so a resumed
    run reuses it instead of inverting the photo again."""
    if method == "imagic" or not item.target:
        return
    legacy = out / f"{item.index:03d}-{slug(item.image.stem, item.target)}"
    folder, picture = out / item.name, out / f"{legacy.name}.png"
    if legacy == folder or not legacy.is_dir() or os.path.lexists(folder):
        return
    try:
        _earlier(model, legacy, item, method, config, runtime)
    except (ArtifactError, OSError):
        return  # not this entry's: left alone
    os.replace(legacy, folder)
    if picture.is_file() and not os.path.lexists(out / f"{item.name}.png"):
        os.replace(picture, out / f"{item.name}.png")
    log.info("%s renamed %s (edit folders are named after the source prompt now)", legacy.name, folder.name)


def _rendered_for(picture: Path) -> str | None:
    """The target prompt an earlier run rendered ``picture`` for (None when there is none); raises for a file that
    peftedit batch did not write, which a resumed run must not replace."""
    if not picture.exists():
        return None
    try:
        with Image.open(picture) as image:
            target = getattr(image, "text", {}).get(PICTURE_TAG)
    except (OSError, ValueError, Image.DecompressionBombError):
        target = None
    if target is None:
        raise FileExistsError(
            f"{picture} exists and was not rendered by peftedit batch; move it or pass --overwrite (overwrite=True)"
        )
    return target


def _make(model, item: Item, method: str, config, runtime, show: bool) -> Artifact:
    if method == "imagic":
        return imagic.fit(model, item.image, item.target, config, runtime, show_progress=show)
    return nulltext.invert(model, item.image, item.source, config, runtime, show_progress=show)


def _earlier(model: Model, folder: Path, item: Item, method: str, config, runtime) -> Artifact:
    """The edit an earlier run left in ``folder``, if it is this item's (method, prompt, photo) on this model; raises
    otherwise. Other settings only warn: the edit is kept."""
    artifact = Artifact.load(folder)
    check_base(model, artifact)
    key = needed_prompt(method)
    prompt, made = getattr(item, key), artifact.meta["prompts"].get(key)
    made_from = artifact.meta.get("image") or {}
    differs = []
    if artifact.method != method:
        differs.append(f"it is {artifact.method}, this entry {method}")
    if made != prompt and made is not None:  # an edit of the other kind has no such prompt: its kind says it
        differs.append(f"its {key} prompt is {shorten(str(made), 40)!r}")
    if made_from.get("sha256") != file_sha256(item.image):
        differs.append(f"it was made from another photo ({made_from.get('name')})")
    if differs:
        raise ArtifactError(
            f"{folder} holds another edit: {'; '.join(differs)}; --overwrite (overwrite=True) redoes it"
        )
    made_with = artifact.meta["recipe"].get(recipe_table(method), {})
    changed = sorted(k for k, v in to_dict(config).items() if k in made_with and made_with[k] != v)
    made_in = artifact.meta["recipe"].get("runtime", {})
    changed += [f"runtime.{k}" for k in RESULT_RUNTIME if k in made_in and made_in[k] != getattr(runtime, k)]
    if changed:
        log.warning(
            "%s was made with other settings (%s); kept; --overwrite (overwrite=True) redoes it",
            folder,
            ", ".join(changed),
        )
    return artifact


def tally(records: list[dict]) -> dict[str, int]:
    """How many records are done, done earlier, failed and pending."""
    counts = dict.fromkeys((DONE, EARLIER, FAILED, PENDING, INTERRUPTED), 0)
    for record in records:
        counts[record["status"].split(":")[0]] += 1
    return counts


def _write_summary(
    out: Path, method: str, base_model: str, started: str, records: list[dict], earlier: list[dict]
) -> None:
    summary = {
        "method": method,
        "base_model": base_model,
        "started": started,
        "updated": datetime.now(UTC).isoformat(timespec="seconds"),
        "counts": tally(records),
        "items": records,
        "earlier_items": earlier,
    }
    write_json(out / SUMMARY_FILE, summary)
