"""The edit folder: one photo's edit, saved so it can be shared and re-rendered without re-training.

Layout (documented in adapters/README.md)::

    edit.safetensors                  tensors needed to render + all metadata in the header
    pytorch_lora_weights.safetensors  (Imagic) the LoRA, in the layout diffusers' load_lora_weights reads
    preview.png                       a grid to look at
    README.md                         a short model card

Folders are written atomically: built next to the target under a hidden name, then renamed into place. Only an
earlier edit folder is ever replaced (:func:`check_replaceable`).
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
from dataclasses import dataclass, field
from datetime import UTC, datetime
from importlib import metadata as importlib_metadata
from pathlib import Path
from typing import Any

import torch
from PIL import Image
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file, save_file

from .artifact_checks import HEADER_CHECKSUM, check_contents, check_lora_weights, check_tensors, header_sha256
from .errors import ArtifactError, first_line
from .files import hidden_name
from .images import read_picture

FORMAT_VERSION = "2"  # 2: the header carries HEADER_CHECKSUM
# 3: format 2 made on SDXL (embeddings with an added-conditions row); SD edits stay 2, so older readers still take
# them and refuse an SDXL edit by its version rather than failing on it later.
SDXL_FORMAT_VERSION = "3"
READABLE_VERSIONS = ("1", FORMAT_VERSION, SDXL_FORMAT_VERSION)  # 1: no header checksum; read with a warning
EDIT_FILE = "edit.safetensors"
LORA_FILE = "pytorch_lora_weights.safetensors"
PREVIEW_FILE = "preview.png"
CARD_FILE = "README.md"
EDIT_FOLDER_FILES = frozenset({EDIT_FILE, LORA_FILE, PREVIEW_FILE, CARD_FILE})
PACKAGES = (
    "peftedit",
    "torch",
    "diffusers",
    "transformers",
    "peft",
    "bitsandbytes",
    "safetensors",
)
log = logging.getLogger("peftedit")


def package_versions() -> dict[str, str]:
    """Installed versions of the packages that shape a result."""
    out = {}
    for name in PACKAGES:
        try:
            out[name] = importlib_metadata.version(name)
        except importlib_metadata.PackageNotFoundError:
            out[name] = "not installed"
    if out.get("peftedit") == "not installed":  # run from a checkout on the path (the GPU benchmarks), not installed
        from . import __version__

        out["peftedit"] = f"{__version__} (not installed)"
    return out


def now_utc() -> str:
    """The current time as an ISO 8601 UTC string."""
    return datetime.now(UTC).isoformat(timespec="seconds")


def tensors_sha256(tensors: dict[str, torch.Tensor]) -> str:
    """sha256 over names, dtypes, shapes and bytes of a tensor dict, in name order."""
    digest = hashlib.sha256()
    for name in sorted(tensors):
        tensor = tensors[name].detach().cpu().contiguous()
        digest.update(f"{name}:{tensor.dtype}:{tuple(tensor.shape)};".encode())
        digest.update(tensor.view(torch.uint8).numpy().tobytes() if tensor.numel() else b"")
    return digest.hexdigest()


def _file_sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


@dataclass
class Artifact:
    """One photo's edit: what a method's ``fit``/``invert`` returns and its ``render``/``edit`` takes."""

    method: str
    tensors: dict[str, torch.Tensor]
    meta: dict[str, Any]
    lora: dict[str, torch.Tensor] | None = None
    lora_config: dict[str, Any] | None = None
    preview: Image.Image | None = None
    card: str = ""
    extra_images: dict[str, Image.Image] = field(default_factory=dict)

    @property
    def format_version(self) -> str:
        """The format this edit is written in: ``SDXL_FORMAT_VERSION`` when made on SDXL, else ``FORMAT_VERSION``."""
        return SDXL_FORMAT_VERSION if "XL" in str(self.meta.get("base_pipeline", "")) else FORMAT_VERSION

    def save(self, folder: str | Path, overwrite: bool = False) -> Path:
        """Write the folder atomically; returns its path. An existing folder is replaced only with ``overwrite``."""
        folder = edit_path(folder)
        check_replaceable(folder, overwrite)
        folder.parent.mkdir(parents=True, exist_ok=True)
        tmp = folder.parent / hidden_name(folder.name, "partial")
        try:
            tmp.mkdir()
            self._write(tmp)
            _shareable(tmp)
            _replace_dir(tmp, folder)
        finally:
            if tmp.exists():
                shutil.rmtree(tmp, ignore_errors=True)
        return folder

    def _write(self, tmp: Path) -> None:
        files = {}
        if self.lora is not None:
            from diffusers import StableDiffusionPipeline

            StableDiffusionPipeline.save_lora_weights(
                tmp,
                unet_lora_layers=self.lora,
                unet_lora_adapter_metadata=dict(self.lora_config or {}),
            )
            files[LORA_FILE] = _file_sha256(tmp / LORA_FILE)
        tensors = {k: v.detach().cpu().contiguous() for k, v in self.tensors.items()}
        header = {
            "format": "pt",
            "peftedit.format_version": self.format_version,
            "peftedit.method": self.method,
            "peftedit.meta": json.dumps(self.meta, sort_keys=True),
            "peftedit.files": json.dumps(files, sort_keys=True),
            "peftedit.tensors_sha256": tensors_sha256(tensors),
        }
        if self.lora_config is not None:
            header["peftedit.lora_config"] = json.dumps(self.lora_config, sort_keys=True)
        header[HEADER_CHECKSUM] = header_sha256(header)
        save_file(tensors, tmp / EDIT_FILE, metadata=header)
        if self.preview is not None:
            self.preview.save(tmp / PREVIEW_FILE)
        for name, image in self.extra_images.items():
            image.save(tmp / name)
        if self.card:
            (tmp / CARD_FILE).write_text(self.card, encoding="utf-8")  # as load reads it, whatever the locale

    @classmethod
    def load(cls, folder: str | Path) -> Artifact:
        """Read and verify an edit folder (a leading ``~`` expanded); raises :class:`ArtifactError` for anything
        incomplete or tampered."""
        folder = Path(folder).expanduser()
        if folder.exists() and not folder.is_dir():
            raise ArtifactError(f"{folder} is a file; give the edit folder written by 'imagic' or 'invert'")
        if not folder.is_dir():
            raise ArtifactError(f"edit folder not found: {folder}")
        path = folder / EDIT_FILE
        if not path.is_file():
            raise ArtifactError(f"{folder} is not a complete peftedit edit folder (no {EDIT_FILE})")
        try:
            with safe_open(str(path), framework="pt") as handle:
                header = handle.metadata() or {}
            tensors = load_file(str(path))
        except (SafetensorError, OSError) as err:
            raise ArtifactError(f"{path}: corrupt safetensors file ({err})") from None
        version = header.get("peftedit.format_version")
        if version is None:
            raise ArtifactError(f"{path} has no peftedit metadata: not a peftedit edit")
        if version not in READABLE_VERSIONS:
            readable = ", ".join(READABLE_VERSIONS)
            raise ArtifactError(f"{folder} is format version {version}; this peftedit reads versions {readable}")
        if version == "1":
            log.warning("%s predates header checksums (format 1): changes to its metadata go unnoticed", path)
        elif header.get(HEADER_CHECKSUM) != header_sha256(header):
            raise ArtifactError(f"{path}: the header was changed after it was written (checksum mismatch)")
        if tensors_sha256(tensors) != header.get("peftedit.tensors_sha256"):
            raise ArtifactError(f"{path}: tensors do not match their recorded checksum (modified or damaged)")
        try:
            meta = json.loads(header["peftedit.meta"])
            files = json.loads(header["peftedit.files"])
            lora_config = json.loads(header["peftedit.lora_config"]) if "peftedit.lora_config" in header else None
        except (KeyError, json.JSONDecodeError, RecursionError) as err:  # RecursionError: JSON nested too deep
            raise ArtifactError(f"{path}: damaged metadata ({type(err).__name__}: {first_line(err)})") from None
        method = header.get("peftedit.method")
        check_contents(str(path), method, list(tensors), meta, files, lora_config, LORA_FILE)
        check_tensors(str(path), method, tensors, meta)
        for name, digest in files.items():
            if not (folder / name).is_file():
                raise ArtifactError(f"{folder} is incomplete: {name} is missing")
            if _file_sha256(folder / name) != digest:
                raise ArtifactError(f"{folder / name} does not match its recorded checksum (modified or damaged)")
        lora = None
        if LORA_FILE in files:
            lora = _read_lora(folder / LORA_FILE, lora_config)
        # rendering needs neither the preview nor the card, so a broken one only warns; both are kept for a later save
        return cls(method, tensors, meta, lora, lora_config, read_picture(folder / PREVIEW_FILE), _read_card(folder))

    def require(self, *names: str) -> None:
        """Raise :class:`ArtifactError` when a tensor the method needs is absent."""
        missing = [n for n in names if n not in self.tensors]
        if missing:
            raise ArtifactError(f"{self.method} edit is missing tensors: {', '.join(missing)}")


def _read_card(folder: Path) -> str:
    """The edit folder's model card, or "" when it has none or it cannot be read (with a warning)."""
    path = folder / CARD_FILE
    if not path.is_file():
        return ""
    try:
        return path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as err:
        log.warning("ignoring %s: not a readable text file (%s)", path, first_line(err))
        return ""


