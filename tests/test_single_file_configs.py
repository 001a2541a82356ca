"""A single checkpoint file's configs without --single-file-config: diffusers' guess from its tensors (a hub id),
taken from the local Hugging Face cache with no request, or one line at once when neither cache nor hub has it."""

from __future__ import annotations

import shutil

import huggingface_hub
import numpy as np
import pytest
from cli_run import cache_snapshot, network_refused, one_line_error, run_cli
from ldm_checkpoint import write_single_file
from PIL import Image
from safetensors.torch import load_file, save_file

from peftedit import hub
from peftedit.config import RuntimeConfig
from peftedit.models import load_model

GUESS = "stable-diffusion-v1-5/stable-diffusion-v1-5"  # diffusers' guess for the tiny SD file (and SD 1.5's)


@pytest.fixture
def checkpoint(eps_dir, tmp_path):
    path = tmp_path / "tiny.safetensors"
    write_single_file(eps_dir, path)
    return path


@pytest.fixture
def cache(tmp_path, monkeypatch):
    folder = tmp_path / "hub"
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(folder))  # read when huggingface_hub loads
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", False)
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    return folder


def test_guessed_configs_come_from_the_cache_with_no_request(
    checkpoint, cache, eps_dir, tmp_path, monkeypatch, capsys
):
    """diffusers' loader asked the hub for them even when cached (offline it retried for most of a minute); and
    uncached with the hub out of reach, it failed after that minute."""
    tries = network_refused(monkeypatch)
    argv = ("generate", "a red circle", "--steps", 3, "--model", checkpoint, "-o", tmp_path / "file.png")
    code, _, err = run_cli(capsys, *argv)
    one_line_error(
        code, err, f"{GUESS!r} (the configs of tiny.safetensors, guessed from its tensors) is not in the local",
        "the hub cannot be reached", "pass --single-file-config (single_file_config) with a local diffusers folder",
    )  # fmt: skip
    assert len(tries) == 1 and not (tmp_path / "file.png").exists()  # the one reachability check

    tries.clear()
    cache_snapshot(cache, GUESS, eps_dir, weights=False)  # configs only, as the loader fetches them
    assert run_cli(capsys, *argv)[0] == 0
    assert tries == []
    code, _, err = run_cli(capsys, *argv[:4], "--model", eps_dir, "-o", tmp_path / "dir.png")
    assert code == 0, err
    file, folder = (np.array(Image.open(tmp_path / name)) for name in ("file.png", "dir.png"))
    assert np.array_equal(file, folder)


def test_configs_given_as_a_hub_id_come_from_the_cache_and_are_recorded(checkpoint, cache, eps_dir, monkeypatch):
    tries = network_refused(monkeypatch)
    cache_snapshot(cache, "someone/tiny-configs", eps_dir, weights=False)
    runtime = RuntimeConfig(device="cpu")
    assert load_model(str(checkpoint), runtime, single_file_config="someone/tiny-configs").single_file_config == (
        "someone/tiny-configs"
    )
    cache_snapshot(cache, GUESS, eps_dir, weights=False)
    assert load_model(str(checkpoint), runtime).single_file_config is None  # guessed again when re-rendered
    assert tries == []


def test_configs_that_are_neither_a_folder_nor_a_hub_id_are_one_line(checkpoint, tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("HOME", str(tmp_path))
    monkeypatch.setattr(hub, "load", lambda name, *args, **kwargs: pytest.fail(f"asked the hub for {name!r}"))
    (tmp_path / "cfg").mkdir()
    (tmp_path / "cfg" / "model_index.json").write_text("{}")
    a_file = "cfg/model_index.json"  # shaped like a hub id, but a file here
    for given in (tmp_path / "no-such-folder", "a/b/c", checkpoint, "./configs", "~/configs", "configs", a_file):
        code, _, err = run_cli(capsys, "generate", "a", "--model", checkpoint, "--single-file-config", given)
        one_line_error(
            code,
            err,
            f"--single-file-config (single_file_config) {str(given)!r}: no such folder (nor a hub id, owner/name)",
        )


def test_a_partial_snapshot_of_the_configs_is_fetched_again(checkpoint, cache, eps_dir, tmp_path, monkeypatch, capsys):
    """A cache holding only ``model_index.json`` (what reading a hub id's architecture fetches) is not the configs:
    downloaded (here: unreachable, one line), not diffusers' missing-file error."""
    tries = network_refused(monkeypatch)
    only_index = tmp_path / "only-index"
    only_index.mkdir()
    (only_index / "model_index.json").write_text((eps_dir / "model_index.json").read_text())
    cache_snapshot(cache, GUESS, only_index)
    code, _, err = run_cli(capsys, "generate", "a", "--model", checkpoint, "-o", tmp_path / "x.png")
    one_line_error(code, err, "is not in the local Hugging Face cache and the hub cannot be reached")
    assert len(tries) == 1

    no_index = tmp_path / "no-index"  # the parts' configs without the pipeline's index: fetched again too
    shutil.copytree(eps_dir, no_index, ignore=shutil.ignore_patterns("*.safetensors", "model_index.json"))
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path / "hub-2"))
    cache_snapshot(tmp_path / "hub-2", GUESS, no_index)
    code, _, err = run_cli(capsys, "generate", "a", "--model", checkpoint, "-o", tmp_path / "x.png")
    one_line_error(code, err, "is not in the local Hugging Face cache and the hub cannot be reached")
    assert len(tries) == 2


