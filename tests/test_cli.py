"""The command line end to end on a tiny model: fit, re-render, inspect, and one-line errors that leave nothing."""

from __future__ import annotations

import contextlib
import io
import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import huggingface_hub.constants
import numpy as np
import pytest
import torch
from cli_run import cache_snapshot, network_refused, one_line_error, run_cli
from PIL import Image
from safetensors.torch import load_file, save_file

from peftedit import hub
from peftedit.cli import main

FAST = ["--set", "render_steps=6", "--set", "preview_etas=[0.6]", "--set", "runtime.device=cpu"]


@pytest.fixture(scope="module")
def made_edit(eps_dir, shared_photo, tmp_path_factory):
    """One small Imagic edit made through the CLI for the module (a run was ~2 s, and ~20 tests took one each)."""
    from peftedit.cli import main

    out = tmp_path_factory.mktemp("made") / "adapters" / "edit"
    steps = ["--embedding-steps", "20", "--finetune-steps", "20"]
    argv = ["imagic", str(shared_photo), "a photo of a red circle", "--model", str(eps_dir), "-o", str(out)]
    with contextlib.redirect_stdout(io.StringIO()) as stdout:
        assert main(["--quiet", *argv, *steps, *FAST]) == 0
    assert "saved" in stdout.getvalue()
    return out


@pytest.fixture
def edit_dir(made_edit, tmp_path):
    """A copy of ``made_edit`` at tmp_path/adapters/edit, the test's own to change or damage."""
    out = tmp_path / "adapters" / "edit"
    shutil.copytree(made_edit, out)
    return out


def _leftovers(folder):
    return [p.name for p in folder.iterdir() if p.name.startswith(".")] if folder.exists() else []


def test_imagic_writes_a_complete_folder_and_edit_rerenders_identically(edit_dir, tmp_path, capsys):
    names = {p.name for p in edit_dir.iterdir()}
    assert names == {"edit.safetensors", "pytorch_lora_weights.safetensors", "preview.png", "README.md"}
    assert not _leftovers(edit_dir.parent)
    (tmp_path / "plain").touch()  # shareable: every file has the mode of a plain new file (safetensors makes 0600)
    plain = (tmp_path / "plain").stat().st_mode & 0o777
    assert {p.name: p.stat().st_mode & 0o777 for p in edit_dir.iterdir()} == dict.fromkeys(names, plain)
    first, second = tmp_path / "a.png", tmp_path / "b.png"
    for target in (first, second):
        code, out, err = run_cli(capsys, "edit", edit_dir, "--eta", 0.6, "--seed", 2, "--steps", 6, "-o", target)
        assert code == 0, err
    assert np.array_equal(np.asarray(Image.open(first)), np.asarray(Image.open(second)))


def test_inspect_reports_the_edit(edit_dir, capsys):
    code, out, _ = run_cli(capsys, "inspect", edit_dir, "--json")
    info = json.loads(out)
    assert code == 0 and info["method"] == "imagic"
    assert info["prompts"]["target"] == "a photo of a red circle"
    assert info["recipe"]["imagic"]["embedding_steps"] == 20
    assert info["tensors"]["e_opt"] == [1, 77, 32]
    code, out, _ = run_cli(capsys, "inspect", edit_dir)
    assert code == 0 and "lora" in out
    lines = {line[:17].strip(): line[17:].strip() for line in out.splitlines()}
    assert lines["prompts"] == "target='a photo of a red circle'"  # it was a Python dict
    shown = ", ".join(f"{k}={v:.4g}" for k, v in info["losses"].items())  # it was every digit of a float
    assert lines["losses"] == shown and len(shown) < 40, shown


@pytest.mark.parametrize("kind", [ValueError, OSError])
def test_a_library_error_over_several_lines_is_still_one_line(kind, tmp_path, capsys, monkeypatch):
    """A third-party message spanning lines (torch's, safetensors') printed as a block under "peftedit: error:"."""
    from peftedit.artifacts import Artifact

    def fails(folder):
        raise kind("header too large:\n  expected at most 100 MB\n\n  got 4 GB\n")

    monkeypatch.setattr(Artifact, "load", staticmethod(fails))
    code, _, err = run_cli(capsys, "inspect", tmp_path)
    one_line_error(code, err, "peftedit: error: header too large: expected at most 100 MB got 4 GB\n")


@pytest.mark.parametrize(
    "args, fragments",
    [
        (["missing.png", "a dog"], ["image not found"]),
        (["missing.png", "a dog", "--model", "{tmp}/no-model"], ["image not found"]),  # checked before the model
        (["{photo}", "  ", "--model", "{tmp}/no-model"], ["prompt is empty"]),
        (["{photo}", "   "], ["prompt is empty"]),
        (["{photo}", "a dog", "--set", "imagic.lora_rnak=4"], ["unknown key imagic.lora_rnak"]),
        (["{photo}", "a dog", "--recipe", "nope"], ["recipe 'nope' not found"]),
        (["{photo}", "a dog", "--model", "{tmp}/weights.ckpt"], ["pickle checkpoints are not loaded"]),
        (["{photo}", "a dog", "--model", "{tmp}"], ["not a diffusers model folder"]),
        (["{photo}", "a dog", "--seed", "99999999999999999999999"], ["runtime.seed = 99999999999999999999999 is out"]),
    ],
)
def test_bad_imagic_input_is_one_line_and_leaves_nothing(args, fragments, eps_dir, photo, tmp_path, capsys):
    args = [a.format(photo=photo, tmp=tmp_path) for a in args]
    if "--model" not in args:
        args += ["--model", str(eps_dir)]
    out = tmp_path / "adapters" / "x"
    code, _, err = run_cli(capsys, "imagic", *args, "-o", out, "--embedding-steps", 2, "--finetune-steps", 2, *FAST)
    one_line_error(code, err, *fragments)
    assert not out.exists() and not _leftovers(out.parent)


def test_nan_loss_stops_naming_the_stage(eps_dir, photo, tmp_path, capsys, monkeypatch):
    import torch

    from peftedit.methods import imagic

    real = imagic.denoising_loss
    monkeypatch.setattr(imagic, "denoising_loss", lambda *a: real(*a) * torch.tensor(float("nan")))
    out = tmp_path / "adapters" / "nan"
    code, _, err = run_cli(capsys, "imagic", photo, "a red circle", "--model", eps_dir, "-o", out, *FAST)
    one_line_error(code, err, "stage 1/2 (embedding)", "nan", "embedding_lr")
    assert "runtime.dtype=fp32" not in err  # the model already runs in fp32 on the CPU
    assert not out.exists() and not _leftovers(out.parent)


def test_a_last_update_that_breaks_the_trained_values_stops_saving(eps_dir, photo, tmp_path, capsys, monkeypatch):
    """The loss is checked before each step, so the last step's update went unchecked into the saved edit."""
    from peftedit.methods import imagic

    real, calls = imagic.descend, []

    def last_update_breaks(optimizer, *args):
        real(optimizer, *args)
        calls.append(1)
        if len(calls) == 2:  # stage 1's second and last step
            for group in optimizer.param_groups:
                for param in group["params"]:
                    param.data.fill_(float("nan"))

    monkeypatch.setattr(imagic, "descend", last_update_breaks)
    out = tmp_path / "adapters" / "nan"
    args = ["--embedding-steps", 2, "--finetune-steps", 2, *FAST]
    code, _, err = run_cli(capsys, "imagic", photo, "a red circle", "--model", eps_dir, "-o", out, *args)
    one_line_error(code, err, "stage 1/2 (embedding): the trained values are not finite after step 1", "embedding_lr")
    assert not out.exists() and not _leftovers(out.parent)


