"""The memory benchmark runs end to end on the tiny architectures (SD's and SDXL's) and writes complete rows (no timing
assertions)."""

from __future__ import annotations

import argparse
import contextlib
import gc
import json
import math
import os
import subprocess
from pathlib import Path

import pytest
import torch

from benchmarks import checkpointing, memory, savers
from benchmarks.build_model import build_pipeline, load_config, parameter_counts, resolution

STAGES = {
    "imagic": {"pipeline", "embedding", "lora", "render"},
    "null-text": {"pipeline", "pivot", "null-optimization", "edit"},
    "negative-prompt": {"pipeline", "edit"},
    "direct": {"pipeline", "offsets", "edit"},
}
FIELDS = (
    "device model method stage resolution peak_allocated_gib peak_reserved_gib seconds_per_step seconds_total "
    "baseline_peak_reserved_gib baseline_seconds_per_step memory_ratio time_ratio versions command status"
).split()


@contextlib.contextmanager
def frozen_heap():
    """The live-tensor count (benchmarks.tensor_memory) collects garbage and walks the whole heap as each measured
    stage starts, to find the tensors already alive: under pytest that is over half a million objects, mostly from
    imports (~0.5 s a stage; this module measures ~130 stages). What is alive when the block starts is moved out of
    the collector's way (``gc.freeze``: ``gc.get_objects`` no longer lists it), so each stage walks only what was
    made since. Every model measured here is built inside the block; a tensor made before it is counted, as a storage
    first seen, only where an operator measured touches it."""
    gc.collect()
    gc.freeze()
    try:
        yield
    finally:
        gc.unfreeze()


@pytest.fixture(autouse=True)
def _frozen_heap():
    with frozen_heap():
        yield