def _read_lora(path: Path, lora_config: dict) -> dict[str, torch.Tensor]:
    """The UNet LoRA weights of ``path`` (peft keys, ``unet.`` dropped), checked: only UNet weights, the rank
    ``lora_config`` names, and the file's own adapter config (``lora_adapter_metadata``, what diffusers'
    ``load_lora_weights`` reads) saying what ``lora_config`` says, so vanilla diffusers renders the same edit."""
    prefix = "unet."
    weights = load_file(str(path))
    other = sorted(k for k in weights if not k.startswith(prefix))
    if other:
        raise ArtifactError(f"{path}: holds weights peftedit does not write ({other[0]}; only {prefix}* LoRA weights)")
    lora = {k[len(prefix) :]: v for k, v in weights.items()}
    check_lora_weights(str(path), lora, lora_config["r"])
    with safe_open(str(path), framework="pt") as handle:
        text = (handle.metadata() or {}).get("lora_adapter_metadata")
    try:
        declared = json.loads(text) if text else None
    except (json.JSONDecodeError, RecursionError):
        declared = {}
    if declared is not None:
        same = isinstance(declared, dict) and all(  # diffusers writes the UNet's settings as "unet.<key>"
            _plain(declared.get(prefix + key)) == _plain(lora_config.get(key))
            for key in ("r", "lora_alpha", "target_modules")
        )
        if not same:
            raise ArtifactError(
                f"{path}: its lora_adapter_metadata (what diffusers reads) differs from peftedit.lora_config "
                "(modified or damaged)"
            )
    return lora


