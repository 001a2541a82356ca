"""Pieces the methods share: input preparation, encoder offloading, progress bars, artifact metadata."""

from __future__ import annotations

import contextlib
import dataclasses
import logging

import torch
from PIL import Image
from tqdm.auto import tqdm

from ..artifacts import Artifact, now_utc, package_versions
from ..config import LOAD_TIME_SETTINGS, RuntimeConfig
from ..diffusion import decode_latents, encode_image, encode_text
from ..errors import ArtifactError, PeftEditError
from ..models import (
    MODEL_OPTION,
    TEXT_ENCODERS,
    Model,
    architecture_hash,
    check_same_base,
    dtype_name,
    fingerprint,
    is_xl,
    pipe_parts,
)
from ..optim import numeric_advice

log = logging.getLogger("peftedit")


def call_runtime(model: Model, runtime: RuntimeConfig | None) -> RuntimeConfig:
    """The runtime a method call runs (and records) with: ``runtime``'s training settings over the load-time ones
    ``model`` was loaded with; ``None`` means the model's own.

    A load-time setting (``LOAD_TIME_SETTINGS``) cannot change after loading, so one that differs is the model's, with
    a warning naming it when it is not the default (``RuntimeConfig(seed=1)`` asks for no other device).
    """
    if runtime is None:
        return model.runtime
    if not isinstance(runtime, RuntimeConfig):
        raise TypeError(f"runtime must be a RuntimeConfig (or None for the model's), not {type(runtime).__name__}")
    loaded = {name: getattr(model.runtime, name) for name in LOAD_TIME_SETTINGS}
    default = RuntimeConfig()
    differ = [
        f"runtime.{name}"
        for name, value in loaded.items()
        if getattr(runtime, name) not in (value, getattr(default, name))
    ]
    if differ:
        log.warning(
            "%s %s set when the model is loaded: using the model's (%s)",
            ", ".join(differ),
            "is" if len(differ) == 1 else "are",
            ", ".join(f"{name}={loaded[name.removeprefix('runtime.')]!r}" for name in differ),
        )
    return dataclasses.replace(runtime, **loaded)


# The pipeline parts ``encoders_offloaded`` moves off the GPU.
OFFLOADED_PARTS = ("vae", *TEXT_ENCODERS)


@contextlib.contextmanager
def parts_offloaded(pipe, parts: tuple[str, ...], enabled: bool):
    """Move these pipeline parts to the CPU inside the block, each back to where it was afterwards.

    Parts already on the CPU stay (so blocks nest), parts the pipeline lacks are skipped (SD has no
    ``text_encoder_2``); nothing moves when ``enabled`` is false.
    """
    present = pipe_parts(pipe, parts)
    where = {part: next(module.parameters()).device for part, module in present.items()} if enabled else {}
    moved = [part for part, device in where.items() if device.type != "cpu"]
    for part in moved:
        present[part].to("cpu")
    if any(where[part].type == "cuda" for part in moved):
        torch.cuda.empty_cache()
    try:
        yield
    finally:
        for part in moved:
            present[part].to(where[part])


def check_steps(model: Model, steps: int, name: str = "steps") -> None:
    """Raise when ``steps`` sampling steps are more than the model's scheduler has training timesteps (checked before
    any work, so a bad value does not surface after training)."""
    most = model.pipe.scheduler.config.num_train_timesteps
    if steps > most:
        raise PeftEditError(f"{name} = {steps} is more than the model's {most} training timesteps")


def encode_photo(model: Model, picture: Image.Image) -> torch.Tensor:
    """The photo's VAE latent, on the model's device (the VAE placed first: ``Model.place``)."""
    model.place("vae")
    return encode_image(model.pipe, picture).to(model.device)


def decode_pictures(model: Model, latents: torch.Tensor, settings: str = "guidance") -> list[Image.Image]:
    """The pictures of ``latents`` (the VAE placed first). Raises :class:`RenderDiverged` for a render that diverged
    (NaN or infinite values), advising lower ``settings`` (the sampling values that can blow a render up)."""
    model.place("vae")
    return decode_latents(model.pipe, latents, numeric_advice(settings, model.dtype))


def text_embedding(model: Model, text: str) -> torch.Tensor:
    """``diffusion.encode_text`` on the model's device (the text encoders placed first)."""
    model.place(*TEXT_ENCODERS)
    return encode_text(model.pipe, text).to(model.device)


def unet_placed(model: Model):
    """The UNet, placed on the model's device for sampling or training (``Model.place``)."""
    model.place("unet")
    return model.pipe.unet


