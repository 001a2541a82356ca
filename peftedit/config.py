"""Typed configs and strict recipes.

Every tunable number is a dataclass field with a default and a ``help`` saying where the default comes from.
Recipes are TOML files whose tables map onto these dataclasses; an unknown table or key is an error.
"""

from __future__ import annotations

import dataclasses
import math
import numbers
import tomllib
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .errors import PeftEditError

# An installed wheel carries the recipes as peftedit/recipes (pyproject maps them there); a checkout has them at the
# top level.
_PACKAGED_RECIPES = Path(__file__).resolve().parent / "recipes"
RECIPES_DIR = _PACKAGED_RECIPES if _PACKAGED_RECIPES.is_dir() else Path(__file__).resolve().parent.parent / "recipes"


def option(default: Any, help: str) -> Any:
    """A dataclass field with a default and its one-line help (mutable defaults are copied)."""
    if isinstance(default, (list, dict)):
        return field(default_factory=lambda: type(default)(default), metadata={"help": help})
    return field(default=default, metadata={"help": help})


@dataclass
class RuntimeConfig:
    """Where and how the model runs: device, precision, attention backend and memory savers."""

    device: str = option("auto", "auto = cuda when available, else cpu.")
    dtype: str = option(
        "auto",
        "auto = fp16 on CUDA (SD's usual half precision), fp32 on CPU; or fp32/fp16/bf16.",
    )
    attention: str = option(
        "auto",
        "auto = xformers when installed on CUDA, else PyTorch SDPA; or sdpa/xformers.",
    )
    gradient_checkpointing: bool = option(True, "Recompute UNet activations in backward: less memory, ~30% slower.")
    optimizer: str = option(
        "adamw8bit",
        "adamw8bit (bitsandbytes, 8-bit states) or adamw (torch, fp32 states).",
    )
    offload_encoders: bool = option(True, "Move the VAE and text encoder off the GPU while training.")
    offload_idle: bool = option(
        False,
        "Only the part at work on the GPU: the model loads onto the CPU and each part (UNet, VAE, text encoders) "
        "moves to the GPU when it runs, the others leaving, and stays there until another part runs. "
        "The peak is then the UNet's stage, not all weights at once; costs each part's transfer when its turn "
        "comes (~2 GiB of SD weights, ~6.5 of SDXL's per edit), not timed on a GPU yet.",
    )
    vae_slicing: bool = option(
        True, "Decode one picture at a time (the VAE's slicing): a P2P edit decodes two, so its peak drops."
    )
    channels_last: bool = option(
        False, "UNet in channels-last memory format (diffusers' advice for fp16 convolutions on tensor-core GPUs)."
    )
    compile: bool = option(
        False,
        "torch.compile the UNet: each stage's first steps wait for compilation (minutes at SD size on a GPU), later "
        "ones may run faster. Needs a C compiler (inductor).",
    )
    seed: int = option(0, "Seed for noise and timestep sampling during training.")

    def __post_init__(self) -> None:
        check_fields(self, "runtime.{}".format)
        check_seed("runtime.seed", self.seed)
        _choice(
            "runtime.device",
            self.device,
            ("auto", "cpu", "cuda", "mps"),
            prefix_ok=("cuda:",),
        )
        index = self.device.removeprefix("cuda:")
        if index != self.device and not (index.isascii() and index.isdigit()):
            raise PeftEditError(f"runtime.device = {self.device!r}: a CUDA device is cuda or cuda:N (N = 0, 1, …)")
        _choice("runtime.dtype", self.dtype, ("auto", "fp32", "fp16", "bf16"))
        _choice("runtime.attention", self.attention, ("auto", "sdpa", "xformers"))
        _choice("runtime.optimizer", self.optimizer, ("adamw8bit", "adamw"))


# The runtime settings a loaded model carries (``load_model`` applies them, or sampling reads them from
# ``Model.runtime``); a method call's own runtime config sets only the others (training and seed).
LOAD_TIME_SETTINGS = ("device", "dtype", "attention", "vae_slicing", "channels_last", "compile", "offload_idle")


def _choice(name: str, value: str, allowed: tuple[str, ...], prefix_ok: tuple[str, ...] = ()) -> None:
    if value not in allowed and not value.startswith(prefix_ok or ("\0",)):
        raise PeftEditError(f"{name} = {value!r} is not one of {', '.join(allowed)}")


def finite(name: str, value: Any) -> float:
    """``value`` as a float; raises unless it is a real number (not a bool) that is neither NaN nor infinite."""
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise PeftEditError(f"{name} = {value!r} must be a number")
    try:
        number = float(value)
    except OverflowError:  # an int too large for a float
        number = math.inf
    if not math.isfinite(number):
        raise PeftEditError(f"{name} = {value!r} must be a finite number")
    return number