def test_a_relative_or_home_relative_configs_folder_is_recorded_absolute(checkpoint, eps_dir, monkeypatch):
    """An edit records its base's configs to load them again from any working folder, as it records the base."""
    monkeypatch.chdir(eps_dir.parent)
    model = load_model(str(checkpoint), RuntimeConfig(device="cpu"), single_file_config=eps_dir.name)
    assert model.single_file_config == str(eps_dir.resolve())
    monkeypatch.setenv("HOME", str(eps_dir.parent))  # "~/NAME" is a folder in one's home, as for --model
    model = load_model(str(checkpoint), RuntimeConfig(device="cpu"), single_file_config=f"~/{eps_dir.name}")
    assert model.single_file_config == str(eps_dir.resolve())


def test_a_file_missing_a_parts_weights_is_one_line(checkpoint, cache, eps_dir, tmp_path, monkeypatch, capsys):
    """A file without a part's weights (here the VAE's) was diffusers' traceback; and the advice to give
    --single-file-config is not repeated to one who gave it."""
    tensors = load_file(checkpoint)
    save_file(
        {k: v for k, v in tensors.items() if not k.startswith("first_stage_model.")},
        tmp_path / "no-vae.safetensors",
    )
    code, _, err = run_cli(
        capsys, "generate", "a", "--model", tmp_path / "no-vae.safetensors", "--single-file-config", eps_dir
    )
    one_line_error(code, err, "could not load model", "SingleFileComponentError")
    assert "configs come from --single-file-config" not in err
    network_refused(monkeypatch)
    cache_snapshot(cache, GUESS, eps_dir, weights=False)  # the guessed configs: the advice is for one who gave none
    code, _, err = run_cli(capsys, "generate", "a", "--model", tmp_path / "no-vae.safetensors")
    one_line_error(code, err, "SingleFileComponentError", "; a single checkpoint file's configs come from "
                   "--single-file-config (single_file_config), a diffusers folder or hub id")  # fmt: skip