@pytest.fixture
def one_thread():
    """One CPU thread: two threads on a shared two-core machine run these small convolutions ~10x slower."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def _positive(value) -> bool:
    return isinstance(value, float) and math.isfinite(value) and value > 0


# The tiny architectures the whole benchmark runs on: SD's, and SDXL's (two text encoders, pooled text and sizes).
TINY_MODELS = ["tiny", "tiny-xl"]
# Each one's text embedding: SDXL's carries its pooled text and size conditions in one more row (peftedit.diffusion).
EMBEDDING_SHAPE = {"tiny": [1, 77, 32], "tiny-xl": [1, 78, 48]}
RECIPES = {"tiny": ("sd15-8gb", "nulltext-sd15-8gb"), "tiny-xl": ("sdxl", "nulltext-sdxl")}


@pytest.fixture(scope="module", params=TINY_MODELS)
def bench(request, tmp_path_factory):
    """One benchmark run on a tiny model: (rows returned, rows read back)."""
    out = tmp_path_factory.mktemp("results") / "cpu.json"
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        argv = ["--model", request.param, "--device", "cpu", "--steps", "2", "--warmup", "1", "--inner-steps", "1"]
        with frozen_heap():
            rows = memory.main([*argv, "--set", "runtime.dtype=fp32", "--out", str(out)])
    finally:
        torch.set_num_threads(before)
    return rows, json.loads(out.read_text())


def test_every_stage_has_a_complete_row(bench):
    rows, written = bench
    assert written == rows
    found = {(r["method"], r["stage"]) for r in rows}
    assert found == {(m, s) for m, stages in STAGES.items() for s in stages}
    model = rows[0]["model"]
    for row in rows:
        missing = [f for f in FIELDS if f not in row]
        assert not missing, (row["method"], row["stage"], missing)
        assert row["device"] == "cpu" and row["model"] == model and row["resolution"] == 32
        assert row["versions"]["torch"] == torch.__version__
        assert row["command"].startswith(f"python -m benchmarks.memory --model {model} ")
        assert row["recipe"] == RECIPES[model][row["method"] != "imagic"]
        assert not row["out_of_memory"] and not row["baseline_out_of_memory"]
    parts = {"unet", "vae", "text_encoder"} | ({"text_encoder_2"} if model == "tiny-xl" else set())
    assert set(rows[0]["parameters"]) == parts


def test_numbers_are_finite_and_memory_is_null_on_cpu(bench):
    rows, _ = bench
    for row in rows:
        where = (row["method"], row["stage"], row["status"], row["baseline_status"])
        if row["status"].startswith("not available"):
            continue
        assert row["status"] == "ok", where
        assert row["peak_allocated_gib"] is None and row["peak_reserved_gib"] is None
        # off CUDA every stage counts its live tensors instead: at least what was there when it started
        assert _positive(row["tensor_peak_gib"]) and row["tensor_peak_gib"] >= row["tensor_resident_gib"], where
        assert _positive(row["seconds_total"]), where
        if row["stage"] == "pipeline":
            continue
        assert _positive(row["seconds_per_step"]) and row["steps_timed"] >= 1, where
        assert _positive(row["tflop_per_step"]), where
        if row["baseline"] is not None:  # every stage with a reference runs it too
            assert row["baseline_status"] == "ok", where
            assert _positive(row["baseline_seconds_per_step"]) and _positive(row["time_ratio"]), where
            assert _positive(row["flop_ratio"]), where


def test_checkpointing_costs_a_forward_in_flops(bench):
    """Imagic's embedding step only needs input gradients: the baseline does a forward and a backward, ours (with
    checkpointing) recomputes the forward too, so it does more work per step, not less."""
    rows, _ = bench
    embedding = next(r for r in rows if r["method"] == "imagic" and r["stage"] == "embedding")
    assert embedding["runtime"]["gradient_checkpointing"]
    assert embedding["flop_ratio"] > 1.1, embedding["flop_ratio"]


def test_training_stages_report_the_optimizer_state(bench):
    rows, _ = bench
    by_stage = {(r["method"], r["stage"]): r for r in rows}
    embedding = by_stage[("imagic", "embedding")]
    assert embedding["optimizer_state"]["class"] in ("AdamW8bit", "AdamW")
    assert embedding["optimizer_state"]["largest_param_shape"] == EMBEDDING_SHAPE[embedding["model"]]
    assert embedding["baseline_optimizer_state"]["class"] == "Adam"
    # two steps, one of them warm-up; fp32 scales no loss, so none is skipped
    assert (embedding["optimizer_steps"], embedding["steps_timed"]) == (2, 1)
    lora = by_stage[("imagic", "lora")]
    # the baseline fine-tunes the whole UNet: far more optimizer state than the LoRA, and more memory in all
    assert lora["baseline_optimizer_state"]["state_mib"] > 10 * lora["optimizer_state"]["state_mib"]
    assert lora["tensor_ratio"] < 1 and lora["baseline_tensor_peak_gib"] > lora["tensor_peak_gib"]


def test_offloaded_encoders_are_left_out_of_training_stages(bench):
    """The recipes move the VAE and text encoder(s) off the GPU while training; on a CPU they cannot move, so the
    estimate leaves their weights out of those stages instead, SDXL's second text encoder too. With the SD recipes
    the encoders count again where they are used (a render, an edit, whose start has them on the GPU); the SDXL
    recipes' ``offload_idle`` has only the UNet there when a render or an edit starts, as in training."""
    rows, _ = bench
    by_stage = {(r["method"], r["stage"]): r for r in rows}
    assert by_stage[("imagic", "embedding")]["runtime"]["offload_encoders"]
    idle = by_stage[("imagic", "embedding")]["runtime"]["offload_idle"]
    assert idle == (rows[0]["model"] == "tiny-xl")
    counts = by_stage[("imagic", "embedding")]["parameters"]
    encoders_gib = (counts["vae"] + counts["text_encoder"] + counts.get("text_encoder_2", 0)) * 4 / 2**30  # fp32
    for method, stage, used in (("imagic", "embedding", "render"), ("null-text", "null-optimization", "edit")):
        gap = by_stage[(method, used)]["tensor_resident_gib"] - by_stage[(method, stage)]["tensor_resident_gib"]
        if idle:
            assert abs(gap) < 0.5 * encoders_gib, (method, stage, gap, encoders_gib)
        else:
            assert gap >= 0.95 * encoders_gib, (method, stage, gap, encoders_gib)