def test_a_bad_loss_before_the_adapter_moves_blames_stage_1(eps_dir, photo, tmp_path, capsys, monkeypatch):
    import torch

    from peftedit.methods import imagic

    real = imagic.denoising_loss

    def stage_2_nan(unet, scheduler, latent, cond, generator):  # stage 2 trains the LoRA, not the embedding
        loss = real(unet, scheduler, latent, cond, generator)
        return loss if cond.requires_grad else loss * torch.tensor(float("nan"))

    monkeypatch.setattr(imagic, "denoising_loss", stage_2_nan)
    out = tmp_path / "adapters" / "nan"
    stage_1 = ["--set", "embedding_steps=3"]  # stage 1 done (the recipe's 500 steps took most of this test's time)
    code, _, err = run_cli(capsys, "imagic", photo, "a red circle", "--model", eps_dir, "-o", out, *FAST, *stage_1)
    one_line_error(code, err, "stage 2/2 (LoRA fine-tune): loss became nan at step 0", "lower imagic.embedding_lr")
    assert not out.exists() and not _leftovers(out.parent)


def test_running_out_of_gpu_memory_is_one_line_with_what_to_try(eps_dir, photo, tmp_path, capsys, monkeypatch):
    """On an 8 GB card the likeliest failure printed torch's traceback; other errors still do (they are bugs)."""
    import torch

    from peftedit.methods import imagic

    said = "CUDA out of memory. Tried to allocate 2.00 GiB. GPU 0 has a total capacity of 7.79 GiB of which 1.0 GiB"

    def oom(*args):
        raise torch.OutOfMemoryError(said + " is free.\nIf reserved but unallocated memory is large ...")

    monkeypatch.setattr(imagic, "denoising_loss", oom)
    out = tmp_path / "adapters" / "oom"
    code, _, err = run_cli(capsys, "imagic", photo, "a red circle", "--model", eps_dir, "-o", out, *FAST)
    one_line_error(code, err, "out of memory (CUDA out of memory. Tried to allocate 2.00 GiB);", "sd15-8gb")
    assert not out.exists() and not _leftovers(out.parent)

    def bug(*args):
        raise RuntimeError("mat1 and mat2 shapes cannot be multiplied")

    monkeypatch.setattr(imagic, "denoising_loss", bug)
    with pytest.raises(RuntimeError, match="mat1"):
        run_cli(capsys, "imagic", photo, "a red circle", "--model", eps_dir, "-o", out, *FAST)


def test_running_out_of_host_memory_in_edit_says_so_with_edit_advice(edit_dir, tmp_path, capsys, monkeypatch):
    """torch's CPU allocator raises a plain RuntimeError; edit takes no recipe, so the advice must not name one (it
    names edit's --set runtime.offload_idle=true)."""
    from peftedit.methods import imagic

    def oom(*args, **kwargs):
        raise RuntimeError("[enforce fail at alloc_cpu.cpp:127] . DefaultCPUAllocator: not enough memory: you tried")

    monkeypatch.setattr(imagic, "render", oom)
    code, _, err = run_cli(capsys, "edit", edit_dir, "-o", tmp_path / "x.png")
    one_line_error(code, err, "out of memory ([enforce fail", "--set runtime.offload_idle=true")
    assert "--recipe" not in err and not (tmp_path / "x.png").exists()


def test_list_option_elements_are_checked_before_loading(eps_dir, photo, tmp_path, capsys):
    """A list option with an element of the wrong type failed only after training, without naming the key."""
    out = tmp_path / "adapters" / "x"
    args = ["imagic", photo, "a dog", "--model", eps_dir, "-o", out, "--set", "runtime.device=cpu"]
    code, _, err = run_cli(capsys, *args, "--set", 'imagic.preview_etas=["a"]')
    one_line_error(code, err, "imagic.preview_etas[0] = 'a' must be a number")
    code, _, err = run_cli(capsys, *args, "--set", 'lora_targets=["conv", 2]')
    one_line_error(code, err, "imagic.lora_targets[1] = 2 must be a string")
    assert not out.exists()


def test_long_prompt_warns_in_one_short_line(eps_dir, photo, tmp_path, capsys):
    text = "a photo of a red circle " + "on a bench " * 30 + "zebra"
    code, _, err = run_cli(
        capsys,
        "imagic",
        photo,
        text,
        "--model",
        eps_dir,
        "-o",
        tmp_path / "long",
        "--embedding-steps",
        1,
        "--finetune-steps",
        1,
        *FAST,
    )
    assert code == 0
    (line,) = [line for line in err.splitlines() if "dropped" in line]
    assert "prompt is 101 tokens, the text encoder reads 75: the last 26 are dropped ('on a bench on a bench …')" in (
        line
    )


def test_long_prompt_warning_stays_short(tokenizer_dir, caplog):
    """The warning quoted every dropped word: 5,252 characters for a 500-word prompt."""
    from transformers import CLIPTokenizer

    from peftedit.diffusion import check_prompt

    tokenizer = CLIPTokenizer.from_pretrained(str(tokenizer_dir))
    with caplog.at_level("WARNING", logger="peftedit"):
        check_prompt(tokenizer, "a photo of a red circle " + "on a bench " * 165)
        check_prompt(tokenizer, "a photo of a red circle " + "on a bench " * 23 + "dog")
    long, one = [record.getMessage() for record in caplog.records]
    assert len(long) < 120 and "\n" not in long and "the last 426 are dropped" in long, long
    assert one.endswith("the last token is dropped ('dog')"), one


@pytest.mark.skipif(not Path("/proc/self").is_dir(), reason="needs Linux's /proc")
def test_an_output_folder_that_takes_no_files_is_refused_before_any_work(edit_dir, capsys):
    """os.access said /proc was writable (as root, which CI is): the render ran and only its save failed."""
    code, _, err = run_cli(capsys, "edit", edit_dir, "-o", "/proc/edit.png")
    one_line_error(code, err, "cannot write /proc/edit.png: /proc is not writable")


def test_several_etas_and_seeds_render_a_labelled_grid_of_the_single_renders(edit_dir, tmp_path, capsys, monkeypatch):
    """Choosing eta is Imagic's one knob: a row per seed and a column per eta, each cell the render on its own."""
    monkeypatch.chdir(tmp_path)  # the default picture name is in the working folder
    code, out, err = run_cli(capsys, "edit", "--eta", "0.5,0.9", "--seed", "0,1", edit_dir, "--steps", 4)
    assert code == 0, err
    sheet = Image.open(out.split("wrote ", 1)[1].strip())
    assert out.strip().endswith("edit-eta0.5_0.9-seed0_1.png")
    for row, column, eta, seed in ((1, 1, 0.9, 1), (0, 1, 0.9, 0)):  # off the diagonal: rows are seeds, not etas
        one = tmp_path / f"eta{eta}-seed{seed}.png"
        code, _, err = run_cli(capsys, "edit", edit_dir, "--eta", eta, "--seed", seed, "--steps", 4, "-o", one)
        assert code == 0, err
        single = Image.open(one).convert("RGB")
        cell = max(128, single.width)  # images.grid enlarges small renders to 128 px cells, under a 14 px label
        row_height = 16 + cell + 14  # images.sheet: a 16 px caption ("seed 1") over each row
        assert sheet.size == (2 * cell, 2 * row_height)
        top = row * row_height + 16
        picked = sheet.crop((column * cell, top, (column + 1) * cell, top + cell))
        assert np.array_equal(np.array(picked), np.array(single.resize((cell, cell), Image.NEAREST))), (eta, seed)


