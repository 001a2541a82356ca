"""Inverting a real photo for Prompt-to-Prompt editing, and the edits themselves.

The pivot is a DDIM inversion at guidance 1 with the source prompt, by default started from the forward-noised latent
(``NullTextConfig.pivot_noise``) so that its end carries noise everywhere. Guided sampling from its end drifts off it;
the methods differ in how they pull it back:

- ``null-text`` (Mokady et al., CVPR 2023): per timestep, optimize the null (unconditional) embedding so the guided
  step lands on the pivot; the per-step embeddings are the edit.
- ``negative-prompt`` (Miyake et al., 2023): no optimization; the source prompt's embedding stands in for the null one.
- ``direct`` (PnP inversion, Ju et al., ICLR 2024): store each step's offset from the guided step to the pivot and add
  it back in the source branch while editing.
- ``ddim``: the plain inversion with the empty prompt as null; the baseline.
"""

from __future__ import annotations

import contextlib
import logging
import math
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path

import torch
from PIL import Image
from tqdm.auto import tqdm

from ..artifact_checks import INVERSIONS
from ..artifacts import Artifact
from ..config import RuntimeConfig, check_fields, check_sampling, check_seed, option, positive, to_dict
from ..diffusion import (
    check_finite,
    check_prompt,
    ddim_invert,
    fresh_scheduler,
    guided_prediction,
    sample,
)
from ..errors import ArtifactError, NumericalError, PeftEditError
from ..images import grid, load_image, psnr
from ..models import Model
from ..optim import descend, loss_scaler, make_optimizer, numeric_advice
from . import p2p
from .common import (
    TRAINING_SCHEDULE,
    base_meta,
    call_runtime,
    check_base,
    check_schedule,
    check_steps,
    checkpointing,
    decode_pictures,
    encode_photo,
    encoders_offloaded,
    progress,
    sampling_bar,
    text_embedding,
    unet_placed,
)

log = logging.getLogger("peftedit")

METHODS = INVERSIONS  # one list: artifact checks, the CLI and the config read the same
TABLE = "nulltext"
STAGE = "null-text optimization"
# Scheduler settings an edit must share with its inversion (the timesteps and the noise schedule).
SCHEDULER_KEYS = (
    *TRAINING_SCHEDULE,
    "timestep_spacing",
    "steps_offset",
    "set_alpha_to_one",
    "clip_sample",
    "rescale_betas_zero_snr",
)


@dataclass
class NullTextConfig:
    """Inversion hyperparameters; each help names where its default comes from."""

    method: str = option("null-text", f"One of {', '.join(METHODS)} (see the module docstring).")
    steps: int = option(50, "DDIM steps of the inversion and of every edit. Null-text reference: NUM_DDIM_STEPS = 50.")
    guidance: float = option(7.5, "Classifier-free guidance the inversion is made for. Null-text reference: 7.5.")
    inner_steps: int = option(10, "Most optimizer steps per timestep. Null-text reference: num_inner_steps = 10.")
    lr: float = option(1e-2, "Adam learning rate at the first timestep. Null-text reference: 1e-2.")
    lr_decay: float = option(1e-2, "Step i's learning rate is lr * (1 - lr_decay * i). Reference: 1 - i/100.")
    early_stop: float = option(1e-5, "Step i stops when loss < early_stop + i * early_stop_slope. Reference: 1e-5.")
    early_stop_slope: float = option(2e-5, "Growth of the early-stop threshold per step. Null-text reference: 2e-5.")
    pivot_noise: float = option(
        0.4,
        "Share of the steps, from t = 0, where the pivot is the photo noised by the forward process (one seeded "
        "noise) instead of DDIM-inverted; the inversion goes on from there. 0 = the reference (all DDIM), which "
        "leaves z_T near zero where the model predicts the photo exactly (flat backgrounds) and so pins the layout. "
        "0.4 by the demo edit-quality benchmark (shape, size and position edits 0/6 at 0, 5/6 at 0.3, 6/6 at 0.4).",
    )
    seed: int = option(0, "Seed of the pivot_noise noise (drawn on the CPU, the same on every device).")

    def __post_init__(self) -> None:
        check_fields(self, "nulltext.{}".format)
        check_seed("nulltext.seed", self.seed)
        if self.method not in METHODS:
            raise PeftEditError(f"nulltext.method = {self.method!r}: choose one of {', '.join(METHODS)}")
        positive("nulltext.steps", self.steps)
        positive("nulltext.inner_steps", self.inner_steps, zero_ok=True)
        if not 0.0 <= self.pivot_noise <= 1.0:
            raise PeftEditError(f"nulltext.pivot_noise = {self.pivot_noise!r} must be between 0 and 1")
        for name in ("guidance", "lr_decay", "early_stop", "early_stop_slope"):
            positive(f"nulltext.{name}", getattr(self, name), zero_ok=True)
        positive("nulltext.lr", self.lr)
        if self.method == "null-text" and self.guidance == 1:
            raise PeftEditError(
                "nulltext.guidance = 1 leaves null-text nothing to optimize (guided sampling at 1 does not use the "
                "null embedding); --method (nulltext.method) ddim inverts for guidance 1 as it is"
            )
        # Only null-text optimizes: the other methods have no learning rate to run out (ddim at 200 steps was refused)
        if self.method == "null-text" and self.lr_decay * (self.steps - 1) >= 1:
            raise PeftEditError(
                f"nulltext.lr_decay = {self.lr_decay} makes the learning rate reach 0 within nulltext.steps = "
                f"{self.steps}; give at most {math.ceil(1 / self.lr_decay)} steps or an lr_decay below "
                f"{1 / (self.steps - 1):.3g}"
            )

    def sampling_steps(self) -> tuple[int, str]:
        """The sampling step count of the inversion and its edits, and its name, for ``check_steps``."""
        return self.steps, "nulltext.steps"


