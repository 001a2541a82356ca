"""Checks on what an edit folder's ``edit.safetensors`` header holds, run by :meth:`Artifact.load`.

``peftedit.header_sha256`` catches a header changed by hand or damaged (a checksum, not a signature: it guards against
accidents, not against someone who rewrites it). The structural checks turn anything a renderer would trip over (a
missing key, a string where a number belongs, a LoRA rank that does not fit the weights) into one ``ArtifactError``
line; they also cover format-1 folders, which were written before the checksum existed.
"""

from __future__ import annotations

import hashlib
import json
import math
import re
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from .errors import ArtifactError

if TYPE_CHECKING:  # annotations only
    import torch

HEADER_CHECKSUM = "peftedit.header_sha256"
IMAGIC = "imagic"
INVERSIONS = ("null-text", "negative-prompt", "direct", "ddim")
METHODS = (IMAGIC, *INVERSIONS)

OBJECT, TEXT, NUMBER, COUNT, NAMES = "a JSON object", "a string", "a number", "a positive integer", "a list of names"
KINDS: dict[str, Callable[[Any], bool]] = {
    OBJECT: lambda v: isinstance(v, dict),
    TEXT: lambda v: isinstance(v, str),
    NUMBER: lambda v: isinstance(v, int | float) and not isinstance(v, bool) and math.isfinite(v),
    COUNT: lambda v: isinstance(v, int) and not isinstance(v, bool) and v > 0,
    NAMES: lambda v: isinstance(v, list) and bool(v) and all(isinstance(x, str) for x in v),
}
# What the renderers, ``edit`` and ``inspect`` read from ``peftedit.meta``, by dotted path.
COMMON_META = (
    ("base_model", TEXT),
    ("base_architecture", TEXT),
    ("scheduler", OBJECT),
    ("prompts", OBJECT),
    ("recipe", OBJECT),
    ("recipe.runtime", OBJECT),
)
METHOD_META = {
    IMAGIC: (
        ("prompts.target", TEXT),
        ("recipe.imagic", OBJECT),
        ("recipe.imagic.eta", NUMBER),
        ("recipe.imagic.guidance", NUMBER),
        ("recipe.imagic.render_steps", COUNT),
    ),
    **dict.fromkeys(INVERSIONS, (("prompts.source", TEXT), ("steps", COUNT), ("guidance", NUMBER))),
}
_PIVOT = ("z_T", "z_0", "timesteps", "e_src", "e_uncond", "base_probe")
TENSORS = {
    IMAGIC: ("e_tgt", "e_opt", "e_uncond", "base_probe"),
    "null-text": (*_PIVOT, "null_embeddings"),
    "negative-prompt": _PIVOT,
    "direct": (*_PIVOT, "offsets"),
    "ddim": _PIVOT,
}
OPTIONAL_META = (
    ("image", OBJECT),
    ("versions", OBJECT),
    ("losses", OBJECT),
    ("base_model_config", TEXT),
    ("base_pipeline", TEXT),
    ("dtype", TEXT),
)
LORA_REQUIRED = (("r", COUNT), ("lora_alpha", NUMBER), ("target_modules", NAMES))
# Also written by ImagicConfig.lora_config(), always with these values: another (dropout, say, which makes a render
# random) is not an edit peftedit made.
LORA_OTHER = {"init_lora_weights": True, "lora_dropout": 0.0, "bias": "none"}
SHA256 = re.compile(r"[0-9a-f]{64}")


def header_sha256(header: dict[str, str]) -> str:
    """sha256 of every header entry but the checksum itself, as canonical JSON (sorted keys, no spaces, ASCII)."""
    body = {k: v for k, v in header.items() if k != HEADER_CHECKSUM}
    text = json.dumps(body, sort_keys=True, separators=(",", ":"), ensure_ascii=True)
    return hashlib.sha256(text.encode()).hexdigest()


