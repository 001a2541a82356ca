"""Stable Diffusion pipelines with random weights, built from the architecture configs in ``benchmarks/configs/``.

No download, ever: the UNet, VAE and text encoder(s) come from their JSON configs, the tokenizer is peftedit's small
word-level CLIP tokenizer written to a folder. Memory and speed depend on the architecture, not on the weights, so
these stand in for the real checkpoints in benchmarks. Run ``python -m benchmarks.build_model sd15 OUT_DIR`` to save
one as a diffusers folder.

A config with a ``text_encoder_2`` section is an SDXL one: its second text encoder is a
``CLIPTextModelWithProjection`` (its pooled, projected output conditions the UNet), both encoders read the same small
tokenizer, and the parts make a ``StableDiffusionXLPipeline``.
"""

from __future__ import annotations

import argparse
import json
import tempfile
from pathlib import Path

import torch

from peftedit.models import DTYPES, PARTS, pipe_parts
from peftedit.tiny import assemble, assemble_xl, write_tokenizer

CONFIG_DIR = Path(__file__).resolve().parent / "configs"


def model_names() -> list[str]:
    """The architectures there is a config for (``sd15``, ``sd21``, ``sdxl``, ``tiny``, ``tiny-xl``)."""
    return sorted(p.stem for p in CONFIG_DIR.glob("*.json"))


def load_config(name: str) -> dict:
    """The architecture config ``name`` (sections ``unet``, ``vae``, ``text_encoder``, ``scheduler``; SDXL's also
    ``text_encoder_2``)."""
    path = CONFIG_DIR / f"{name}.json"
    if not path.is_file():
        raise ValueError(f"unknown model {name!r}: choose one of {', '.join(model_names())}")
    return json.loads(path.read_text(encoding="utf-8"))


def resolution(name: str) -> int:
    """Image side in pixels of the architecture ``name`` (latent side x the VAE's downsampling)."""
    config = load_config(name)
    return config["unet"]["sample_size"] * 2 ** (len(config["vae"]["block_out_channels"]) - 1)


def build_pipeline(
    name: str,
    dtype: torch.dtype = torch.float32,
    device: str | torch.device = "cpu",
    seed: int = 0,
):
    """A randomly initialised StableDiffusionPipeline (StableDiffusionXLPipeline for a config with a
    ``text_encoder_2``) of architecture ``name`` in ``dtype`` on ``device``.

    The modules are created directly on ``device`` (fast on a GPU; ``"meta"`` builds only the shapes, to count
    parameters without the memory) from ``seed``. The text encoders' vocabulary is ``max(len(tokenizer), config
    vocab_size)`` so their embedding tables have the real model's shape.
    """
    import diffusers
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextModel, CLIPTextModelWithProjection, CLIPTokenizer

    config = load_config(name)
    with tempfile.TemporaryDirectory() as tmp:
        tokenizer = CLIPTokenizer.from_pretrained(str(write_tokenizer(tmp)))
    scheduler_config = dict(config["scheduler"])
    scheduler = getattr(diffusers, scheduler_config.pop("_class_name")).from_config(scheduler_config)
    torch.manual_seed(seed)
    default = torch.get_default_dtype()
    torch.set_default_dtype(dtype)  # drawn in ``dtype``: SDXL in bf16 needs 7 GB, not 14 in fp32 and then a copy
    try:
        with torch.device(device):
            unet = UNet2DConditionModel(**config["unet"])
            vae = AutoencoderKL(**config["vae"])
            text_encoder = CLIPTextModel(_text_config(config["text_encoder"], tokenizer))
            if "text_encoder_2" in config:
                text_encoder_2 = CLIPTextModelWithProjection(_text_config(config["text_encoder_2"], tokenizer))
    finally:
        torch.set_default_dtype(default)
    if "text_encoder_2" in config:
        pipe = assemble_xl(unet, vae, text_encoder, text_encoder_2, tokenizer, tokenizer, scheduler)
    else:
        pipe = assemble(unet, vae, text_encoder, tokenizer, scheduler)
    return pipe if dtype == torch.float32 else pipe.to(dtype=dtype)


def _text_config(section: dict, tokenizer):
    """A CLIPTextConfig from a config's text encoder section, with the tokenizer's special tokens and a vocabulary
    that holds both the tokenizer's and the real model's."""
    from transformers import CLIPTextConfig

    text = dict(section)
    text["vocab_size"] = max(len(tokenizer), text["vocab_size"])
    return CLIPTextConfig(
        **text,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )


def save_model(
    name: str, folder: str | Path, dtype: torch.dtype = torch.float32, seed: int = 0, device: str = "cpu"
) -> Path:
    """Build architecture ``name`` and save it as a diffusers folder (safetensors); returns the folder.

    ``device="cuda"`` draws the random weights on the GPU (SDXL's 3.5 B take minutes on a CPU) and stores them in
    float16 (half the bytes to write and read back; the fp32 baselines load them as float32, with the same memory and
    speed); the GPU memory it used is freed before anything is measured."""
    folder = Path(folder)
    on_gpu = str(device).startswith("cuda")
    pipe = build_pipeline(name, dtype=torch.float16 if on_gpu else dtype, device=device, seed=seed)
    pipe.save_pretrained(folder, safe_serialization=True)
    if on_gpu:
        del pipe
        torch.cuda.empty_cache()
    return folder


def parameter_counts(pipe) -> dict[str, int]:
    """Number of parameters of the UNet, VAE and text encoder(s), by part name."""
    return {key: sum(p.numel() for p in part.parameters()) for key, part in pipe_parts(pipe, PARTS).items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("model", choices=model_names())
    parser.add_argument("out", help="folder to write (diffusers layout)")
    parser.add_argument("--dtype", choices=sorted(DTYPES), default="fp32")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    folder = save_model(args.model, args.out, DTYPES[args.dtype], args.seed)
    print(f"wrote {folder}")


if __name__ == "__main__":
    main()
