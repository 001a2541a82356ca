"""SDXL from one checkpoint file in SDXL's original layout (written by tests/ldm_checkpoint.py from the tiny SDXL):
every weight loads bit-identically through diffusers' single-file loader, the file's tensor names refuse SD
configs, and `generate` draws the same picture from the file as from its folder."""

from __future__ import annotations

import shutil

import huggingface_hub.constants
import numpy as np
import pytest
import torch
from cli_run import cache_snapshot
from diffusers import UNet2DConditionModel
from ldm_checkpoint import write_single_file
from PIL import Image
from safetensors.torch import load_file

from peftedit import RuntimeConfig, load_model
from peftedit.cli import main
from peftedit.errors import PeftEditError
from peftedit.models import is_xl
from peftedit.tiny import build_xl_pipeline

RUNTIME = RuntimeConfig(device="cpu")
WEIGHTS = {  # component -> its weights file in a diffusers folder
    "unet": "diffusion_pytorch_model.safetensors",
    "vae": "diffusion_pytorch_model.safetensors",
    "text_encoder": "model.safetensors",
    "text_encoder_2": "model.safetensors",
}
OPEN_CLIP = "conditioner.embedders.1.model."  # SDXL's second text encoder, in OpenCLIP's names
ROOTS = ("model.diffusion_model.", "first_stage_model.", "conditioner.embedders.0.transformer.", OPEN_CLIP)


@pytest.fixture(scope="module")
def xl_dir(tmp_path_factory, tokenizer_dir):
    folder = tmp_path_factory.mktemp("tiny-xl")
    build_xl_pipeline(tokenizer_dir).save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def xl_file(xl_dir, tmp_path_factory):
    path = tmp_path_factory.mktemp("single") / "tiny-xl.safetensors"
    write_single_file(xl_dir, path)
    return path


def test_the_file_has_sdxl_original_names(xl_dir, xl_file):
    checkpoint = load_file(xl_file)
    assert all(key.startswith(ROOTS) for key in checkpoint)
    assert "model.diffusion_model.label_emb.0.0.weight" in checkpoint  # the pooled-text and size embedding
    assert checkpoint["model.diffusion_model.middle_block.1.proj_in.weight"].ndim == 2  # SDXL's linear proj_in
    text_2 = load_file(xl_dir / "text_encoder_2" / WEIGHTS["text_encoder_2"])
    # OpenCLIP computes x @ text_projection: the transpose of HF's linear weight.
    assert torch.equal(checkpoint[OPEN_CLIP + "text_projection"], text_2["text_projection.weight"].T)
    attention = "text_model.encoder.layers.1.self_attn."
    qkv = torch.cat([text_2[f"{attention}{p}_proj.weight"] for p in "qkv"])
    assert torch.equal(checkpoint[OPEN_CLIP + "transformer.resblocks.1.attn.in_proj_weight"], qkv)


def _with_two_transformer_layers(xl_dir, folder):
    """The tiny SDXL with SDXL's deeper attention blocks: (1, 2) transformer layers per down block, as SDXL's
    (1, 2, 10), so the mid block and the up blocks hold two too."""
    shutil.copytree(xl_dir, folder)
    config = dict(UNet2DConditionModel.load_config(xl_dir / "unet"), transformer_layers_per_block=[1, 2])
    torch.manual_seed(1)
    UNet2DConditionModel.from_config(config).save_pretrained(folder / "unet")
    return folder


@pytest.mark.parametrize("layers", ["one", "two"], ids=["transformer_layers_1", "transformer_layers_1_2"])
def test_every_weight_round_trips_bit_identically(layers, xl_dir, xl_file, tmp_path):
    if layers == "two":
        xl_dir, xl_file = _with_two_transformer_layers(xl_dir, tmp_path / "deeper"), tmp_path / "deeper.safetensors"
        write_single_file(xl_dir, xl_file)
        assert "model.diffusion_model.middle_block.1.transformer_blocks.1.attn2.to_k.weight" in load_file(xl_file)
    model = load_model(str(xl_file), RUNTIME, single_file_config=str(xl_dir))
    assert is_xl(model.pipe) and model.single_file_config == str(xl_dir.resolve())
    for component, weights in WEIGHTS.items():
        saved = load_file(xl_dir / component / weights)
        loaded = getattr(model.pipe, component).state_dict()
        assert loaded.keys() == saved.keys(), component
        different = [key for key in saved if not torch.equal(loaded[key], saved[key])]
        assert not different, (component, different[:5])