def check_contents(
    where: str, method: Any, tensors: list[str], meta: Any, files: Any, lora_config: Any, lora_file: str
) -> None:
    """Raise :class:`ArtifactError` (prefixed with ``where``) unless the parsed header is one a renderer can use."""

    def damaged(what: str) -> ArtifactError:
        return ArtifactError(f"{where}: damaged metadata: {what}")

    if method not in METHODS:
        raise damaged(f"unknown method {method!r} (known: {', '.join(METHODS)})")
    missing, extra = sorted(set(TENSORS[method]) - set(tensors)), sorted(set(tensors) - set(TENSORS[method]))
    if missing or extra:
        raise damaged(f"a {method} edit's tensors do not match (missing: {missing}, unexpected: {extra})")
    if not isinstance(meta, dict):
        raise damaged(f"peftedit.meta is {_kind(meta)}, expected {OBJECT}")
    for path, kind in (*COMMON_META, *METHOD_META[method]):
        _check(meta, "meta", path, kind, damaged)
    for path, kind in OPTIONAL_META:
        if path in meta:
            _check(meta, "meta", path, kind, damaged)
    for table, values in meta["recipe"].items():
        if not isinstance(values, dict):
            raise damaged(f"meta.recipe.{table} is {_kind(values)}, expected {OBJECT}")
    if not isinstance(files, dict) or not all(isinstance(v, str) and SHA256.fullmatch(v) for v in files.values()):
        raise damaged(f"peftedit.files is not a JSON object of sha256 digests: {files!r:.80}")
    expected = {lora_file} if method == IMAGIC else set()
    if set(files) != expected:
        raise damaged(f"peftedit.files lists {sorted(files)}; a {method} edit has {sorted(expected)}")
    if method != IMAGIC:
        if lora_config is not None:
            raise damaged(f"a {method} edit has no peftedit.lora_config")
        return
    if not isinstance(lora_config, dict):
        raise damaged(f"peftedit.lora_config is {_kind(lora_config)}, expected {OBJECT}")
    for path, kind in LORA_REQUIRED:
        _check(lora_config, "lora_config", path, kind, damaged)
    unknown = sorted(set(lora_config) - {k for k, _ in LORA_REQUIRED} - set(LORA_OTHER))
    if unknown:
        raise damaged(f"lora_config has settings this peftedit does not know: {', '.join(unknown)}")
    for key, value in LORA_OTHER.items():
        if key in lora_config and (lora_config[key] != value or type(lora_config[key]) is not type(value)):
            raise damaged(f"lora_config.{key} is {lora_config[key]!r:.40}; peftedit writes {value!r}")


# Each method's tensors by shape: letters name sizes that must agree across the tensors (and with the model: see
# ``methods.common.check_fits``): B the batch (1), L the text length, D the text width, T the sampling steps, C, H and
# W the latent's channels and sides; N the base model probe's length.
_TEXT, _LATENT = "BLD", "BCHW"
SHAPES = {
    IMAGIC: {"e_tgt": _TEXT, "e_opt": _TEXT, "e_uncond": _TEXT, "base_probe": "N"},
    **{
        method: {
            "z_T": _LATENT,
            "z_0": _LATENT,
            "timesteps": "T",
            "e_src": _TEXT,
            "e_uncond": _TEXT,
            "base_probe": "N",
            **({"null_embeddings": "TLD"} if method == "null-text" else {}),
            **({"offsets": "TCHW"} if method == "direct" else {}),
        }
        for method in INVERSIONS
    },
}


def check_tensors(where: str, method: str, tensors: dict[str, torch.Tensor], meta: dict) -> None:
    """Raise :class:`ArtifactError` unless the tensors have the shapes their method's renderer reads (sizes that agree,
    a batch of one, as many steps as ``meta.steps``), floating-point values that are all finite (``timesteps``:
    integers)."""
    import torch

    sizes: dict[str, int] = {"B": 1}
    if method != IMAGIC:
        sizes["T"] = meta["steps"]
    for name, letters in SHAPES[method].items():
        tensor = tensors[name]
        integral = name == "timesteps"
        if tensor.dtype.is_floating_point == integral or tensor.dtype == torch.bool:
            kind = "integers" if integral else "floating-point values"
            raise ArtifactError(f"{where}: {name} is {str(tensor.dtype).removeprefix('torch.')}, expected {kind}")
        if tensor.dim() != len(letters):
            raise ArtifactError(f"{where}: {name} has shape {list(tensor.shape)}, expected {len(letters)} dimensions")
        for letter, size in zip(letters, tensor.shape, strict=True):
            if sizes.setdefault(letter, size) != size:
                raise ArtifactError(
                    f"{where}: {name} has shape {list(tensor.shape)}, which does not agree with the edit's other "
                    "tensors or its step count (modified or damaged)"
                )
        if not integral and not bool(torch.isfinite(tensor).all()):
            raise ArtifactError(f"{where}: {name} holds values that are not finite (modified or damaged)")


def check_lora_weights(where: str, lora: dict[str, torch.Tensor], rank: int) -> None:
    """Raise unless every LoRA matrix has the rank ``lora_config`` names (peft would dump a size mismatch) and holds
    finite floating-point values."""
    import torch

    for name, tensor in lora.items():
        if not tensor.dtype.is_floating_point or not bool(torch.isfinite(tensor).all()):
            raise ArtifactError(f"{where}: {name} is not finite floating-point values (modified or damaged)")
        axis = 0 if ".lora_A." in name else 1 if ".lora_B." in name else None
        if axis is not None and (tensor.dim() < 2 or tensor.shape[axis] != rank):
            raise ArtifactError(
                f"{where}: lora_config says rank {rank} but {name} has shape {list(tensor.shape)} "
                "(modified or damaged)"
            )


def _check(mapping: dict, root: str, path: str, kind: str, damaged: Callable[[str], ArtifactError]) -> None:
    value: Any = mapping
    for key in path.split("."):
        if not isinstance(value, dict) or key not in value:
            raise damaged(f"{root}.{path} is missing")
        value = value[key]
    if not KINDS[kind](value):
        raise damaged(f"{root}.{path} is {value!r:.60}, expected {kind}")


def _kind(value: Any) -> str:
    return {list: "a JSON list", str: "a string", type(None): "null"}.get(type(value), type(value).__name__)
