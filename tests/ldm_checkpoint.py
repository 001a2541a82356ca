"""Test support: a diffusers Stable Diffusion 1.x pipeline folder written as one checkpoint in the original
CompVis/LDM key layout (what `--model file.safetensors` loads), so the single-file path is tested on a real file.

The result loads with ``StableDiffusionPipeline.from_single_file(path, config=folder)``. Only names change (and the
VAE attention's linear weights become 1x1 convolutions), so every UNet, VAE and text-encoder tensor round-trips
bit-identically. The block numbering is derived from the folder's ``unet/config.json`` and ``vae/config.json``; a
weight that has no LDM name (an SDXL-style add-embedding, a non-attention UNet mid block, ...) raises ``ValueError``.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

# Inner names (module path after the block prefix, parameter name excluded) that differ; anything else is kept.
Inner = dict[str, str]
UNET_RESNET: Inner = {
    "norm1": "in_layers.0",
    "conv1": "in_layers.2",
    "time_emb_proj": "emb_layers.1",
    "norm2": "out_layers.0",
    "conv2": "out_layers.3",
    "conv_shortcut": "skip_connection",
}
VAE_RESNET: Inner = {"conv_shortcut": "nin_shortcut"}
VAE_ATTENTION: Inner = {"group_norm": "norm", "to_q": "q", "to_k": "k", "to_v": "v", "to_out.0": "proj_out"}
KEEP: Inner = {}
Prefixes = dict[str, tuple[str, Inner]]  # diffusers module prefix -> (LDM module prefix, inner renames)


def _config(folder: Path, component: str) -> dict:
    return json.loads((folder / component / "config.json").read_text())


def _unet_prefixes(cfg: dict) -> Prefixes:
    lpb, levels = cfg["layers_per_block"], len(cfg["block_out_channels"])
    if not isinstance(lpb, int) or cfg.get("mid_block_type", "UNetMidBlock2DCrossAttn") != "UNetMidBlock2DCrossAttn":
        raise ValueError(
            "only SD 1.x-shaped UNets (one int layers_per_block, cross-attention mid block) are supported"
        )
    p: Prefixes = {
        "time_embedding.linear_1": ("time_embed.0", KEEP),
        "time_embedding.linear_2": ("time_embed.2", KEEP),
        "conv_in": ("input_blocks.0.0", KEEP),
        "conv_norm_out": ("out.0", KEEP),
        "conv_out": ("out.2", KEEP),
        "mid_block.resnets.0": ("middle_block.0", UNET_RESNET),
        "mid_block.attentions.0": ("middle_block.1", KEEP),
        "mid_block.resnets.1": ("middle_block.2", UNET_RESNET),
    }
    n = 1  # input_blocks.0 is conv_in; then per level: lpb x (resnet [+ transformer]), and a downsampler if not last
    for level, kind in enumerate(cfg["down_block_types"]):
        for j in range(lpb):
            p[f"down_blocks.{level}.resnets.{j}"] = (f"input_blocks.{n}.0", UNET_RESNET)
            if "CrossAttn" in kind:
                p[f"down_blocks.{level}.attentions.{j}"] = (f"input_blocks.{n}.1", KEEP)
            n += 1
        if level < levels - 1:
            p[f"down_blocks.{level}.downsamplers.0.conv"] = (f"input_blocks.{n}.0.op", KEEP)
            n += 1
    for level, kind in enumerate(cfg["up_block_types"]):  # per level: lpb + 1 x (resnet [+ transformer] [+ upsampler])
        attention = "CrossAttn" in kind
        for j in range(lpb + 1):
            n = level * (lpb + 1) + j
            p[f"up_blocks.{level}.resnets.{j}"] = (f"output_blocks.{n}.0", UNET_RESNET)
            if attention:
                p[f"up_blocks.{level}.attentions.{j}"] = (f"output_blocks.{n}.1", KEEP)
        if level < levels - 1:
            p[f"up_blocks.{level}.upsamplers.0.conv"] = (f"output_blocks.{n}.{2 if attention else 1}.conv", KEEP)
    return p


def _vae_prefixes(cfg: dict) -> Prefixes:
    lpb, levels = cfg["layers_per_block"], len(cfg["block_out_channels"])
    p: Prefixes = {"quant_conv": ("quant_conv", KEEP), "post_quant_conv": ("post_quant_conv", KEEP)}
    for part in ("encoder", "decoder"):
        p[f"{part}.conv_in"] = (f"{part}.conv_in", KEEP)
        p[f"{part}.conv_norm_out"] = (f"{part}.norm_out", KEEP)
        p[f"{part}.conv_out"] = (f"{part}.conv_out", KEEP)
        p[f"{part}.mid_block.resnets.0"] = (f"{part}.mid.block_1", VAE_RESNET)
        p[f"{part}.mid_block.resnets.1"] = (f"{part}.mid.block_2", VAE_RESNET)
        p[f"{part}.mid_block.attentions.0"] = (f"{part}.mid.attn_1", VAE_ATTENTION)
    for i in range(levels):
        up = levels - 1 - i  # LDM numbers decoder levels from the highest resolution, diffusers from the lowest
        for j in range(lpb):
            p[f"encoder.down_blocks.{i}.resnets.{j}"] = (f"encoder.down.{i}.block.{j}", VAE_RESNET)
        for j in range(lpb + 1):
            p[f"decoder.up_blocks.{i}.resnets.{j}"] = (f"decoder.up.{up}.block.{j}", VAE_RESNET)
        p[f"encoder.down_blocks.{i}.downsamplers.0.conv"] = (f"encoder.down.{i}.downsample.conv", KEEP)
        p[f"decoder.up_blocks.{i}.upsamplers.0.conv"] = (f"decoder.up.{up}.upsample.conv", KEEP)
    return p


def _rename(state: dict[str, torch.Tensor], prefixes: Prefixes, root: str) -> dict[str, torch.Tensor]:
    out: dict[str, torch.Tensor] = {}
    for key, tensor in state.items():
        parts = key.split(".")
        for cut in range(len(parts) - 1, 0, -1):  # the longest known module prefix wins
            if (head := ".".join(parts[:cut])) in prefixes:
                new_head, inner = prefixes[head]
                module, param = ".".join(parts[cut:-1]), parts[-1]
                module = inner.get(module, module)
                if inner is VAE_ATTENTION and tensor.ndim == 2:  # linear in diffusers, 1x1 conv in LDM
                    tensor = tensor[:, :, None, None]
                out[".".join(filter(None, (root + new_head, module, param)))] = tensor.contiguous()
                break
        else:
            raise ValueError(f"{root}: no LDM name for diffusers weight {key!r}")
    if len(out) != len(state):
        raise ValueError(f"{root}: two weights were given the same LDM name")
    return out


def write_single_file(folder: str | Path, path: str | Path) -> None:
    """Write the diffusers SD 1.x pipeline in ``folder`` as one LDM-layout .safetensors checkpoint at ``path``."""
    folder = Path(folder)
    unet = load_file(folder / "unet" / "diffusion_pytorch_model.safetensors")
    vae = load_file(folder / "vae" / "diffusion_pytorch_model.safetensors")
    text = load_file(folder / "text_encoder" / "model.safetensors")
    checkpoint = _rename(unet, _unet_prefixes(_config(folder, "unet")), "model.diffusion_model.")
    checkpoint.update(_rename(vae, _vae_prefixes(_config(folder, "vae")), "first_stage_model."))
    # transformers >= 5.6 saves CLIPTextModel without the "text_model." level; the LDM layout always has it.
    clip = "cond_stage_model.transformer.text_model."
    checkpoint.update({clip + key.removeprefix("text_model."): tensor for key, tensor in text.items()})
    if len(checkpoint) != len(unet) + len(vae) + len(text):
        raise ValueError("weights of different components were given the same LDM name")
    save_file(checkpoint, str(path), metadata={"format": "pt"})