def test_a_grid_keeps_the_renders_that_did_not_diverge(edit_dir, tmp_path, capsys):
    """One eta too large for the model cost the whole grid (an error, nothing written); now its cells are grey and
    labelled, with a warning, and the other cells are kept."""
    out = tmp_path / "grid.png"
    code, _, err = run_cli(capsys, "edit", edit_dir, "--eta", "0.9,1e30", "--steps", 4, "-o", out)
    assert code == 0, err
    assert "render eta 1e+30: the render diverged" in err
    code, _, err = run_cli(capsys, "edit", edit_dir, "--eta", 0.9, "--steps", 4, "-o", tmp_path / "one.png")
    assert code == 0, err
    single = Image.open(tmp_path / "one.png").convert("RGB")
    cell = max(128, single.width)
    sheet = np.array(Image.open(out).convert("RGB"))
    kept = sheet[16 : 16 + cell, :cell]
    assert np.array_equal(kept, np.array(single.resize((cell, cell), Image.NEAREST)))
    assert (sheet[16 : 16 + cell, cell : 2 * cell] == 128).all()  # the diverged cell: grey
    code, _, err = run_cli(capsys, "edit", edit_dir, "--eta", "1e30,1e31", "--steps", 4, "-o", tmp_path / "none.png")
    one_line_error(code, err, "the render diverged")  # every cell diverged: an error
    assert not (tmp_path / "none.png").exists()


def test_bad_edit_settings_are_one_line_and_write_nothing(edit_dir, tmp_path, capsys):
    """--eta nan rendered an all-black PNG with exit 0; --seed overflowed inside torch."""
    out = tmp_path / "edit.png"
    for flags, fragment in (
        (["--eta", "nan"], "--eta = nan must be a finite number"),
        (["--eta=-inf"], "--eta = -inf must be a finite number"),
        (["--guidance", "nan"], "--guidance = nan must be a finite number"),
        (["--guidance", "-1"], "--guidance = -1.0 must be >= 0"),
        (["--steps", "0"], "--steps = 0 must be > 0"),
        (["--steps", "5000"], "steps = 5000 is more than the model's 1000 training timesteps"),
        (["--seed", "99999999999999999999999"], "--seed = 99999999999999999999999 is out of range"),
        (["--seed", "-3"], "--seed = -3 is out of range"),
        (["--eta", "0.6,nan"], "--eta = nan must be a finite number"),  # every value of a grid
        (["--seed", "0,-3"], "--seed = -3 is out of range"),
        (["--eta", "1e30"], "the render diverged: its latents are NaN or infinite; try a lower eta or guidance"),
        (["--guidance", "1e30"], "the render diverged: its latents are NaN or infinite"),  # both gave black PNGs
    ):
        code, _, err = run_cli(capsys, "edit", edit_dir, *flags, "-o", out)
        one_line_error(code, err, fragment)
        assert not out.exists() and not _leftovers(tmp_path)


def test_existing_output_is_not_overwritten(edit_dir, eps_dir, photo, capsys):
    before = (edit_dir / "edit.safetensors").read_bytes()
    code, _, err = run_cli(capsys, "imagic", photo, "a dog", "--model", eps_dir, "-o", edit_dir, *FAST)
    one_line_error(code, err, "already exists")
    assert (edit_dir / "edit.safetensors").read_bytes() == before


def test_damaged_edit_folders_are_refused(edit_dir, tmp_path, capsys):
    """Each damage is named by its own message ("checksum" alone matched either checksum error for either damage)."""
    import shutil

    def broken(name, damage):
        folder = tmp_path / name
        shutil.copytree(edit_dir, folder)
        damage(folder)
        return folder

    def tamper_tensor(folder):
        from safetensors import safe_open

        path = folder / "edit.safetensors"
        with safe_open(str(path), "pt") as handle:
            header = handle.metadata()
        tensors = load_file(str(path))
        tensors["e_opt"] = tensors["e_opt"] + 1
        save_file(tensors, str(path), metadata=header)

    def other_version(folder):
        from safetensors import safe_open

        path = folder / "edit.safetensors"
        with safe_open(str(path), "pt") as handle:
            header = dict(handle.metadata())
        header["peftedit.format_version"] = "99"
        save_file(load_file(str(path)), str(path), metadata=header)

    cases = [
        (broken("no-lora", lambda f: (f / "pytorch_lora_weights.safetensors").unlink()), "incomplete"),
        (broken("no-edit", lambda f: (f / "edit.safetensors").unlink()), "not a complete peftedit edit folder"),
        (
            broken("lora-bytes", lambda f: _flip_last_byte(f / "pytorch_lora_weights.safetensors")),
            "lora-bytes/pytorch_lora_weights.safetensors does not match its recorded checksum (modified or damaged)",
        ),
        (broken("tensor", tamper_tensor), "edit.safetensors: tensors do not match their recorded checksum"),
        (broken("garbage", lambda f: (f / "edit.safetensors").write_bytes(b"\x00" * 40)), "corrupt"),
        (broken("version", other_version), "format version 99"),
        (tmp_path / "nowhere", "edit folder not found"),
    ]
    for folder, fragment in cases:
        code, _, err = run_cli(capsys, "edit", folder, "-o", tmp_path / "out.png")
        one_line_error(code, err, fragment)
        assert not (tmp_path / "out.png").exists()


def _flip_last_byte(path):
    data = bytearray(path.read_bytes())
    data[-1] ^= 0xFF
    path.write_bytes(bytes(data))


def test_other_base_model_is_named_in_the_error(edit_dir, other_dir, eps_dir, tmp_path, capsys):
    from peftedit.models import demo_model_dir

    code, _, err = run_cli(capsys, "edit", edit_dir, "--model", other_dir, "-o", tmp_path / "x.png")
    one_line_error(
        code, err, "base model mismatch", str(eps_dir), str(other_dir), "(different weights)", "pass --model (model)"
    )
    demo = demo_model_dir()  # built otherwise
    code, _, err = run_cli(capsys, "edit", edit_dir, "--model", demo, "-o", tmp_path / "x.png")
    one_line_error(code, err, "base model mismatch", "(a different architecture)")
    code, _, err = run_cli(capsys, "edit", edit_dir, "a cat", "-o", tmp_path / "x.png")
    one_line_error(code, err, "drop the prompt")


def test_help_has_examples(capsys):
    with pytest.raises(SystemExit) as stop:
        main(["--help"])
    assert stop.value.code == 0
    assert "examples:" in capsys.readouterr().out


@pytest.mark.parametrize(
    "argv, said",
    [
        (["edit", "e", "--eta", "0.5,,0.6"], "argument --eta: '0.5,,0.6': give float values separated by commas"),
        (["frob"], "argument COMMAND: invalid choice: 'frob'"),
        (["generate"], "the following arguments are required: prompt"),
        (["generate", "a dog", "-o", ""], "-o/--output is empty"),
        (["edit", "e", "--save-attention", ""], "--save-attention is empty"),
        (["inspect", "e", "--bogus"], "unrecognized arguments: --bogus (see peftedit inspect --help)"),
    ],
)
def test_usage_mistakes_are_one_line(argv, said, capsys):
    """argparse's own errors printed its usage block, then "peftedit edit: error: ..."."""
    with pytest.raises(SystemExit) as stop:
        main(argv)
    err = capsys.readouterr().err
    assert stop.value.code == 2 and err.count("\n") == 1, err
    assert err.startswith(f"peftedit: error: {said}") and "--help)" in err, err