def test_markdown_table_has_one_line_per_row(bench):
    rows, _ = bench
    table = memory.markdown(rows).splitlines()
    assert table[0].startswith("| model | method | stage |") and len(table) == len(rows) + 2
    assert "| tensors GiB |" in table[0] and "| FLOP ratio |" in table[0]


def test_configs_build_their_architectures(one_thread):
    pipe = build_pipeline("tiny")
    assert resolution("tiny") == 32 and pipe.unet.config.cross_attention_dim == 32
    assert pipe.text_encoder.config.vocab_size >= len(pipe.tokenizer)
    assert all(n > 0 for n in parameter_counts(pipe).values())
    for name, side, context in (("sd15", 512, 768), ("sd21", 768, 1024)):
        config = load_config(name)
        assert resolution(name) == side and config["unet"]["cross_attention_dim"] == context
        assert config["text_encoder"]["hidden_size"] == context


# The real checkpoints' parameter counts (stable-diffusion-v1-5, stable-diffusion-2-1, stable-diffusion-xl-base-1.0).
REAL_PARAMETERS = {
    "sd15": {"unet": 859_520_964, "vae": 83_653_863, "text_encoder": 123_060_480},
    "sd21": {"unet": 865_910_724, "vae": 83_653_863, "text_encoder": 340_387_840},
    "sdxl": {"unet": 2_567_463_684, "vae": 83_653_863, "text_encoder": 123_060_480, "text_encoder_2": 694_659_840},
}


@pytest.mark.parametrize("name", sorted(REAL_PARAMETERS))
def test_real_size_configs_have_the_real_parameter_counts(name):
    """Built on the meta device (shapes, no memory: SDXL in fp32 is 14 GB), part by part."""
    pipe = build_pipeline(name, device="meta")
    assert parameter_counts(pipe) == REAL_PARAMETERS[name]


@pytest.mark.parametrize("name, side", [("sdxl", 1024), ("tiny-xl", 32)])
def test_xl_configs_build_sdxl_pipelines(name, side):
    """Two text encoders whose hidden states are concatenated into the UNet's context, the second one's projection
    (pooled text) and six size numbers into its added time embedding; the scheduler converts to DDIM as it is."""
    from diffusers import DDIMScheduler

    pipe = build_pipeline(name, device="meta")
    unet, first, second = pipe.unet.config, pipe.text_encoder.config, pipe.text_encoder_2.config
    assert type(pipe).__name__ == "StableDiffusionXLPipeline" and resolution(name) == side
    assert type(pipe.text_encoder_2).__name__ == "CLIPTextModelWithProjection"
    assert first.hidden_size + second.hidden_size == unet.cross_attention_dim
    assert unet.projection_class_embeddings_input_dim == 6 * unet.addition_time_embed_dim + second.projection_dim
    assert pipe.tokenizer_2 is pipe.tokenizer and second.vocab_size >= len(pipe.tokenizer)
    ddim = DDIMScheduler.from_config(pipe.scheduler.config)
    assert torch.equal(ddim.betas, pipe.scheduler.betas) and ddim.config.steps_offset == 1