def _plain(value: Any) -> Any:
    """A LoRA setting as compared: numbers as floats, name lists sorted."""
    if isinstance(value, bool) or value is None:
        return value
    if isinstance(value, int | float):
        return float(value)
    if isinstance(value, list):
        return sorted(map(str, value))
    return value


def _shareable(folder: Path) -> None:
    """Give every file the mode a plain new file gets (0666 less the umask): safetensors writes its files 0600."""
    probe = folder / ".mode"
    probe.touch()
    mode = probe.stat().st_mode & 0o777
    probe.unlink()
    for path in folder.iterdir():
        path.chmod(mode)


def edit_path(folder: str | Path) -> Path:
    """Where an edit saved at ``folder`` goes: ``folder`` with a leading ``~`` expanded (as ``load_model`` does; it
    made a folder named "~" here), or for "." or ".." (inside an edit folder) its real path, whose name the hidden
    temporary folder beside it is named after."""
    folder = Path(folder).expanduser()
    return folder.resolve() if folder.name in ("", ".", "..") else folder


def check_replaceable(path: str | Path, overwrite: bool) -> None:
    """Raise :class:`ArtifactError` unless an edit may be saved at ``path``: nothing is there, an empty folder (made
    for it beforehand: nothing is lost), or, with ``overwrite``, an earlier peftedit edit folder holding only files an
    edit writes. Call it before any work."""
    path = Path(path)
    if not os.path.lexists(path):
        return
    if path.is_dir() and not path.is_symlink() and not any(path.iterdir()):
        return
    reason = _not_an_edit(path)  # first: --overwrite would not help, so the message must not suggest it
    if reason:
        raise ArtifactError(
            f"{path} exists and is not a peftedit edit folder: it {reason}; --overwrite (overwrite=True) replaces "
            "only edit folders: choose another -o (folder)"
        )
    if not overwrite:
        raise ArtifactError(f"{path} already exists; choose another path or pass --overwrite (overwrite=True)")


def _not_an_edit(path: Path) -> str | None:
    """Why ``path`` is not a folder that ``--overwrite`` may replace, or None when it is one."""
    if path.is_symlink():
        return "is a symbolic link"
    if not path.is_dir():
        return "is not a folder"
    entries = sorted(path.iterdir())
    others = [p.name for p in entries if p.name not in EDIT_FOLDER_FILES or not p.is_file()]
    if others:
        more = f" and {len(others) - 5} more" if len(others) > 5 else ""
        listed = f"{', '.join(others[:5])}{more}"
        if _edit_file_problem(path) is None:  # an edit the user saved other things into (renders, notes)
            raise ArtifactError(
                f"{path} is a peftedit edit folder that also holds other files ({listed}): replacing it would delete "
                "them; move them out first or choose another -o (folder)"
            )
        return f"holds files an edit does not write ({listed})"
    return _edit_file_problem(path)


def _edit_file_problem(path: Path) -> str | None:
    """What keeps ``path``'s edit file from being a peftedit one, or None."""
    if not (path / EDIT_FILE).is_file():
        return f"has no {EDIT_FILE}"
    try:
        with safe_open(str(path / EDIT_FILE), framework="pt") as handle:
            header = handle.metadata() or {}
    except (SafetensorError, OSError):
        return f"has an unreadable {EDIT_FILE}"
    if "peftedit.format_version" not in header:
        return f"has an {EDIT_FILE} without a peftedit header"
    return None


def _replace_dir(tmp: Path, folder: Path) -> None:
    if not folder.exists():
        os.replace(tmp, folder)
        return
    old = folder.parent / hidden_name(folder.name, "old")
    os.replace(folder, old)
    try:
        os.replace(tmp, folder)
    except BaseException:  # the earlier edit goes back where it was, not left under a hidden name
        os.replace(old, folder)
        raise
    shutil.rmtree(old, ignore_errors=True)
