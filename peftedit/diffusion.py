"""Shared diffusion mechanics: prompts and images in and out of the model's spaces, the denoising loss, and a
guided sampler. Every target and step goes through the scheduler, so epsilon and v-prediction models both work."""

from __future__ import annotations

import inspect
import logging
from collections.abc import Callable

import torch
from diffusers import DDIMScheduler
from PIL import Image

from .errors import NumericalError, PeftEditError, RenderDiverged
from .images import to_image, to_tensor

log = logging.getLogger("peftedit")

CondSource = torch.Tensor | Callable[[int], torch.Tensor]


# A too-long prompt's warning quotes the start of what is dropped: at most this many tokens, and characters.
DROPPED_QUOTE_TOKENS = 6
DROPPED_QUOTE_CHARS = 40


def require_text(text: str, what: str = "the prompt", hint: str = "") -> str:
    """``text`` with its whitespace collapsed; raises when nothing is left (needs no tokenizer, so the CLI checks
    prompts with it before the model loads)."""
    if not isinstance(text, str):  # str(None) would be the prompt "None"
        raise PeftEditError(f"{what} must be a string, not {type(text).__name__}")
    text = " ".join(text.split())
    if not text:
        raise PeftEditError(f"{what} is empty: describe the picture you want{hint}")
    return text


def check_prompt(tokenizer, text: str) -> str:
    """Strip a prompt; raise on an empty one and warn (in one short line: how many tokens are dropped, and the first
    few of them) when it is too long."""
    text = require_text(text)
    limit = tokenizer.model_max_length - 2
    ids = tokenizer(text, add_special_tokens=False, truncation=False).input_ids
    if len(ids) > limit:
        dropped = ids[limit:]
        quote = tokenizer.decode(dropped[:DROPPED_QUOTE_TOKENS]).strip()
        if len(dropped) > DROPPED_QUOTE_TOKENS or len(quote) > DROPPED_QUOTE_CHARS:
            quote = quote[:DROPPED_QUOTE_CHARS].rstrip() + " …"
        log.warning(
            "prompt is %d tokens, the text encoder reads %d: %s dropped (%r)",
            len(ids),
            limit,
            "the last token is" if len(dropped) == 1 else f"the last {len(dropped)} are",
            quote,
        )
    return text


# SDXL's UNet also takes "added conditions": the second text encoder's pooled output and six size numbers
# (original height and width, crop top and left, target height and width). peftedit carries them in one extra row at
# the end of the text embedding, [1, 77 + 1, d]: pooled values first, then the six numbers, then zeros. Everything
# that handles embeddings (Imagic's interpolation and optimization, null-text's per-step null embeddings, batching)
# then handles them too, and ``unet_output`` is the one place that unpacks the row.
SIZE_CONDITIONS = 6


@torch.no_grad()
def encode_text(pipe, text: str) -> torch.Tensor:
    """The text encoder's output sequence for ``text`` (``""`` allowed), as fp32 [1, 77, d] on the pipe's device.

    For SDXL: both encoders' penultimate hidden states side by side, then the added-conditions row, [1, 78, d] (see
    ``SIZE_CONDITIONS``); with ``force_zeros_for_empty_prompt`` (SDXL base) the empty prompt is zeros, as in diffusers.
    """
    if getattr(pipe, "text_encoder_2", None) is None:
        return pipe.text_encoder(_token_ids(pipe.tokenizer, text, pipe.text_encoder.device))[0].float()
    pieces, pooled = [], None
    for tokenizer, encoder in ((pipe.tokenizer, pipe.text_encoder), (pipe.tokenizer_2, pipe.text_encoder_2)):
        out = encoder(_token_ids(tokenizer, text, encoder.device), output_hidden_states=True)
        pieces.append(out.hidden_states[-2].float())
        pooled = out[0].float()  # the second encoder's projected output (CLIPTextModelWithProjection.text_embeds)
    hidden = torch.cat(pieces, dim=-1)
    if not text and pipe.config.get("force_zeros_for_empty_prompt", False):
        hidden, pooled = torch.zeros_like(hidden), torch.zeros_like(pooled)
    side = int(pipe.unet.config.sample_size) * int(pipe.vae_scale_factor)
    sizes = torch.tensor([[side, side, 0, 0, side, side]], dtype=torch.float32, device=hidden.device)
    added = torch.cat([pooled, sizes], dim=-1)
    if added.shape[-1] > hidden.shape[-1]:
        raise PeftEditError(f"SDXL pooled text ({pooled.shape[-1]}) does not fit a row of {hidden.shape[-1]} values")
    row = torch.nn.functional.pad(added, (0, hidden.shape[-1] - added.shape[-1]))
    return torch.cat([hidden, row[:, None]], dim=1)


def _token_ids(tokenizer, text: str, device) -> torch.Tensor:
    tokens = tokenizer(
        text,
        padding="max_length",
        max_length=tokenizer.model_max_length,
        truncation=True,
        return_tensors="pt",
    )
    return tokens.input_ids.to(device)


