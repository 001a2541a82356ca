"""Building the demo model's components (sizes from the recipe) and saving it as a diffusers pipeline."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import torch

from ..config import option
from ..tiny import BASE_WORDS, write_tokenizer
from .world import IMAGE_SIZE, WORDS


@dataclass
class ModelConfig:
    """Component sizes of the demo model."""

    vae_channels: list = option([16, 32, 64], "VAE block widths; n blocks downsample by 2**(n-1) (4: 16x16 latents).")
    latent_channels: int = option(4, "Latent channels, as in Stable Diffusion.")
    unet_channels: list = option([32, 64, 128], "UNet block widths (first block without attention).")
    unet_layers_per_block: int = option(1, "ResNet layers per UNet block.")
    attention_head_dim: int = option(8, "Channels per attention head in the UNet.")
    text_width: int = option(64, "CLIP text encoder width = UNet cross-attention dim.")
    text_layers: int = option(3, "CLIP text encoder layers (causal: later tokens see the attributes before them).")
    text_heads: int = option(4, "CLIP text encoder attention heads.")
    norm_groups: int = option(8, "GroupNorm groups in the UNet and VAE.")


def build_tokenizer(folder: Path):
    """A CLIP tokenizer whose vocabulary holds the world's words whole."""
    from transformers import CLIPTokenizer

    write_tokenizer(folder, list(WORDS) + list(BASE_WORDS))
    return CLIPTokenizer.from_pretrained(str(folder))


def build_vae(cfg: ModelConfig):
    from diffusers import AutoencoderKL

    n = len(cfg.vae_channels)
    return AutoencoderKL(
        block_out_channels=tuple(cfg.vae_channels),
        in_channels=3,
        out_channels=3,
        down_block_types=("DownEncoderBlock2D",) * n,
        up_block_types=("UpDecoderBlock2D",) * n,
        latent_channels=cfg.latent_channels,
        layers_per_block=1,
        norm_num_groups=cfg.norm_groups,
        sample_size=IMAGE_SIZE,
    )


def build_unet(cfg: ModelConfig):
    from diffusers import UNet2DConditionModel

    n = len(cfg.unet_channels)
    return UNet2DConditionModel(
        block_out_channels=tuple(cfg.unet_channels),
        layers_per_block=cfg.unet_layers_per_block,
        sample_size=IMAGE_SIZE // 2 ** (len(cfg.vae_channels) - 1),
        in_channels=cfg.latent_channels,
        out_channels=cfg.latent_channels,
        down_block_types=("DownBlock2D",) + ("CrossAttnDownBlock2D",) * (n - 1),
        up_block_types=("CrossAttnUpBlock2D",) * (n - 1) + ("UpBlock2D",),
        cross_attention_dim=cfg.text_width,
        attention_head_dim=cfg.attention_head_dim,
        norm_num_groups=cfg.norm_groups,
    )


def build_text_encoder(cfg: ModelConfig, tokenizer):
    from transformers import CLIPTextConfig, CLIPTextModel

    return CLIPTextModel(
        CLIPTextConfig(
            bos_token_id=tokenizer.bos_token_id,
            eos_token_id=tokenizer.eos_token_id,
            pad_token_id=tokenizer.pad_token_id,
            hidden_size=cfg.text_width,
            intermediate_size=2 * cfg.text_width,
            num_attention_heads=cfg.text_heads,
            num_hidden_layers=cfg.text_layers,
            vocab_size=len(tokenizer),
            max_position_embeddings=tokenizer.model_max_length,
            projection_dim=cfg.text_width,
        )
    )


def build_scheduler():
    """Stable Diffusion's DDIM scheduler settings (scaled-linear betas, epsilon prediction)."""
    from ..tiny import sd_scheduler

    return sd_scheduler("epsilon")


def save_pipeline(out: Path, unet, vae, text_encoder, tokenizer, settings: dict) -> None:
    """Save a StableDiffusionPipeline (safetensors) plus the demo's sampler settings and recipe."""
    from ..tiny import assemble

    pipe = assemble(unet, vae, text_encoder, tokenizer, build_scheduler())
    out.mkdir(parents=True, exist_ok=True)
    pipe.save_pretrained(str(out), safe_serialization=True)
    from . import DEMO_SETTINGS_FILE

    (out / DEMO_SETTINGS_FILE).write_text(json.dumps(settings, indent=2) + "\n")


def count_params(module: torch.nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())
