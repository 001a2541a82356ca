"""Small Stable Diffusion components built in code: no download, for tests, the demo model and benchmarks.

The sizes follow diffusers' own test fixtures (``get_dummy_components``): a two-block UNet with
``cross_attention_dim=32``, a two-layer CLIP text encoder and a word-level BPE tokenizer written to a folder.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

# Words every tiny tokenizer knows as single tokens; other words fall back to characters.
BASE_WORDS = (
    "a an the of photo picture and on in with dog cat bird sitting standing jumping red green blue yellow purple "
    "circle square triangle small large left right center bench snowy tree car apple"
).split()


def _byte_alphabet() -> list[str]:
    """The 256 printable stand-ins CLIP's byte-level BPE uses for raw bytes."""
    keep = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), 256))
    out, extra = [], 0
    for b in range(256):
        if b in keep:
            out.append(chr(b))
        else:
            out.append(chr(256 + extra))
            extra += 1
    return out


def _apply_merges(pieces: list[str], merges: list[str]) -> list[str]:
    """Byte-pair encoding of one word's pieces: repeatedly join the adjacent pair with the best (lowest) rank."""
    ranks = {tuple(m.split(" ")): i for i, m in enumerate(merges)}
    while len(pieces) > 1:
        adjacent = zip(pieces[:-1], pieces[1:], strict=True)
        pairs = [(ranks.get(pair, len(ranks)), i) for i, pair in enumerate(adjacent)]
        rank, i = min(pairs)
        if rank == len(ranks):
            break
        pieces = pieces[:i] + [pieces[i] + pieces[i + 1]] + pieces[i + 2 :]
    return pieces


def write_tokenizer(folder: str | Path, words: list[str] | tuple[str, ...] = BASE_WORDS) -> Path:
    """Write a CLIP tokenizer (vocab.json, merges.txt, configs) whose vocabulary holds ``words`` whole.

    Returns the folder. Any text still tokenizes: unknown words split into characters.
    """
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    alphabet = _byte_alphabet()
    vocab: dict[str, int] = {}
    for ch in alphabet:
        vocab.setdefault(ch, len(vocab))
    for ch in alphabet:
        vocab.setdefault(ch + "</w>", len(vocab))
    merges: list[str] = []
    known: set[str] = set()
    for word in dict.fromkeys(w.lower() for w in words):
        # Tokenize with the merges so far (earlier words' merges outrank ours and may split this word, e.g.
        # "an" inside "triangle"), then append merges joining those pieces left to right. Appended merges rank
        # last, so every earlier word still reaches its whole token first: all words end up single tokens.
        pieces = _apply_merges(list(word[:-1]) + [word[-1] + "</w>"], merges)
        left = pieces[0]
        for right in pieces[1:]:
            merged, merge = left + right, f"{left} {right}"
            if merge not in known:
                known.add(merge)
                merges.append(merge)
            vocab.setdefault(merged, len(vocab))
            left = merged
    vocab["<|startoftext|>"] = len(vocab)
    vocab["<|endoftext|>"] = len(vocab)
    (folder / "vocab.json").write_text(json.dumps(vocab))
    (folder / "merges.txt").write_text("#version: 0.2\n" + "\n".join(merges) + "\n")
    special = {
        "bos_token": "<|startoftext|>",
        "eos_token": "<|endoftext|>",
        "unk_token": "<|endoftext|>",
        "pad_token": "<|endoftext|>",
        "model_max_length": 77,
        "tokenizer_class": "CLIPTokenizer",
    }
    (folder / "tokenizer_config.json").write_text(json.dumps(special))
    return folder


def build_pipeline(
    tokenizer_folder: str | Path,
    prediction_type: str = "epsilon",
    block_out_channels: tuple[int, ...] = (32, 64),
    cross_attention_dim: int = 32,
    sample_size: int = 8,
    seed: int = 0,
):
    """Build a randomly initialised StableDiffusionPipeline small enough for CPU tests.

    Returns the pipeline (fp32, CPU). ``sample_size`` is the latent side; images are 2x larger (a 2-block VAE).
    """
    from transformers import CLIPTextModel

    tokenizer, unet, vae = _unet_and_vae(tokenizer_folder, block_out_channels, cross_attention_dim, sample_size, seed)
    text_encoder = CLIPTextModel(_text_config(tokenizer, cross_attention_dim))
    return assemble(unet, vae, text_encoder, tokenizer, sd_scheduler(prediction_type))


