"""Null-text, negative-prompt and direct inversion as peftedit runs them, and as the null-text reference does.

Ours calls ``peftedit.methods.nulltext``: ``invert`` + ``run_edit`` for each method's whole pipeline, and the pieces
``invert`` is made of (``ddim_invert``, ``optimize_null_text``, ``direct_offsets``) under the same offloading and
checkpointing contexts. When that module cannot be imported, every row says so. The baseline is the reference's
cost: fp32, attention probabilities materialised in every layer, torch Adam, no checkpointing, an attention store
while editing (:mod:`benchmarks.reference`).
"""

from __future__ import annotations

import dataclasses
import importlib

import torch
from PIL import Image

from peftedit import Artifact, RuntimeConfig
from peftedit.diffusion import ddim_invert, decode_latents, encode_image, encode_text, fresh_scheduler, sample
from peftedit.methods.common import checkpointing, encode_photo, text_embedding, unet_placed
from peftedit.models import Model

from . import reference
from .measure import Recorder, StageResult, idle_offload

SOURCE = "a photo of a cat sitting on a bench"
TARGET = "a photo of a dog sitting on a bench"
STAGES = {
    "null-text": ["pipeline", "pivot", "null-optimization", "edit"],
    "negative-prompt": ["pipeline", "edit"],
    "direct": ["pipeline", "offsets", "edit"],
}
# What baseline() measures: the reference's null-text stages (the other methods' rows compare against these).
BASELINE_STAGES = (("null-text", "pivot"), ("null-text", "null-optimization"), ("null-text", "edit"))
REFERENCE_GUIDANCE = 7.5
# The reference implementations' settings: everything in fp32, fp32 optimizer states, no memory savers.
BASELINE_RUNTIME = dict(
    dtype="fp32",
    attention="sdpa",
    gradient_checkpointing=False,
    optimizer="adamw",
    offload_encoders=False,
    vae_slicing=False,
)


def load_nulltext():
    """The library's null-text module, or the reason it is not available."""
    try:
        return importlib.import_module("peftedit.methods.nulltext"), ""
    except Exception as err:  # the module may be missing or half-written while it is being developed
        return None, f"not available: peftedit.methods.nulltext is not importable ({type(err).__name__}: {err})"


def ours(
    model: Model, picture: Image.Image, config, runtime: RuntimeConfig, steps: int, warmup: int, track: bool = False
):
    """Rows for each inversion method: the whole pipeline and its stages, each with ``steps`` DDIM steps.

    ``config`` is the library's ``NullTextConfig``; the early stop is switched off so every timestep does all
    ``inner_steps`` optimizer steps (the worst case, and a fixed amount of work to time).
    """
    pipe, unet = model.pipe, model.pipe.unet
    bench = Recorder(model.device, unet, warmup, track, idle_offload(model))
    nulltext, why = load_nulltext()
    if nulltext is None:
        for method, stages in STAGES.items():
            bench.skip(method, stages, why)
        return bench.results
    config = dataclasses.replace(config, steps=steps, early_stop=0.0, early_stop_slope=0.0)
    artifacts = {}
    for method in STAGES:
        method_config = dataclasses.replace(config, method=method)

        def whole(method_config=method_config) -> Artifact:
            artifact = nulltext.invert(model, picture, SOURCE, method_config, runtime, show_progress=False)
            nulltext.run_edit(model, artifact, TARGET, check=False)
            return artifact

        note = "nulltext.invert (with its reconstruction) + nulltext.run_edit"
        artifacts[method] = bench.run(method, "pipeline", whole, note=note, timed=False)
    z0 = encode_photo(model, picture)
    e_src, e_uncond = text_embedding(model, SOURCE), text_embedding(model, "")
    unet_placed(model)
    with bench.encoders_offloaded(model, runtime.offload_encoders):
        pivot = lambda: ddim_invert(unet, pipe.scheduler.config, z0, e_src, steps)
        pivots = bench.run("null-text", "pivot", pivot, note="diffusion.ddim_invert at guidance 1")
        if pivots is None:
            bench.skip("null-text", ["null-optimization"], "skipped: the pivot failed")
            bench.skip("direct", ["offsets"], "skipped: the pivot failed")
        else:
            scheduler = fresh_scheduler(pipe, steps)

            def optimization():
                return nulltext.optimize_null_text(unet, scheduler, pivots, e_src, e_uncond, config, runtime, False)

            note = f"nulltext.optimize_null_text, {config.inner_steps} optimizer steps per timestep"
            with checkpointing(unet, runtime.gradient_checkpointing):
                bench.run("null-text", "null-optimization", optimization, "optimizer", note)
            offsets = lambda: nulltext.direct_offsets(unet, scheduler, pivots, e_src, e_uncond, config.guidance)
            bench.run("direct", "offsets", offsets, note="nulltext.direct_offsets")
    for method, artifact in artifacts.items():
        if artifact is None:
            bench.skip(method, ["edit"], "skipped: the inversion failed, so there is nothing to edit")
            continue
        note = "nulltext.run_edit: P2P [source, target] guided steps + VAE decode"
        bench.run(
            method,
            "edit",
            lambda artifact=artifact: nulltext.run_edit(model, artifact, TARGET, check=False),
            note=note,
        )
    return bench.results