def test_missing_nulltext_module_gives_not_available_rows(tmp_path, monkeypatch, one_thread):
    from benchmarks import nulltext_bench

    monkeypatch.setattr(nulltext_bench, "load_nulltext", lambda: (None, "not available: nulltext is missing"))
    argv = ["--model", "tiny", "--device", "cpu", "--steps", "2", "--warmup", "1", "--methods", "nulltext"]
    rows = memory.main([*argv, "--no-baseline", "--set", "runtime.dtype=fp32", "--out", str(tmp_path / "r.json")])
    assert {(r["method"], r["stage"]) for r in rows} == {(m, s) for m in STAGES if m != "imagic" for s in STAGES[m]}
    assert all(r["status"] == "not available: nulltext is missing" for r in rows)
    assert json.loads((tmp_path / "r.json").read_text()) == rows


def test_savers_show_what_checkpointing_buys(tmp_path, one_thread):
    """Checkpointing is the saver for training stages: switched off, their peak rises; sampling ones do not move."""
    from benchmarks import savers

    out = tmp_path / "savers.json"
    argv = ["--model", "tiny", "--device", "cpu", "--methods", "imagic", "--set", "runtime.dtype=fp32"]
    rows = savers.main([*argv, "--variants", "no gradient checkpointing", "--out", str(out)])
    assert json.loads(out.read_text()) == rows
    off = {r["stage"]: r for r in rows if r["variant"] == "no gradient checkpointing"}
    assert set(off) == STAGES["imagic"] and all(r["field"] == "tensor_peak_gib" for r in rows)
    for stage in ("embedding", "lora", "pipeline"):
        assert off[stage]["saver_buys_gib"] > 0.1 * off[stage]["recipe_peak_gib"], off[stage]
    assert off["render"]["peak_gib"] == off["render"]["recipe_peak_gib"]
    # and what it costs: the recomputed forward, so switching it off lowers each training step's FLOPs
    for stage in ("embedding", "lora"):
        assert off[stage]["tflop_per_step"] < 0.9 * off[stage]["recipe_tflop_per_step"], off[stage]
    assert off["render"]["tflop_per_step"] == off["render"]["recipe_tflop_per_step"]
    assert "FLOPs -" in savers.markdown(rows)


def test_checkpointing_levels_trade_memory_for_work(tmp_path, one_thread):
    """More blocks checkpointed: less memory above the weights, more FLOPs per step (the recomputed forward)."""
    # diffusers' first lazy import of the pipeline class, done here: done inside a run, it kept (under pytest) that
    # run's frames, and so its model, alive into the next run's resident count
    from diffusers import StableDiffusionPipeline  # noqa: F401

    from benchmarks import checkpointing

    out = tmp_path / "ckpt.json"
    rows = checkpointing.main(["--model", "tiny", "--device", "cpu", "--set", "runtime.dtype=fp32", "--out", str(out)])
    assert json.loads(out.read_text()) == rows
    for stage in ("embedding", "lora"):
        ordered = [r for r in rows if r["stage"] == stage]
        assert [r["setting"] for r in ordered] == list(checkpointing.SETTINGS)
        above = [r["above_weights_gib"] for r in ordered]
        work = [r["tflop_per_step"] for r in ordered]
        assert all(_positive(v) for v in above + work), ordered
        assert above == sorted(above, reverse=True) and above[0] > above[-1], above
        assert work == sorted(work) and work[-1] > 1.1 * work[0], work
    # the encoders are off the GPU for training (the recipe), so they are not counted as resident
    argv = ["--model", "tiny", "--device", "cpu", "--set", "runtime.dtype=fp32"]
    kept = checkpointing.main([*argv, "--set", "runtime.offload_encoders=false", "--out", str(tmp_path / "kept.json")])
    # runtime.offload_idle keeps them off as well (the count follows Model.place), encoder offload or not
    idle = ["--set", "runtime.offload_idle=true", "--set", "runtime.offload_encoders=false"]
    placed = checkpointing.main([*argv, *idle, "--out", str(tmp_path / "idle.json")])
    for offloaded, idle_row in zip(rows, placed, strict=True):
        assert idle_row["resident_gib"] == pytest.approx(offloaded["resident_gib"], abs=1e-9)
    pipe = build_pipeline("tiny")
    parts = (pipe.vae, pipe.text_encoder)
    encoders = sum(t.numel() * t.element_size() for m in parts for t in [*m.parameters(), *m.buffers()])
    for offloaded, on_device in zip(rows, kept, strict=True):
        assert (on_device["resident_gib"] - offloaded["resident_gib"]) * 2**30 == pytest.approx(encoders, rel=1e-6)
        assert on_device["above_weights_gib"] == pytest.approx(offloaded["above_weights_gib"], abs=1e-6)


