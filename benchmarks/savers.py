"""What each memory saver of the 8 GB recipes buys, and each speed option they leave off: the memory benchmark with
one setting changed at a time.

    python -m benchmarks.savers --model sd15 --device cuda
    python -m benchmarks.savers --model sd15 --device cpu --set runtime.dtype=bf16   # live-tensor estimate

Runs ``benchmarks.memory`` (no baselines) once with the recipes as shipped, once per saver switched off and once per
option they leave off (``offload_idle``, channels-last UNet, ``torch.compile``) switched on, on one model built once
(``offload_idle`` is on in the SDXL recipes: there its variant switches it off; a variant equal to the recipe is
skipped), and reports per method and stage the peak memory of each variant against the recipe's: CUDA peak reserved
on a GPU, the live-tensor estimate (``tensor_peak_gib``) elsewhere; on a GPU the table also gives the change in
seconds per step. Rows go to ``benchmarks/results/savers-<device>-<date>.json``. Encoder offloading and the compiled
UNet run only on a GPU: on a CPU the encoders are on the "device" either way, and the live-tensor count does not see
inside compiled kernels.
"""

from __future__ import annotations

import argparse
import logging
import tempfile
from pathlib import Path

from peftedit import RuntimeConfig
from peftedit.config import build

from . import memory, options
from .build_model import save_model
from .output import publish, write_json

log = logging.getLogger("benchmarks")

# (name, override): the first is the recipes as shipped; then each memory saver they use switched off, and each
# option they leave off switched on: a further memory saver, and the speed options (whose worth is seconds per step,
# which only a GPU measures).
VARIANTS = [
    ("recipe", None),
    ("fp32 weights", "runtime.dtype=fp32"),
    ("no gradient checkpointing", "runtime.gradient_checkpointing=false"),
    ("fp32 AdamW states", "runtime.optimizer=adamw"),
    ("encoders stay on the GPU", "runtime.offload_encoders=false"),
    ("batched VAE decode", "runtime.vae_slicing=false"),
    ("idle parts off the GPU", "runtime.offload_idle=true"),
    ("every part kept on the GPU", "runtime.offload_idle=false"),  # the SDXL recipes have it on
    ("channels-last UNet", "runtime.channels_last=true"),
    ("compiled UNet", "runtime.compile=true"),
]
# A variant the recipe already is (offload_idle: on for SDXL, off for SD) is skipped: it would run the recipe again.
# Skipped off CUDA: a CPU cannot move the encoders off its "device", and the live-tensor count does not see inside
# inductor's compiled kernels (nor would CPU timings say what compiling buys on a GPU).
GPU_ONLY = {"encoders stay on the GPU", "compiled UNet"}


def peak_key(device: str) -> str:
    """The row field compared: CUDA peak reserved on a GPU, the live-tensor estimate elsewhere."""
    return "peak_reserved_gib" if device.startswith("cuda") else "tensor_peak_gib"


def compare(runs: dict[str, list[dict]], key: str) -> list[dict]:
    """One row per (variant, method, stage): the peak with the saver off, the recipe's, and what the saver buys."""
    recipe = {(r["method"], r["stage"]): r for r in runs["recipe"]}
    out = []
    for variant, rows in runs.items():
        for row in rows:
            base = recipe.get((row["method"], row["stage"]))
            ours, shipped = row.get(key), base.get(key) if base else None
            out.append(
                {
                    "variant": variant,
                    "method": row["method"],
                    "stage": row["stage"],
                    "status": row["status"],
                    "field": key,
                    "peak_gib": ours,
                    "recipe_peak_gib": shipped,
                    "saver_buys_gib": ours - shipped if ours is not None and shipped is not None else None,
                    "seconds_per_step": row["seconds_per_step"],
                    "recipe_seconds_per_step": base["seconds_per_step"] if base else None,
                    "tflop_per_step": row.get("tflop_per_step"),
                    "recipe_tflop_per_step": base.get("tflop_per_step") if base else None,
                    "device": row["device"],
                    "model": row["model"],
                    "resolution": row["resolution"],
                    "runtime": row["runtime"],
                    "versions": row["versions"],
                    "created": row["created"],
                }
            )
    return out


