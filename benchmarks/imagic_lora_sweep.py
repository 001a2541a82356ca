"""Imagic's stage 2 as a reconstructor: eta = 0 PSNR before and after the LoRA stage, per LoRA setting.

Reconstruction alone rewards a LoRA that overfits the input (the demo's 1000-step, lr 1e-3 attention LoRA scored
best here and edited 0 of 4 cases), so defaults are chosen with benchmarks/edit_quality.py; this sweep shows how
closely each setting reproduces the photo.

For each LoRA setting (learning rate, rank, targets), fit Imagic on each input image and render eta = 0 with and
without the LoRA; report PSNR against the input and the seconds per fit. Run:

    python -m benchmarks.imagic_lora_sweep --images peftedit/demo/examples/red-circle-left.png \
        peftedit/demo/examples/yellow-triangle-blue-square.png \
        --texts "a large blue circle on the left" \
        "a large yellow triangle on the left and a small red square on the right"

Writes ``benchmarks/results/imagic-lora-sweep.json``.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch

from peftedit import Artifact, ImagicConfig, RuntimeConfig, imagic, load_model
from peftedit.artifacts import now_utc, package_versions
from peftedit.images import load_image, psnr

from .output import write_json

SETTINGS = [
    {"lora_lr": 1e-4, "lora_rank": 8, "lora_targets": ["attention"]},
    {"lora_lr": 5e-4, "lora_rank": 8, "lora_targets": ["attention"]},
    {"lora_lr": 1e-3, "lora_rank": 8, "lora_targets": ["attention"]},
    {"lora_lr": 5e-4, "lora_rank": 16, "lora_targets": ["attention", "feedforward"]},
    {"lora_lr": 5e-4, "lora_rank": 8, "lora_targets": ["attention", "feedforward", "conv"]},
]


def without_lora(artifact: Artifact) -> Artifact:
    """The same artifact with LoRA B zeroed: the model as it was before stage 2."""
    lora = {k: torch.zeros_like(v) if "lora_B" in k else v for k, v in artifact.lora.items()}
    return Artifact(artifact.method, artifact.tensors, artifact.meta, lora=lora, lora_config=artifact.lora_config)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--images", nargs="+", required=True)
    parser.add_argument("--texts", nargs="+", required=True, help="one target text per image")
    parser.add_argument("--model", default=None)
    parser.add_argument("--embedding-steps", type=int, default=500)
    parser.add_argument("--finetune-steps", type=int, default=1000)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1])
    parser.add_argument("--settings", type=int, nargs="+", help="indices into SETTINGS (default: all)")
    parser.add_argument("--out", default="benchmarks/results/imagic-lora-sweep.json")
    args = parser.parse_args()
    if len(args.images) != len(args.texts):
        parser.error(f"{len(args.images)} --images but {len(args.texts)} --texts: give one target text per image")
    runtime = RuntimeConfig()
    model = load_model(args.model, runtime)
    rows = []
    for setting in [SETTINGS[i] for i in args.settings] if args.settings else SETTINGS:
        for image_path, text in zip(args.images, args.texts, strict=True):
            config = ImagicConfig(
                embedding_steps=args.embedding_steps, finetune_steps=args.finetune_steps, preview_etas=[0.7], **setting
            )
            start = time.perf_counter()
            artifact = imagic.fit(model, image_path, text, config, runtime, show_progress=False)
            seconds = time.perf_counter() - start
            picture, _ = load_image(image_path, model.resolution)
            before = [psnr(imagic.render(model, without_lora(artifact), eta=0.0, seed=s), picture) for s in args.seeds]
            after = [psnr(imagic.render(model, artifact, eta=0.0, seed=s), picture) for s in args.seeds]
            row = {
                **setting,
                "image": Path(image_path).name,
                "text": text,
                "psnr_eta0_before_db": sum(before) / len(before),
                "psnr_eta0_after_db": sum(after) / len(after),
                "fit_seconds": seconds,
            }
            rows.append(row)
            print(json.dumps(row), flush=True)
    result = {
        "model": model.name,
        "device": str(model.device),
        "created": now_utc(),
        "versions": package_versions(),
        "embedding_steps": args.embedding_steps,
        "finetune_steps": args.finetune_steps,
        "rows": rows,
    }
    write_json(args.out, result)


if __name__ == "__main__":
    main()
