"""What gradient checkpointing buys and costs per UNet block level: one Imagic embedding step and one LoRA step each.

    python -m benchmarks.checkpointing --model sd15 --device cpu --set runtime.dtype=bf16   # live-tensor estimate
    python -m benchmarks.checkpointing --model sd15 --device cuda

``runtime.gradient_checkpointing`` switches diffusers' checkpointing on for every UNet block. Most of the activations
(and of the recomputed work) sit in the outer, highest-resolution blocks, so checkpointing only some blocks could keep
most of the saving for part of the cost. This runs the library's two Imagic training stages under each setting (the
model's Imagic recipe otherwise, ``memory.recipes``) and reports the peak above the weights (CUDA peak allocated on a
GPU, live tensors elsewhere), TFLOP per step (:mod:`benchmarks.flops`; off CUDA only) and seconds per step. Settings
select blocks through diffusers' own switch: ``enable_gradient_checkpointing`` sets each block's
``gradient_checkpointing`` flag, which is then cleared on the blocks left out.
"""

from __future__ import annotations

import argparse
import dataclasses
import logging
import tempfile
from pathlib import Path

import torch

from peftedit import ImagicConfig, RuntimeConfig, imagic, load_model
from peftedit.artifacts import now_utc, package_versions
from peftedit.config import build, resolve_recipe
from peftedit.diffusion import fresh_scheduler
from peftedit.methods.common import encode_photo, text_embedding, unet_placed

from . import memory, options
from .build_model import save_model
from .measure import GIB, encoders_away, idle_offload, measure, release
from .output import publish

log = logging.getLogger("benchmarks")


def levels(unet) -> list[list[torch.nn.Module]]:
    """The UNet's blocks by resolution level, outermost (highest resolution) first; the middle block last."""
    ups = list(reversed(unet.up_blocks))
    return [[down, up] for down, up in zip(unet.down_blocks, ups, strict=True)] + [[unet.mid_block]]


SETTINGS = {
    "none": 0,
    "outermost level": 1,
    "two outer levels": 2,
    "all blocks": None,  # what runtime.gradient_checkpointing = true does
}


def checkpoint(unet, outer_levels: int | None) -> None:
    """Checkpoint the blocks of the ``outer_levels`` outermost levels (None: all, 0: none)."""
    unet.disable_gradient_checkpointing()
    if outer_levels == 0:
        return
    unet.enable_gradient_checkpointing()
    if outer_levels is None:
        return
    for block in [b for level in levels(unet)[outer_levels:] for b in level]:
        block.gradient_checkpointing = False


def run(args) -> list[dict]:
    overrides = [f"runtime.device={args.device}", *args.set]
    recipe = str(resolve_recipe(memory.recipes(args.model)[0]))
    configs = build({"runtime": RuntimeConfig, "imagic": ImagicConfig}, recipe, overrides)
    runtime = configs["runtime"]
    config = dataclasses.replace(configs["imagic"], embedding_steps=args.steps, finetune_steps=args.steps)
    with tempfile.TemporaryDirectory(prefix="peftedit-ckpt-") as tmp:
        model = load_model(str(save_model(args.model, Path(tmp) / args.model, device=args.device)), runtime)
    device = model.device
    latent = encode_photo(model, memory.input_photo(model.resolution))
    e_tgt = text_embedding(model, "a photo of a dog jumping on a bench")
    unet = unet_placed(model)  # as in imagic.fit (runtime.offload_idle loads the model onto the CPU)
    rows = []
    with encoders_away(model, runtime.offload_encoders) as offloaded:  # as in imagic.fit
        for setting, outer in SETTINGS.items():
            checkpoint(unet, outer)
            for stage in ("embedding", "lora"):
                log.info("measuring %s / %s", setting, stage)
                row = _stage(model, stage, latent, e_tgt, config, runtime, args.warmup, offloaded)
                rows.append({"setting": setting, "stage": stage, **row})
    unet.disable_gradient_checkpointing()
    common = {
        "device": options.device_name(device),
        "model": args.model,
        "resolution": model.resolution,
        "dtype": str(model.dtype).removeprefix("torch."),
        "versions": package_versions(),
        "command": args.command,
        "created": now_utc(),
    }
    return [{**row, **common} for row in rows]


def _stage(model, stage, latent, e_tgt, config, runtime, warmup: int, offloaded) -> dict:
    """One Imagic training stage measured: peak, what was resident at its start, TFLOP and seconds per step."""
    pipe, device = model.pipe, model.device
    fn = {"embedding": imagic.optimize_embedding, "lora": imagic.finetune_lora}[stage]
    track = device.type != "cuda"
    generator = torch.Generator("cpu").manual_seed(runtime.seed)
    release(device)  # the previous stage's garbage must not count as resident (measure() would free it after)
    held = torch.cuda.memory_allocated(device) / GIB if device.type == "cuda" else None
    hooks = idle_offload(model)  # runtime.offload_idle on a CPU: only what the library placed counts
    with measure(device, "train", pipe.unet, warmup, track, offloaded, hooks) as result:
        fn(pipe.unet, fresh_scheduler(pipe), latent, e_tgt, config, runtime, generator, False)
    if track:
        peak, resident = result.tensor_peak_gib, result.tensor_resident_gib
    else:
        peak, resident = result.peak_allocated_gib, held
    return {
        "field": "tensor_peak_gib" if track else "peak_allocated_gib",
        "peak_gib": peak,
        "resident_gib": resident,
        "above_weights_gib": peak - resident if resident is not None else None,
        "tflop_per_step": result.tflop_per_step,
        "seconds_per_step": result.seconds_per_step,
        "steps_timed": result.steps_timed,
        "optimizer_steps": result.optimizer_steps,
    }


def markdown(rows: list[dict]) -> str:
    """Settings down, each stage's peak (above the weights where known) and TFLOP per step across."""
    head = "| checkpointing | stage | peak GiB | above weights GiB | TFLOP/step | s/step |"
    lines = [head, "|---|---|---|---|---|---|"]
    for r in rows:
        cells = [r["setting"], r["stage"], r["peak_gib"], r["above_weights_gib"], r["tflop_per_step"]]
        cells.append(r["seconds_per_step"])
        lines.append("| " + " | ".join(memory.cell(c) for c in cells) + " |")
    return "\n".join(lines)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = options.parser(__doc__, steps=2, warmup=1, out="checkpointing-<device>-<date>.json")
    return options.parse(parser, argv, "checkpointing")


def main(argv: list[str] | None = None) -> list[dict]:
    args = parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(name)s: %(message)s")
    rows = run(args)
    return publish(args.out or options.results_path("checkpointing-", args.device), rows, markdown(rows))


if __name__ == "__main__":
    main()
