"""Test support: a diffusers Stable Diffusion pipeline folder written as one checkpoint in the original key layout
(what `--model file.safetensors` loads), so the single-file path is tested on a real file.

SD 1.x (CompVis/LDM): UNet under ``model.diffusion_model.``, VAE under ``first_stage_model.``, the CLIP text encoder
under ``cond_stage_model.transformer.``. SDXL (Stability's generative-models): the same UNet and VAE names plus the
UNet's added embedding (``label_emb.0.0`` / ``label_emb.0.2``), the first text encoder in HF CLIP names under
``conditioner.embedders.0.transformer.`` and the second in OpenCLIP names under ``conditioner.embedders.1.model.``
(q, k and v fused into ``in_proj``; ``text_projection`` stored as OpenCLIP multiplies by it, ``x @ P``: the transpose
of the HF linear weight). The folder's ``model_index.json`` says which.

The result loads with ``StableDiffusionPipeline.from_single_file(path, config=folder)`` (``StableDiffusionXLPipeline``
for SDXL). Only names change (and the VAE attention's linear weights become 1x1 convolutions, OpenCLIP's q, k, v one
tensor, its projection transposed), so every UNet, VAE and text-encoder tensor round-trips bit-identically. The block
numbering is derived from the folder's ``unet/config.json`` and ``vae/config.json``; a weight that has no original name
(a non-attention UNet mid block, an add-embedding other than SDXL's, ...) raises ``ValueError``.

What diffusers 0.42's single-file loader needs of a tiny SDXL: its two text encoders of different widths (it tells
them apart by the width of the first one's position embedding; with equal widths the second gets the first's weights
and no projection). Without ``config=`` it guesses the model from tensor names and takes the tiny file for SD 1.x: it
recognises SDXL by OpenCLIP layer 9 (``resblocks.9``), which a 2-layer encoder lacks.
"""

from __future__ import annotations

import json
import re
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
# OpenCLIP's names for the HF CLIP text model's (SDXL's second text encoder), outside and inside a transformer layer.
OPEN_CLIP_TOP = {
    "embeddings.token_embedding.weight": "token_embedding.weight",
    "embeddings.position_embedding.weight": "positional_embedding",
    "final_layer_norm.weight": "ln_final.weight",
    "final_layer_norm.bias": "ln_final.bias",
    "text_projection.weight": "text_projection",
}
OPEN_CLIP_LAYER: Inner = {
    "layer_norm1": "ln_1",
    "layer_norm2": "ln_2",
    "mlp.fc1": "mlp.c_fc",
    "mlp.fc2": "mlp.c_proj",
    "self_attn.out_proj": "attn.out_proj",
}
FUSED = ("q_proj", "k_proj", "v_proj")  # OpenCLIP's in_proj holds them stacked in this order (nn.MultiheadAttention)
KEEP: Inner = {}
Prefixes = dict[str, tuple[str, Inner]]  # diffusers module prefix -> (LDM module prefix, inner renames)


def _config(folder: Path, component: str) -> dict:
    return json.loads((folder / component / "config.json").read_text())


def _unet_prefixes(cfg: dict) -> Prefixes:
    lpb, levels = cfg["layers_per_block"], len(cfg["block_out_channels"])
    if not isinstance(lpb, int) or cfg.get("mid_block_type", "UNetMidBlock2DCrossAttn") != "UNetMidBlock2DCrossAttn":
        raise ValueError("only SD-shaped UNets (one int layers_per_block, cross-attention mid block) are supported")
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
    if cfg.get("addition_embed_type") == "text_time":  # SDXL: pooled text and sizes join the time embedding
        p["add_embedding.linear_1"] = ("label_emb.0.0", KEEP)
        p["add_embedding.linear_2"] = ("label_emb.0.2", KEEP)
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


def _open_clip(state: dict[str, torch.Tensor], root: str) -> dict[str, torch.Tensor]:
    """An HF ``CLIPTextModelWithProjection`` state dict in OpenCLIP's names under ``root``."""
    out: dict[str, torch.Tensor] = {}
    stacked: dict[str, dict[str, torch.Tensor]] = {}  # in_proj name -> {"q_proj": ..., "k_proj": ..., "v_proj": ...}
    for key, tensor in state.items():
        name = key.removeprefix("text_model.")  # present or not depending on the transformers version
        layer = re.fullmatch(r"encoder\.layers\.(\d+)\.(.+)\.(weight|bias)", name)
        if name == "text_projection.weight":
            out[root + "text_projection"] = tensor.T.contiguous()
        elif name in OPEN_CLIP_TOP:
            out[root + OPEN_CLIP_TOP[name]] = tensor
        elif layer and layer[2].startswith("self_attn.") and layer[2].removeprefix("self_attn.") in FUSED:
            fused = f"{root}transformer.resblocks.{layer[1]}.attn.in_proj_{layer[3]}"
            stacked.setdefault(fused, {})[layer[2].removeprefix("self_attn.")] = tensor
        elif layer and layer[2] in OPEN_CLIP_LAYER:
            out[f"{root}transformer.resblocks.{layer[1]}.{OPEN_CLIP_LAYER[layer[2]]}.{layer[3]}"] = tensor
        else:
            raise ValueError(f"{root}: no OpenCLIP name for text-encoder weight {key!r}")
    for fused, parts in stacked.items():
        if sorted(parts) != sorted(FUSED):
            raise ValueError(f"{fused}: q, k and v projections not all present ({sorted(parts)})")
        out[fused] = torch.cat([parts[p] for p in FUSED]).contiguous()
    return out


def _merge(parts: list[dict[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
    out = {key: tensor for part in parts for key, tensor in part.items()}
    if len(out) != sum(map(len, parts)):
        raise ValueError("weights of different components were given the same original name")
    return out


def write_single_file(folder: str | Path, path: str | Path) -> None:
    """Write the diffusers SD 1.x or SDXL pipeline in ``folder`` as one original-layout .safetensors checkpoint at
    ``path`` (SDXL when its ``model_index.json`` names an XL pipeline)."""
    folder = Path(folder)
    xl = "XL" in json.loads((folder / "model_index.json").read_text()).get("_class_name", "")
    unet = load_file(folder / "unet" / "diffusion_pytorch_model.safetensors")
    vae = load_file(folder / "vae" / "diffusion_pytorch_model.safetensors")
    text = load_file(folder / "text_encoder" / "model.safetensors")
    parts = [
        _rename(unet, _unet_prefixes(_config(folder, "unet")), "model.diffusion_model."),
        _rename(vae, _vae_prefixes(_config(folder, "vae")), "first_stage_model."),
    ]
    # transformers >= 5.6 saves CLIPTextModel without the "text_model." level; the original layouts always have it.
    clip = ("conditioner.embedders.0" if xl else "cond_stage_model") + ".transformer.text_model."
    parts.append({clip + key.removeprefix("text_model."): tensor for key, tensor in text.items()})
    if xl:
        text_2 = load_file(folder / "text_encoder_2" / "model.safetensors")
        parts.append(_open_clip(text_2, "conditioner.embedders.1.model."))
    save_file(_merge(parts), str(path), metadata={"format": "pt"})
