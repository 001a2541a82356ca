"""Plain text-to-image with any loaded model, through the same sampler the edit methods use."""

from __future__ import annotations

import json
from pathlib import Path

from PIL import Image

from .config import check_sampling, check_seed
from .diffusion import check_prompt, fresh_scheduler, initial_noise, sample
from .methods.common import check_steps, decode_pictures, sampling_bar, text_embedding, unet_placed
from .models import Model, is_xl

# Sampling defaults for a model that recommends none: SD's usual 50 DDIM steps at guidance 7.5 (diffusers' SD
# pipeline default); SDXL's pipeline defaults to guidance 5.
DEFAULT_STEPS = 50
DEFAULT_GUIDANCE = 7.5
DEFAULT_GUIDANCE_XL = 5.0


def recommended_sampling(model: Model) -> tuple[int, float]:
    """(steps, guidance) the model folder recommends, else diffusers' defaults for its pipeline (SD or SDXL)."""
    from .demo import DEMO_SETTINGS_FILE  # a model folder may recommend its own sampling (the demo model does)

    # The model's folder: its name, the configs a single checkpoint file was loaded with, or the hub snapshot.
    folders = (model.name, model.single_file_config, model.pipe.config.get("_name_or_path"))
    path = next((Path(f) / DEMO_SETTINGS_FILE for f in folders if f and Path(f).is_dir()), None)
    guidance = DEFAULT_GUIDANCE_XL if is_xl(model.pipe) else DEFAULT_GUIDANCE
    if path is not None and path.is_file():
        data = json.loads(path.read_text(encoding="utf-8"))
        return int(data.get("num_inference_steps", DEFAULT_STEPS)), float(data.get("guidance_scale", guidance))
    return DEFAULT_STEPS, guidance


def generate(
    model: Model,
    prompt: str,
    seed: int = 0,
    *,
    steps: int | None = None,
    guidance: float | None = None,
    show_progress: bool = False,
):
    """One image for ``prompt`` (PIL); steps and guidance default to the model's recommendation."""
    pipe = model.pipe
    seed = check_seed("seed", seed)  # always: None is not "the default" here; a numpy integer becomes an int
    check_sampling(guidance=guidance, steps=steps)
    prompt = check_prompt(pipe.tokenizer, prompt)
    rec_steps, rec_guidance = recommended_sampling(model)
    steps = steps or rec_steps
    check_steps(model, steps)
    scheduler = fresh_scheduler(pipe, steps)
    side = pipe.unet.config.sample_size
    noise = initial_noise((1, pipe.unet.config.in_channels, side, side), seed) * scheduler.init_noise_sigma
    cond, uncond = text_embedding(model, prompt), text_embedding(model, "")
    guidance = rec_guidance if guidance is None else guidance
    bar = sampling_bar("generate", show_progress)
    latents = sample(unet_placed(model), scheduler, noise, cond, uncond, guidance, progress=bar)
    image: Image.Image = decode_pictures(model, latents)[0]
    return image
