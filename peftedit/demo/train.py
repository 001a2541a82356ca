"""Train the demo model: a KL autoencoder on world images, then UNet + text encoder on its frozen latents.

python -m peftedit.demo.train --recipe recipes/demo-train.toml --out peftedit/demo/model
"""

from __future__ import annotations

import argparse
import copy
import json
import math
import random
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from tqdm import tqdm

from .. import config as cfglib
from ..config import option
from ..images import to_tensor as image_tensor
from ..optim import set_lr
from .components import (
    ModelConfig,
    build_scheduler,
    build_text_encoder,
    build_tokenizer,
    build_unet,
    build_vae,
    count_params,
    save_pipeline,
)
from .world import WHERE, Scene, random_scene


@dataclass
class RunConfig:
    """Process-wide settings."""

    seed: int = option(0, "Seed for scenes, initialisation, noise and timesteps.")
    num_threads: int = option(1, "torch CPU threads (leave the other cores to other work).")


@dataclass
class VaeTrainConfig:
    """Stage 1: the autoencoder, trained on freshly drawn scenes."""

    steps: int = option(700, "Optimizer steps.")
    batch_size: int = option(32, "Images per step.")
    lr: float = option(1e-3, "AdamW learning rate (cosine decay to lr_floor x lr after warmup).")
    warmup: int = option(50, "Linear warmup steps.")
    kl_weight: float = option(1e-6, "Weight of the KL term: small, so the latent is nearly a plain autoencoder's.")
    l1_weight: float = option(1.0, "Weight of the L1 reconstruction term (added to MSE) for crisp edges.")


@dataclass
class DiffusionTrainConfig:
    """Stage 2: UNet + text encoder with the denoising (epsilon) loss on precomputed latents."""

    scenes: int = option(12000, "Scenes drawn and encoded once (latent mean and std kept; sampled each step).")
    steps: int = option(3000, "Optimizer steps.")
    batch_size: int = option(64, "Latents per step.")
    lr: float = option(1e-3, "AdamW learning rate (cosine decay to lr_floor x lr after warmup).")
    warmup: int = option(200, "Linear warmup steps.")
    ema_decay: float = option(0.999, "EMA decay of the saved weights (after a warmup: min(decay, (1+n)/(10+n))).")
    empty_prompt: float = option(0.1, "Fraction of empty prompts, for classifier-free guidance.")
    short_prompt: float = option(0.15, "Fraction of prompts with some attributes dropped.")
    save_every: int = option(500, "Save the EMA pipeline every this many steps (and at the end).")


@dataclass
class SamplerConfig:
    """Recommended sampling, written to the model folder."""

    steps: int = option(25, "DDIM steps.")
    guidance: float = option(4.0, "Classifier-free guidance scale (the demo gate passes at 4: 99.4% / 97.5%).")


@dataclass
class DataConfig:
    """The scene mix."""

    two_object_fraction: float = option(0.5, "Fraction of scenes with two objects (left and right).")


SECTIONS = {
    "run": RunConfig,
    "model": ModelConfig,
    "data": DataConfig,
    "vae": VaeTrainConfig,
    "diffusion": DiffusionTrainConfig,
    "sampler": SamplerConfig,
}
LR_FLOOR = 0.1  # cosine schedules end at this fraction of the peak learning rate
SHORT_DROP = 0.5  # in a shortened prompt, each attribute is dropped with this probability


def lr_at(step: int, total: int, peak: float, warmup: int) -> float:
    """Linear warmup then cosine decay to LR_FLOOR x peak."""
    if step < warmup:
        return peak * (step + 1) / warmup
    progress = (step - warmup) / max(1, total - warmup)
    return peak * (LR_FLOOR + (1 - LR_FLOOR) * 0.5 * (1 + math.cos(math.pi * progress)))


def to_tensor(scenes: list[Scene]) -> torch.Tensor:
    """Scenes as a (N, 3, 64, 64) batch in [-1, 1]."""
    return torch.cat([image_tensor(s.draw()) for s in scenes])