def markdown(rows: list[dict]) -> str:
    """The comparison as a Markdown table, variants across, (method, stage) down: peak and what the saver buys, the
    change in FLOPs per step where the variant changes the work (checkpointing's recomputed forward), and on a GPU
    the change in seconds per step."""
    variants = list(dict.fromkeys(r["variant"] for r in rows))
    cells = {(r["method"], r["stage"], r["variant"]): r for r in rows}
    head = "| method | stage | " + " | ".join(variants) + " |"
    lines = [head, "|" + "---|" * (len(variants) + 2)]
    for method, stage in dict.fromkeys((r["method"], r["stage"]) for r in rows):
        row = [method, stage]
        for variant in variants:
            r = cells.get((method, stage, variant))
            if r is None or r["peak_gib"] is None:
                row.append("–" if r is None else r["status"][:40])
            elif variant == "recipe":
                row.append(f"{r['peak_gib']:.3g}")
            else:
                row.append(f"{r['peak_gib']:.3g} ({r['saver_buys_gib']:+.3g}){_work(r)}{_time(r)}")
        lines.append("| " + " | ".join(row) + " |")
    return "\n".join(lines)


def _work(row: dict) -> str:
    """`` FLOPs -25%`` when switching the saver off changes the FLOPs per step by more than 0.5%, else nothing."""
    ours, shipped = row.get("tflop_per_step"), row.get("recipe_tflop_per_step")
    if not ours or not shipped or abs(ours / shipped - 1) <= 0.005:
        return ""
    return f" FLOPs {100 * (ours / shipped - 1):+.0f}%"


def _time(row: dict) -> str:
    """`` time -12%`` against the recipe's seconds per step, measured on a GPU only (CPU timings say nothing)."""
    ours, shipped = row.get("seconds_per_step"), row.get("recipe_seconds_per_step")
    if row["device"] == "cpu" or not ours or not shipped:
        return ""
    return f" time {100 * (ours / shipped - 1):+.0f}%"


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = options.parser(__doc__, steps=2, warmup=1, out="savers-<device>-<date>.json")
    parser.add_argument("--inner-steps", type=int, default=1)
    parser.add_argument("--methods", nargs="+", choices=["imagic", "nulltext"], default=["imagic", "nulltext"])
    parser.add_argument("--variants", nargs="+", choices=[v for v, _ in VARIANTS[1:]], help="default: all")
    return options.parse(parser, argv, "savers")


def main(argv: list[str] | None = None) -> list[dict]:
    args = parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(name)s: %(message)s")
    chosen = set(args.variants or [v for v, _ in VARIANTS[1:]])
    if not args.device.startswith("cuda"):
        chosen -= GPU_ONLY
    common = ["--model", args.model, "--device", args.device, "--steps", str(args.steps), "--warmup", str(args.warmup)]
    common += ["--inner-steps", str(args.inner_steps), "--methods", *args.methods, "--no-baseline"]
    common += [f"--set={item}" for item in args.set]
    path = args.out or options.results_path("savers-", args.device)
    runs: dict[str, list[dict]] = {}

    def rows() -> list[dict]:
        found = compare(runs, peak_key(args.device))
        for row in found:
            row["command"] = args.command
        return found

    with tempfile.TemporaryDirectory(prefix="peftedit-savers-") as tmp:
        folder = save_model(args.model, Path(tmp) / args.model, device=args.device)
        for variant, override in VARIANTS:
            if variant != "recipe" and variant not in chosen:
                continue
            if override and _same_as_recipe(runs["recipe"], override):
                log.info("skipping %r: the recipe already has %s", variant, override)
                continue
            extra = [f"--set={override}"] if override else []
            out = Path(tmp) / f"{len(runs)}.json"
            runs[variant] = memory.main([*common, *extra, "--model-dir", str(folder), "--out", str(out)])
            write_json(path, rows())  # after each variant, so a run stopped part way keeps the variants done
    final = rows()
    return publish(path, final, markdown(final))


def _same_as_recipe(recipe_rows: list[dict], override: str) -> bool:
    """Whether ``runtime.KEY=VALUE`` is what the recipe run already had (its rows record their runtime)."""
    key = override.partition("=")[0].removeprefix("runtime.")
    wanted = getattr(build({"runtime": RuntimeConfig}, None, [override])["runtime"], key)  # parsed as --set is
    return {row["runtime"].get(key) for row in recipe_rows if row.get("runtime")} == {wanted}


if __name__ == "__main__":
    main()