def encoders_offloaded(model: Model, enabled: bool):
    """The VAE and text encoders off the GPU inside the block (the training stages, ``runtime.offload_encoders``).

    With ``runtime.offload_idle`` nothing moves: ``Model.place`` has already put them on the CPU when the UNet was
    placed, and moving parts back on exit would undo what a ``place`` inside the block did.
    """
    return parts_offloaded(model.pipe, OFFLOADED_PARTS, enabled and not model.runtime.offload_idle)


@contextlib.contextmanager
def checkpointing(unet, enabled: bool):
    """Gradient checkpointing on the UNet inside the block only (left on when it was on before)."""
    switch = enabled and not unet.is_gradient_checkpointing
    if switch:
        unet.enable_gradient_checkpointing()
    try:
        yield
    finally:
        if switch:
            unet.disable_gradient_checkpointing()


def progress(total: int, desc: str, show: bool):
    """A tqdm bar over ``range(total)``."""
    return tqdm(range(total), desc=desc, disable=not show, leave=True, dynamic_ncols=True)


def sampling_bar(desc: str, show: bool):
    """A bar for ``diffusion.sample``'s ``progress``: wraps its steps; gone from the terminal when done."""
    return lambda steps: tqdm(steps, desc=desc, disable=not show, leave=False, dynamic_ncols=True)


def base_meta(model: Model, recipe: dict, image_info: dict) -> tuple[dict, torch.Tensor]:
    """Metadata every artifact carries, and the base model's weight probe (stored as a tensor)."""
    fid, probe = fingerprint(model.pipe)
    meta = {
        "base_model": model.name,
        "base_pipeline": type(model.pipe).__name__,  # StableDiffusionPipeline or StableDiffusionXLPipeline
        **({"base_model_config": model.single_file_config} if model.single_file_config else {}),
        "base_fingerprint": fid,
        "base_architecture": architecture_hash(model.pipe),
        "scheduler": {k: v for k, v in dict(model.pipe.scheduler.config).items()},
        "resolution": model.resolution,
        "dtype": dtype_name(model.dtype),  # what "auto" became: a re-render in lower precision warns
        "recipe": recipe,
        "image": image_info,
        "versions": package_versions(),
        "created": now_utc(),
    }
    return meta, probe


def check_base(model: Model, artifact: Artifact) -> None:
    """Raise when ``model`` is not the base model ``artifact`` was made on."""
    meta = artifact.meta
    made_on, loaded = meta.get("base_pipeline"), type(model.pipe).__name__  # edits before SDXL support lack it
    if made_on and made_on != loaded:
        raise ArtifactError(
            f"base model mismatch: the edit was made on {meta['base_model']!r}, a {made_on}, but {model.name!r} is a "
            f"{loaded}; pass {MODEL_OPTION} with the original base model"
        )
    check_same_base(
        model.pipe,
        model.name,
        meta["base_model"],
        meta["base_architecture"],
        artifact.tensors["base_probe"],
    )
    check_fits(model, artifact)
    check_schedule(model, artifact, TRAINING_SCHEDULE)


# The scheduler settings that define what a UNet is trained to predict: an edit is made for them (an Imagic LoRA
# trained for epsilon renders garbage on a v-prediction scheduler, with the same weights).
TRAINING_SCHEDULE = (
    "num_train_timesteps",
    "beta_start",
    "beta_end",
    "beta_schedule",
    "trained_betas",
    "prediction_type",
)


def check_schedule(model: Model, artifact: Artifact, keys: tuple[str, ...]) -> None:
    """Raise unless the model's scheduler has the ``keys`` settings the artifact was made with."""
    saved, current = artifact.meta["scheduler"], dict(model.pipe.scheduler.config)
    differ = [k for k in keys if _plain(saved.get(k)) != _plain(current.get(k))]
    if differ:
        what = ", ".join(f"{k} {saved.get(k)!r} -> {current.get(k)!r}" for k in differ)
        raise ArtifactError(f"the model's scheduler differs from the one this edit was made with ({what})")


def _plain(value):
    return list(value) if isinstance(value, (list, tuple)) else value


def check_fits(model: Model, artifact: Artifact) -> None:
    """Raise unless the artifact's embeddings and latents have the sizes this model's UNet takes (``Artifact.load``
    has checked that they agree with each other; a hand-made edit can still disagree with its base model)."""
    pipe = model.pipe
    unet = pipe.unet.config
    text = (pipe.tokenizer.model_max_length + (1 if is_xl(pipe) else 0), unet.cross_attention_dim)
    latent = (unet.in_channels, unet.sample_size, unet.sample_size)
    for name, sizes in (("e_tgt", text), ("e_src", text), ("z_T", latent)):
        tensor = artifact.tensors.get(name)
        if tensor is not None and tuple(tensor.shape[1:]) != sizes:
            raise ArtifactError(
                f"{name} has shape {list(tensor.shape)}, but {model.name!r} takes [1, {', '.join(map(str, sizes))}] "
                "(the edit was modified, or made for another model)"
            )
