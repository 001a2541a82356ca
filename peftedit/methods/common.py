"""Pieces the methods share: input preparation, encoder offloading, progress bars, artifact metadata."""

from __future__ import annotations

import contextlib
from pathlib import Path

import torch
from PIL import Image
from tqdm.auto import tqdm

from ..artifacts import Artifact, now_utc, package_versions
from ..images import fit_square, load_image
from ..models import Model, architecture_hash, check_same_base, fingerprint


def prepare_image(image: str | Path | Image.Image, side: int) -> tuple[Image.Image, dict]:
    """A square RGB input at the model's resolution and facts about it, from a path or a PIL image."""
    if isinstance(image, Image.Image):
        square = fit_square(image.convert("RGB"), side)
        return square, {
            "sha256": None,
            "name": None,
            "size": list(image.size),
            "mode": image.mode,
        }
    return load_image(image, side)


# The pipeline parts ``encoders_offloaded`` moves off the GPU.
OFFLOADED_PARTS = ("vae", "text_encoder")


@contextlib.contextmanager
def encoders_offloaded(pipe, enabled: bool):
    """Move the VAE and text encoder to the CPU inside the block when the UNet is on a GPU."""
    device = pipe.unet.device
    move = enabled and device.type != "cpu"
    if move:
        for part in OFFLOADED_PARTS:
            getattr(pipe, part).to("cpu")
        torch.cuda.empty_cache() if device.type == "cuda" else None
    try:
        yield
    finally:
        if move:
            for part in OFFLOADED_PARTS:
                getattr(pipe, part).to(device)


@contextlib.contextmanager
def checkpointing(unet, enabled: bool):
    """Gradient checkpointing on the UNet inside the block only."""
    if enabled:
        unet.enable_gradient_checkpointing()
    try:
        yield
    finally:
        if enabled:
            unet.disable_gradient_checkpointing()


def progress(total: int, desc: str, show: bool):
    """A tqdm bar over ``range(total)``."""
    return tqdm(range(total), desc=desc, disable=not show, leave=True, dynamic_ncols=True)


def base_meta(model: Model, recipe: dict, image_info: dict) -> tuple[dict, torch.Tensor]:
    """Metadata every artifact carries, and the base model's weight probe (stored as a tensor)."""
    fid, probe = fingerprint(model.pipe)
    meta = {
        "base_model": model.name,
        "base_fingerprint": fid,
        "base_architecture": architecture_hash(model.pipe),
        "scheduler": {k: v for k, v in dict(model.pipe.scheduler.config).items()},
        "resolution": model.resolution,
        "recipe": recipe,
        "image": image_info,
        "versions": package_versions(),
        "created": now_utc(),
    }
    return meta, probe


def check_base(model: Model, artifact: Artifact) -> None:
    """Raise when ``model`` is not the base model ``artifact`` was made on."""
    meta = artifact.meta
    check_same_base(
        model.pipe,
        model.name,
        meta["base_model"],
        meta["base_architecture"],
        artifact.tensors["base_probe"],
    )