def positive(name: str, value: float, zero_ok: bool = False) -> None:
    """Raise when a numeric config value is not a finite number, or negative (or zero unless allowed)."""
    finite(name, value)
    if value < 0 or (value == 0 and not zero_ok):
        raise PeftEditError(f"{name} = {value!r} must be {'>= 0' if zero_ok else '> 0'}")


def _is_integer(value: Any) -> bool:
    return isinstance(value, numbers.Integral) and not isinstance(value, bool)


def integer(name: str, value: Any) -> int:
    """``value`` as an int; raises unless it is an integer (a bool is not one)."""
    if not _is_integer(value):
        raise PeftEditError(f"{name} = {value!r} must be an integer")
    return int(value)


def count(name: str, value: Any, zero_ok: bool = False) -> int:
    """``value`` as an int; raises unless it is an integer (not a bool) > 0 (>= 0 when ``zero_ok``)."""
    value = integer(name, value)
    positive(name, value, zero_ok)
    return value


# torch.Generator.manual_seed takes any 64-bit value; seeds are kept to the non-negative int64 range so that every
# seed also fits the signed 64-bit integers other tools store them in.
SEED_LIMIT = 2**63


def check_seed(name: str, value: Any) -> int:
    """``value`` as an int; raises unless it is an integer with 0 <= value < 2**63."""
    value = integer(name, value)
    if not 0 <= value < SEED_LIMIT:
        raise PeftEditError(f"{name} = {value} is out of range (a seed is between 0 and 2**63 - 1)")
    return int(value)


def check_sampling(prefix: str = "", eta=None, seed=None, guidance=None, steps=None) -> None:
    """The arguments a render takes, each checked when given: ``eta`` finite, ``seed`` in range, ``guidance`` finite
    and >= 0, ``steps`` a positive integer. ``prefix`` names them as the caller knows them (``--`` for CLI flags)."""
    if eta is not None:
        finite(f"{prefix}eta", eta)
    if seed is not None:
        check_seed(f"{prefix}seed", seed)
    if guidance is not None:
        positive(f"{prefix}guidance", guidance, zero_ok=True)
    if steps is not None:
        count(f"{prefix}steps", steps)


# How a type is named in an error: "must be <this>".
_KIND_WORDS = {
    bool: "true or false",
    int: "an integer",
    float: "a number",
    str: "a string",
    list: "a list",
    dict: "a table",
}


def check_type(name: str, kind: Any, value: Any) -> Any:
    """``value`` checked against the annotation ``kind``: bool, int, float, str, ``list[X]``, ``dict[K, V]`` or
    ``X | None``; an int where a float is wanted becomes a float, and a float must be finite. Returns the value."""
    origin, args = typing.get_origin(kind), typing.get_args(kind)
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        (kind,) = [a for a in args if a is not type(None)]  # only ``X | None`` is used
        return check_type(name, kind, value)
    base = origin or kind
    if base is float:
        return finite(name, value)
    if base is int and _is_integer(value):
        return int(value)
    if base in (bool, str) and isinstance(value, base):
        return value
    if base is list and isinstance(value, list):
        return [check_type(f"{name}[{i}]", args[0], v) for i, v in enumerate(value)] if args else list(value)
    if base is dict and isinstance(value, dict):
        if not args:
            return dict(value)
        return {
            check_type(f"{name} key", args[0], k): check_type(f"{name}[{k!r}]", args[1], v) for k, v in value.items()
        }
    if base not in _KIND_WORDS:
        return value
    hint = ""
    if base in (list, dict) and isinstance(value, str) and value.lstrip().startswith(("[", "{")):
        # --set reads values as TOML; one that is not (unquoted strings) arrives as text, which "must be a list" missed
        hint = ', written in TOML: strings in quotes, e.g. ["attention", "conv"]'
    raise PeftEditError(f"{name} = {value!r} must be {_KIND_WORDS[base]}{hint}")


def field_kinds(cls: type) -> dict[str, Any]:
    """Each field's annotation, resolved; a bare ``list`` whose default's elements share one type is read as a list of
    that type (so ``[1, 2]`` defaults make a list of ints)."""
    hints = typing.get_type_hints(cls)
    kinds = {}
    for f in dataclasses.fields(cls):
        kind = hints[f.name]
        if kind is list and f.default_factory is not dataclasses.MISSING:
            elements = {type(v) for v in f.default_factory()}
            if len(elements) == 1:
                kind = list[elements.pop()]
        kinds[f.name] = kind
    return kinds


def check_fields(config: Any, name: typing.Callable[[str], str]) -> None:
    """Check every field of a dataclass config against its annotation (``check_type``), in place; ``name`` maps a
    field's name to the one errors show (e.g. ``"imagic.{}".format``)."""
    for key, kind in field_kinds(type(config)).items():
        setattr(config, key, check_type(name(key), kind, getattr(config, key)))


def to_dict(config: Any) -> dict[str, Any]:
    """The config as plain data (for artifacts and ``inspect``)."""
    return dataclasses.asdict(config)