def test_result_files_are_written_whole(tmp_path):
    from pathlib import Path

    from benchmarks.output import write_json

    path = write_json(tmp_path / "new" / "r.json", {"model": Path("a/b"), "rows": [1.5]})
    assert json.loads(path.read_text()) == {"model": "a/b", "rows": [1.5]}
    assert [p.name for p in path.parent.iterdir()] == ["r.json"]  # no temporary file left beside it


def test_a_write_that_fails_part_way_keeps_the_old_file_and_leaves_no_temporary_one(tmp_path, monkeypatch):
    """Writing straight to the path (or not removing the temporary file) left half a file that looks complete."""
    from peftedit import files

    path = files.write_json(tmp_path / "r.json", {"rows": [1]})
    before = path.read_bytes()

    def half_then_full_disk(tmp):
        tmp.write_text('{"rows": [')
        raise OSError(28, "No space left on device")

    with pytest.raises(OSError, match="No space left"):
        files.write_atomic(path, half_then_full_disk)
    assert path.read_bytes() == before and [p.name for p in tmp_path.iterdir()] == ["r.json"]

    def refused(src, dst):
        raise PermissionError(13, "Permission denied")

    monkeypatch.setattr(os, "replace", refused)  # the whole new file written, the rename refused
    with pytest.raises(PermissionError):
        files.write_json(path, {"rows": [2]})
    assert path.read_bytes() == before and [p.name for p in tmp_path.iterdir()] == ["r.json"]


def test_savers_table_gives_time_changes_from_a_gpu_only():
    from benchmarks import savers

    def row(variant, device, seconds, recipe_seconds):
        return {
            "variant": variant,
            "method": "imagic",
            "stage": "lora",
            "status": "ok",
            "peak_gib": 3.0,
            "recipe_peak_gib": 3.0,
            "saver_buys_gib": 0.0,
            "seconds_per_step": seconds,
            "recipe_seconds_per_step": recipe_seconds,
            "device": device,
        }

    gpu = [row("recipe", "NVIDIA H100", 0.5, 0.5), row("compiled UNet", "NVIDIA H100", 0.4, 0.5)]
    assert "3 (+0) time -20%" in savers.markdown(gpu)
    cpu = [row("recipe", "cpu", 5.0, 5.0), row("channels-last UNet", "cpu", 4.0, 5.0)]
    assert "time" not in savers.markdown(cpu)


def test_compile_limits_fail_loudly_instead_of_timing_eager_steps():
    import torch

    from benchmarks import memory

    before = torch._dynamo.config.recompile_limit, torch._dynamo.config.fail_on_recompile_limit_hit
    with memory.compile_limits(True):
        assert torch._dynamo.config.recompile_limit == memory.COMPILE_RECOMPILE_LIMIT
        assert torch._dynamo.config.fail_on_recompile_limit_hit
    assert (torch._dynamo.config.recompile_limit, torch._dynamo.config.fail_on_recompile_limit_hit) == before
    with memory.compile_limits(False):
        assert torch._dynamo.config.recompile_limit == before[0]