def test_without_configs_the_guess_comes_from_the_cache_and_must_agree_with_the_tensor_names(
    xl_file, xl_dir, eps_dir, tmp_path, monkeypatch, capsys
):
    """No --single-file-config: the configs are diffusers' guess from the file's tensors, read from the local cache
    (for this tiny file SD 1.5's, see ldm_checkpoint; a real SDXL file reads as SDXL base). Offline and not cached:
    one line. Cached, SD configs for SDXL tensor names: one line, not diffusers' weight-shape error. An SDXL hub id
    given: its cached configs load the XL pipeline."""
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)  # read at import: the env var is too late
    cache = tmp_path / "hub"
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(cache))
    guess, xl_id = "stable-diffusion-v1-5/stable-diffusion-v1-5", "someone/tiny-xl-configs"
    argv = [
        "--quiet",
        "generate",
        "a red circle",
        "--steps",
        "2",
        "--model",
        str(xl_file),
        "-o",
        str(tmp_path / "x.png"),
    ]
    capsys.readouterr()  # the command's stderr only
    code = main(argv)
    err = capsys.readouterr().err
    assert code == 2 and err.startswith("peftedit: error: ") and err.count("\n") == 1, err  # all of it one line
    assert f"{guess!r} (the configs of tiny-xl.safetensors, guessed from its tensors) is not in the local" in err
    assert "HF_HUB_OFFLINE is set" in err

    cache_snapshot(cache, guess, eps_dir, weights=False)
    code = main(argv)
    err = capsys.readouterr().err
    assert code == 2 and err.count("\n") == 1, err
    assert f"is an SDXL checkpoint but diffusers' guess of its configs, {guess}, is an SD pipeline" in err

    cache_snapshot(cache, xl_id, xl_dir, weights=False)
    model = load_model(str(xl_file), RUNTIME, single_file_config=xl_id)
    assert is_xl(model.pipe) and model.single_file_config == xl_id


def test_generate_draws_the_same_picture_from_the_file_as_from_the_folder(xl_dir, xl_file, tmp_path):
    pictures = []
    for model in (["--model", str(xl_file), "--single-file-config", str(xl_dir)], ["--model", str(xl_dir)]):
        pictures.append(tmp_path / f"{len(pictures)}.png")
        argv = ["--quiet", "generate", "a red circle", *model, "--steps", "2", "-o", str(pictures[-1])]
        assert main(argv) == 0
    file_picture, folder_picture = (np.array(Image.open(p)) for p in pictures)
    assert file_picture.shape == (16, 16, 3) and file_picture.std() > 0
    # The weights are bit-identical (above), but a tensor read from the file may sit at another memory alignment,
    # which changes the BLAS kernel's rounding in its last bit (measured: text_projection, 2.4e-7 on the pooled text);
    # after a few guided steps that can flip a pixel by one level.
    assert np.abs(file_picture.astype(int) - folder_picture.astype(int)).max() <= 1


def test_an_sd_file_with_sdxl_configs_is_refused_by_its_tensor_names(xl_dir, eps_dir, tmp_path):
    """SD's original layout (text encoder under cond_stage_model) tells an SD file from SDXL configs, as the other way
    round: one line naming both, not diffusers' error from deep inside the XL loader."""
    path = tmp_path / "tiny-sd.safetensors"
    write_single_file(eps_dir, path)
    with pytest.raises(
        PeftEditError,
        match=r"is an SD checkpoint but --single-file-config \(single_file_config\) .* is an SDXL pipeline",
    ):
        load_model(str(path), RUNTIME, single_file_config=str(xl_dir))