def training_prompt(scene: Scene, rng: random.Random, cfg: DiffusionTrainConfig) -> str:
    """The scene's prompt; sometimes empty (for guidance), sometimes with attributes dropped."""
    roll = rng.random()
    if roll < cfg.empty_prompt:
        return ""
    if roll >= cfg.empty_prompt + cfg.short_prompt:
        return scene.prompt()
    parts = []
    for obj in scene.objects:
        words = ["a"]
        words += [obj.size] if rng.random() > SHORT_DROP else []
        words += [obj.color] if rng.random() > SHORT_DROP else []
        words += [obj.shape]
        words += [WHERE[obj.position]] if rng.random() > SHORT_DROP else []
        parts.append(" ".join(words))
    return " and ".join(parts)


def train_vae(vae, cfg: VaeTrainConfig, data: DataConfig, rng: random.Random) -> None:
    vae.train()
    optimizer = torch.optim.AdamW(vae.parameters(), lr=cfg.lr, weight_decay=0.0)
    bar = tqdm(range(cfg.steps), desc="vae", mininterval=10)
    for step in bar:
        set_lr(optimizer, lr_at(step, cfg.steps, cfg.lr, cfg.warmup))
        images = to_tensor([random_scene(rng, data.two_object_fraction) for _ in range(cfg.batch_size)])
        posterior = vae.encode(images).latent_dist
        recon = vae.decode(posterior.sample()).sample
        rec = F.mse_loss(recon, images) + cfg.l1_weight * F.l1_loss(recon, images)
        loss = rec + cfg.kl_weight * posterior.kl().mean()
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        bar.set_postfix(loss=f"{loss.item():.4f}", refresh=False)
    vae.eval()
    vae.requires_grad_(False)


@torch.no_grad()
def encode_scenes(vae, scenes: list[Scene], batch: int = 64) -> tuple[torch.Tensor, torch.Tensor]:
    """Latent means and stds of the scenes (unscaled)."""
    means, stds = [], []
    for i in tqdm(range(0, len(scenes), batch), desc="encode", mininterval=10):
        dist = vae.encode(to_tensor(scenes[i : i + batch])).latent_dist
        means.append(dist.mean)
        stds.append(dist.std)
    return torch.cat(means), torch.cat(stds)


@torch.no_grad()
def reconstruction_accuracy(vae, scenes: list[Scene]) -> float:
    """Fraction of scenes the reader reads correctly after an encode/decode round trip."""
    from PIL import Image

    from .world import read_scene

    images = to_tensor(scenes)
    recon = vae.decode(vae.encode(images).latent_dist.mode()).sample
    pixels = ((recon.clamp(-1, 1) + 1) * 127.5).round().byte().permute(0, 2, 3, 1).numpy()
    good = 0
    for scene, array in zip(scenes, pixels, strict=True):
        try:
            good += read_scene(Image.fromarray(array)) == scene
        except ValueError:
            pass
    return good / len(scenes)


def ema_decay_at(step: int, decay: float) -> float:
    """EMA decay with warmup: early averages forget the random initialisation quickly, then settle at ``decay``."""
    return min(decay, (1 + step) / (10 + step))


def ema_update(ema: torch.nn.Module, model: torch.nn.Module, decay: float) -> None:
    with torch.no_grad():
        for e, p in zip(ema.parameters(), model.parameters(), strict=True):
            e.lerp_(p, 1 - decay)