def test_help_gives_each_flags_key_and_default_and_lists_the_recipes_the_command_takes():
    """The help's defaults are the config dataclasses' (some flags had none, one its own copy of the number), and
    --recipe lists the shipped recipes made only of the command's tables, by name."""
    import tomllib

    from peftedit.cli import build_parser
    from peftedit.commands import recipe_sections
    from peftedit.config import RECIPES_DIR
    from peftedit.methods.p2p import Control

    commands = build_parser().commands  # each command's parser (main uses it for errors)
    helps = {
        name: {a.option_strings[-1]: a.help for a in p._actions if a.option_strings} for name, p in commands.items()
    }
    sections = recipe_sections()
    for command, flag, key in (
        ("imagic", "--embedding-steps", "imagic.embedding_steps"),
        ("imagic", "--seed", "runtime.seed"),
        ("invert", "--method", "nulltext.method"),
        ("invert", "--steps", "nulltext.steps"),
        ("invert", "--pivot-noise", "nulltext.pivot_noise"),
        ("invert", "--seed", "nulltext.seed"),
    ):
        table, _, name = key.partition(".")
        default = getattr(sections[table](), name)
        assert helps[command][flag].endswith(f" ({key}; default {default} unless the recipe sets it)"), flag
    for flag, name in (("--cross-replace", "cross_replace"), ("--self-replace", "self_replace")):
        assert helps["edit"][flag].endswith(f" (default {getattr(Control(), name)})"), flag
    recipes = {p.stem: set(tomllib.loads(p.read_text(encoding="utf-8"))) for p in sorted(RECIPES_DIR.glob("*.toml"))}
    for command, tables in (
        ("imagic", {"runtime", "imagic"}),
        ("invert", {"runtime", "nulltext"}),
        ("batch", {"runtime", "imagic", "nulltext"}),
    ):
        names = ", ".join(name for name, made_of in recipes.items() if made_of <= tables)
        assert names and helps[command]["--recipe"].startswith(f"a shipped recipe ({names}) or a .toml path"), command


@pytest.mark.parametrize("command", ["imagic", "invert", "edit", "inspect", "generate"])
def test_each_command_shows_its_own_examples(command, capsys):
    with pytest.raises(SystemExit):
        main([command, "--help"])
    examples = capsys.readouterr().out.split("examples:")[1]
    commands = {line.split()[1] for line in examples.splitlines() if line.strip().startswith("peftedit ")}
    assert commands == {command}


def test_debug_shows_the_traceback_and_keeps_the_exit_code(tmp_path, capsys):
    code = main(["--debug", "inspect", str(tmp_path / "missing")])
    err = capsys.readouterr().err
    assert code == 2
    assert "Traceback" in err and "edit folder not found" in err


def test_model_sources_dispatch_to_the_right_loader(tmp_path, monkeypatch, capsys):
    from diffusers import StableDiffusionPipeline

    seen = {}

    def fake_single_file(path, **kwargs):
        seen["single_file"] = (path, kwargs.get("config"))
        raise OSError("stop here")

    monkeypatch.setattr(StableDiffusionPipeline, "from_single_file", staticmethod(fake_single_file))
    checkpoint, configs = tmp_path / "model.safetensors", tmp_path / "cfg"
    save_file({"model.diffusion_model.out.0.weight": torch.zeros(2)}, str(checkpoint))
    configs.mkdir()
    (configs / "model_index.json").write_text(json.dumps({"_class_name": "StableDiffusionPipeline"}))
    out = tmp_path / "x.png"
    code, _, err = run_cli(
        capsys, "generate", "a dog", "--model", checkpoint, "--single-file-config", configs, "-o", out
    )
    assert seen["single_file"] == (str(checkpoint), str(configs.resolve()))
    one_line_error(code, err, "could not load model", "stop here")
    checkpoint.write_bytes(b"not a checkpoint")  # without configs the file's tensor names say which pipeline
    code, _, err = run_cli(capsys, "generate", "a dog", "--model", checkpoint, "-o", out)
    one_line_error(code, err, "not a readable .safetensors checkpoint")


def test_an_edit_from_a_single_checkpoint_file_re_renders_without_its_configs_again(
    eps_dir, photo, tmp_path, monkeypatch, capsys
):
    """A real LDM-layout file (the loader was tested with a stub only): `generate` on it crashed reading the folder's
    sampling advice, and `edit` needed --single-file-config again, which the edit can record."""
    from ldm_checkpoint import write_single_file

    from peftedit import Artifact, imagic, load_base

    checkpoint, configs = tmp_path / "tiny.safetensors", tmp_path / "configs"
    write_single_file(eps_dir, checkpoint)
    shutil.copytree(eps_dir, configs)
    single = ["--model", checkpoint, "--single-file-config", configs]
    for model, name in ((single, "g1.png"), (["--model", eps_dir], "g2.png")):
        assert run_cli(capsys, "generate", "a red circle", *model, "--steps", 3, "-o", tmp_path / name)[0] == 0
    assert np.array_equal(np.array(Image.open(tmp_path / "g1.png")), np.array(Image.open(tmp_path / "g2.png")))

    out = tmp_path / "edit"
    code, _, err = run_cli(capsys, "imagic", photo, "a red circle", *single, "-o", out, "--embedding-steps", 2,
                        "--finetune-steps", 2, *FAST)  # fmt: skip
    assert code == 0, err
    meta = Artifact.load(out).meta
    assert (meta["base_model"], meta["base_model_config"]) == (str(checkpoint.resolve()), str(configs.resolve()))
    pictures = []
    for model in ([], ["--model", eps_dir], ["--model", checkpoint]):  # recorded; the same weights from their folder
        pictures.append(tmp_path / f"{len(pictures)}.png")
        code, _, err = run_cli(capsys, "edit", out, *model, "--eta", 0.6, "--steps", 4, "-o", pictures[-1])
        assert code == 0, err
    first = np.array(Image.open(pictures[0]))
    assert all(np.array_equal(first, np.array(Image.open(p))) for p in pictures[1:])
    edit = Artifact.load(out)
    base = load_base(edit, settings={"offload_idle": True})  # the API's way to what `edit` loads
    assert (base.name, base.single_file_config) == (str(checkpoint.resolve()), str(configs.resolve()))
    assert base.runtime.offload_idle and not base.runtime.compile
    assert np.array_equal(first, np.array(imagic.render(base, edit, eta=0.6, steps=4)))
    assert f"base_model_config {configs.resolve()}" in run_cli(capsys, "inspect", out)[1]
    configs.rename(tmp_path / "moved")
    code, _, err = run_cli(capsys, "edit", out, "-o", tmp_path / "x.png")
    gone = f"{out}: its base model's configs were in {configs.resolve()}, which is gone"
    one_line_error(code, err, f"{gone}; pass --single-file-config (single_file_config)")
    given = load_base(edit, single_file_config=str(tmp_path / "moved"))  # given: over the recorded ones
    assert given.single_file_config == str((tmp_path / "moved").resolve())

    network_refused(monkeypatch)  # without configs: diffusers' guess, neither cached nor reachable
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path / "hub"))
    code, _, err = run_cli(capsys, "generate", "a red circle", "--model", checkpoint, "-o", tmp_path / "g3.png")
    one_line_error(code, err, "(the configs of tiny.safetensors, guessed from its tensors) is not in the local")

    checkpoint.rename(tmp_path / "moved.safetensors")  # the base model moved: said so, not "not a hub id"
    code, _, err = run_cli(capsys, "edit", out, "-o", tmp_path / "x.png")
    one_line_error(
        code, err, f"its base model was at {checkpoint.resolve()}, which is gone; pass --model (model) with"
    )
    code, _, err = run_cli(capsys, "generate", "a red circle", "--model", checkpoint, "-o", tmp_path / "g3.png")
    one_line_error(code, err, f"model {str(checkpoint)!r} not found: no such folder or file")


