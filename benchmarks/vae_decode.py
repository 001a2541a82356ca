"""Live tensor bytes of one VAE decode, and of one encode of a photo, at an architecture's resolution, per dtype:
what the CPU estimate of ``benchmarks.memory`` misses for SDXL.

On a GPU the shipped recipes run SDXL in fp16, and ``peftedit.load_model`` then keeps SDXL's VAE in fp32 (its config
asks for it: it overflows fp16). The CPU estimate runs the recipes as bf16, where the VAE stays bf16, so its decode
counts half the bytes. This measures both on the same latent (and the same photo, for the encode), with VAE
slicing on as in the recipes:

    python -m benchmarks.vae_decode --model sdxl --out benchmarks/results/vae-decode-sdxl-cpu-<date>.json
"""

from __future__ import annotations

import argparse
import sys
from datetime import date

import torch

from peftedit.models import DTYPES

from .build_model import load_config, resolution
from .output import write_json
from .tensor_memory import TensorMemory

GIB = 2**30


def decode_peaks(model: str, dtypes: list[str]) -> list[dict]:
    """One row per dtype: the decode's and the encode's peak live bytes (weights included) and the VAE's weights,
    in GiB."""
    from diffusers import AutoencoderKL

    torch.manual_seed(0)
    vae = AutoencoderKL(**load_config(model)["vae"]).eval()  # the VAE alone: SDXL's whole model is 14 GB in fp32
    vae.enable_slicing()
    side = resolution(model) // 2 ** (len(vae.config.block_out_channels) - 1)
    latent = torch.randn(1, vae.config.latent_channels, side, side, generator=torch.Generator().manual_seed(0))
    rows = []
    for name in dtypes:
        vae.to(DTYPES[name])
        with torch.no_grad(), TensorMemory("cpu") as tracked:
            vae.decode(latent.to(DTYPES[name]))
        photo = torch.rand(1, 3, resolution(model), resolution(model), generator=torch.Generator().manual_seed(0))
        photo = (photo * 2 - 1).to(DTYPES[name])  # made after the decode, so that count does not hold it
        with torch.no_grad(), TensorMemory("cpu") as encoding:
            vae.encode(photo)
        del photo
        weights = sum(p.numel() * p.element_size() for p in vae.parameters())
        rows.append(
            {"model": model, "resolution": resolution(model), "dtype": name, "decode_peak_gib": tracked.peak / GIB}
            | {"encode_peak_gib": encoding.peak / GIB}
            | {"weights_gib": weights / GIB, "command": "python -m benchmarks.vae_decode " + " ".join(sys.argv[1:])}
        )
    return rows


def main(argv: list[str] | None = None) -> list[dict]:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="sdxl")
    parser.add_argument("--dtypes", nargs="+", choices=sorted(DTYPES), default=["fp32", "bf16"])
    parser.add_argument("--out", help=f"results file (default benchmarks/results/vae-decode-MODEL-cpu-{date.today()})")
    args = parser.parse_args(argv)
    rows = decode_peaks(args.model, args.dtypes)
    for row in rows:
        print(
            f"{row['model']} {row['dtype']}: decode peak {row['decode_peak_gib']:.2f} GiB, "
            f"encode peak {row['encode_peak_gib']:.2f} GiB"
        )
    write_json(args.out or f"benchmarks/results/vae-decode-{args.model}-cpu-{date.today()}.json", rows)
    return rows


if __name__ == "__main__":
    main()