@pytest.mark.slow
def test_every_stage_runs_with_a_compiled_unet(tmp_path, one_thread):
    """The savers' "compiled UNet" variant on a tiny model: every stage's graphs fit the recompile limit, and the
    per-call clock still ticks once per UNet call (inductor: needs a C compiler, minutes on a CPU)."""
    argv = ["--model", "tiny", "--device", "cpu", "--steps", "3", "--warmup", "1", "--no-baseline"]
    rows = memory.main(
        [*argv, "--set", "runtime.dtype=fp32", "--set", "runtime.compile=true", "--out", str(tmp_path / "r.json")]
    )
    assert {(r["method"], r["stage"]) for r in rows} == {(m, s) for m in STAGES for s in STAGES[m]}
    assert all(r["status"].startswith("ok") for r in rows), [r["status"] for r in rows]
    assert all(r["seconds_per_step"] > 0 for r in rows if r["stage"] != "pipeline")


def test_savers_estimate_what_keeping_idle_parts_off_the_gpu_buys(tmp_path, one_thread):
    """``runtime.offload_idle`` on a CPU (hooks in the live-tensor count): renders and edits no longer hold the
    encoders while the UNet samples; the training stages, whose encoders are already off, do not move."""
    from benchmarks import savers

    # one step per stage: what is resident when a stage starts is what differs, not anything a second step does
    common = ["--device", "cpu", "--steps", "1", "--warmup", "0", "--set", "runtime.dtype=fp32"]
    argv = ["--model", "tiny", *common, "--out", str(tmp_path / "s.json")]
    rows = savers.main([*argv, "--variants", "idle parts off the GPU"])
    idle = {(r["method"], r["stage"]): r for r in rows if r["variant"] == "idle parts off the GPU"}
    pipe = build_pipeline("tiny")
    encoders = sum(t.numel() * t.element_size() for m in (pipe.vae, pipe.text_encoder) for t in m.parameters())
    for (method, stage), row in idle.items():
        saved = -row["saver_buys_gib"] * 2**30
        if stage in ("render", "edit"):
            assert saved >= 0.99 * encoders, (method, stage, saved)
        elif stage != "pipeline":
            assert saved == 0, (method, stage, saved)
    # the other way round on the SDXL layout, whose recipes have it on; the variant equal to the recipe is not run
    argv = ["--model", "tiny-xl", *common, "--out", str(tmp_path / "x.json")]
    rows = savers.main([*argv, "--variants", "idle parts off the GPU", "every part kept on the GPU"])
    assert {r["variant"] for r in rows} == {"recipe", "every part kept on the GPU"}
    kept = {(r["method"], r["stage"]): r for r in rows if r["variant"] == "every part kept on the GPU"}
    assert all(not r["runtime"]["offload_idle"] for r in kept.values())
    assert kept[("imagic", "render")]["saver_buys_gib"] > 0 and kept[("null-text", "edit")]["saver_buys_gib"] > 0


def _out_of_memory(*args, **kwargs):
    raise torch.OutOfMemoryError(
        "CUDA out of memory. Tried to allocate 14.00 GiB. GPU 0 has a total capacity of 24 GiB"
    )


def test_baselines_out_of_memory_outside_their_stages_are_rows(monkeypatch):
    """The fp32 model not fitting the GPU (SDXL's baselines on a small card) gives each baseline stage a row that says
    so, and the run goes on to write our rows with them; other failures still stop it."""
    monkeypatch.setattr(memory, "load_model", _out_of_memory)
    args = argparse.Namespace(device="cpu", methods=["imagic", "nulltext"])
    rows = memory.run_baseline(Path("unused"), args, None)
    assert [(r.method, r.stage) for r in rows] == [("imagic", s) for s in ("embedding", "lora", "render")] + [
        ("null-text", s) for s in ("pivot", "null-optimization", "edit")
    ]
    assert all(r.out_of_memory and r.measurement is None for r in rows)
    assert all(r.status.startswith("not measured: out of memory (CUDA out of memory. Tried") for r in rows)
    again = memory.run_baseline(Path("unused"), argparse.Namespace(device="cpu", methods=["imagic"]), None)
    assert [(r.method, r.stage) for r in again] == [("imagic", s) for s in ("embedding", "lora", "render")]
    monkeypatch.setattr(memory, "load_model", _stop)
    with pytest.raises(_Stopped):
        memory.run_baseline(Path("unused"), args, None)