def test_unreachable_hub_id_is_one_line_at_once(monkeypatch, capsys, tmp_path):
    """Offline, huggingface_hub retried for most of a minute (printing each retry), then blamed a missing
    model_index.json; and it reads HF_HUB_OFFLINE only when first imported."""
    tries = network_refused(monkeypatch)
    argv = ("generate", "a dog", "--model", "nobody-here/no-such-model", "-o", tmp_path / "x.png")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    code, _, err = run_cli(capsys, *argv)
    one_line_error(code, err, "'nobody-here/no-such-model' is not in the local Hugging Face cache, and HF_HUB_OFF")
    monkeypatch.delenv("HF_HUB_OFFLINE")
    code, _, err = run_cli(capsys, *argv)
    one_line_error(code, err, "not in the local Hugging Face cache and the hub cannot be reached (no network?)")
    assert "Retry" not in err and not (tmp_path / "x.png").exists()
    tries.clear()
    assert not hub.reachable() and len(tries) == 1  # one connection to the hub's host, refused
    monkeypatch.setenv("HTTPS_PROXY", "http://proxy.invalid:3128")  # the proxy resolves the host: not checked here
    assert hub.reachable() and len(tries) == 1


def test_a_cached_hub_id_loads_without_the_network(eps_dir, tmp_path):
    """A hub id the local Hugging Face cache holds loads from it with no request at all (huggingface_hub would ask
    the hub for updates first, and offline retry for most of a minute). In a fresh interpreter: the hub's cache
    folder is fixed when huggingface_hub is imported."""
    cache_snapshot(tmp_path / "hf" / "hub", "someone/tiny-sd", eps_dir)
    script = (
        "import socket, traceback\n"
        "tries = []\n"
        "def refuse(*args, **kwargs):\n"  # huggingface_hub's own agent registry fetch (once, no retries) aside
        "    if not any(f.filename.endswith('_detect_agent.py') for f in traceback.extract_stack()):\n"
        "        tries.append(args)\n"
        "    raise OSError('network blocked by the test')\n"
        "socket.getaddrinfo = socket.create_connection = refuse\n"
        "from peftedit import load_model\n"
        "model = load_model('someone/tiny-sd')\n"
        "print(model.name, type(model.pipe).__name__, len(tries))\n"
    )
    env = {k: v for k, v in os.environ.items() if not k.startswith(("HF_", "HUGGINGFACE_")) and "PROXY" not in k}
    env["HF_HOME"] = str(tmp_path / "hf")
    done = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    assert done.stdout.split() == ["someone/tiny-sd", "StableDiffusionPipeline", "0"]


def test_rerender_runtime_drops_compile_and_unknown_settings(caplog):
    from types import SimpleNamespace

    from peftedit.base import recorded_runtime

    made = {"device": "cuda", "dtype": "fp16", "attention": "xformers", "channels_last": True, "compile": True}
    runtime = recorded_runtime(SimpleNamespace(meta={"recipe": {"runtime": {**made, "from_the_future": 1}}}), "e")
    assert (runtime.device, runtime.dtype, runtime.channels_last, runtime.compile) == ("auto", "auto", True, False)
    assert runtime.attention == "auto"  # an xformers edit re-renders where xformers is missing
    assert "from_the_future" in caplog.text
    assert "rendering in" not in caplog.text  # fp16 made, fp32 here on the CPU: not less precise
    given = recorded_runtime(SimpleNamespace(meta={"recipe": {"runtime": made}}), "e", {"offload_idle": True})
    assert given.offload_idle and given.channels_last  # --set over the recorded ones
    fp32 = {**made, "dtype": "fp32"}
    recorded_runtime(SimpleNamespace(meta={"recipe": {"runtime": fp32}}), "e", {"device": "cpu", "dtype": "bf16"})
    assert "rendering in bf16; to match, --set runtime.dtype=fp32 (settings={'dtype': 'fp32'})" in caplog.text
    caplog.clear()  # "auto" recorded: meta.dtype says what it became
    auto = {"runtime": {**made, "dtype": "auto"}}
    recorded_runtime(SimpleNamespace(meta={"recipe": auto, "dtype": "fp32"}), "e", {"device": "cpu", "dtype": "bf16"})
    assert "the edit was made in fp32; rendering in bf16" in caplog.text
    older = recorded_runtime(SimpleNamespace(meta={"recipe": {"runtime": {"gradient_checkpointing": False}}}), "e")
    assert not older.gradient_checkpointing and not older.channels_last  # edits made before a setting existed


def test_a_mistake_in_load_base_settings_is_the_callers_not_damaged_metadata():
    """load_base(..., settings=) blamed a typo or a bad value in the caller's own settings on the edit ("damaged
    metadata: recorded runtime settings"), and took a training setting that `edit --set` refuses."""
    from types import SimpleNamespace

    from peftedit.base import recorded_runtime
    from peftedit.errors import ArtifactError, PeftEditError

    edit = SimpleNamespace(meta={"recipe": {"runtime": {"optimizer": "adamw"}}})
    for given, said in (
        ({"offload_idl": True}, "settings: 'offload_idl' is not a runtime setting"),
        ({"seed": 3}, "settings: 'seed' is a training setting; a render trains nothing"),
        ({"offload_idle": "yes"}, "runtime.offload_idle = 'yes' must be true or false"),
    ):
        with pytest.raises(PeftEditError, match=re.escape(said)) as caught:
            recorded_runtime(edit, "adapters/e", given)
        assert not isinstance(caught.value, ArtifactError) and "damaged" not in str(caught.value)
    with pytest.raises(PeftEditError) as caught:
        recorded_runtime(edit, "adapters/e", {"seed": 3})
    assert str(caught.value).endswith(  # the settings a render takes, not every runtime one
        "only these apply: device, dtype, attention, vae_slicing, channels_last, compile, offload_idle"
    )


def test_a_bad_recorded_runtime_names_the_edit_folder():
    """Only a format-1 edit (no header checksum) can carry a hand-changed setting; the error names the folder."""
    from types import SimpleNamespace

    from peftedit.base import recorded_runtime
    from peftedit.errors import ArtifactError

    for bad in ({"optimizer": "warp-drive"}, {"gradient_checkpointing": "often"}):
        with pytest.raises(ArtifactError, match=r"^adapters/old: damaged metadata: recorded runtime settings"):
            recorded_runtime(SimpleNamespace(meta={"recipe": {"runtime": bad}}), "adapters/old")


def test_edit_pictures_are_checked_before_any_work(edit_dir, tmp_path, capsys):
    """An existing picture is kept unless --overwrite; a folder, an unknown format or a path under a file are
    refused; all before the model loads (the bad --model would fail otherwise)."""
    existing = tmp_path / "existing.png"
    existing.write_bytes(b"precious")
    nowhere = ["--model", tmp_path / "no-model"]
    cases = [
        (existing, "already exists"),
        (tmp_path, "is a folder"),
        (tmp_path / "noext", "name a picture file"),
        (existing / "sub.png", "is a file, not a folder"),
    ]
    for output, fragment in cases:
        code, _, err = run_cli(capsys, "edit", edit_dir, *nowhere, "-o", output)
        one_line_error(code, err, fragment)
    code, _, err = run_cli(capsys, "edit", edit_dir, "--save-attention", existing, *nowhere, "-o", tmp_path / "n.png")
    one_line_error(code, err, "Prompt-to-Prompt options are for inversions")
    code, _, err = run_cli(capsys, "generate", "a dog", *nowhere, "-o", existing)
    one_line_error(code, err, "already exists")
    assert existing.read_bytes() == b"precious"
    code, _, err = run_cli(capsys, "edit", edit_dir, "--steps", 3, "-o", existing, "--overwrite")
    assert code == 0, err
    assert Image.open(existing).size[0] > 0