def unet_output(unet, latents: torch.Tensor, t, cond: torch.Tensor) -> torch.Tensor:
    """The UNet's prediction for ``latents`` at ``t`` given text embeddings ``cond`` (in the UNet's dtype).

    For SDXL's UNet (``addition_embed_type="text_time"``) the last row of ``cond`` holds the added conditions; the
    size numbers are never trained (detached)."""
    dtype = unet.dtype
    if unet.config.addition_embed_type != "text_time":
        return unet(latents.to(dtype), t, encoder_hidden_states=cond.to(dtype)).sample
    pooled = unet.config.projection_class_embeddings_input_dim - SIZE_CONDITIONS * unet.config.addition_time_embed_dim
    row = cond[:, -1]
    added = {
        "text_embeds": row[:, :pooled].to(dtype),
        "time_ids": row[:, pooled : pooled + SIZE_CONDITIONS].detach().to(dtype),
    }
    return unet(latents.to(dtype), t, encoder_hidden_states=cond[:, :-1].to(dtype), added_cond_kwargs=added).sample


@torch.no_grad()
def encode_image(pipe, image: Image.Image) -> torch.Tensor:
    """The VAE latent (posterior mean, scaled) of an RGB image, as fp32 [1, 4, h, w]."""
    vae = pipe.vae
    pixels = to_tensor(image).to(vae.device, vae.dtype)
    latent = vae.encode(pixels).latent_dist.mean
    return latent.float() * vae.config.scaling_factor


@torch.no_grad()
def decode_latents(pipe, latents: torch.Tensor, advice: str = "try a lower guidance") -> list[Image.Image]:
    """Images for a batch of scaled latents. Raises :class:`RenderDiverged` ending in ``advice`` when the latents or
    the decoded pixels are NaN or infinite (after decoding): a render that diverged would otherwise be black."""
    vae = pipe.vae
    pixels = vae.decode(latents.to(vae.device, vae.dtype) / vae.config.scaling_factor).sample
    if not bool(torch.isfinite(latents).all()):
        raise RenderDiverged(f"the render diverged: its latents are NaN or infinite; {advice}")
    if not bool(torch.isfinite(pixels).all()):
        raise RenderDiverged(f"the VAE's decoded picture is NaN or infinite; {advice}")
    return [to_image(p) for p in pixels]


def fresh_scheduler(pipe, steps: int | None = None) -> DDIMScheduler:
    """A new DDIM scheduler from the pipe's config (no shared state), with ``steps`` timesteps set if given."""
    scheduler = DDIMScheduler.from_config(pipe.scheduler.config)
    if steps is not None:
        scheduler.set_timesteps(steps)
    return scheduler


