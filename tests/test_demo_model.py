"""The shipped demo model loads with plain diffusers and draws what single-object prompts ask for."""

from __future__ import annotations

import json

import pytest
import torch

from peftedit.demo import DEMO_MODEL_DIR, DEMO_SETTINGS_FILE, parse_prompt, read_scene

WEIGHTS = DEMO_MODEL_DIR / "unet" / "diffusion_pytorch_model.safetensors"
# A smoke test of loading, sampling and reading, not a quality measure (that is benchmarks/demo_gate.py, where the
# shipped model reads correctly on 99.4% of single-object prompts and 97.5% of two-object ones). These prompts are
# ones it draws right for seeds 0 and 1 in the gate; a failure here means loading or sampling changed, or the weights
# did.
PROMPTS = [
    "a large red circle on the left",
    "a small yellow triangle in the center",
    "a large purple square on the right",
]
SEED = 0


@pytest.mark.skipif(not WEIGHTS.is_file(), reason=f"demo model weights not shipped ({WEIGHTS} is absent)")
def test_demo_model_draws_prompted_scenes():
    from diffusers import StableDiffusionPipeline

    pipe = StableDiffusionPipeline.from_pretrained(str(DEMO_MODEL_DIR))
    pipe.set_progress_bar_config(disable=True)
    settings = json.loads((DEMO_MODEL_DIR / DEMO_SETTINGS_FILE).read_text())
    images = pipe(
        PROMPTS,
        num_inference_steps=settings["num_inference_steps"],
        guidance_scale=settings["guidance_scale"],
        generator=[torch.Generator().manual_seed(SEED) for _ in PROMPTS],
    ).images
    assert images[0].size == (64, 64)
    for prompt, image in zip(PROMPTS, images, strict=True):
        assert read_scene(image) == parse_prompt(prompt), prompt


@pytest.mark.skipif(not WEIGHTS.is_file(), reason="demo model weights not shipped")
def test_shipped_tokenizer_keeps_every_world_word_whole():
    """Prompt-to-Prompt replace edits map word to word: every world word must be one token."""
    from transformers import CLIPTokenizer

    from peftedit.demo.world import WORDS

    tokenizer = CLIPTokenizer.from_pretrained(str(DEMO_MODEL_DIR / "tokenizer"))
    assert [w for w in WORDS if len(tokenizer(w, add_special_tokens=False).input_ids) != 1] == []


EXAMPLE = DEMO_MODEL_DIR.parent / "examples" / "red-circle-left.png"


def _quickstart(tmp_path, capsys, *fewer_steps):
    from peftedit.cli import main

    out = tmp_path / "blue-circle"
    argv = ["--quiet", "imagic", str(EXAMPLE), "a large blue circle on the left", "-o", str(out), *fewer_steps]
    assert main(argv) == 0
    err = capsys.readouterr().err
    assert "built-in demo model" in err and "as --model (model), e.g. stable-diffusion-v1-5/" in err
    assert (out / "preview.png").is_file() and (out / "pytorch_lora_weights.safetensors").is_file()
    assert main(["--quiet", "edit", str(out), "--eta", "0.7", "-o", str(tmp_path / "blue.png")]) == 0
    # The edit records the demo as its base model, so re-rendering it does not announce the demo again.
    assert "built-in demo model" not in capsys.readouterr().err
    assert (tmp_path / "blue.png").is_file()
    return out


@pytest.mark.skipif(not WEIGHTS.is_file(), reason="demo model weights not shipped")
def test_quickstart_path_runs_on_the_default_model(tmp_path, capsys):
    """The README's main job with few steps: no --model means the demo model, and the edit re-renders."""
    _quickstart(
        tmp_path,
        capsys,
        "--embedding-steps",
        "10",
        "--finetune-steps",
        "10",
        "--set",
        "render_steps=5",
        "--set",
        "preview_etas=[0.7]",
        "--set",
        "runtime.device=cpu",
    )


@pytest.mark.slow
@pytest.mark.skipif(not WEIGHTS.is_file(), reason="demo model weights not shipped")
def test_quickstart_as_written(tmp_path, capsys):
    """The README's Quickstart command exactly, with the default recipe (about 2-3 minutes on 2 CPU cores)."""
    _quickstart(tmp_path, capsys)


@pytest.fixture(scope="module")
def demo_model():
    """The demo model through peftedit's loader, shared by the inversion tests below (they do not change it)."""
    from peftedit import RuntimeConfig, load_model

    return load_model(None, RuntimeConfig(device="cpu"), announce_demo=False)


@pytest.mark.skipif(not WEIGHTS.is_file(), reason="demo model weights not shipped")
def test_noised_pivot_lets_an_inversion_move_the_object(demo_model):
    """Why ``nulltext.pivot_noise`` exists: plain DDIM inversion of a demo scene leaves z_T near zero on the white
    background (the model predicts it exactly), so the object cannot move; the noised pivot puts noise there and the
    edit reads as the target. ``direct`` inversion: no optimisation, seconds on a CPU."""
    from peftedit import NullTextConfig, nulltext, p2p

    model = demo_model
    source, target = "a large red circle on the left", "a large red circle on the right"
    image = parse_prompt(source).draw()
    control = p2p.Control(cross_replace=0.0, self_replace=0.0)
    seen, background = {}, {}
    for noise in (0.0, 0.4):
        config = NullTextConfig(method="direct", pivot_noise=noise)
        inverted = nulltext.invert(model, image, source, config, show_progress=False)
        background[noise] = float(inverted.tensors["z_T"][..., 10:, 10:].std())  # an empty corner
        seen[noise] = read_scene(nulltext.edit(model, inverted, target, control))
    assert background[0.0] < 0.2 < 0.6 < background[0.4], background
    assert seen[0.4] == parse_prompt(target) and seen[0.0] != parse_prompt(target), seen


@pytest.mark.skipif(not WEIGHTS.is_file(), reason="demo model weights not shipped")
def test_null_text_with_the_default_pivot_reconstructs_a_demo_scene(demo_model):
    from peftedit import NullTextConfig, nulltext

    model = demo_model
    source = "a large yellow triangle on the left and a small blue square on the right"
    image = parse_prompt(source).draw()
    losses = {}
    for method in ("null-text", "ddim"):  # the same noised pivot; ddim does nothing to stay on it
        inverted = nulltext.invert(model, image, source, NullTextConfig(method=method), show_progress=False)
        losses[method] = inverted.meta["losses"]
    # measured: latent error 0.30 vs 0.51, PSNR 36.7 vs 29.1 dB
    assert losses["null-text"]["latent_error"] < 0.7 * losses["ddim"]["latent_error"], losses
    assert losses["null-text"]["psnr"] > max(33.0, losses["ddim"]["psnr"] + 3.0), losses