def test_imagic_output_under_a_file_is_refused_before_training(eps_dir, photo, tmp_path, capsys):
    afile = tmp_path / "afile"
    afile.write_text("x")
    code, _, err = run_cli(capsys, "imagic", photo, "a dog", "--model", tmp_path / "no-model", "-o", afile / "sub")
    one_line_error(code, err, "is a file, not a folder")


def test_options_after_the_command_and_progress_bars(edit_dir, tmp_path, capsys):
    code = main(["edit", str(edit_dir), "--steps", "3", "-o", str(tmp_path / "a.png")])
    _, err = capsys.readouterr()
    assert code == 0 and "render eta" in err  # the sampling bar (tqdm writes to stderr)
    code = main(["edit", str(edit_dir), "--steps", "3", "-o", str(tmp_path / "b.png"), "--quiet"])
    _, err = capsys.readouterr()
    assert code == 0 and "render eta" not in err
    for command in ("inspect", "generate"):
        with pytest.raises(SystemExit):
            main([command, "--help"])
        assert "examples:" in capsys.readouterr().out


def test_a_local_model_is_recorded_by_its_absolute_path(eps_dir, monkeypatch):
    from peftedit import RuntimeConfig, load_model

    monkeypatch.chdir(eps_dir.parent)
    model = load_model(eps_dir.name, RuntimeConfig(device="cpu"))
    assert model.name == str(eps_dir.resolve())


def test_broken_model_folders_and_missing_devices_are_one_line(tmp_path, capsys):
    folder = tmp_path / "empty-model"
    folder.mkdir()
    (folder / "model_index.json").write_text("{}")
    code, _, err = run_cli(capsys, "generate", "a dog", "--model", folder, "-o", tmp_path / "x.png")
    one_line_error(code, err, "could not load model")
    assert "--single-file-config" not in err  # advice for a single checkpoint file only, not a folder

    import torch

    from peftedit import RuntimeConfig
    from peftedit.errors import PeftEditError
    from peftedit.models import resolve_device

    if not torch.backends.mps.is_available():
        with pytest.raises(PeftEditError, match="MPS is not available"):
            resolve_device(RuntimeConfig(device="mps"))


def test_bad_generate_settings_are_one_line(eps_dir, tmp_path, capsys):
    out = tmp_path / "generated.png"
    for flags, fragment in (
        (["--seed", "99999999999999999999999"], "--seed = 99999999999999999999999 is out of range"),
        (["--guidance", "nan"], "--guidance = nan must be a finite number"),
        (["--steps", "-2"], "--steps = -2 must be > 0"),
    ):
        code, _, err = run_cli(capsys, "generate", "a dog", "--model", eps_dir, *flags, "-o", out)
        one_line_error(code, err, fragment)
        assert not out.exists()


def test_recipe_and_image_paths_of_the_wrong_kind_are_one_line(eps_dir, photo, tmp_path, capsys):
    not_text = tmp_path / "recipe.png"
    not_text.write_bytes(b"\x89PNG\r\n\x1a\n\xff\xfe")
    out = tmp_path / "x"
    code, _, err = run_cli(capsys, "imagic", photo, "a dog", "--model", eps_dir, "--recipe", not_text, "-o", out)
    one_line_error(code, err, "recipe.png is not a text file")
    code, _, err = run_cli(capsys, "invert", photo, "a dog", "--model", eps_dir, "--recipe", "nope", "-o", out)
    one_line_error(code, err, "recipe 'nope' not found", "nulltext-sd15-8gb")
    assert "demo-train" not in err  # its [run] table is no use to invert
    code, _, err = run_cli(capsys, "imagic", tmp_path, "a dog", "--model", eps_dir, "-o", out)
    one_line_error(code, err, "is a folder, not an image file")