def optimize_null_text(unet, scheduler, pivots, cond, uncond, config, runtime, show):
    """Per-timestep null embeddings [T, 77, d] (SDXL: [T, 78, d]; fp32), the final latent, and per-step statistics."""
    steps = len(scheduler.timesteps)
    null = uncond.detach().float()
    nulls, latents = [], pivots[-1]
    stats = {"inner_steps": [], "loss": [], "pivot_error": []}
    scaler = loss_scaler(unet.dtype, latents.device)  # one for the run: the scale it finds carries over
    advice = numeric_advice("nulltext.lr", unet.dtype)
    bar = progress(steps, "null-text", show)
    for i in bar:
        t, target = scheduler.timesteps[i], pivots[steps - 1 - i]
        with torch.no_grad():
            pred_cond = guided_prediction(unet, latents, t, cond, None, 1.0)
        null = null.detach().clone().requires_grad_(True)
        optimizer = make_optimizer([null], config.lr * (1 - config.lr_decay * i), runtime.optimizer)
        threshold = config.early_stop + i * config.early_stop_slope
        used, value = 0, float("nan")
        for j in range(config.inner_steps):
            pred_uncond = guided_prediction(unet, latents, t, null, None, 1.0)
            pred = pred_uncond + config.guidance * (pred_cond - pred_uncond)
            loss = torch.nn.functional.mse_loss(scheduler.step(pred, t, latents).prev_sample, target)
            value = check_finite(loss, STAGE, i, advice)
            used = j + 1
            if value < threshold:
                break
            descend(optimizer, scaler, loss, STAGE, advice)
        null = null.detach()
        nulls.append(null)
        with torch.no_grad():
            pred = guided_prediction(unet, latents, t, cond, null, config.guidance)
            latents = scheduler.step(pred, t, latents).prev_sample.float()
        error = float(torch.nn.functional.mse_loss(latents, target))
        if not math.isfinite(error):  # the last inner step's update, which no loss has seen, broke the null embedding
            raise NumericalError(f"{STAGE}: the sampled latents became {error} at step {i}; {advice}")
        stats["inner_steps"].append(used)
        stats["loss"].append(value)
        stats["pivot_error"].append(error)
        bar.set_postfix(t=int(t), loss=f"{value:.2e}", inner=used, refresh=False)
    return torch.cat(nulls).cpu(), latents, stats


@torch.no_grad()
def direct_offsets(unet, scheduler, pivots, cond, uncond, guidance):
    """PnP inversion: per step, the pivot minus the guided step taken from the pivot, [T, 4, h, w]."""
    steps = len(scheduler.timesteps)
    offsets = []
    for i, t in enumerate(scheduler.timesteps):
        current = pivots[steps - i]
        pred = guided_prediction(unet, current, t, cond, uncond, guidance)
        offsets.append(pivots[steps - 1 - i] - scheduler.step(pred, t, current).prev_sample.float())
    return torch.cat(offsets).cpu()