def test_rows_mark_a_baseline_stage_out_of_memory():
    """The baseline's fine-tune out of memory: its row and the baseline pipeline (a lower bound: the reference's whole
    run does not fit) say so, and no ratio is made from the missing peak."""
    from benchmarks.measure import Measurement, StageResult

    measured = Measurement(peak_allocated_gib=5.0, peak_reserved_gib=6.0, seconds_per_step=0.5)
    ours = [StageResult("imagic", s, measured) for s in ("pipeline", "lora", "render")]
    oom = StageResult("imagic", "lora", status="out of memory (CUDA out of memory.); did not fit this device")
    oom.out_of_memory, oom.out_of_memory_at_gib = True, 78.5
    baseline = [oom, StageResult("imagic", "render", Measurement(peak_reserved_gib=20.0, seconds_per_step=1.0))]
    facts = {"device": torch.device("cpu"), "resolution": 1024, "dtype": "float16", "attention": "x", "parameters": {}}
    args = argparse.Namespace(model="sdxl", steps=6, warmup=2, command="python -m benchmarks.memory")
    rows = {r["stage"]: r for r in memory.make_rows(ours, baseline, facts, args, None)}
    lora, whole, render = rows["lora"], rows["pipeline"], rows["render"]
    assert lora["baseline_out_of_memory"] and lora["baseline_out_of_memory_at_gib"] == 78.5
    assert lora["baseline_status"].startswith("out of memory") and lora["memory_ratio"] is None
    assert whole["baseline_out_of_memory"] and whole["baseline_status"] == "lower bound: lora out of memory"
    assert whole["baseline_peak_reserved_gib"] == 20.0  # what was measured: a lower bound
    assert not render["baseline_out_of_memory"] and render["memory_ratio"] == 6.0 / 20.0
    assert not any(r["out_of_memory"] for r in rows.values())
    assert "baseline out of memory" in memory.markdown(list(rows.values()))


class _Stopped(Exception):
    """Stands in for the device tool's time limit killing a run part way."""


def _stop(*args, **kwargs):
    raise _Stopped


def test_a_run_stopped_in_the_baselines_keeps_our_rows(tmp_path, monkeypatch, one_thread):
    monkeypatch.setattr(memory, "run_baseline", _stop)
    out = tmp_path / "r.json"
    argv = ["--model", "tiny", "--device", "cpu", "--steps", "2", "--warmup", "1", "--methods", "imagic"]
    with pytest.raises(_Stopped):
        memory.main([*argv, "--set", "runtime.dtype=fp32", "--no-track-tensors", "--out", str(out)])
    rows = json.loads(out.read_text())
    assert {r["stage"] for r in rows} == STAGES["imagic"]
    assert all(r["status"] == "ok" and r["baseline_status"].startswith("pending") for r in rows)


def test_a_run_stopped_in_our_null_text_stages_keeps_the_imagic_rows(tmp_path, monkeypatch, one_thread):
    """Our rows were written only once all our methods had run: a time limit hit in null-text lost Imagic's too."""
    monkeypatch.setattr(memory.nulltext_bench, "ours", _stop)
    out = tmp_path / "r.json"
    argv = ["--model", "tiny", "--device", "cpu", "--steps", "2", "--warmup", "1", "--no-track-tensors"]
    with pytest.raises(_Stopped):
        memory.main([*argv, "--set", "runtime.dtype=fp32", "--inner-steps", "1", "--out", str(out)])
    rows = json.loads(out.read_text())
    assert {r["stage"] for r in rows} == STAGES["imagic"] and {r["method"] for r in rows} == {"imagic"}
    assert all(r["status"] == "ok" and r["baseline_status"].startswith("pending") for r in rows)


