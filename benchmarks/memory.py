"""Peak GPU memory and seconds per step of every stage of peftedit's methods, against the reference implementations.

One command per model and device:

    python -m benchmarks.memory --model sd15 --device cuda
    python -m benchmarks.memory --model tiny --device cpu --steps 2 --warmup 1
    python -m benchmarks.memory --model sd15 --device cpu --steps 2 --warmup 1 --inner-steps 1 \
        --set runtime.dtype=bf16 --out benchmarks/results/cpu-estimate-<date>.json

The model is built with random weights from ``benchmarks/configs/<model>.json`` (no download), saved to a temporary
folder and loaded with ``peftedit.load_model`` under the shipped recipes' runtime settings (the 8 GB ones; SDXL's own
for SDXL architectures, :func:`recipes`). Each stage calls the library's own functions; the baselines (the diffusers
community Imagic pipeline, the null-text reference) run in the same process on an fp32 copy. Rows go to
``benchmarks/results/<device>-<date>.json`` (merged with rows already there) and a Markdown table is printed. On CPU
the CUDA memory fields are null and timings only show that the path runs; instead, each stage's live tensor bytes are
counted (``tensor_peak_gib``, :mod:`benchmarks.tensor_memory`), an estimate of the GPU's peak allocated memory from the
same code on the same shapes. On CPU, run the fp16 recipes as bf16 (same bytes per value; CPU fp16 convolutions are
hundreds of times slower). With ``--track-tensors`` on a GPU the count sits beside ``max_memory_allocated``, which
checks the estimate.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import tempfile
from collections.abc import Callable
from pathlib import Path

import torch
from PIL import Image, ImageDraw

from peftedit import ImagicConfig, RuntimeConfig, load_model
from peftedit.artifacts import now_utc, package_versions
from peftedit.config import LOAD_TIME_SETTINGS, build, resolve_recipe, to_dict

from . import imagic_bench, nulltext_bench, options
from .build_model import load_config, parameter_counts, save_model
from .measure import StageResult, out_of_memory_status, release
from .nulltext_bench import BASELINE_RUNTIME
from .options import device_name, results_path
from .output import write_json

log = logging.getLogger("benchmarks")

# The shipped recipes whose runtime settings a model runs under (Imagic's, null-text's): the 8 GB ones, and SDXL's
# own for SDXL architectures (a config with text_encoder_2).
IMAGIC_RECIPE = "sd15-8gb"
NULLTEXT_RECIPE = "nulltext-sd15-8gb"
XL_RECIPES = ("sdxl", "nulltext-sdxl")
# Goals of issue 5 (SD 1.5 at 512 px).
GOAL_PEAK_RESERVED_GIB = 7.5
GOAL_MEMORY_RATIO = 0.3
GOAL_IMAGIC_TIME_RATIO = 0.5
# Rows without a reference of their own compare against the null-text reference's stage of the same role.
BASELINE_OF = {
    ("negative-prompt", "pipeline"): ("null-text", "pipeline"),
    ("negative-prompt", "edit"): ("null-text", "edit"),
    ("direct", "pipeline"): ("null-text", "pipeline"),
    ("direct", "edit"): ("null-text", "edit"),
}


def input_photo(side: int) -> Image.Image:
    """A deterministic RGB picture (gradient, disc, bar) of ``side`` pixels."""
    image = Image.linear_gradient("L").resize((side, side)).convert("RGB")
    draw = ImageDraw.Draw(image)
    draw.ellipse((side // 8, side // 8, side // 2, side // 2), fill=(220, 40, 40))
    draw.rectangle((side * 5 // 8, side // 4, side * 7 // 8, side * 3 // 4), fill=(40, 90, 220))
    return image


def recipes(model: str) -> tuple[str, str]:
    """The names of the shipped recipes (Imagic's, null-text's) the architecture ``model`` is measured under."""
    return XL_RECIPES if "text_encoder_2" in load_config(model) else (IMAGIC_RECIPE, NULLTEXT_RECIPE)


def configs(args) -> tuple[dict, dict | None]:
    """({runtime, imagic} from the model's Imagic recipe, {runtime, nulltext} from its null-text recipe or None)."""
    overrides = [f"runtime.device={args.device}", *args.set]
    imagic_recipe, nulltext_recipe = recipes(args.model)

    def mine(tables):
        return [o for o in overrides if o.split("=", 1)[0].split(".", 1)[0] in tables]

    tables = {"runtime": RuntimeConfig, "imagic": ImagicConfig}
    imagic = build(tables, _recipe(imagic_recipe), mine({"runtime", "imagic"}))
    nulltext, _ = nulltext_bench.load_nulltext()
    if nulltext is None:
        return imagic, None
    tables = {"runtime": RuntimeConfig, "nulltext": nulltext.NullTextConfig}
    overrides_nt = mine({"runtime", "nulltext"})
    if args.inner_steps is not None:
        overrides_nt.append(f"nulltext.inner_steps={args.inner_steps}")
    return imagic, build(tables, _recipe(nulltext_recipe), overrides_nt)


def _recipe(name: str) -> str | None:
    """The shipped recipe ``name``, or None (RuntimeConfig defaults) when it is not there."""
    try:
        return str(resolve_recipe(name))
    except Exception:
        log.warning("recipe %s not found; using the config defaults", name)
        return None


# Compiled graphs one run may need: every stage's grad mode, batch size and attention processors make their own.
COMPILE_RECOMPILE_LIMIT = 32


@contextlib.contextmanager
def compile_limits(compiled: bool):
    """With ``runtime.compile``, room for every stage's graphs, and a hard failure instead of torch's silent fall
    back to eager at the limit (which would time eager steps as compiled ones)."""
    if not compiled:
        yield
        return
    torch._dynamo.reset()
    try:
        with torch._dynamo.config.patch(recompile_limit=COMPILE_RECOMPILE_LIMIT, fail_on_recompile_limit_hit=True):
            yield
    finally:
        torch._dynamo.reset()  # a failed stage's graphs must not count against the next run's limit either


def run_ours(
    folder: Path,
    args,
    imagic_cfg: dict,
    nulltext_cfg: dict | None,
    finished: Callable[[list[StageResult], dict], None] = lambda results, facts: None,
) -> tuple[list[StageResult], dict]:
    """Our stages on the model loaded with the recipes' runtime settings; returns results and facts about the load.
    ``finished(results so far, facts)`` is called as each method's stages are done."""
    runtime = imagic_cfg["runtime"]
    model = load_model(str(folder), runtime)
    facts = {
        "resolution": model.resolution,
        "dtype": str(model.dtype).removeprefix("torch."),
        "attention": type(next(iter(model.pipe.unet.attn_processors.values()))).__name__,
        "parameters": parameter_counts(model.pipe),
        "device": model.device,
    }
    picture = input_photo(model.resolution)
    results = []
    with compile_limits(runtime.compile):
        if "imagic" in args.methods:
            results += imagic_bench.ours(
                model, picture, imagic_cfg["imagic"], runtime, args.steps, args.warmup, args.track_tensors
            )
            finished(results, facts)
        if "nulltext" in args.methods:
            config, nt_runtime = (
                (nulltext_cfg["nulltext"], nulltext_cfg["runtime"]) if nulltext_cfg else (None, runtime)
            )
            if any(getattr(nt_runtime, k) != getattr(runtime, k) for k in LOAD_TIME_SETTINGS):
                log.warning(  # both methods' stages share one load
                    "the null-text recipe differs in %s; the model is loaded as the Imagic one", LOAD_TIME_SETTINGS
                )
            results += nulltext_bench.ours(
                model, picture, config, nt_runtime, args.steps, args.warmup, args.track_tensors
            )
            finished(results, facts)
    del model
    release(facts["device"])
    return results, facts


def run_baseline(folder: Path, args, nulltext_cfg: dict | None) -> list[StageResult]:
    """The reference implementations' stages on an fp32 load of the same model.

    A stage that runs out of memory is a row that says so (:meth:`Recorder.run`); running out outside the stages
    (loading the fp32 model, encoding the photo) does not stop the run either: the baseline stages left without a
    row get one saying they were not measured, out of memory, and our rows are written with them. (A method's rows
    come back when it finishes, so all of the stopped method's stages are marked.)
    """
    results: list[StageResult] = []
    try:
        _baselines(folder, args, nulltext_cfg, results)
    except Exception as err:
        said = out_of_memory_status(err)
        if said is None:
            raise
        log.exception("the baselines ran out of memory outside their measured stages")
        done = {(r.method, r.stage) for r in results}
        expected = [
            *(imagic_bench.BASELINE_STAGES if "imagic" in args.methods else ()),
            *(nulltext_bench.BASELINE_STAGES if "nulltext" in args.methods else ()),
        ]
        status = f"not measured: {said}"
        results += [StageResult(m, s, status=status, out_of_memory=True) for m, s in expected if (m, s) not in done]
    release(torch.device(args.device))  # out of the except block, whose traceback held the model
    return results


def _baselines(folder: Path, args, nulltext_cfg: dict | None, results: list[StageResult]) -> None:
    """Load the fp32 model and add each method's baseline rows to ``results`` as it finishes."""
    model = load_model(str(folder), RuntimeConfig(device=args.device, **BASELINE_RUNTIME))
    picture = input_photo(model.resolution)
    if "imagic" in args.methods:
        results += imagic_bench.baseline(model, picture, args.steps, args.warmup, args.track_tensors)
    if "nulltext" in args.methods:
        config = nulltext_cfg["nulltext"] if nulltext_cfg else None
        results += nulltext_bench.baseline(model, picture, config, args.steps, args.warmup, args.track_tensors)


def _peak(results: list[StageResult], method: str, key: str) -> float | None:
    """The largest ``key`` peak over a method's measured stages (a whole-pipeline peak for the baselines)."""
    values = [getattr(r.measurement, key) for r in results if r.method == method and r.measurement is not None]
    values = [v for v in values if v is not None]
    return max(values) if values else None


def _ratio(ours: float | None, base: float | None) -> float | None:
    return ours / base if ours is not None and base else None


def make_rows(
    ours: list[StageResult], baseline: list[StageResult], facts: dict, args, inner_steps: int | None
) -> list[dict]:
    """One row per measured (method, stage) of ours, with the baseline's numbers and the ratios."""
    by_key = {(r.method, r.stage): r for r in baseline}
    for method in {r.method for r in baseline}:
        failed = [r for r in baseline if r.method == method and r.status != "ok"]
        oom = ", ".join(r.stage for r in failed if r.out_of_memory)
        other = ", ".join(r.stage for r in failed if not r.out_of_memory)
        said = "; ".join(filter(None, [oom and f"{oom} out of memory", other and f"{other} not measured"]))
        status = f"lower bound: {said}" if said else "ok"
        # a stage out of memory: the reference's whole run does not fit either
        whole = StageResult(method, "pipeline", status=status, note="max over the stages", out_of_memory=bool(oom))
        by_key[(method, "pipeline")] = whole
    device = facts["device"]
    common = {
        "device": device_name(device),
        "model": args.model,
        "resolution": facts["resolution"],
        "dtype": facts["dtype"],
        "attention": facts["attention"],
        "parameters": facts["parameters"],
        "steps": args.steps,
        "warmup": args.warmup,
        "inner_steps": inner_steps,
        "versions": {**package_versions(), "cuda": torch.version.cuda, "cudnn": torch.backends.cudnn.version()},
        # fp32 matmuls and convolutions run in TF32 where these are on (cuDNN's default), the baselines' included
        "tf32": {"matmul": torch.backends.cuda.matmul.allow_tf32, "cudnn": torch.backends.cudnn.allow_tf32},
        "command": args.command,
        "created": now_utc(),
    }
    rows = []
    for result in ours:
        base_method, base_stage = BASELINE_OF.get((result.method, result.stage), (result.method, result.stage))
        base = by_key.get((base_method, base_stage))
        measured = result.measurement.fields() if result.measurement is not None else {}
        if result.stage == "pipeline":
            measured.update(seconds_per_step=None, steps_timed=0)
        base_fields = base.measurement.fields() if base is not None and base.measurement is not None else {}
        if base is not None and base.stage == "pipeline":
            keys = ("peak_allocated_gib", "peak_reserved_gib", "tensor_peak_gib")
            base_fields = {k: _peak(baseline, base_method, k) for k in keys}
        row = {
            **common,
            "method": result.method,
            "stage": result.stage,
            "status": result.status,
            "note": result.note,
            "out_of_memory": result.out_of_memory,
            "out_of_memory_at_gib": result.out_of_memory_at_gib,
            "peak_allocated_gib": measured.get("peak_allocated_gib"),
            "peak_reserved_gib": measured.get("peak_reserved_gib"),
            "tensor_peak_gib": measured.get("tensor_peak_gib"),
            "tensor_resident_gib": measured.get("tensor_resident_gib"),
            "seconds_per_step": measured.get("seconds_per_step"),
            "tflop_per_step": measured.get("tflop_per_step"),
            "steps_timed": measured.get("steps_timed", 0),
            "optimizer_steps": measured.get("optimizer_steps", 0),
            "seconds_total": measured.get("seconds_total"),
            "optimizer_state": measured.get("optimizer_state"),
            "baseline": f"{base_method}/{base_stage}" if base is not None else None,
            "baseline_status": base.status if base is not None else "no baseline for this stage",
            "baseline_note": base.note if base is not None else "",
            "baseline_out_of_memory": base.out_of_memory if base is not None else False,
            "baseline_out_of_memory_at_gib": base.out_of_memory_at_gib if base is not None else None,
            "baseline_peak_allocated_gib": base_fields.get("peak_allocated_gib"),
            "baseline_peak_reserved_gib": base_fields.get("peak_reserved_gib"),
            "baseline_tensor_peak_gib": base_fields.get("tensor_peak_gib"),
            "baseline_seconds_per_step": base_fields.get("seconds_per_step"),
            "baseline_tflop_per_step": base_fields.get("tflop_per_step"),
            "baseline_optimizer_state": base_fields.get("optimizer_state"),
        }
        row["memory_ratio"] = _ratio(row["peak_reserved_gib"], row["baseline_peak_reserved_gib"])
        row["time_ratio"] = _ratio(row["seconds_per_step"], row["baseline_seconds_per_step"])
        row["tensor_ratio"] = _ratio(row["tensor_peak_gib"], row["baseline_tensor_peak_gib"])
        row["flop_ratio"] = _ratio(row["tflop_per_step"], row["baseline_tflop_per_step"])
        rows.append(row)
    return rows


def write_rows(path: Path, rows: list[dict]) -> Path:
    """Merge ``rows`` into the JSON list at ``path`` (a row replaces one with the same key) and write atomically."""
    key = lambda row: (row["device"], row["model"], row["method"], row["stage"], row["resolution"])
    old = json.loads(path.read_text()) if path.is_file() else []
    new_keys = {key(r) for r in rows}
    return write_json(path, [r for r in old if key(r) not in new_keys] + rows)


def cell(value, digits: int = 3) -> str:
    """A table cell: ``digits`` significant digits for floats, an en dash for None."""
    if value is None:
        return "–"
    return f"{value:.{digits}g}" if isinstance(value, float) else str(value)


def markdown(rows: list[dict]) -> str:
    """The rows as a Markdown table (GiB, seconds, ratios ours/baseline); tensor and FLOP columns when tracked."""
    tracked = any(r.get("tensor_peak_gib") is not None for r in rows)
    head = (
        "| model | method | stage | peak alloc GiB | peak reserved GiB | s/step | baseline reserved GiB "
        "| baseline s/step | memory ratio | time ratio |"
    )
    if tracked:
        head += " tensors GiB | baseline tensors GiB | tensor ratio | TFLOP/step | baseline TFLOP/step | FLOP ratio |"
    head += " status |"
    lines = [head, "|" + "---|" * (head.count("|") - 1)]
    for r in rows:
        status = r["status"] if r["baseline_status"] == "ok" else f"{r['status']}; baseline {r['baseline_status']}"
        cells = [
            r["model"],
            r["method"],
            r["stage"],
            cell(r["peak_allocated_gib"]),
            cell(r["peak_reserved_gib"]),
            cell(r["seconds_per_step"]),
            cell(r["baseline_peak_reserved_gib"]),
            cell(r["baseline_seconds_per_step"]),
            cell(r["memory_ratio"], 2),
            cell(r["time_ratio"], 2),
        ]
        if tracked:
            cells += [cell(r["tensor_peak_gib"]), cell(r["baseline_tensor_peak_gib"]), cell(r["tensor_ratio"], 2)]
            cells += [cell(r.get("tflop_per_step")), cell(r.get("baseline_tflop_per_step"))]
            cells.append(cell(r.get("flop_ratio"), 2))
        lines.append("| " + " | ".join([*cells, status]) + " |")
    return "\n".join(lines)


def goals(rows: list[dict]) -> list[str]:
    """Issue 5's goals checked against the rows (SD 1.5 only; other models are reported, not judged).

    Off CUDA the memory goals are checked on the tensor estimate instead, and every line says it is an estimate:
    the estimate is of peak allocated, while the goal is on peak reserved (allocated plus the allocator's slack).
    """
    out = []
    for r in rows:
        if r["model"] != "sd15" or r["status"] != "ok":
            continue
        name = f"{r['method']}/{r['stage']}"
        if r["device"] == "cpu":
            if r["stage"] == "pipeline" and r.get("tensor_peak_gib") is not None:
                peak, ratio = r["tensor_peak_gib"], r.get("tensor_ratio")
                line = f"{name}: ESTIMATE (CPU, live tensors) {peak:.2f} GiB <= {GOAL_PEAK_RESERVED_GIB}: "
                line += f"{peak <= GOAL_PEAK_RESERVED_GIB}"
                if ratio is not None:
                    line += f"; ratio {ratio:.2f} <= {GOAL_MEMORY_RATIO}: {ratio <= GOAL_MEMORY_RATIO}"
                out.append(line + " (the goal is on CUDA peak reserved; not measured here)")
            if r["method"] == "imagic" and r["stage"] in ("embedding", "lora") and r.get("flop_ratio") is not None:
                out.append(
                    f"{name}: time ratio <= {GOAL_IMAGIC_TIME_RATIO} NOT MEASURED here; FLOP ratio "
                    f"{r['flop_ratio']:.2f} (work per step; time also depends on fp16 vs fp32 throughput, "
                    "which only a GPU shows)"
                )
            continue
        if r["stage"] == "pipeline" and r["peak_reserved_gib"] is not None:
            ok = r["peak_reserved_gib"] <= GOAL_PEAK_RESERVED_GIB
            out.append(f"{name}: peak reserved {r['peak_reserved_gib']:.2f} GiB <= {GOAL_PEAK_RESERVED_GIB}: {ok}")
        if r["stage"] == "pipeline" and r["memory_ratio"] is not None:
            ok = r["memory_ratio"] <= GOAL_MEMORY_RATIO
            out.append(f"{name}: memory ratio {r['memory_ratio']:.2f} <= {GOAL_MEMORY_RATIO}: {ok}")
        if r["method"] == "imagic" and r["stage"] in ("embedding", "lora") and r["time_ratio"] is not None:
            ok = r["time_ratio"] <= GOAL_IMAGIC_TIME_RATIO
            out.append(f"{name}: time ratio {r['time_ratio']:.2f} <= {GOAL_IMAGIC_TIME_RATIO}: {ok}")
    return out


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = options.parser(__doc__, steps=6, warmup=2, out="<device>-<date>.json")
    parser.add_argument("--inner-steps", type=int, default=None, help="null-text steps per timestep (recipe: 10)")
    parser.add_argument("--methods", nargs="+", choices=["imagic", "nulltext"], default=["imagic", "nulltext"])
    parser.add_argument("--no-baseline", action="store_true", help="skip the reference implementations")
    parser.add_argument(
        "--track-tensors",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="count live tensor bytes per stage (benchmarks/tensor_memory.py); default on off CUDA, where it is "
        "the memory estimate, off on CUDA, where it slows every operator",
    )
    parser.add_argument("--model-dir", type=Path, help="a saved model folder to use instead of building one")
    args = options.parse(parser, argv, "memory")
    if args.track_tensors is None:
        args.track_tensors = not args.device.startswith("cuda")
    return args


def main(argv: list[str] | None = None) -> list[dict]:
    """Run the benchmark; returns the rows written."""
    args = parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(name)s: %(message)s")
    imagic_cfg, nulltext_cfg = configs(args)
    inner_steps = nulltext_cfg["nulltext"].inner_steps if nulltext_cfg else None

    def rows_of(ours: list[StageResult], baseline: list[StageResult], facts: dict) -> list[dict]:
        rows = make_rows(ours, baseline, facts, args, inner_steps)
        for row in rows:
            imagic_row = row["method"] == "imagic" or nulltext_cfg is None
            row["recipe"] = recipes(args.model)[0 if imagic_row else 1]
            row["runtime"] = to_dict((imagic_cfg if imagic_row else nulltext_cfg)["runtime"])
        return rows

    def keep(ours: list[StageResult], facts: dict) -> None:
        """Write what is done so far, so a run stopped later (the device tool's time limit) keeps it."""
        pending = rows_of(ours, [], facts)
        if not args.no_baseline:
            for row in pending:
                row["baseline_status"] = "pending: the run stopped before the baselines were measured"
        write_rows(args.out or results_path("", facts["device"]), pending)
        log.info("%d rows written so far", len(pending))

    with tempfile.TemporaryDirectory(prefix="peftedit-bench-") as tmp:
        folder = args.model_dir or save_model(args.model, Path(tmp) / args.model, device=args.device)
        log.info("model %s in %s; running our stages", args.model, folder)
        ours, facts = run_ours(folder, args, imagic_cfg, nulltext_cfg, keep)
        baseline = [] if args.no_baseline else run_baseline(folder, args, nulltext_cfg)
    rows = rows_of(ours, baseline, facts)
    path = write_rows(args.out or results_path("", facts["device"]), rows)
    print(markdown(rows))
    for line in goals(rows):
        print(line)
    print(f"wrote {len(rows)} rows to {path}")
    return rows


if __name__ == "__main__":
    main()