def invert(
    model: Model,
    image: str | Path | Image.Image,
    source_prompt: str,
    config: NullTextConfig | None = None,
    runtime: RuntimeConfig | None = None,
    show_progress: bool = True,
) -> Artifact:
    """Invert one photo with ``config.method``; returns the edit artifact (preview: input | reconstruction)."""
    config = config or NullTextConfig()
    if not isinstance(config, NullTextConfig):
        raise TypeError(f"config must be a NullTextConfig, not {type(config).__name__}")
    runtime = call_runtime(model, runtime)
    pipe, unet = model.pipe, model.pipe.unet
    source_prompt = check_prompt(pipe.tokenizer, source_prompt)
    check_steps(model, *config.sampling_steps())
    picture, image_info = load_image(image, model.resolution)
    z0 = encode_photo(model, picture)
    e_src, e_uncond = text_embedding(model, source_prompt), text_embedding(model, "")
    meta, probe = base_meta(model, {"runtime": to_dict(runtime), TABLE: to_dict(config)}, image_info)
    tensors: dict[str, torch.Tensor] = {}
    unet_placed(model)
    with encoders_offloaded(model, runtime.offload_encoders):
        bar = partial(tqdm, desc="pivot (DDIM inversion)", disable=not show_progress, dynamic_ncols=True)
        noised = round(config.pivot_noise * config.steps)
        pivots = ddim_invert(unet, pipe.scheduler.config, z0, e_src, config.steps, bar, noised, config.seed)
        scheduler = fresh_scheduler(pipe, config.steps)
        stats: dict = {}
        if config.method == "null-text":
            with checkpointing(unet, runtime.gradient_checkpointing):
                nulls, _, stats = optimize_null_text(
                    unet, scheduler, pivots, e_src, e_uncond, config, runtime, show_progress
                )
            tensors["null_embeddings"] = nulls
        elif config.method == "direct":
            tensors["offsets"] = direct_offsets(unet, scheduler, pivots, e_src, e_uncond, config.guidance)
    tensors.update(
        z_T=pivots[-1].cpu(),
        z_0=z0.cpu(),
        timesteps=scheduler.timesteps.clone().cpu(),
        e_src=e_src.cpu(),
        e_uncond=e_uncond.cpu(),
        base_probe=probe,
    )
    meta.update(prompts={"source": source_prompt}, guidance=config.guidance, steps=config.steps)
    artifact = Artifact(config.method, tensors, meta)
    result = run_edit(model, artifact, check=False, pivots=pivots, show_progress=show_progress)
    stats.setdefault("pivot_error", result.pivot_error)
    meta["per_step"] = stats
    meta["losses"] = {
        "psnr": psnr(picture, result.images[0]),
        "latent_error": float(torch.nn.functional.mse_loss(result.latents[:1].cpu(), z0.cpu())),
        "pivot_error_mean": sum(stats["pivot_error"]) / len(stats["pivot_error"]),
    }
    label = f"{config.method} {meta['losses']['psnr']:.1f} dB"
    artifact.preview = grid([picture, result.images[0]], ["input", label])
    artifact.card = model_card(artifact)
    return artifact


@dataclass
class EditResult:
    """What an edit run produced: one image and latent per branch ([source] or [source, target]) and the maps."""

    images: list[Image.Image]
    latents: torch.Tensor
    prompts: list[str]
    maps: torch.Tensor | None = None
    pivot_error: list[float] = field(default_factory=list)

    @property
    def image(self) -> Image.Image:
        """The edited picture (the reconstruction when there is no target)."""
        return self.images[-1]


def check_inversion(model: Model, artifact: Artifact, steps: int | None = None, check: bool = True) -> None:
    """Raise :class:`ArtifactError` unless ``artifact`` is an inversion this model can edit with ``steps`` steps."""
    if artifact.method not in METHODS:
        raise ArtifactError(f"this edit's method is {artifact.method!r}, not an inversion ({', '.join(METHODS)})")
    artifact.require("z_T", "timesteps", "e_src", "e_uncond", "base_probe")
    if artifact.method == "null-text":
        artifact.require("null_embeddings")
    if artifact.method == "direct":
        artifact.require("offsets")
    made = artifact.meta["steps"]
    if steps is not None and steps != made:
        raise ArtifactError(
            f"this inversion was made with {made} DDIM steps and only edits with {made} (asked for {steps}); "
            f"invert again with --steps (nulltext.steps) {steps}"
        )
    if check:
        check_base(model, artifact)
    check_schedule(model, artifact, SCHEDULER_KEYS)
    timesteps = fresh_scheduler(model.pipe, made).timesteps.cpu()
    if not torch.equal(timesteps, artifact.tensors["timesteps"]):
        raise ArtifactError("the scheduler's timesteps differ from the ones this inversion was made with")