def test_configs_not_in_the_cache_are_downloaded_without_the_weights(checkpoint, eps_dir, tmp_path, monkeypatch):
    """With the hub in reach, a hub id's configs missing from the cache are downloaded: the JSON and tokenizer files
    only (the weights of an SD repo are gigabytes, and the checkpoint file has its own)."""
    from huggingface_hub.errors import LocalEntryNotFoundError
    from huggingface_hub.utils import filter_repo_objects

    calls, patterns = [], []

    def snapshot_download(repo, allow_patterns=None, local_files_only=False, **kwargs):
        calls.append((repo, local_files_only))
        patterns.append(allow_patterns)
        if local_files_only:
            raise LocalEntryNotFoundError(f"{repo} is not cached")
        folder = tmp_path / "downloaded"
        files = [p.relative_to(eps_dir).as_posix() for p in eps_dir.rglob("*") if p.is_file()]
        for name in filter_repo_objects(files, allow_patterns=allow_patterns):  # the hub's own pattern matching
            (folder / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy(eps_dir / name, folder / name)
        return str(folder)

    monkeypatch.setattr(huggingface_hub, "snapshot_download", snapshot_download)
    monkeypatch.setattr(hub, "offline", lambda: False)
    monkeypatch.setattr(hub, "reachable", lambda: True)
    model = load_model(str(checkpoint), RuntimeConfig(device="cpu"), single_file_config="someone/tiny-configs")
    assert calls == [("someone/tiny-configs", True), ("someone/tiny-configs", False)]  # the cache, then the hub
    assert model.single_file_config == "someone/tiny-configs"
    folder = tmp_path / "downloaded"
    fetched = {p.relative_to(folder).as_posix() for p in folder.rglob("*") if p.is_file()}
    assert "unet/config.json" in fetched and "tokenizer/tokenizer_config.json" in fetched
    assert not [name for name in fetched if name.endswith(".safetensors")]
    sd15 = [
        "model_index.json",
        "unet/config.json",
        "unet/diffusion_pytorch_model.safetensors",
        "vae/config.json",
        "text_encoder/model.fp16.safetensors",
        "tokenizer/merges.txt",
        "tokenizer/vocab.json",
        "tokenizer/special_tokens_map.json",
        "safety_checker/pytorch_model.bin",
        "v1-5-pruned.safetensors",
    ]
    taken = list(filter_repo_objects(sd15, allow_patterns=patterns[-1]))  # a real repo's files: its tokenizer's too
    assert taken == [name for name in sd15 if name.endswith((".json", ".txt"))]


def test_a_checkpoint_file_with_an_upper_case_suffix_is_one_line_naming_the_rename(checkpoint, eps_dir, capsys):
    """NAME.SAFETENSORS was taken for a checkpoint file, but diffusers reads a file as safetensors by its lower-case
    suffix alone: it tried to unpickle it, and the user got torch's refusal to, as a "could not load model"."""
    upper = checkpoint.rename(checkpoint.with_name("TINY.SAFETENSORS"))
    code, _, err = run_cli(capsys, "generate", "a", "--model", upper, "--single-file-config", eps_dir)
    one_line_error(code, err, f"{upper}: diffusers reads a file as safetensors by its lower-case suffix alone; "
                   "rename it to TINY.safetensors")  # fmt: skip
    mixed = upper.rename(upper.with_name("Tiny.SafeTensors"))  # any capital in the suffix, not only all of them
    code, _, err = run_cli(capsys, "generate", "a", "--model", mixed, "--single-file-config", eps_dir)
    one_line_error(code, err, f"{mixed}: diffusers reads a file as safetensors by its lower-case suffix alone")


def test_a_file_that_is_no_checkpoint_is_said_to_be_none(checkpoint, eps_dir, tmp_path, monkeypatch, capsys):
    """A LoRA or VAE file, or an edit's own file, given as --model: diffusers guesses SD 1.5 for any file without its
    marker tensors, so offline the error was that SD 1.5's configs could not be fetched, and with them (or with
    --single-file-config) that the text encoder's weights were missing. Neither says what is wrong."""
    monkeypatch.setattr(hub, "load", lambda name, *args, **kwargs: pytest.fail(f"asked the hub for {name!r}"))
    tensors = load_file(checkpoint)
    save_file({k: v for k, v in tensors.items() if k.startswith("first_stage_model.")}, tmp_path / "vae.safetensors")
    for configs in ([], ["--single-file-config", eps_dir]):
        code, _, err = run_cli(capsys, "generate", "a", "--model", tmp_path / "vae.safetensors", *configs)
        one_line_error(
            code, err, "is not a whole Stable Diffusion checkpoint in the original layout (no model.diffusion_model.*"
        )
    edit = tmp_path / "edit"
    edit.mkdir()
    save_file(
        {"e_tgt": tensors[next(iter(tensors))]}, edit / "edit.safetensors", metadata={"peftedit.format_version": "2"}
    )
    save_file({"unet.x.lora_A.weight": tensors[next(iter(tensors))]}, edit / "pytorch_lora_weights.safetensors")
    for part in ("edit.safetensors", "pytorch_lora_weights.safetensors"):
        code, _, err = run_cli(capsys, "generate", "a", "--model", edit / part)
        one_line_error(
            code, err, f"is part of a peftedit edit, not a model: render the edit with peftedit edit {edit}"
        )
        assert err.endswith(f"peftedit edit {edit}\n"), err  # the folder, not the file given
    code, _, err = run_cli(capsys, "generate", "a", "--model", edit)  # the folder itself: not "no model_index.json"
    one_line_error(code, err, f"{edit} is a peftedit edit, not a model: render it with peftedit edit {edit}")
    beside = shutil.copy(checkpoint, edit / "model.safetensors")  # a whole checkpoint is a model wherever it lies
    assert load_model(str(beside), RuntimeConfig(device="cpu"), single_file_config=str(eps_dir)).pipe.unet is not None


def test_an_edit_file_moved_out_of_its_folder_is_still_said_to_be_an_edit_file(checkpoint, tmp_path, capsys):
    """An edit's file copied away from its folder is known by its header: said to be an edit's file, not "a LoRA, a
    VAE", and the advice names no folder, since the one it lies in now is no edit."""
    tensors = load_file(checkpoint)
    moved = tmp_path / "downloads" / "my-edit.safetensors"
    moved.parent.mkdir()
    save_file({"e_tgt": tensors[next(iter(tensors))]}, moved, metadata={"peftedit.format_version": "2"})
    code, _, err = run_cli(capsys, "generate", "a", "--model", moved)
    one_line_error(code, err, f"{moved} is a peftedit edit's file, not a model: render the edit folder it came from")
    assert f"peftedit edit {moved.parent}" not in err, err