def test_default_picture_names_do_not_stop_a_second_render(edit_dir, tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    for guidance in (3, 4):
        code, out, err = run_cli(capsys, "edit", edit_dir, "--steps", 3, "--guidance", guidance)
        assert code == 0, err
    stem = f"{edit_dir.name}-eta"
    assert sorted(p.name for p in tmp_path.glob(f"{stem}*")) == [f"{stem}0.7-seed0-2.png", f"{stem}0.7-seed0.png"]
    code, _, err = run_cli(capsys, "edit", edit_dir, "--steps", 3, "-o", f"{stem}0.7-seed0.png")
    one_line_error(code, err, "already exists")  # a name given with -o is never renumbered


def test_edit_numbers_and_attention_file_are_checked_before_the_model_loads(edit_dir, tmp_path, capsys):
    nowhere = ["--model", tmp_path / "no-model", "-o", tmp_path / "x.png"]
    for flags, fragment in (
        (["--eta", "nan"], "--eta = nan must be a finite number"),
        (["--seed", "-1"], "--seed = -1 is out of range"),
        (["--steps", "0"], "--steps = 0 must be > 0"),
        (["--guidance", "inf"], "--guidance = inf must be a finite number"),
    ):
        code, _, err = run_cli(capsys, "edit", edit_dir, *flags, *nowhere)
        one_line_error(code, err, fragment)
    code, _, err = run_cli(capsys, "generate", "a dog", "--steps", "0", *nowhere)
    one_line_error(code, err, "--steps = 0 must be > 0")


def test_an_inversion_redone_in_place_from_inside_its_folder(eps_dir, photo, tmp_path, capsys, monkeypatch):
    folder = tmp_path / "inv"
    argv = ["invert", photo, "a red circle", "--model", eps_dir, "--method", "ddim", "--steps", 2]
    code, _, err = run_cli(capsys, *argv, "-o", folder)
    assert code == 0, err
    monkeypatch.chdir(folder)
    code, out, err = run_cli(capsys, *argv, "-o", ".", "--overwrite")
    assert code == 0, err
    assert not _leftovers(tmp_path)
    assert sorted(p.name for p in folder.iterdir()) == ["README.md", "edit.safetensors", "preview.png"]


def test_edit_run_inside_its_folder_writes_the_picture_beside_it(edit_dir, photo, tmp_path, capsys, monkeypatch):
    """`peftedit edit .` (the edit folder's README suggests it) wrote into the folder, and the picture then stopped
    `imagic ... -o <folder> --overwrite` from replacing the edit."""
    made = sorted(p.name for p in edit_dir.iterdir())
    monkeypatch.chdir(edit_dir)
    code, _, err = run_cli(capsys, "edit", ".", "--steps", 2)
    assert code == 0, err
    assert sorted(p.name for p in edit_dir.iterdir()) == made
    assert (edit_dir.parent / f"{edit_dir.name}-eta0.7-seed0.png").is_file()  # named after the folder, not "."
    monkeypatch.chdir(tmp_path)
    code, _, err = run_cli(capsys, "edit", edit_dir, "--steps", 2)
    assert code == 0, err
    assert (tmp_path / "edit-eta0.7-seed0.png").is_file()  # elsewhere: the current folder, as before
    assert "inside the edit folder" not in err
    inside = edit_dir / "mine.png"  # asked for: written, with a word on what it costs
    try:
        code, _, err = run_cli(capsys, "edit", edit_dir, "--steps", 2, "-o", inside)
        assert code == 0 and inside.is_file(), err
        assert f"warning: {inside} is inside the edit folder: --overwrite will no longer replace the folder" in err
    finally:
        inside.unlink(missing_ok=True)  # the edit folder is shared by other tests


def test_inspect_of_a_file_says_it_is_not_a_folder(photo, capsys):
    code, _, err = run_cli(capsys, "inspect", photo)
    one_line_error(code, err, "is a file; give the edit folder")


@pytest.fixture
def loaded(monkeypatch) -> list:
    """Every model the CLI loads in the test, in order."""
    from peftedit import base, models

    models_loaded: list = []
    real = models.load_model

    def recorded(*args, **kwargs):
        models_loaded.append(real(*args, **kwargs))
        return models_loaded[-1]

    for module in (models, base):  # edit loads through base.load_base
        monkeypatch.setattr(module, "load_model", recorded)
    return models_loaded


def test_generate_takes_runtime_settings(eps_dir, tmp_path, capsys, loaded):
    """`generate --set runtime.offload_idle=true` (SDXL in 8 GB) loads the model with it and draws the same picture;
    a key of another table, or no such key, is a one-line error before anything is written."""
    pictures = []
    for extra in ([], ["--set", "runtime.offload_idle=true"]):
        pictures.append(tmp_path / f"g{len(pictures)}.png")
        code, _, err = run_cli(capsys, "generate", "a red circle", "--model", eps_dir, "--steps", 3, *extra, "-o",
                            pictures[-1])  # fmt: skip
        assert code == 0, err
    assert [m.runtime.offload_idle for m in loaded] == [False, True]
    assert loaded[1].on_device == ("vae",)  # the decode ran last
    assert np.array_equal(np.array(Image.open(pictures[0])), np.array(Image.open(pictures[1])))
    for bad, said in (
        ("imagic.lora_rank=4", "--set (overrides) imagic.lora_rank: unknown table 'imagic' (known: runtime)"),
        ("runtime.offload=true", "unknown key runtime.offload"),
        ("runtime.seed=4", "--set runtime.seed: generate trains nothing, so only these runtime settings apply"),
        ("optimizer=adamw", "--set runtime.optimizer: generate trains nothing"),
    ):
        code, _, err = run_cli(capsys, "generate", "a dog", "--model", eps_dir, "--set", bad, "-o", tmp_path / "x.png")
        one_line_error(code, err, said)
        assert not (tmp_path / "x.png").exists()


def test_edit_takes_runtime_settings_over_the_recorded_ones(edit_dir, tmp_path, capsys, loaded):
    """`edit --set runtime.offload_idle=true` (an SDXL edit on 8 GB: the recorded settings were all edit had) draws
    the same picture; a training setting or another table's key is a one-line error before anything is written."""
    pictures = []
    for extra in ([], ["--set", "runtime.offload_idle=true"]):
        pictures.append(tmp_path / f"e{len(pictures)}.png")
        code, _, err = run_cli(capsys, "edit", edit_dir, "--steps", 3, *extra, "-o", pictures[-1])
        assert code == 0, err
    assert [m.runtime.offload_idle for m in loaded] == [False, True]
    assert np.array_equal(np.array(Image.open(pictures[0])), np.array(Image.open(pictures[1])))
    for bad, said in (
        ("runtime.gradient_checkpointing=false", "--set runtime.gradient_checkpointing: edit trains nothing"),
        ("imagic.eta=0.5", "--set (overrides) imagic.eta: unknown table 'imagic' (known: runtime)"),
        ("runtime.dtype=fp8", "runtime.dtype = 'fp8' is not one of"),
    ):
        code, _, err = run_cli(capsys, "edit", edit_dir, "--set", bad, "-o", tmp_path / "x.png")
        one_line_error(code, err, said)
        assert not (tmp_path / "x.png").exists()


def test_an_empty_prompt_is_named_before_its_default_folder_is_checked(photo, tmp_path, capsys, monkeypatch):
    """The empty prompt's default folder is adapters/<photo>, which an earlier edit may hold: the error said that
    folder already exists instead of naming the prompt."""
    monkeypatch.chdir(tmp_path)
    (tmp_path / "adapters" / Path(photo).stem).mkdir(parents=True)
    for command in ("imagic", "invert"):
        code, _, err = run_cli(capsys, command, photo, "  ")
        one_line_error(code, err, "prompt is empty")


def test_a_skipped_stage_says_skipped_not_nan(eps_dir, photo, tmp_path, capsys):
    """0 steps in a stage printed and stored its loss as nan, which reads as the NaN failure the stages refuse."""
    from peftedit import Artifact

    out = tmp_path / "adapters" / "none"
    argv = ["imagic", photo, "a red circle", "--model", eps_dir, "-o", out, *FAST]
    code, stdout, err = run_cli(capsys, *argv, "--embedding-steps", 0, "--finetune-steps", 0)
    assert code == 0, err
    assert "final losses: embedding skipped, LoRA skipped" in stdout
    assert Artifact.load(out).meta["losses"] == {"embedding": None, "finetune": None}


def test_ctrl_c_during_training_exits_130_and_leaves_nothing(eps_dir, photo, tmp_path):
    """A real SIGINT to a real process: Ctrl-C while Imagic trains stops it with status 130 and one line, leaving no
    edit folder and no hidden partial one (the artifact is written only after training, through a rename)."""
    import select
    import signal
    import time

    out = tmp_path / "edits" / "dog"
    argv = [sys.executable, "-m", "peftedit", "imagic", str(photo), "a dog", "--model", str(eps_dir), "-o", str(out)]
    argv += [*FAST, "--set", "embedding_steps=100000"]  # hours: only Ctrl-C ends it
    process = subprocess.Popen(argv, stderr=subprocess.PIPE, stdout=subprocess.PIPE)
    said, deadline = b"", time.monotonic() + 240
    try:
        while b"embedding" not in said and time.monotonic() < deadline and process.poll() is None:
            if select.select([process.stderr], [], [], 1)[0]:
                said += os.read(process.stderr.fileno(), 4096)
        assert b"embedding" in said, said.decode(errors="replace")  # training has begun
        time.sleep(1)
        process.send_signal(signal.SIGINT)
        _, rest = process.communicate(timeout=120)
    finally:
        process.kill()
    lines = (said + rest).decode(errors="replace")
    assert process.returncode == 130, lines
    assert lines.rstrip().splitlines()[-1].endswith("peftedit: interrupted; nothing was saved"), lines
    assert not out.exists() and not (out.parent.exists() and any(out.parent.iterdir()))


def test_default_picture_names_fit_the_file_system_with_long_non_latin_prompts(
    eps_dir, photo, tmp_path, capsys, monkeypatch
):
    """An inversion's default folder takes 60 characters of its source prompt, and `edit`'s default picture name
    added 60 of the target's: in Chinese, 3 bytes a character, over the 255 a file name may take, so `edit` with no
    -o stopped with "[Errno 36] File name too long"."""
    monkeypatch.chdir(tmp_path)
    source = "一只红色的圆圈在白色的背景上" * 5
    code, _, err = run_cli(capsys, "invert", photo, source, "--model", eps_dir, "--method", "ddim", "--steps", 2)
    assert code == 0, err
    (folder,) = (tmp_path / "adapters").iterdir()
    for _ in range(2):  # the second one numbered "-2"
        code, _, err = run_cli(capsys, "edit", folder, source.replace("红色", "蓝色"))
        assert code == 0, err
    names = sorted(p.name for p in tmp_path.glob(f"{folder.name}*.png"))
    assert len(names) == 2 and all(len(n.encode()) <= 255 and n.startswith(folder.name) for n in names), names
    assert names[0].endswith("-2.png")


def test_output_names_near_the_file_systems_limit_are_saved_and_longer_ones_refused_before_training(
    eps_dir, photo, tmp_path, capsys
):
    """A name of up to 255 bytes is a legal file name, but the hidden temporary beside it added ".partial-" and 8 hex
    digits: 80 Chinese characters (240 bytes) as -o failed with "File name too long" after the training, losing it;
    a name over 255 bytes, which no file may have, was not found out before the training either."""
    if os.pathconf(tmp_path, "PC_NAME_MAX") != 255:
        pytest.skip("the byte counts below are for file systems whose names take up to 255 bytes")
    fast = ["--model", eps_dir, "--embedding-steps", 1, "--finetune-steps", 1, *FAST]
    out = tmp_path / ("猫" * 80)
    for again in ([], ["--overwrite"]):  # replacing: the earlier edit is moved aside under a hidden name too
        code, _, err = run_cli(capsys, "imagic", photo, "a red circle", *fast, "-o", out, *again)
        assert code == 0, err
    assert sorted(p.name for p in tmp_path.iterdir() if p.name != photo.name) == [out.name]
    picture = tmp_path / f"{'猫' * 82}.png"  # 250 bytes
    code, _, err = run_cli(capsys, "edit", out, "--steps", 2, "-o", picture)
    assert code == 0, err
    assert picture.is_file() and not _leftovers(tmp_path)

    nowhere = ["--model", tmp_path / "no-model"]  # loading it would fail: the names are refused before
    too_long = "猫" * 86  # 258 bytes
    code, _, err = run_cli(capsys, "imagic", photo, "a red circle", *nowhere, "-o", tmp_path / too_long / "edit")
    one_line_error(code, err, "258 bytes", "255")
    code, _, err = run_cli(capsys, "edit", out, *nowhere, "-o", tmp_path / f"{too_long}.png")
    one_line_error(code, err, "262 bytes", "255")


def test_the_hub_check_connects_to_the_endpoints_host_and_port(monkeypatch):
    """HTTPS on 443 unless HF_ENDPOINT names a port (a firewall that lets only 443 out is common)."""
    from huggingface_hub import constants

    tries = network_refused(monkeypatch)
    for endpoint in ("https://huggingface.co", "http://mirror.example", "https://mirror.example:8443"):
        monkeypatch.setattr(constants, "ENDPOINT", endpoint)
        assert not hub.reachable()
    assert tries == [("huggingface.co", 443), ("mirror.example", 80), ("mirror.example", 8443)]


def test_hf_hub_offline_set_after_import_is_read_in_any_case(monkeypatch):
    from huggingface_hub import constants

    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)  # read once, when huggingface_hub was imported
    for value in ("true", "Yes", "1", "on", "0", "off", ""):  # huggingface_hub's own reading of the variable
        monkeypatch.setenv("HF_HUB_OFFLINE", value)
        assert hub.offline() is (value.upper() in ("TRUE", "YES", "1", "ON")), value