def build_xl_pipeline(
    tokenizer_folder: str | Path,
    prediction_type: str = "epsilon",
    block_out_channels: tuple[int, ...] = (32, 64),
    text_dims: tuple[int, int] = (16, 32),
    sample_size: int = 8,
    seed: int = 0,
):
    """Build a randomly initialised StableDiffusionXLPipeline small enough for CPU tests.

    SDXL's layout at toy sizes: two text encoders whose penultimate hidden states are concatenated
    (``cross_attention_dim = sum(text_dims)``), the second one's projected (pooled) output and the six size/crop
    numbers fed to the UNet's added time embedding (``addition_embed_type="text_time"``).
    """
    from transformers import CLIPTextModel, CLIPTextModelWithProjection

    time_dim = 8
    tokenizer, unet, vae = _unet_and_vae(
        tokenizer_folder,
        block_out_channels,
        sum(text_dims),
        sample_size,
        seed,
        use_linear_projection=True,
        addition_embed_type="text_time",
        addition_time_embed_dim=time_dim,
        projection_class_embeddings_input_dim=6 * time_dim + text_dims[1],
    )
    text_encoder = CLIPTextModel(_text_config(tokenizer, text_dims[0]))
    text_encoder_2 = CLIPTextModelWithProjection(_text_config(tokenizer, text_dims[1]))
    scheduler = sd_scheduler(prediction_type)
    return assemble_xl(unet, vae, text_encoder, text_encoder_2, tokenizer, tokenizer, scheduler)


def _unet_and_vae(tokenizer_folder, block_out_channels, cross_attention_dim, sample_size, seed, **unet_options):
    """The tokenizer, then a tiny UNet and a 2-block VAE drawn from ``seed`` (in that order, so a seed always gives
    the same weights)."""
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTokenizer

    tokenizer = CLIPTokenizer.from_pretrained(str(tokenizer_folder))
    torch.manual_seed(seed)
    n = len(block_out_channels)
    unet = UNet2DConditionModel(
        block_out_channels=block_out_channels,
        layers_per_block=1,
        sample_size=sample_size,
        in_channels=4,
        out_channels=4,
        down_block_types=("DownBlock2D",) + ("CrossAttnDownBlock2D",) * (n - 1),
        up_block_types=("CrossAttnUpBlock2D",) * (n - 1) + ("UpBlock2D",),
        cross_attention_dim=cross_attention_dim,
        attention_head_dim=(2,) * n,
        norm_num_groups=8,
        **unet_options,
    )
    vae = AutoencoderKL(
        block_out_channels=(16, 32),
        in_channels=3,
        out_channels=3,
        down_block_types=("DownEncoderBlock2D",) * 2,
        up_block_types=("UpDecoderBlock2D",) * 2,
        latent_channels=4,
        norm_num_groups=8,
        sample_size=sample_size * 2,
    )
    return tokenizer, unet, vae


def _text_config(tokenizer, dim: int):
    """A two-layer CLIP text encoder's config of width ``dim`` for ``tokenizer``."""
    from transformers import CLIPTextConfig

    return CLIPTextConfig(
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        hidden_size=dim,
        intermediate_size=2 * dim,
        num_attention_heads=4,
        num_hidden_layers=2,
        vocab_size=len(tokenizer),
        max_position_embeddings=77,
        projection_dim=dim,
    )


def sd_scheduler(prediction_type: str = "epsilon"):
    """A DDIM scheduler with Stable Diffusion's noise schedule (scaled-linear betas 0.00085..0.012)."""
    from diffusers import DDIMScheduler

    return DDIMScheduler(
        beta_start=0.00085,
        beta_end=0.012,
        beta_schedule="scaled_linear",
        clip_sample=False,
        set_alpha_to_one=False,
        steps_offset=1,
        prediction_type=prediction_type,
    )


def assemble(unet, vae, text_encoder, tokenizer, scheduler):
    """A StableDiffusionPipeline from its parts, without a safety checker."""
    from diffusers import StableDiffusionPipeline

    return StableDiffusionPipeline(
        unet=unet,
        vae=vae,
        text_encoder=text_encoder,
        tokenizer=tokenizer,
        scheduler=scheduler,
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )


def assemble_xl(unet, vae, text_encoder, text_encoder_2, tokenizer, tokenizer_2, scheduler):
    """A StableDiffusionXLPipeline from its parts, without a watermarker."""
    from diffusers import StableDiffusionXLPipeline

    return StableDiffusionXLPipeline(
        unet=unet,
        vae=vae,
        text_encoder=text_encoder,
        text_encoder_2=text_encoder_2,
        tokenizer=tokenizer,
        tokenizer_2=tokenizer_2,
        scheduler=scheduler,
        add_watermarker=False,
    )