def training_target(scheduler, clean: torch.Tensor, noise: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    """What the UNet should predict for ``scheduler.add_noise(clean, noise, t)``, per ``prediction_type``."""
    kind = scheduler.config.prediction_type
    if kind == "epsilon":
        return noise
    if kind == "v_prediction":
        return scheduler.get_velocity(clean, noise, t)
    if kind == "sample":
        return clean
    raise PeftEditError(f"unsupported prediction_type {kind!r}")


def denoising_loss(
    unet, scheduler, clean: torch.Tensor, cond: torch.Tensor, generator: torch.Generator
) -> torch.Tensor:
    """MSE denoising loss at one random timestep (fp32), with noise drawn from ``generator`` (CPU)."""
    t = torch.randint(0, scheduler.config.num_train_timesteps, (clean.shape[0],), generator=generator)
    noise = torch.randn(clean.shape, generator=generator)
    noisy = scheduler.add_noise(clean.cpu(), noise, t)
    target = training_target(scheduler, clean.cpu(), noise, t).to(clean.device)
    device = clean.device
    pred = unet_output(unet, noisy.to(device), t.to(device), cond)
    return torch.nn.functional.mse_loss(pred.float(), target.float())


@torch.no_grad()
def mean_denoising_loss(unet, scheduler, clean: torch.Tensor, cond: torch.Tensor, samples: int = 16, seed: int = 0):
    """Denoising loss averaged over ``samples`` fixed (timestep, noise) draws: a repeatable measure of fit."""
    generator = torch.Generator("cpu").manual_seed(seed)
    losses = [float(denoising_loss(unet, scheduler, clean, cond, generator)) for _ in range(samples)]
    return sum(losses) / len(losses)


def check_finite(loss: torch.Tensor, stage: str, step: int, advice: str) -> float:
    """The loss as a float; raises :class:`NumericalError` naming the stage when it is NaN or infinite."""
    value = float(loss.detach())
    if value != value or value in (float("inf"), float("-inf")):
        raise NumericalError(f"{stage}: loss became {value} at step {step}; {advice}")
    return value


def guided_prediction(
    unet,
    latents: torch.Tensor,
    t,
    cond: torch.Tensor,
    uncond: torch.Tensor | None,
    guidance: float,
) -> torch.Tensor:
    """Classifier-free-guided model output (fp32); one batched UNet call, or conditional only when uncond is None."""
    if uncond is None:
        return unet_output(unet, latents, t, cond).float()
    both = unet_output(unet, torch.cat([latents, latents]), t, torch.cat([uncond, cond])).float()
    out_uncond, out_cond = both.chunk(2)
    return out_uncond + guidance * (out_cond - out_uncond)


def initial_noise(shape: tuple[int, ...], seed: int) -> torch.Tensor:
    """Gaussian starting latents from a CPU generator, so a seed means the same picture on every device."""
    return torch.randn(shape, generator=torch.Generator("cpu").manual_seed(seed))


def _at(source: CondSource, i: int) -> torch.Tensor:
    return source(i) if callable(source) else source


@torch.no_grad()
def sample(
    unet,
    scheduler,
    latents: torch.Tensor,
    cond: CondSource,
    uncond: CondSource | None,
    guidance: float,
    after_step: Callable[[int, torch.Tensor], torch.Tensor] | None = None,
    progress: Callable | None = None,
) -> torch.Tensor:
    """Run the scheduler's timesteps from ``latents`` with guided predictions; returns the final latents (fp32).

    ``cond``/``uncond`` are tensors or functions of the step index (per-step null embeddings); ``after_step`` may
    replace the latents after each step (null-text offsets, Prompt-to-Prompt blending).
    """
    latents = latents.to(unet.device, torch.float32)
    steps = list(enumerate(scheduler.timesteps))
    for i, t in progress(steps) if progress else steps:
        uncond_i = _at(uncond, i) if uncond is not None and guidance != 1.0 else None
        pred = guided_prediction(unet, latents, t, _at(cond, i), uncond_i, guidance)
        latents = scheduler.step(pred, t, latents).prev_sample.float()
        if after_step is not None:
            latents = after_step(i, latents)
    return latents


INVERTIBLE_SPACINGS = ("leading", "trailing")  # the timestep spacings DDIMInverseScheduler implements


@torch.no_grad()
def ddim_invert(
    unet,
    scheduler_config,
    latent: torch.Tensor,
    cond: torch.Tensor,
    steps: int,
    progress: Callable | None = None,
    noised_steps: int = 0,
    seed: int = 0,
) -> list[torch.Tensor]:
    """DDIM inversion at guidance 1: the latents z_0 (= ``latent``) … z_T, fp32 on the UNet's device.

    Runs diffusers' ``DDIMInverseScheduler`` on exactly the timesteps a ``steps``-step ``DDIMScheduler`` from the same
    config samples with (reversed), so the sampler's step ``i`` goes from z_{T-i} towards z_{T-i-1}. Every conversion
    is the scheduler's own, so epsilon and v-prediction models both work.

    With ``noised_steps`` = n > 0 the first n latents after z_0 are instead the forward process's
    ``add_noise(z_0, noise, t)`` with one noise drawn from ``seed`` (on the CPU, so every device draws the same),
    and the inversion goes on from the last of them: DDIM inversion keeps the noise it is given, so z_T then carries
    Gaussian noise where a plain inversion leaves areas the model predicts exactly (flat backgrounds) near zero.
    """
    from diffusers import DDIMInverseScheduler

    spacing = dict(scheduler_config).get("timestep_spacing", "leading")
    if spacing not in INVERTIBLE_SPACINGS:  # diffusers' inverse scheduler refuses the others with its own ValueError
        raise PeftEditError(
            f"timestep_spacing {spacing!r}: DDIM inversion takes {' or '.join(map(repr, INVERTIBLE_SPACINGS))}; use "
            "a scheduler config with one of them"
        )
    # Only the keys it takes: a config converted from another scheduler (SDXL ships Euler's) carries keys diffusers
    # would warn about, one line per inversion.
    takes = inspect.signature(DDIMInverseScheduler.__init__).parameters
    inverse = DDIMInverseScheduler.from_config({k: v for k, v in dict(scheduler_config).items() if k in takes})
    inverse.set_timesteps(steps)
    forward = DDIMScheduler.from_config(scheduler_config)
    forward.set_timesteps(steps)
    if not torch.equal(inverse.timesteps.flip(0).cpu(), forward.timesteps.cpu()):
        raise PeftEditError(
            f"timestep_spacing {forward.config.timestep_spacing!r} gives inversion timesteps that differ from the "
            "sampler's; use a scheduler config with 'leading' or 'trailing' spacing"
        )
    if not 0 <= noised_steps <= steps:
        raise PeftEditError(f"noised_steps = {noised_steps} must be between 0 and the {steps} steps")
    clean = latent.to(unet.device, torch.float32)
    latents = [clean]
    timesteps = list(inverse.timesteps)
    if noised_steps:
        noise = torch.randn(clean.shape, generator=torch.Generator().manual_seed(seed)).to(clean.device)
        for t in timesteps[:noised_steps]:
            latents.append(forward.add_noise(clean, noise, t.reshape(1).to(clean.device)).float())
    rest = timesteps[noised_steps:]
    for t in progress(rest) if progress else rest:
        pred = guided_prediction(unet, latents[-1], t, cond, None, 1.0)
        latents.append(inverse.step(pred, t, latents[-1]).prev_sample.float())
    return latents