def test_generate_takes_guidance_zero_as_given(eps_model, monkeypatch):
    """Guidance 0 (the unconditional picture) is a value, not "use the model's recommendation"."""
    import peftedit.generate as generating

    real, used = generating.sample, []

    def spy(*args, **kwargs):
        used.append(args[5])  # guidance
        return real(*args, **kwargs)

    monkeypatch.setattr(generating, "sample", spy)
    for guidance in (0.0, None):
        generating.generate(eps_model, "a red circle", steps=2, guidance=guidance)
    assert used == [0.0, generating.DEFAULT_GUIDANCE]


def test_generate_samples_exactly_like_vanilla_diffusers(eps_model, monkeypatch):
    """The same seed, steps and guidance as the pipeline's own call: the same latents (guided towards the prompt)."""
    import peftedit.generate as generating
    from peftedit.diffusion import initial_noise

    real, ours = generating.sample, []
    monkeypatch.setattr(generating, "sample", lambda *args, **kwargs: ours.append(real(*args, **kwargs)) or ours[-1])
    generating.generate(eps_model, "a red circle", seed=3, steps=3, guidance=7.5)
    pipe = eps_model.pipe
    side = pipe.unet.config.sample_size
    noise = initial_noise((1, pipe.unet.config.in_channels, side, side), seed=3)
    theirs = pipe("a red circle", num_inference_steps=3, guidance_scale=7.5, latents=noise, output_type="latent")
    assert torch.allclose(ours[0], theirs.images, atol=1e-6), (ours[0] - theirs.images).abs().max()


def test_edit_run_below_its_folder_writes_the_default_picture_beside_the_folder(tmp_path, monkeypatch):
    """Inside any folder under the edit, too: a picture there would stop --overwrite from replacing the edit."""
    from peftedit.commands import _outside

    edit = tmp_path / "edit"
    (edit / "notes" / "deeper").mkdir(parents=True)
    for here, expected in ((edit, tmp_path), (edit / "notes" / "deeper", tmp_path), (tmp_path, Path())):
        monkeypatch.chdir(here)
        assert _outside(edit) == expected, here


def test_an_edit_rendered_on_another_base_does_not_take_its_recorded_single_file_configs(tmp_path, monkeypatch):
    from types import SimpleNamespace

    from peftedit.base import recorded_configs

    base, other, gone = tmp_path / "base.safetensors", tmp_path / "other", tmp_path / "configs"
    artifact = SimpleNamespace(meta={"base_model": str(base), "base_model_config": str(gone)})
    assert recorded_configs(artifact, str(other), "edit") is None  # --model names another base: not its configs
    with pytest.raises(ValueError, match=r"which is gone; pass --single-file-config \(single_file_config\)$"):
        recorded_configs(artifact, str(base), "edit")  # the recorded base itself: its configs, which are gone
    monkeypatch.setenv("HOME", str(tmp_path))
    with pytest.raises(ValueError, match="which is gone"):
        recorded_configs(artifact, "~/base.safetensors", "edit")  # the recorded base too, as load_model reads it
    from peftedit.base import load_base

    moved = SimpleNamespace(meta={"base_model": str(tmp_path / "moved.safetensors")})
    with pytest.raises(ValueError, match=r"^edit: its base model was at .*; pass --model \(model\) with where it is$"):
        load_base(moved, name="edit")  # load_base's own argument named beside the flag
    gone.mkdir()
    assert recorded_configs(artifact, None, "edit") == str(gone)
    by_id = SimpleNamespace(meta={"base_model": str(base), "base_model_config": "someone/configs"})
    assert recorded_configs(by_id, None, "edit") == "someone/configs"  # a hub id is no folder that is gone


def test_an_edit_whose_recorded_base_is_gone_renders_on_the_model_given(eps_dir, tmp_path):
    """ "Its base model was at …, which is gone; pass --model": with --model given, the edit loads on it, and a
    --model that is not there is said to be not found (not that the edit's base is gone)."""
    from types import SimpleNamespace

    from peftedit.base import load_base
    from peftedit.errors import ArtifactError, PeftEditError

    gone = str(tmp_path / "moved-away")
    artifact = SimpleNamespace(meta={"base_model": gone, "recipe": {"runtime": {"device": "cpu"}}})
    with pytest.raises(ArtifactError, match=f"^edit: its base model was at {gone}, which is gone; pass --model"):
        load_base(artifact, name="edit")
    assert load_base(artifact, model=str(eps_dir), name="edit").name == str(eps_dir.resolve())
    missing = str(tmp_path / "no-such-model")  # a --model that is not there is not the edit's base that is gone
    with pytest.raises(PeftEditError, match=f"^model {missing!r} not found: no such folder or file"):
        load_base(artifact, model=missing, name="edit")