def _parse_value(text: str) -> Any:
    try:
        return tomllib.loads(f"v = {text}")["v"]
    except tomllib.TOMLDecodeError:
        return text


# How messages name one override: the flag that gives it, then the argument of build() that takes it from Python.
OVERRIDE = "--set (overrides)"
# The method tables recipes hold, and what reads each: a recipe of one method given to another says so.
METHOD_TABLES = {"imagic": "Imagic (peftedit imagic)", "nulltext": "inversions (peftedit invert)"}


def build(
    sections: dict[str, type],
    recipe: str | Path | None = None,
    overrides: list[str] | None = None,
):
    """Build one config per section from an optional recipe file and ``key=value`` overrides.

    ``sections`` maps table names (``runtime``, ``imagic``…) to dataclasses. Returns a dict of config objects.
    A key in an override may omit its table when only one table has it. Unknown tables and keys raise.
    """
    if isinstance(overrides, str):  # read character by character, it said "--set 'i': expected key=value"
        raise TypeError(f"overrides must be a list of 'key=value' strings, not one string ({overrides!r:.60})")
    raw: dict[str, dict[str, Any]] = {name: {} for name in sections}
    if recipe is not None:
        path = resolve_recipe(recipe, tuple(sections))
        try:
            data = tomllib.loads(path.read_text(encoding="utf-8"))
        except tomllib.TOMLDecodeError as err:
            raise PeftEditError(f"recipe {path} is not valid TOML: {err}") from None
        except UnicodeDecodeError:
            raise PeftEditError(
                f"recipe {path} is not a text file (a recipe is TOML, e.g. recipes/sd15-8gb.toml)"
            ) from None
        for table, values in data.items():
            if table in METHOD_TABLES and table not in sections and isinstance(values, dict):
                raise PeftEditError(
                    f"recipe {path} is for {METHOD_TABLES[table]}, with a [{table}] table; this command reads "
                    f"{' and '.join(f'[{t}]' for t in sections)}"
                )
            if table not in sections:
                raise PeftEditError(f"recipe {path}: unknown table [{table}] (known: {', '.join(sections)})")
            if not isinstance(values, dict):  # `imagic = 5`: it said "unknown table [imagic] (known: ..., imagic)"
                raise PeftEditError(
                    f"recipe {path}: {table} = {values!r:.40} is not a table; put its keys under [{table}]"
                )
            raw[table].update(values)
    for item in overrides or []:
        key, sep, text = item.partition("=")
        if not sep or not key.strip():  # "=3" said "--set : is not a known key"
            raise PeftEditError(f"{OVERRIDE} {item!r}: expected key=value")
        table, key = _locate(sections, key.strip())
        raw[table][key] = _parse_value(text.strip())
    out = {}
    for table, cls in sections.items():
        kinds = field_kinds(cls)
        for key in raw[table]:
            if key not in kinds:
                raise PeftEditError(f"unknown key {table}.{key} (known: {', '.join(kinds)})")
        values = {k: check_type(f"{table}.{k}", kinds[k], v) for k, v in raw[table].items()}
        out[table] = cls(**values)
    return out


def _locate(sections: dict[str, type], key: str) -> tuple[str, str]:
    if "." in key:
        table, _, name = key.partition(".")
        if table not in sections:
            raise PeftEditError(f"{OVERRIDE} {key}: unknown table {table!r} (known: {', '.join(sections)})")
        return table, name
    owners = [t for t, cls in sections.items() if key in {f.name for f in dataclasses.fields(cls)}]
    if len(owners) != 1:
        what = "is ambiguous" if owners else "is not a known key"
        raise PeftEditError(f"{OVERRIDE} {key}: {what}; write it as table.key (tables: {', '.join(sections)})")
    return owners[0], key


def shipped_recipes(tables: tuple[str, ...] | None = None) -> list[str]:
    """The names of the recipes in ``recipes/``; with ``tables``, only those made of these tables."""
    shipped = sorted(RECIPES_DIR.glob("*.toml"))
    return [
        p.stem for p in shipped if tables is None or set(tomllib.loads(p.read_text(encoding="utf-8"))) <= set(tables)
    ]


def resolve_recipe(recipe: str | Path, tables: tuple[str, ...] | None = None) -> Path:
    """A recipe path, or the name of one shipped in ``recipes/`` (with or without ``.toml``); the error for an unknown
    name lists the shipped recipes, only those made of ``tables`` when given (the ones this command can use)."""
    path = Path(recipe)
    if path.is_file():
        return path
    for candidate in (RECIPES_DIR / f"{recipe}", RECIPES_DIR / f"{recipe}.toml"):
        if candidate.is_file():
            return candidate
    usable = shipped_recipes(tables)
    names = f"one of: {', '.join(usable)}" if usable else "no shipped recipe is for these tables"
    raise PeftEditError(f"recipe {recipe!r} not found (a file path, or {names})")