def train(recipe: str | None, out: Path, overrides: list[str] | None = None) -> None:
    cfgs = cfglib.build(SECTIONS, recipe, overrides)
    run, mcfg, data, vcfg, dcfg, scfg = (cfgs[k] for k in SECTIONS)
    torch.set_num_threads(run.num_threads)
    torch.manual_seed(run.seed)
    rng = random.Random(run.seed)
    started = time.time()

    with tempfile.TemporaryDirectory() as folder:
        tokenizer = build_tokenizer(Path(folder))
    vae, unet, text_encoder = build_vae(mcfg), build_unet(mcfg), build_text_encoder(mcfg, tokenizer)
    print(f"params: vae {count_params(vae):,} unet {count_params(unet):,} text {count_params(text_encoder):,}")

    train_vae(vae, vcfg, data, rng)
    check = [random_scene(random.Random(run.seed + 1), data.two_object_fraction) for _ in range(200)]
    vae_accuracy = reconstruction_accuracy(vae, check)
    print(f"vae reconstruction read accuracy: {vae_accuracy:.3f} ({time.time() - started:.0f}s)", flush=True)

    scenes = [random_scene(rng, data.two_object_fraction) for _ in range(dcfg.scenes)]
    means, stds = encode_scenes(vae, scenes)
    scaling = 1.0 / float(means.std())
    vae.register_to_config(scaling_factor=scaling)
    print(f"latents {tuple(means.shape)}, scaling_factor {scaling:.4f}", flush=True)

    scheduler = build_scheduler()
    alphas = scheduler.alphas_cumprod
    unet.train()
    text_encoder.train()
    params = list(unet.parameters()) + list(text_encoder.parameters())
    optimizer = torch.optim.AdamW(params, lr=dcfg.lr, weight_decay=0.0)
    ema_unet, ema_text = copy.deepcopy(unet).eval(), copy.deepcopy(text_encoder).eval()

    def save(step: int) -> None:
        settings = {
            "name": "peftedit-demo",
            "num_inference_steps": scfg.steps,
            "guidance_scale": scfg.guidance,
            "scheduler": "DDIMScheduler (epsilon)",
            "trained_steps": step,
            "vae_reconstruction_read_accuracy": vae_accuracy,
            "train_seconds": round(time.time() - started),
            "recipe": {k: cfglib.to_dict(v) for k, v in cfgs.items()},
        }
        save_pipeline(out, ema_unet, vae, ema_text, tokenizer, settings)

    bar = tqdm(range(dcfg.steps), desc="diffusion", mininterval=10)
    for step in bar:
        set_lr(optimizer, lr_at(step, dcfg.steps, dcfg.lr, dcfg.warmup))
        index = torch.randint(0, len(scenes), (dcfg.batch_size,))
        latents = (means[index] + stds[index] * torch.randn_like(means[index])) * scaling
        prompts = [training_prompt(scenes[i], rng, dcfg) for i in index.tolist()]
        ids = tokenizer(prompts, padding="max_length", max_length=tokenizer.model_max_length, return_tensors="pt")
        noise = torch.randn_like(latents)
        t = torch.randint(0, scheduler.config.num_train_timesteps, (dcfg.batch_size,))
        a = alphas[t].view(-1, 1, 1, 1)
        noisy = a.sqrt() * latents + (1 - a).sqrt() * noise
        context = text_encoder(ids.input_ids)[0]
        loss = F.mse_loss(unet(noisy, t, context).sample, noise)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        decay = ema_decay_at(step, dcfg.ema_decay)
        ema_update(ema_unet, unet, decay)
        ema_update(ema_text, text_encoder, decay)
        bar.set_postfix(loss=f"{loss.item():.4f}", refresh=False)
        if (step + 1) % dcfg.save_every == 0 or step + 1 == dcfg.steps:
            save(step + 1)
            print(f"saved step {step + 1} ({time.time() - started:.0f}s)", flush=True)
    print(json.dumps({"train_seconds": round(time.time() - started)}))


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--recipe", default=None, help="TOML recipe (tables: " + ", ".join(SECTIONS) + ").")
    parser.add_argument("--out", type=Path, required=True, help="Output folder for the pipeline.")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="Override a recipe value.")
    args = parser.parse_args(argv)
    train(args.recipe, args.out, args.set)


if __name__ == "__main__":
    main()
