"""The model an edit was made on, loaded again to re-render it: its recorded base model, the configs a single
checkpoint file was loaded with, and its runtime settings made fit for this machine."""

from __future__ import annotations

import dataclasses
import logging
from pathlib import Path

from .artifacts import Artifact
from .config import LOAD_TIME_SETTINGS, RuntimeConfig
from .errors import ArtifactError, PeftEditError
from .models import CONFIGS_OPTION, DTYPES, MODEL_OPTION, Model, dtype_name, load_model, resolve_device, resolve_dtype

log = logging.getLogger("peftedit")


def load_base(
    artifact: Artifact,
    model: str | Path | None = None,
    single_file_config: str | None = None,
    settings: dict | None = None,
    name: str = "the edit",
) -> Model:
    """The model to re-render ``artifact`` on: the base it records, or ``model``; a single checkpoint file's configs
    as recorded (unless ``model`` names another base) or ``single_file_config``; the runtime it was made with, with
    device, precision and attention picked afresh and ``settings`` (RuntimeConfig field -> value) over it (see
    :func:`recorded_runtime`). ``name`` names the edit in errors (its folder)."""
    base = model if model is not None else artifact.meta["base_model"]
    if model is None and Path(base).is_absolute() and not Path(base).exists():
        raise ArtifactError(
            f"{name}: its base model was at {base}, which is gone; pass {MODEL_OPTION} with where it is"
        )
    configs = single_file_config or recorded_configs(artifact, model, name)
    runtime = recorded_runtime(artifact, name, settings)
    # The edit records its base model: no "using the demo model" notice when that is where the edit came from.
    return load_model(base, runtime, configs, announce_demo=model is not None)


def recorded_configs(artifact: Artifact, model: str | Path | None, name: str = "the edit") -> str | None:
    """The configs a single-file base was loaded with, as the edit recorded them, unless ``model`` names another base;
    raises when they were a folder that is gone."""
    recorded, base = artifact.meta.get("base_model_config"), artifact.meta["base_model"]
    if recorded is None or (model is not None and Path(model).expanduser().resolve() != Path(base)):
        return None
    if Path(recorded).is_absolute() and not Path(recorded).exists():
        raise ArtifactError(
            f"{name}: its base model's configs were in {recorded}, which is gone; pass {CONFIGS_OPTION}"
        )
    return recorded


def recorded_runtime(artifact: Artifact, name: str = "the edit", settings: dict | None = None) -> RuntimeConfig:
    """The runtime config an artifact was made with, for re-rendering on this machine: device, precision and
    attention backend picked afresh (the edit may come from a machine with CUDA or xformers), no compilation (one
    render is too few UNet calls to win back the compile time), settings this version does not know (an edit made by
    a newer peftedit) left out with a warning, and ``settings`` (``--set``) over all that. A precision lower than the
    edit was made in is said in a warning (an inversion's null embeddings fit the precision they were made in)."""
    saved = dict(artifact.meta.get("recipe", {}).get("runtime", {}))
    known = {f.name for f in dataclasses.fields(RuntimeConfig)}
    unknown = sorted(set(saved) - known)
    if unknown:
        log.warning("ignoring runtime settings this peftedit does not know: %s", ", ".join(unknown))
    saved = {k: v for k, v in saved.items() if k in known}
    made_in = artifact.meta.get("dtype") or saved.get("dtype")  # edits before meta.dtype: the setting, maybe "auto"
    saved.update(device="auto", dtype="auto", attention="auto", compile=False)
    try:
        runtime = RuntimeConfig(**saved)
    except (TypeError, ValueError) as err:  # only a format-1 edit (no header checksum) can carry a changed value
        raise ArtifactError(f"{name}: damaged metadata: recorded runtime settings: {err}") from None
    # The caller's own settings checked apart: a mistake in them is theirs, not "damaged metadata" in the edit.
    settings = dict(settings or {})
    for key in settings:
        if key not in LOAD_TIME_SETTINGS:
            what = "a training setting" if key in known else "not a runtime setting"
            raise PeftEditError(
                f"settings: {key!r} is {what}; a render trains nothing, so only these apply: "
                f"{', '.join(LOAD_TIME_SETTINGS)}"
            )
    runtime = dataclasses.replace(runtime, **settings)  # checked as RuntimeConfig checks its fields
    dtype = resolve_dtype(runtime, resolve_device(runtime))
    if made_in in DTYPES and dtype not in (DTYPES[made_in], DTYPES["fp32"]):
        log.warning(
            "the edit was made in %s; rendering in %s; to match, --set runtime.dtype=%s (settings={'dtype': '%s'})",
            made_in,
            dtype_name(dtype),
            made_in,
            made_in,
        )
    return runtime
