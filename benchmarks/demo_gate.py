"""Quality gate for the built-in demo model: generate world prompts and read them back with the analytic reader.

    python -m benchmarks.demo_gate                              # writes benchmarks/results/demo-gate.json

Cases: all 90 single-object prompts and a fixed set of two-object prompts, each over a few seeds.
An image passes when the reader recovers exactly the prompted scene (colour, shape, size and position of each object).
"""

from __future__ import annotations

import argparse
import json
import random
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from benchmarks.output import write_json
from peftedit.demo import DEMO_MODEL_DIR, DEMO_SETTINGS_FILE, Scene, WorldObject, all_single_scenes, read_scene
from peftedit.demo.world import random_object

RESULTS = Path(__file__).parent / "results" / "demo-gate.json"
SINGLE_GOAL, TWO_GOAL = 0.95, 0.85
TWO_OBJECT_SEED = 1234  # fixes the two-object prompt set


@dataclass
class GateConfig:
    """What the gate generates."""

    model: Path = DEMO_MODEL_DIR
    seeds: tuple[int, ...] = (0, 1)
    two_object_prompts: int = 60
    batch_size: int = 30
    threads: int = 1
    steps: int | None = None  # None: the model folder's recommended settings
    guidance: float | None = None


def two_object_scenes(count: int) -> list[Scene]:
    """A fixed set of distinct two-object scenes (no jitter)."""
    rng, out = random.Random(TWO_OBJECT_SEED), {}
    while len(out) < count:
        left, right = random_object(rng, "left"), random_object(rng, "right")
        scene = Scene(tuple(WorldObject(o.color, o.shape, o.size, o.position) for o in (left, right)))
        out.setdefault(scene.prompt(), scene)
    return list(out.values())


def run_cases(pipe, scenes: list[Scene], cfg: GateConfig, steps: int, guidance: float) -> list[dict]:
    rows = []
    jobs = [(scene, seed) for seed in cfg.seeds for scene in scenes]
    for start in range(0, len(jobs), cfg.batch_size):
        chunk = jobs[start : start + cfg.batch_size]
        images = pipe(
            [scene.prompt() for scene, _ in chunk],
            num_inference_steps=steps,
            guidance_scale=guidance,
            generator=[torch.Generator().manual_seed(seed) for _, seed in chunk],
        ).images
        for (scene, seed), image in zip(chunk, images, strict=True):
            try:
                read = read_scene(image).prompt()
            except ValueError as err:
                read = f"unreadable: {err}"
            rows.append({"prompt": scene.prompt(), "seed": seed, "read": read, "ok": read == scene.prompt()})
    return rows


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", type=Path, default=GateConfig.model)
    parser.add_argument("--steps", type=int, default=None, help="DDIM steps (default: the model's recommendation).")
    parser.add_argument("--guidance", type=float, default=None, help="Guidance scale (default: the model's).")
    parser.add_argument("--threads", type=int, default=GateConfig.threads)
    parser.add_argument("--seeds", type=int, nargs="+", default=list(GateConfig.seeds), help="Sampling seeds.")
    parser.add_argument("--two-object-prompts", type=int, default=GateConfig.two_object_prompts)
    parser.add_argument("--out", type=Path, default=RESULTS)
    args = parser.parse_args(argv)
    cfg = GateConfig(
        model=args.model,
        seeds=tuple(args.seeds),
        two_object_prompts=args.two_object_prompts,
        threads=args.threads,
        steps=args.steps,
        guidance=args.guidance,
    )

    from diffusers import StableDiffusionPipeline

    torch.set_num_threads(cfg.threads)
    pipe = StableDiffusionPipeline.from_pretrained(str(cfg.model))
    pipe.set_progress_bar_config(disable=True)
    settings = json.loads((cfg.model / DEMO_SETTINGS_FILE).read_text())
    steps = cfg.steps or settings["num_inference_steps"]
    guidance = cfg.guidance if cfg.guidance is not None else settings["guidance_scale"]

    started = time.time()
    single = run_cases(pipe, all_single_scenes(), cfg, steps, guidance)
    two = run_cases(pipe, two_object_scenes(cfg.two_object_prompts), cfg, steps, guidance)
    rate = lambda rows: sum(r["ok"] for r in rows) / len(rows)
    result = {
        "model": str(cfg.model),
        "trained_steps": settings.get("trained_steps"),
        "sampler": {"scheduler": type(pipe.scheduler).__name__, "steps": steps, "guidance": guidance},
        "seeds": list(cfg.seeds),
        "single_object": {"rate": rate(single), "n": len(single), "goal": SINGLE_GOAL},
        "two_object": {"rate": rate(two), "n": len(two), "goal": TWO_GOAL},
        "passed": rate(single) >= SINGLE_GOAL and rate(two) >= TWO_GOAL,
        "seconds": round(time.time() - started),
        "failures": [r for r in single + two if not r["ok"]],
    }
    write_json(args.out, result)
    print(f"single-object: {rate(single):.1%} of {len(single)} (goal {SINGLE_GOAL:.0%})")
    print(f"two-object:    {rate(two):.1%} of {len(two)} (goal {TWO_GOAL:.0%})")
    print(f"{'PASSED' if result['passed'] else 'FAILED'} in {result['seconds']}s; wrote {args.out}")
    return result


if __name__ == "__main__":
    main()