@torch.no_grad()
def run_edit(
    model: Model,
    artifact: Artifact,
    target_prompt: str | None = None,
    control: p2p.Control | None = None,
    *,
    steps: int | None = None,
    guidance: float | None = None,
    maps: bool = False,
    check: bool = True,
    pivots: list[torch.Tensor] | None = None,
    show_progress: bool = False,
) -> EditResult:
    """Sample from the inversion: the source branch alone (reconstruction) or [source, target] with P2P control."""
    if control is not None and not isinstance(control, p2p.Control):
        raise TypeError(f"control must be a p2p.Control (or None), not {type(control).__name__}")
    check_sampling(guidance=guidance, steps=steps)
    check_inversion(model, artifact, steps, check)
    pipe, unet, meta = model.pipe, model.pipe.unet, artifact.meta
    made = meta["guidance"]
    if guidance is not None and guidance != made:
        log.warning("the inversion was made for guidance %g; at %g the source branch will drift", made, guidance)
    guidance = made if guidance is None else guidance
    device = model.device
    tensors = {k: v.to(device) for k, v in artifact.tensors.items()}
    prompts = [meta["prompts"]["source"]]
    if target_prompt is not None:
        prompts.append(check_prompt(pipe.tokenizer, target_prompt))
    elif control is not None and (control.mode or control.reweight):
        prompts.append(prompts[0])
        if not control.reweight:
            log.warning(
                "%s %s without a target prompt edits the source into itself: nothing changes",
                p2p.named("mode"),
                control.mode,
            )
    elif control is not None and control.blends:
        log.warning("the local blend is ignored without a target prompt")
    branches = len(prompts)
    cond = torch.cat([tensors["e_src"]] + [text_embedding(model, p) for p in prompts[1:]])
    null = {"null-text": None, "negative-prompt": tensors["e_src"]}.get(artifact.method, tensors["e_uncond"])

    def uncond(i: int) -> torch.Tensor:
        row = tensors["null_embeddings"][i : i + 1] if null is None else null
        return row.expand(branches, -1, -1)

    scheduler = fresh_scheduler(pipe, meta["steps"])
    unet_placed(model)  # before the controller, which puts its tensors on the UNet's device
    controller = p2p.Controller(unet, pipe.tokenizer, prompts, control, meta["steps"])
    errors: list[float] = []

    def after_step(i: int, latents: torch.Tensor) -> torch.Tensor:
        if artifact.method == "direct":
            latents = torch.cat([latents[:1] + tensors["offsets"][i : i + 1], latents[1:]])
        latents = controller.after_step(i, latents)
        if pivots is not None:
            errors.append(float(torch.nn.functional.mse_loss(latents[:1], pivots[len(pivots) - 2 - i])))
        return latents

    start = tensors["z_T"].expand(branches, -1, -1, -1)
    bar = sampling_bar("reconstruction" if pivots is not None else "edit", show_progress)
    # The controller's processors only where something reads or edits the attention; else the fast processors.
    attention = p2p.installed(unet, controller) if branches == 2 or maps else contextlib.nullcontext()
    with attention:
        latents = sample(unet, scheduler, start, cond, uncond, guidance, after_step, bar)
    images = decode_pictures(model, latents)
    return EditResult(images, latents, prompts, controller.mean_maps(), errors)


def edit(
    model: Model,
    artifact: Artifact,
    target_prompt: str | None = None,
    control: p2p.Control | None = None,
    *,
    steps: int | None = None,
    guidance: float | None = None,
    show_progress: bool = False,
) -> Image.Image:
    """The edited picture (PIL); with no target prompt and no control, the reconstruction of the input.

    DDIM with eta 0 is deterministic, so there is no seed. Raises :class:`ArtifactError` for another base model,
    scheduler or step count than the inversion was made with.
    """
    return run_edit(
        model, artifact, target_prompt, control, steps=steps, guidance=guidance, show_progress=show_progress
    ).image


def reconstruct(model: Model, artifact: Artifact, *, show_progress: bool = False) -> Image.Image:
    """The inversion's reconstruction of the input photo (PIL)."""
    return edit(model, artifact, show_progress=show_progress)


def model_card(artifact: Artifact) -> str:
    """A short README for the edit folder."""
    meta = artifact.meta
    losses = meta.get("losses", {})
    return f"""# peftedit {artifact.method} inversion

- source prompt: "{meta["prompts"]["source"]}"
- base model: `{meta["base_model"]}` (fingerprint {meta["base_fingerprint"]})
- input image: {meta["image"].get("name")} (sha256 {meta["image"].get("sha256")})
- {meta["steps"]} DDIM steps at guidance {meta["guidance"]}; PSNR {losses.get("psnr", float("nan")):.2f} dB
- created {meta["created"]} with peftedit {meta["versions"].get("peftedit")}

![preview](preview.png)

Edit (Prompt-to-Prompt, no re-inversion): the source prompt with words swapped, added or reweighted, e.g.

    peftedit edit . "TARGET PROMPT" -o ../edit.png
    peftedit edit . -o ../reconstruction.png          # no target: input | reconstruction

(pictures go outside the folder: `--overwrite` replaces an edit folder only while it holds nothing else)
"""
