"""Imagic's stages as peftedit runs them, and as the diffusers community pipeline does (the baseline).

Ours calls the library: ``imagic.fit`` for the whole pipeline, ``optimize_embedding`` and ``finetune_lora`` under the
same offloading and checkpointing contexts ``fit`` uses, and ``imagic.render``. The baseline is the community
pipeline's training step written out: fp32 weights, torch Adam, no gradient checkpointing, everything on the device,
and stage 2 fine-tunes the whole UNet (``unet.requires_grad_(True)``, lr 2e-6).
"""

from __future__ import annotations

import dataclasses

import torch
from PIL import Image

from peftedit import Artifact, ImagicConfig, RuntimeConfig, imagic
from peftedit.diffusion import (
    decode_latents,
    denoising_loss,
    encode_image,
    encode_text,
    fresh_scheduler,
    initial_noise,
    sample,
)
from peftedit.methods.common import checkpointing, encode_photo, text_embedding, unet_placed
from peftedit.models import Model

from .measure import Recorder, StageResult, idle_offload

METHOD = "imagic"
BASELINE_STAGES = ((METHOD, "embedding"), (METHOD, "lora"), (METHOD, "render"))  # what baseline() measures
TARGET = "a photo of a dog jumping on a bench"
# The diffusers community Imagic pipeline's defaults.
COMMUNITY_EMBEDDING_LR = 1e-3
COMMUNITY_UNET_LR = 2e-6
COMMUNITY_GUIDANCE = 7.5
ETA = 0.7


def ours(
    model: Model,
    picture: Image.Image,
    config: ImagicConfig,
    runtime: RuntimeConfig,
    steps: int,
    warmup: int,
    track: bool = False,
) -> list[StageResult]:
    """Peak memory and seconds per step of ``fit`` (whole pipeline) and of each stage, with ``steps`` steps each."""
    pipe, unet = model.pipe, model.pipe.unet
    config = dataclasses.replace(
        config, embedding_steps=steps, finetune_steps=steps, render_steps=steps, preview_etas=[ETA]
    )
    bench = Recorder(model.device, unet, warmup, track, idle_offload(model))

    def whole() -> Artifact:
        artifact = imagic.fit(model, picture, TARGET, config, runtime, show_progress=False)
        imagic.render(model, artifact, eta=ETA, check=False)
        return artifact

    note = "imagic.fit (both stages, one preview render) + imagic.render"
    artifact = bench.run(METHOD, "pipeline", whole, note=note, timed=False)
    latent, e_tgt = encode_photo(model, picture), text_embedding(model, TARGET)
    generator = torch.Generator("cpu").manual_seed(runtime.seed)
    scheduler = fresh_scheduler(pipe)
    unet_placed(model)
    with (
        bench.encoders_offloaded(model, runtime.offload_encoders),
        checkpointing(unet, runtime.gradient_checkpointing),
    ):

        def stage1() -> torch.Tensor:
            return imagic.optimize_embedding(unet, scheduler, latent, e_tgt, config, runtime, generator, False)[0]

        e_opt = bench.run(METHOD, "embedding", stage1, "train", "imagic.optimize_embedding")
        e_opt = e_tgt if e_opt is None else e_opt

        def stage2() -> dict:
            return imagic.finetune_lora(unet, scheduler, latent, e_opt, config, runtime, generator, False)[0]

        note = f"imagic.finetune_lora (rank {config.lora_rank}, targets {', '.join(config.lora_targets)})"
        bench.run(METHOD, "lora", stage2, "train", note)
    if artifact is None:
        bench.skip(METHOD, ["render"], "skipped: the pipeline run failed, so there is no artifact to render")
        return bench.results
    note = "imagic.render: guided DDIM steps through the LoRA + VAE decode (seconds_total includes the decode)"
    bench.run(METHOD, "render", lambda: imagic.render(model, artifact, eta=ETA, steps=steps, check=False), note=note)
    return bench.results


def _train(unet, scheduler, latent, cond, optimizer, steps: int, generator: torch.Generator) -> None:
    """The community pipeline's loop: denoising loss, backward, Adam step."""
    for _ in range(steps):
        loss = denoising_loss(unet, scheduler, latent, cond, generator)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()


def baseline(model: Model, picture: Image.Image, steps: int, warmup: int, track: bool = False) -> list[StageResult]:
    """The community pipeline's cost on an fp32 model loaded with nothing else switched on."""
    pipe, unet = model.pipe, model.pipe.unet
    bench = Recorder(model.device, unet, warmup, track)
    latent, e_tgt, e_uncond = encode_image(pipe, picture), encode_text(pipe, TARGET), encode_text(pipe, "")
    generator = torch.Generator("cpu").manual_seed(0)
    scheduler = fresh_scheduler(pipe)
    embedding = torch.nn.Parameter(e_tgt.clone())

    def stage1() -> None:
        optimizer = torch.optim.Adam([embedding], lr=COMMUNITY_EMBEDDING_LR)
        _train(unet, scheduler, latent, embedding, optimizer, steps, generator)

    bench.run(METHOD, "embedding", stage1, "train", "fp32, torch Adam on the embedding, no checkpointing")
    e_opt = embedding.detach()

    def stage2() -> None:
        unet.requires_grad_(True)
        unet.train()
        try:
            optimizer = torch.optim.Adam(unet.parameters(), lr=COMMUNITY_UNET_LR)
            _train(unet, scheduler, latent, e_opt, optimizer, steps, generator)
        finally:
            unet.requires_grad_(False)
            unet.eval()
            unet.zero_grad(set_to_none=True)

    bench.run(METHOD, "lora", stage2, "train", "full UNet fine-tune: fp32, torch Adam, no checkpointing")

    def render() -> list[Image.Image]:
        sampler = fresh_scheduler(pipe, steps)
        side = unet.config.sample_size
        noise = initial_noise((1, unet.config.in_channels, side, side), 0) * sampler.init_noise_sigma
        cond = ETA * e_tgt + (1 - ETA) * e_opt
        return decode_latents(pipe, sample(unet, sampler, noise, cond, e_uncond, COMMUNITY_GUIDANCE))

    bench.run(METHOD, "render", render, note="fp32 guided DDIM steps + VAE decode")
    return bench.results