def test_a_savers_run_stopped_part_way_keeps_the_variants_done(tmp_path, monkeypatch, one_thread):
    from benchmarks import savers

    real, calls = memory.main, []

    def second_stops(argv):
        calls.append(argv)
        return real(argv) if len(calls) == 1 else _stop()

    monkeypatch.setattr(memory, "main", second_stops)
    out = tmp_path / "savers.json"
    argv = ["--model", "tiny", "--device", "cpu", "--methods", "imagic", "--set", "runtime.dtype=fp32"]
    with pytest.raises(_Stopped):
        savers.main([*argv, "--variants", "no gradient checkpointing", "--out", str(out)])
    rows = json.loads(out.read_text())
    assert {r["variant"] for r in rows} == {"recipe"} and {r["stage"] for r in rows} == STAGES["imagic"]


def test_versions_name_peftedit_when_it_runs_from_a_checkout(monkeypatch):
    """On the GPU machine peftedit is on PYTHONPATH, not installed: its rows still say which version ran."""
    from peftedit import __version__, artifacts

    real = artifacts.importlib_metadata.version

    def version(name):
        if name == "peftedit":
            raise artifacts.importlib_metadata.PackageNotFoundError(name)
        return real(name)

    monkeypatch.setattr(artifacts.importlib_metadata, "version", version)
    assert artifacts.package_versions()["peftedit"] == f"{__version__} (not installed)"


def test_every_command_of_the_gpu_run_parses(tmp_path):
    """Device calls are scarce (30 minutes a session): each command gpu_run.sh would run there parses with its
    benchmark's own parser here, so a misspelt option or variant fails in CI, not in a device call."""
    steps = ["smoke", "sd15", "sd21", "sdxl", "savers", "options", "compiled", "tracked", "checkpointing"]
    script = Path(__file__).resolve().parents[1] / "benchmarks" / "gpu_run.sh"
    env = {**os.environ, "GPU_RUN_DRY": "1", "OUT": str(tmp_path)}
    done = subprocess.run(["bash", str(script), *steps], env=env, capture_output=True, text=True, check=True)
    commands = [block.split("\n") for block in done.stdout.strip("\n").split("\n\n")]
    parsers = {"benchmarks.memory": memory, "benchmarks.savers": savers, "benchmarks.checkpointing": checkpointing}
    for module, *argv in commands:
        if module == "pytest":
            assert argv[:2] == ["-m", "gpu"]
            continue
        args = parsers[module].parse_args(argv)
        assert args.device == "cuda" and args.out.parent == tmp_path, argv
    assert [c[0] for c in commands].count("pytest") == 1 and len(commands) == 11
    models = [parsers[module].parse_args(argv).model for module, *argv in commands if module != "pytest"]
    assert {"tiny", "tiny-xl", "sd15", "sd21", "sdxl"} <= set(models)
    refused = subprocess.run(["bash", str(script), "smoke", "sd51"], env=env, capture_output=True, text=True)
    assert refused.returncode == 2 and "unknown step: sd51" in refused.stderr and not refused.stdout


def test_vae_decode_counts_more_bytes_for_the_fp32_decode(tmp_path):
    from benchmarks import vae_decode

    rows = vae_decode.main(["--model", "tiny-xl", "--out", str(tmp_path / "vae.json")])
    fp32, bf16 = rows
    assert (fp32["dtype"], bf16["dtype"]) == ("fp32", "bf16")
    assert fp32["resolution"] == vae_decode.resolution("tiny-xl")
    assert fp32["decode_peak_gib"] > fp32["weights_gib"] > 0
    assert fp32["decode_peak_gib"] > bf16["decode_peak_gib"]  # 2.0x at SDXL's size; fixed costs weigh more here
    assert fp32["encode_peak_gib"] > fp32["weights_gib"] and fp32["encode_peak_gib"] > bf16["encode_peak_gib"]
    assert json.loads((tmp_path / "vae.json").read_text()) == rows