def baseline(
    model: Model, picture: Image.Image, config, steps: int, warmup: int, track: bool = False
) -> list[StageResult]:
    """The reference's cost for the null-text stages (pivot, null optimization, P2P edit) on an fp32 model.

    ``config`` is the library's ``NullTextConfig`` (None when the module is missing: the optimization is skipped).
    The null optimization is the same algorithm as ours, run with the reference's settings: fp32 weights, torch
    AdamW (fp32 states; the reference's Adam without weight decay is the same), materialised attention and no
    gradient checkpointing. Negative-prompt and direct inversion have no reference of their own; their rows compare
    against these.
    """
    pipe, unet = model.pipe, model.pipe.unet
    bench = Recorder(model.device, unet, warmup, track)
    nulltext, why = load_nulltext()
    z0 = encode_image(pipe, picture)
    e_src, e_tgt, e_uncond = encode_text(pipe, SOURCE), encode_text(pipe, TARGET), encode_text(pipe, "")
    reference.materialise_attention(unet)
    pivot = lambda: ddim_invert(unet, pipe.scheduler.config, z0, e_src, steps)
    pivots = bench.run("null-text", "pivot", pivot, note="fp32, materialised attention")
    if pivots is None:
        bench.skip("null-text", ["null-optimization", "edit"], "skipped: the pivot failed")
        return bench.results
    scheduler = fresh_scheduler(pipe, steps)
    nulls = e_uncond.expand(steps, -1, -1)
    if nulltext is None:
        bench.skip("null-text", ["null-optimization"], why)
    else:
        config = dataclasses.replace(config, steps=steps, early_stop=0.0, early_stop_slope=0.0)
        runtime = RuntimeConfig(device=str(model.device), **BASELINE_RUNTIME)

        def optimization() -> torch.Tensor:
            return nulltext.optimize_null_text(unet, scheduler, pivots, e_src, e_uncond, config, runtime, False)[0]

        note = f"fp32, materialised attention, torch AdamW, {config.inner_steps} steps per timestep, no checkpointing"
        found = bench.run("null-text", "null-optimization", optimization, "optimizer", note)
        nulls = nulls if found is None else found.to(model.device)
    store: dict = {}
    reference.materialise_attention(unet, store)

    def edit() -> list[Image.Image]:
        start, cond = pivots[-1].expand(2, -1, -1, -1), torch.cat([e_src, e_tgt])
        uncond = lambda i: nulls[i : i + 1].expand(2, -1, -1)
        latents = sample(unet, fresh_scheduler(pipe, steps), start, cond, uncond, REFERENCE_GUIDANCE)
        return decode_latents(pipe, latents)

    note = "fp32, materialised attention + attention store (<= 32x32 layers), [source, target] + VAE decode"
    bench.run("null-text", "edit", edit, note=note)
    store.clear()
    reference.materialise_attention(unet)
    return bench.results
