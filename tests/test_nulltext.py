"""Null-text inversion and Prompt-to-Prompt on tiny models (epsilon and v-prediction): null-text reconstructs better
than plain DDIM, the early stop is respected, reloads are bit-identical, and mistakes give clear errors."""

from __future__ import annotations

import dataclasses
import json
import math
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from cli_run import run_cli
from diffusers import DDIMScheduler
from diffusers.models.attention_processor import AttnProcessor2_0
from PIL import Image

from peftedit import Artifact, ArtifactError, NullTextConfig, PeftEditError, RuntimeConfig, imagic, nulltext, p2p
from peftedit.diffusion import ddim_invert, encode_image, encode_text
from peftedit.errors import NumericalError
from peftedit.images import load_image, psnr

RUNTIME = RuntimeConfig(device="cpu", gradient_checkpointing=False)  # checkpointing: the bf16 test
SOURCE = "a photo of a red circle"
# The tiny random text encoder needs a larger step than CLIP's 1e-2 to get far in a few inner steps (measured at
# 10 steps x 4 inner: latent error vs ddim ~0.6x (epsilon) / ~0.37x (v) at lr 1e-2; ~0.30x / ~0.14x at 5e-2).
# The reference pivot (all DDIM inversion): the ratios asserted below were measured on it. A random UNet cannot
# predict the noise of the noised pivot (the default), so null-text gains less there (0.51x vs ddim, epsilon); the
# default is tested on the demo model (tests/test_demo_model.py).
FAST = dict(steps=10, inner_steps=4, lr=5e-2, pivot_noise=0.0)


@pytest.fixture(scope="module")
def module_photo(tmp_path_factory):
    from PIL import ImageDraw

    image = Image.new("RGB", (48, 40), "white")
    draw = ImageDraw.Draw(image)
    draw.ellipse((6, 6, 26, 26), fill=(220, 40, 40))
    draw.rectangle((30, 10, 42, 34), fill=(40, 90, 220))
    path = tmp_path_factory.mktemp("nulltext-photo") / "photo.png"
    image.save(path)
    return path


@pytest.fixture(scope="session")
def _shared():
    return {}


@pytest.fixture
def model(tiny_dir, _shared):
    """One tiny model per prediction type, shared by this module's tests (they leave it as they found it)."""
    from peftedit import load_model

    key = ("model", str(tiny_dir))
    if key not in _shared:
        _shared[key] = load_model(str(tiny_dir), RUNTIME)
    return _shared[key]


@pytest.fixture
def inversions(model, module_photo, _shared):
    """Inversions of the photo by method, made once per model."""

    def get(method):
        key = ("inversion", model.name, method)
        if key not in _shared:
            _shared[key] = _invert(model, module_photo, method)
        return _shared[key]

    return get


def _invert(model, photo, method="null-text", **overrides):
    config = NullTextConfig(method=method, **{**FAST, **overrides})
    return nulltext.invert(model, photo, SOURCE, config, RUNTIME, show_progress=False)


def test_null_text_reconstructs_better_than_ddim_and_respects_the_early_stop(model, inversions):
    inverted, baseline = inversions("null-text"), inversions("ddim")
    ours, theirs = inverted.meta["losses"], baseline.meta["losses"]
    # The tiny VAE cannot decode photos: compare the final latent with the encoded input, and each step with the pivot.
    assert ours["latent_error"] < 0.45 * theirs["latent_error"], (ours, theirs)
    assert ours["pivot_error_mean"] < 0.45 * theirs["pivot_error_mean"], (ours, theirs)
    steps = inverted.meta["per_step"]
    assert len(steps["inner_steps"]) == len(steps["loss"]) == FAST["steps"]
    _check_early_stop(steps, NullTextConfig().early_stop, FAST["inner_steps"])
    assert inverted.tensors["null_embeddings"].shape == (FAST["steps"], 77, 32)
    assert torch.equal(inverted.tensors["timesteps"], _timesteps(model, FAST["steps"]))


def test_null_text_stays_on_the_default_noised_pivot(model, module_photo):
    """The default pivot (forward-noised start) with both prediction types: null-text still beats plain sampling.

    A random UNet cannot predict the pivot's noise, so the gain is smaller than on the reference pivot; measured
    latent / pivot error vs ddim: epsilon 0.51 / 0.44, v-prediction 0.85 / 0.81 (the demo model: see
    tests/test_demo_model.py)."""
    ours, theirs = (_invert(model, module_photo, m, pivot_noise=0.4).meta["losses"] for m in ("null-text", "ddim"))
    bound = {"epsilon": 0.6, "v_prediction": 0.9}[model.pipe.scheduler.config.prediction_type]
    assert ours["latent_error"] < bound * theirs["latent_error"], (ours, theirs)
    assert ours["pivot_error_mean"] < bound * theirs["pivot_error_mean"], (ours, theirs)


def _check_early_stop(steps, early_stop, most):
    for i, (used, loss) in enumerate(zip(steps["inner_steps"], steps["loss"], strict=True)):
        threshold = early_stop + i * NullTextConfig().early_stop_slope
        assert used == most or (loss < threshold and used < most), (i, used, loss, threshold)


def _timesteps(model, steps):
    scheduler = DDIMScheduler.from_config(model.pipe.scheduler.config)
    scheduler.set_timesteps(steps)
    return scheduler.timesteps


def test_a_loose_early_stop_stops_every_step_at_once(eps_model, photo):
    artifact = _invert(eps_model, photo, early_stop=10.0, steps=4)
    steps = artifact.meta["per_step"]
    _check_early_stop(steps, 10.0, FAST["inner_steps"])
    assert steps["inner_steps"] == [1] * 4  # every step stops at its first loss: the null embedding never moves
    assert torch.equal(artifact.tensors["null_embeddings"][-1], artifact.tensors["e_uncond"][0])


class _ConstantEpsilon(torch.nn.Module):
    """A stand-in UNet predicting the same noise everywhere: DDIM steps with it are exactly invertible."""

    config = SimpleNamespace(addition_embed_type=None)  # an SD UNet's: no SDXL added conditions

    def __init__(self, noise):
        super().__init__()
        self.register_buffer("noise", noise)

    @property
    def dtype(self):
        return self.noise.dtype

    @property
    def device(self):
        return self.noise.device

    def forward(self, latents, t, encoder_hidden_states):
        return type("Out", (), {"sample": self.noise.expand_as(latents)})()


def _stub_pivot_inputs(eps_model, photo, seed: int):
    """(scheduler config, photo latent, source conditioning, a constant-noise UNet stub, a 6-step DDIM sampler)."""
    pipe = eps_model.pipe
    picture, _ = load_image(photo, eps_model.resolution)
    latent, cond = encode_image(pipe, picture), encode_text(pipe, SOURCE)
    stub = _ConstantEpsilon(torch.randn(latent.shape, generator=torch.Generator().manual_seed(seed)))
    scheduler = DDIMScheduler.from_config(pipe.scheduler.config)
    scheduler.set_timesteps(6)
    return pipe.scheduler.config, latent, cond, stub, scheduler


def _assert_sampler_walks_back(scheduler, stub, pivots, steps: int) -> None:
    """From the last pivot, the sampler's first ``steps`` steps land on the pivots before it, one by one."""
    z = pivots[-1]
    for i, t in enumerate(scheduler.timesteps[:steps]):
        z = scheduler.step(stub.noise, t, z).prev_sample
        assert torch.allclose(z, pivots[-2 - i], atol=1e-5), i


def test_pivot_is_on_the_samplers_timesteps(eps_model, photo):
    config, latent, cond, stub, scheduler = _stub_pivot_inputs(eps_model, photo, seed=0)
    pivots = ddim_invert(stub, config, latent, cond, 6)
    assert len(pivots) == 7 and torch.equal(pivots[0], latent)
    _assert_sampler_walks_back(scheduler, stub, pivots, 6)


def test_pivot_spacings_the_inverse_scheduler_takes(eps_model, photo):
    """'trailing' inverts onto its sampler's timesteps like 'leading'; 'linspace' is one line naming the setting (it
    was diffusers' own ValueError, raised from inside its inverse scheduler)."""
    config, latent, cond, stub, _ = _stub_pivot_inputs(eps_model, photo, seed=0)
    trailing = DDIMScheduler.from_config(config, timestep_spacing="trailing")
    trailing.set_timesteps(6)
    pivots = ddim_invert(stub, trailing.config, latent, cond, 6)
    _assert_sampler_walks_back(trailing, stub, pivots, 6)
    unset = {k: v for k, v in config.items() if k != "timestep_spacing"}  # a config without it: diffusers' leading
    assert torch.equal(ddim_invert(stub, unset, latent, cond, 6)[-1], ddim_invert(stub, config, latent, cond, 6)[-1])
    linspace = DDIMScheduler.from_config(config, timestep_spacing="linspace").config
    with pytest.raises(PeftEditError, match="^timestep_spacing 'linspace': DDIM inversion takes 'leading' or 'trail"):
        ddim_invert(stub, linspace, latent, cond, 6)


def test_noised_pivot_starts_on_the_forward_process_then_inverts(eps_model, photo):
    config, latent, cond, stub, scheduler = _stub_pivot_inputs(eps_model, photo, seed=1)
    pivots = ddim_invert(stub, config, latent, cond, 6, noised_steps=2, seed=5)
    again = ddim_invert(stub, config, latent, cond, 6, noised_steps=2, seed=5)
    other = ddim_invert(stub, config, latent, cond, 6, noised_steps=2, seed=6)
    plain = ddim_invert(stub, config, latent, cond, 6)
    assert len(pivots) == 7 and torch.equal(pivots[0], latent)
    assert all(torch.equal(a, b) for a, b in zip(pivots, again, strict=True))
    assert not torch.equal(pivots[-1], other[-1]) and not torch.equal(pivots[-1], plain[-1])
    ascending = scheduler.timesteps.flip(0)
    noise = torch.randn(latent.shape, generator=torch.Generator().manual_seed(5))
    for k in (1, 2):  # the first two are the forward process at the sampler's two lowest timesteps
        expected = scheduler.add_noise(latent, noise, ascending[k - 1 : k])
        assert torch.allclose(pivots[k], expected, atol=1e-6), k
    _assert_sampler_walks_back(scheduler, stub, pivots, 4)  # above them, the DDIM pivot walks back exactly
    with pytest.raises(PeftEditError, match="noised_steps"):
        ddim_invert(stub, config, latent, cond, 6, noised_steps=7)
    with pytest.raises(PeftEditError, match="pivot_noise"):
        NullTextConfig(pivot_noise=1.5)


def test_reload_reproduces_the_reconstruction_bit_identically(model, inversions, tmp_path, capsys):
    inverted = inversions("null-text")
    first = nulltext.run_edit(model, inverted)
    inverted.save(tmp_path / "inv")
    loaded = Artifact.load(tmp_path / "inv")
    assert loaded.method == "null-text"
    assert all(torch.equal(loaded.tensors[k], inverted.tensors[k]) for k in inverted.tensors)
    second = nulltext.run_edit(model, loaded)
    assert torch.equal(first.latents, second.latents)
    capsys.readouterr()
    assert np.array_equal(np.asarray(first.image), np.asarray(nulltext.reconstruct(model, loaded)))
    assert capsys.readouterr().err == ""
    assert np.array_equal(np.asarray(first.image), np.asarray(nulltext.reconstruct(model, loaded, show_progress=True)))
    assert "edit" in capsys.readouterr().err  # its bar, as nulltext.edit's
    error = float(torch.nn.functional.mse_loss(second.latents.cpu(), inverted.tensors["z_0"]))
    assert error == pytest.approx(inverted.meta["losses"]["latent_error"], rel=1e-4)


def test_replace_with_the_same_prompt_reproduces_the_reconstruction(model, inversions):
    inverted = inversions("null-text")
    reconstruction = nulltext.run_edit(model, inverted).latents
    result = nulltext.run_edit(model, inverted, SOURCE, p2p.Control(mode="replace"))
    assert result.latents.shape[0] == 2
    scale = float(reconstruction.abs().max())
    assert torch.allclose(result.latents[0], reconstruction[0], atol=1e-3 * scale)
    assert torch.allclose(result.latents[1], reconstruction[0], atol=1e-3 * scale)


@pytest.mark.parametrize("method", nulltext.METHODS)
def test_each_method_inverts_and_edits(model, inversions, method):
    artifact = inversions(method)
    expected = {"null-text": "null_embeddings", "direct": "offsets"}.get(method)
    assert (expected in artifact.tensors) if expected else not {"null_embeddings", "offsets"} & set(artifact.tensors)
    if method == "direct":
        assert artifact.tensors["offsets"].shape == (FAST["steps"], 4, 8, 8)
        assert artifact.meta["losses"]["latent_error"] < 1e-8  # offsets put the source branch back on the pivot
    control = p2p.Control(mode="refine", blend=["circle", "square"], reweight={"blue": 2.0})
    result = nulltext.run_edit(model, artifact, "a photo of a blue square", control, maps=True)
    reconstruction = nulltext.run_edit(model, artifact).latents
    # The source branch reproduces the reconstruction up to float noise (batching, explicit attention) that guidance
    # 7.5 on a random UNet amplifies; the target branch moves much further.
    drift = float((result.latents[0] - reconstruction[0]).abs().max())
    assert drift < 0.02 * float(reconstruction.abs().max()), drift
    assert float((result.latents[1] - result.latents[0]).abs().max()) > 10 * drift
    assert result.maps.shape == (2, 4, 4, 77) and torch.isfinite(result.maps).all()
    assert isinstance(nulltext.edit(model, artifact, "a photo of a blue circle"), Image.Image)


def test_negative_prompt_guides_every_branch_away_from_the_source_prompt(eps_model, photo):
    """The null embedding a run uses is the method's: e_src for negative-prompt (e_uncond there was plain DDIM)."""
    seen = []
    hook = eps_model.pipe.unet.register_forward_pre_hook(
        lambda module, args, kwargs: seen.append(kwargs["encoder_hidden_states"].clone()), with_kwargs=True
    )
    try:
        for method in ("negative-prompt", "ddim"):
            artifact = _invert(eps_model, photo, method, steps=2)
            seen.clear()
            nulltext.run_edit(eps_model, artifact, "a photo of a blue square")
            null = artifact.tensors["e_src" if method == "negative-prompt" else "e_uncond"][0]
            assert len(seen) == 2 and all(len(batch) == 4 for batch in seen)  # [null, null, source, target]
            assert all(torch.equal(batch[0], null) and torch.equal(batch[1], null) for batch in seen), method
    finally:
        hook.remove()


def test_direct_offsets_move_only_the_source_branch(eps_model, photo):
    """PnP inversion's offsets belong to the source branch: added to the target too, they dragged the edit back."""
    artifact = _invert(eps_model, photo, "direct", steps=3)
    no_offsets = torch.zeros_like(artifact.tensors["offsets"])
    still = Artifact("direct", {**artifact.tensors, "offsets": no_offsets}, artifact.meta)
    independent = p2p.Control(cross_replace=0.0, self_replace=0.0)  # the target borrows no source attention
    target = "a photo of a blue square"
    moved, plain = (nulltext.run_edit(eps_model, a, target, independent) for a in (artifact, still))
    assert not torch.allclose(moved.latents[0], plain.latents[0], atol=1e-3)
    assert torch.allclose(moved.latents[1], plain.latents[1], atol=1e-6)


def test_maps_are_materialised_only_where_used(eps_model):
    unet = eps_model.pipe.unet
    controller = p2p.Controller(unet, eps_model.pipe.tokenizer, [SOURCE], None, 10)
    with p2p.installed(unet, controller):
        kinds = {n: type(p) for n, p in unet.attn_processors.items()}
    stored = [n for n, k in kinds.items() if k is p2p.ControlledAttention]
    assert stored and all(n.endswith("attn2.processor") for n in stored)  # reconstruction: cross-attention maps only
    assert {k for n, k in kinds.items() if n not in stored} == {AttnProcessor2_0}
    assert {type(p) for p in unet.attn_processors.values()} == {AttnProcessor2_0}  # restored afterwards


@pytest.mark.parametrize("dtype", ["bf16", "fp16"])
def test_half_precision_unet_optimizes_fp32_embeddings(eps_dir, photo, dtype):
    """Every step moves its null embedding, in both half precisions (fp16 through the loss scaler, which
    test_optim checks at the small losses where it matters)."""
    from peftedit import load_model

    runtime = RuntimeConfig(device="cpu", dtype=dtype)
    model = load_model(str(eps_dir), runtime)
    config = NullTextConfig(steps=3, inner_steps=2, early_stop=0.0, early_stop_slope=0.0)
    artifact = nulltext.invert(model, photo, SOURCE, config, runtime, show_progress=False)
    assert all(t.dtype == torch.float32 for k, t in artifact.tensors.items() if k != "timesteps")
    nulls, start = artifact.tensors["null_embeddings"], artifact.tensors["e_uncond"][0]
    assert all(not torch.equal(null, start) for null in nulls)


def test_mismatched_edits_are_clear_errors(eps_model, eps_inverted):
    with pytest.raises(
        ArtifactError, match=r"made with 4 DDIM steps.*invert again with --steps \(nulltext.steps\) 20$"
    ):
        nulltext.edit(eps_model, eps_inverted, steps=20)
    original = eps_model.pipe.scheduler
    eps_model.pipe.scheduler = DDIMScheduler.from_config(original.config, timestep_spacing="trailing")
    try:
        with pytest.raises(ArtifactError, match="timestep_spacing"):
            nulltext.edit(eps_model, eps_inverted)
    finally:
        eps_model.pipe.scheduler = original
    with pytest.raises(PeftEditError, match=r"use --p2p \(mode\) refine"):
        nulltext.edit(eps_model, eps_inverted, "a photo of a big red circle", p2p.Control(mode="replace"))
    with pytest.raises(PeftEditError, match="'tiger'.*not in the target"):
        nulltext.edit(eps_model, eps_inverted, "a photo of a blue circle", p2p.Control(reweight={"tiger": 2.0}))
    with pytest.raises(PeftEditError, match="'tiger'.*neither prompt"):
        nulltext.edit(eps_model, eps_inverted, "a photo of a blue circle", p2p.Control(blend=["tiger"]))
    for control in ({"mode": "refine"}, "refine"):  # an AttributeError on .mode, deep in the edit
        named = f"^control must be a p2p.Control \\(or None\\), not {type(control).__name__}$"
        with pytest.raises(TypeError, match=named):
            nulltext.edit(eps_model, eps_inverted, "a photo of a blue circle", control)
    with pytest.raises(PeftEditError, match=r"drop the --blend \(blend\) words"):
        p2p.Control(blend=["circle"], blend_mask="difference")
    with pytest.raises(PeftEditError, match="choose one of attention, difference"):
        p2p.Control(blend_mask="edges")
    with pytest.raises(ArtifactError, match="^this edit's method is 'negative-prompt', not Imagic$"):
        imagic.render(eps_model, eps_inverted)
    imagic_like = Artifact("imagic", dict(eps_inverted.tensors), dict(eps_inverted.meta))
    with pytest.raises(ArtifactError, match="^this edit's method is 'imagic', not an inversion"):
        nulltext.edit(eps_model, imagic_like)
    shifted = {**eps_inverted.tensors, "timesteps": eps_inverted.tensors["timesteps"] + 1}  # same count, other steps
    with pytest.raises(ArtifactError, match="^the scheduler's timesteps differ from the ones this inversion was made"):
        nulltext.edit(eps_model, Artifact(eps_inverted.method, shifted, eps_inverted.meta))


def test_difference_blend_keeps_the_source_where_the_target_did_not_move(eps_model):
    pipe = eps_model.pipe
    prompts = [SOURCE, "a photo of a blue circle"]
    control = p2p.Control(blend_mask="difference", blend_start=0.0)
    controller = p2p.Controller(pipe.unet, pipe.tokenizer, prompts, control, steps=4)
    source = torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(0))
    target = source + 0.01 * torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(1))
    target[..., 5:7, 5:7] += 1.0  # the edit moved one corner
    out = controller.after_step(0, torch.cat([source, target]))
    assert torch.equal(out[0], source[0])
    moved = torch.zeros(8, 8, dtype=torch.bool)
    moved[4:8, 4:8] = True  # the moved cells, dilated by one
    assert torch.allclose(out[1][:, moved], target[0][:, moved], atol=1e-6)
    assert torch.equal(out[1][:, ~moved], source[0][:, ~moved])
    assert controller.step == 1
    late = p2p.Controller(pipe.unet, pipe.tokenizer, prompts, p2p.Control(blend_mask="difference"), steps=10)
    both = torch.cat([source, target])
    assert torch.equal(late.after_step(0, both), both)  # blend_start 0.2: the first two steps are left alone


def test_a_last_inner_update_that_breaks_the_null_embedding_is_caught(eps_model, photo, monkeypatch):
    """With one inner step per timestep, no loss sees the update: the broken null showed up only as a NaN PSNR."""
    real = nulltext.descend

    def breaks(optimizer, *args):
        real(optimizer, *args)
        optimizer.param_groups[0]["params"][0].data.fill_(float("inf"))

    monkeypatch.setattr(nulltext, "descend", breaks)
    with pytest.raises(NumericalError, match="null-text optimization: the sampled latents became nan at step 0; .*lr"):
        _invert(eps_model, photo, steps=4, inner_steps=1, early_stop=0.0, early_stop_slope=0.0)


@pytest.fixture
def eps_inverted(eps_model, photo):
    return _invert(eps_model, photo, "negative-prompt", steps=4)


@pytest.mark.parametrize(
    "kwargs, fragment",
    [
        (dict(method="nulltext"), "choose one of"),
        (dict(steps=0), "must be > 0"),
        (dict(steps=200), "lr_decay"),
        (dict(inner_steps=-1), "must be >= 0"),
        (dict(guidance=1.0), "nulltext.guidance = 1 leaves null-text nothing to optimize"),
        (dict(guidance=1.0), r"; --method \(nulltext.method\) ddim inverts for guidance 1 as it is$"),
    ],
)
def test_bad_config_is_refused(kwargs, fragment):
    with pytest.raises(PeftEditError, match=fragment):
        NullTextConfig(**kwargs)


@pytest.mark.parametrize(
    "kwargs, said",
    [
        (dict(mode="swap"), "--p2p (mode) 'swap': choose one of replace, refine, reweight"),
        (dict(blend_mask="edges"), "--blend-mask (blend_mask) 'edges': choose one of attention, difference"),
        (dict(blend=["cat"], blend_mask="difference"), "drop the --blend (blend) words"),
        (dict(mode="reweight"), "--p2p (mode) reweight needs --reweight (reweight) words and factors"),
        (dict(reweight="cat=2"), "--reweight (reweight) = 'cat=2' must be a table of WORD: FACTOR"),
        (dict(reweight={"cat": math.nan}), "--reweight (reweight) cat=nan: the factor must be a finite number"),
        (dict(self_replace=1.5), "--self-replace (self_replace) = 1.5 must be between 0 and 1"),
        (dict(blend_start=-0.5), "blend_start = -0.5 must be between 0 and 1"),
        (dict(self_replace_max_side=-1), "self_replace_max_side = -1 must be >= 0"),
    ],
)
def test_control_errors_name_the_python_argument(kwargs, said):
    """A Control built in Python is refused in terms of its own arguments (mode=, blend_mask=...), each beside the
    `peftedit edit` flag that sets it; a field with no flag by its Python name alone (not "blend-start")."""
    with pytest.raises(PeftEditError) as caught:
        p2p.Control(**kwargs)
    message = str(caught.value)
    assert said in message and "\n" not in message, message
    for name in kwargs:
        assert name in message, message


def test_bad_control_and_input_are_refused(eps_model, photo, tmp_path):
    with pytest.raises(PeftEditError, match="choose one of"):
        p2p.Control(mode="swap")
    with pytest.raises(PeftEditError, match="between 0 and 1"):
        p2p.Control(cross_replace=1.5)
    with pytest.raises(PeftEditError, match="needs --reweight"):
        p2p.Control(mode="reweight")
    shown = {  # a field that `peftedit edit` sets is named by its flag and its Python name, the others by the latter
        "cross_replace": r"--cross-replace \(cross_replace\)",
        "self_replace": r"--self-replace \(self_replace\)",
        "blend_threshold": "blend_threshold",
        "blend_start": "blend_start",
    }
    for name, said in shown.items():
        for value in (float("nan"), float("inf")):
            with pytest.raises(PeftEditError, match=rf"^{said} = .* must be a finite number$"):
                p2p.Control(**{name: value})
    for factor in (float("nan"), float("inf"), float("-inf"), "2", True):
        with pytest.raises(
            PeftEditError, match=r"^--reweight \(reweight\) cat=.*: the factor must be a finite number$"
        ):
            p2p.Control(reweight={"cat": factor})
    with pytest.raises(PeftEditError, match="^map_divisor = 0 must be > 0$"):
        p2p.Control(map_divisor=0)
    with pytest.raises(PeftEditError, match=r"^--blend \(blend\) = 'cat' must be a list"):
        p2p.Control(blend="cat")
    for bad in (["cat:2"], ["=2"], [" =2"]):  # no word: said here, not as a word missing from the prompt later
        with pytest.raises(PeftEditError, match="WORD=FACTOR"):
            p2p.parse_reweight(bad)
    assert p2p.parse_reweight(["cat=2", "red=0.5,blue=1"]) == {"cat": 2.0, "red": 0.5, "blue": 1.0}
    with pytest.raises(PeftEditError, match="prompt is empty"):
        nulltext.invert(eps_model, photo, "  ", NullTextConfig(**FAST), RUNTIME, False)
    with pytest.raises(FileNotFoundError):
        nulltext.invert(eps_model, tmp_path / "missing.png", SOURCE, NullTextConfig(**FAST), RUNTIME, False)


def test_inspect_json_and_batch_json_are_strict_json(eps_dir, photo, tmp_path, capsys, monkeypatch):
    """A perfect reconstruction has an infinite PSNR (images.psnr of equal pictures), which Python wrote as Infinity:
    not JSON, so `inspect --json` and batch.json were refused by strict readers (JavaScript, jq). Now null there."""

    def strict(text: str):
        return json.loads(text, parse_constant=lambda name: pytest.fail(f"{name} in JSON output"))

    assert psnr(Image.open(photo), Image.open(photo)) == math.inf
    monkeypatch.setattr(nulltext, "psnr", lambda a, b: math.inf)  # as if the reconstruction were exact
    folder = tmp_path / "inv"
    args = ["--model", eps_dir, "--set", "nulltext.steps=3", "--set", "nulltext.inner_steps=1", "-o"]
    code, _, err = run_cli(capsys, "invert", photo, SOURCE, *args, folder)
    assert code == 0, err
    assert Artifact.load(folder).meta["losses"]["psnr"] == math.inf  # what the edit itself keeps
    code, out, err = run_cli(capsys, "inspect", folder, "--json")
    assert code == 0, err
    assert strict(out)["losses"]["psnr"] is None
    listed = tmp_path / "list.json"
    listed.write_text(json.dumps([{"image": photo.name, "source": SOURCE}]))
    code, _, err = run_cli(
        capsys, "batch", listed, "--images", photo.parent, "--method", "null-text", *args, tmp_path / "batch"
    )
    assert code == 0, err
    entry = strict((tmp_path / "batch" / "batch.json").read_text())["items"][0]
    assert entry["status"] == "done" and entry["losses"]["psnr"] is None


def test_every_field_has_help():
    for cls in (NullTextConfig, p2p.Control):
        for f in dataclasses.fields(cls):
            assert f.metadata.get("help"), f"{cls.__name__}.{f.name} has no help"


def test_cli_invert_edit_and_errors(eps_dir, photo, tmp_path, capsys):
    folder = tmp_path / "adapters" / "inv"
    args = ["--model", eps_dir, "--steps", 6, "--inner-steps", 2, "--set", "runtime.device=cpu", "-o", folder]
    code, out, err = run_cli(capsys, "invert", photo, SOURCE, *args, "--pivot-noise", 0.5, "--seed", 3)
    assert code == 0, err
    assert {"pivot_noise": 0.5, "seed": 3}.items() <= Artifact.load(folder).meta["recipe"]["nulltext"].items()
    assert "PSNR" in out and {p.name for p in folder.iterdir()} == {"edit.safetensors", "preview.png", "README.md"}
    side = tmp_path / "reconstruction.png"
    code, out, err = run_cli(capsys, "edit", folder, "-o", side)
    assert code == 0, err
    assert Image.open(side).size == Image.open(folder / "preview.png").size  # input | reconstruction
    edited, maps = tmp_path / "edited.png", tmp_path / "maps.png"
    code, out, err = run_cli(
        capsys, "edit", folder, "a photo of a blue circle", "--blend", "circle", "--save-attention", maps, "-o", edited
    )
    assert code == 0, err
    assert Image.open(edited).size == (16, 16) and Image.open(maps).size[0] == 7 * 128  # image + 6 tokens
    code, out, err = run_cli(capsys, "edit", folder, SOURCE, "--blend-mask", "difference", "-o", edited, "--overwrite")
    assert code == 0, err
    code, out, err = run_cli(capsys, "inspect", folder)
    assert code == 0 and "null_embeddings [6, 77, 32]" in out
    edited = tmp_path / "not-written.png"
    for argv, fragment in (
        (["edit", folder, "--steps", 7, "-o", edited], "made with 6 DDIM steps"),
        (["edit", folder, "a photo of a big red circle", "--p2p", "replace", "-o", edited], "use --p2p (mode) refine"),
        (
            ["edit", folder, SOURCE, "--blend", "circle", "--blend-mask", "difference", "-o", edited],
            "--blend-mask (blend_mask) difference",
        ),
        (  # no words: it blended nothing, silently
            ["edit", folder, SOURCE, "--blend-mask", "attention", "-o", edited],
            "--blend-mask attention keeps what lies outside the --blend words' attention: give the words",
        ),
        (["invert", photo, SOURCE, *args], "already exists"),
        (["invert", photo, SOURCE, *args, "--overwrite", "--set", "nulltext.method=fast"], "choose one of"),
        (["invert", photo, SOURCE, *args, "--overwrite", "--guidance", "nan"], "nulltext.guidance = nan must be a"),
        (["invert", photo, SOURCE, *args, "--overwrite", "--seed", 10**23], "nulltext.seed = 1"),
        (["edit", folder, "--guidance", "nan", "-o", edited], "--guidance = nan must be a finite number"),
        (["edit", folder, SOURCE, "--guidance", "inf", "-o", edited], "--guidance = inf must be a finite number"),
        (["edit", folder, "--steps", 0, "-o", edited], "--steps = 0 must be > 0"),
        (
            ["edit", folder, SOURCE, "--cross-replace", "nan", "-o", edited],
            "--cross-replace (cross_replace) = nan must be a",
        ),
        (
            ["edit", folder, SOURCE, "--reweight", "circle=inf", "-o", edited],
            "--reweight (reweight) circle=inf: the factor",
        ),
    ):
        code, out, err = run_cli(capsys, *argv)
        assert code == 2 and err.startswith("peftedit: error: ") and err.count("\n") == 1, (argv, err)
        assert fragment in err, (argv, err)
    assert not edited.exists()
    same = tmp_path / "same.png"
    code, _, err = run_cli(capsys, "edit", folder, "a photo of a blue circle", "--save-attention", same, "-o", same)
    assert code == 2 and "give the attention maps their own file" in err and not same.exists()
    for bad, fragment in ((["  "], "target prompt is empty"), (["x", "--cross-replace", "1.5"], "between 0 and 1")):
        code, _, err = run_cli(capsys, "edit", folder, *bad, "--model", tmp_path / "no-model", "-o", same)
        assert code == 2 and fragment in err, err  # before the (missing) model is loaded


def test_a_pil_image_inverts_like_its_file(eps_model, tmp_path):
    """``invert`` (and ``imagic.fit``, through the same ``load_image``) gives a PIL image the input policy a path
    gets: here a transparent background must be composited on white, not dropped (red)."""
    rgba = Image.new("RGBA", (48, 40), (255, 0, 0, 0))
    rgba.paste((40, 90, 220, 255), (10, 8, 30, 32))
    path = tmp_path / "rgba.png"
    rgba.save(path)
    config = NullTextConfig(method="ddim", steps=2, pivot_noise=0.0)
    from_path = nulltext.invert(eps_model, path, SOURCE, config, RUNTIME, show_progress=False)
    with Image.open(path) as opened:
        from_pil = nulltext.invert(eps_model, opened, SOURCE, config, RUNTIME, show_progress=False)
    assert torch.equal(from_pil.tensors["z_0"], from_path.tensors["z_0"])
    assert from_pil.meta["image"] == {**from_path.meta["image"], "sha256": None, "name": None}


def test_a_p2p_mode_without_a_target_says_it_changes_nothing(eps_model, eps_inverted, caplog):
    nulltext.edit(eps_model, eps_inverted, control=p2p.Control(mode="refine"))
    assert "--p2p (mode) refine without a target prompt edits the source into itself" in caplog.text
    caplog.clear()
    nulltext.edit(eps_model, eps_inverted, control=p2p.Control(reweight={"circle": 2.0}))
    assert "edits the source into itself" not in caplog.text  # reweighting the source's own words is an edit


def test_attention_replace_schedules_cover_their_share_of_steps(eps_model):
    """The target borrows the source's cross maps for steps < cross_replace * steps, self maps for < self_replace."""
    pipe = eps_model.pipe
    control = p2p.Control(mode="replace", cross_replace=0.5, self_replace=0.3)
    controller = p2p.Controller(pipe.unet, pipe.tokenizer, [SOURCE, "a photo of a blue circle"], control, steps=10)
    probs = torch.rand(4, 2, 16, 77, generator=torch.Generator().manual_seed(0))
    for cross, share in ((True, 5), (False, 3)):
        borrowed = []
        for step in range(10):
            controller.step = step
            out = controller.attend(probs.clone(), cross, edit=True, store=False)
            assert torch.equal(out[:-1], probs[:-1])  # the source branch and the unconditional half are untouched
            borrowed.append(torch.equal(out[-1], probs[-2]))
        assert borrowed == [step < share for step in range(10)], cross


def test_refine_mapping_borrows_shared_tokens_and_end_tokens_from_the_source():
    """Refine aligns the prompts' shared tokens, added words keep their own maps, end/padding tokens shift."""
    tokenizer = _WordTokenizer({"a": 1, "red": 2, "big": 3, "circle": 4}, length=10)
    index, aligned = p2p.token_mapping(tokenizer, "a red circle", "a big red circle", "refine")
    # target [start, a, big, red, circle, end, pad...] borrows from source [start, a, red, circle, end, pad...]
    assert index.tolist() == [0, 1, 2, 2, 3, 4, 5, 6, 7, 8]
    assert aligned.tolist() == [1, 1, 0, 1, 1, 1, 1, 1, 1, 1]
    _, aligned = p2p.token_mapping(tokenizer, "a circle", "a circle big", "refine")
    assert aligned[:5].tolist() == [1, 1, 1, 0, 1]  # a word added last keeps its own map too


class _WordTokenizer:
    """One id per word, no special tokens: enough for token_mapping."""

    def __init__(self, ids: dict[str, int], length: int) -> None:
        self.ids, self.model_max_length = ids, length

    def __call__(self, text: str, add_special_tokens: bool = False) -> SimpleNamespace:
        return SimpleNamespace(input_ids=[self.ids[word] for word in text.split()])


def test_reweight_scales_only_the_chosen_word_in_the_target(eps_model):
    """--reweight multiplies the target's cross-attention on the word's tokens by its factor, and nothing else."""
    pipe = eps_model.pipe
    target = "a photo of a blue circle"
    controller = p2p.Controller(pipe.unet, pipe.tokenizer, [SOURCE, target], p2p.Control(reweight={"blue": 2.0}), 10)
    where = p2p.word_positions(pipe.tokenizer, target, "blue")
    probs = torch.rand(4, 2, 16, 77, generator=torch.Generator().manual_seed(0))
    out = controller.attend(probs.clone(), cross=True, edit=True, store=False)
    expected = probs[-2].clone()
    expected[..., where] *= 2.0
    assert where and torch.equal(out[-1], expected)


def test_a_negative_reweight_factor_is_taken_as_the_p2p_paper_allows(eps_model):
    """P2P scales a word's map by c in [-2, 2]: below 0 weakens the word past its absence. Factors < 0 were refused."""
    pipe = eps_model.pipe
    target = "a photo of a blue circle"
    assert p2p.parse_reweight(["blue=-1.5"]) == {"blue": -1.5}
    controller = p2p.Controller(pipe.unet, pipe.tokenizer, [SOURCE, target], p2p.Control(reweight={"blue": -1.5}), 10)
    where = p2p.word_positions(pipe.tokenizer, target, "blue")
    probs = torch.rand(4, 2, 16, 77, generator=torch.Generator().manual_seed(0))
    out = controller.attend(probs.clone(), cross=True, edit=True, store=False)
    expected = probs[-2].clone()
    expected[..., where] *= -1.5
    assert where and torch.equal(out[-1], expected)


def test_a_reweighted_phrase_scales_its_words_where_they_stand_together(eps_model):
    """--reweight "blue circle=2" said the word was not in the target: each prompt word was searched alone."""
    tokenizer = eps_model.pipe.tokenizer
    target = "a blue square and a blue circle"
    phrase = p2p.word_positions(tokenizer, target, "blue circle")
    blue, circle = (p2p.word_positions(tokenizer, target, word) for word in ("blue", "circle"))
    assert len(blue) == 2 and len(circle) == 1 and phrase == [blue[1], circle[0]] == [circle[0] - 1, circle[0]]
    ids = tokenizer(target).input_ids  # with the start token: positions index the text encoder's sequence
    assert [ids[p] for p in phrase] == tokenizer("blue circle", add_special_tokens=False).input_ids
    controller = p2p.Controller(
        eps_model.pipe.unet, tokenizer, [SOURCE, target], p2p.Control(reweight={"blue circle": 2.0}), 4
    )
    assert torch.equal(torch.nonzero(controller.equalizer.cpu() == 2.0).flatten(), torch.tensor(phrase))


def test_a_word_past_the_text_encoders_reach_has_no_position(eps_model):
    """The encoder's sequence ends with the end token at model_max_length - 1: a word truncated to that slot or past
    it is not in the prompt the encoder sees."""
    tokenizer = eps_model.pipe.tokenizer
    words = tokenizer.model_max_length - 3  # "a" at 1 .. model_max_length - 3
    assert p2p.word_positions(tokenizer, "a " * words + "blue", "blue") == [tokenizer.model_max_length - 2]
    assert p2p.word_positions(tokenizer, "a " * (words + 1) + "blue", "blue") == []


def test_self_attention_is_replaced_at_layers_up_to_the_max_side(eps_model):
    """self_replace_max_side is inclusive: layers of exactly that many latents a side are edited."""
    unet, tokenizer = eps_model.pipe.unet, eps_model.pipe.tokenizer
    probe = p2p.Controller(unet, tokenizer, [SOURCE], None, 10)
    names = [n for n in unet.attn_processors if n.endswith("attn1.processor")]
    side = min(probe.layer_side(n) for n in names)
    for most in (side, side - 1):
        control = p2p.Control(self_replace_max_side=most)
        controller = p2p.Controller(unet, tokenizer, [SOURCE, "a photo of a blue circle"], control, 10)
        for name in names:
            edited = (controller.role(name) or (False, False))[0]
            assert edited == (controller.layer_side(name) <= most), (name, most)


def test_null_text_learning_rate_decays_per_timestep(eps_model, photo, monkeypatch):
    """Timestep i's null embedding is optimized at lr * (1 - lr_decay * i), the null-text reference's schedule."""
    rates = []

    def recording(params, lr, kind="adamw8bit", weight_decay=0.0):
        rates.append(lr)
        return torch.optim.AdamW(params, lr=lr)

    monkeypatch.setattr(nulltext, "make_optimizer", recording)
    _invert(eps_model, photo, steps=4, inner_steps=1, lr=0.1, lr_decay=0.2, early_stop=0.0, early_stop_slope=0.0)
    assert rates == pytest.approx([0.1, 0.08, 0.06, 0.04])


def test_the_early_stop_threshold_grows_by_its_slope_per_timestep(eps_model, photo):
    """Step i stops once its loss < early_stop + i * early_stop_slope: with 0 + 10 * i only step 0 runs every step."""
    artifact = _invert(eps_model, photo, steps=4, inner_steps=2, early_stop=0.0, early_stop_slope=10.0)
    assert artifact.meta["per_step"]["inner_steps"] == [2, 1, 1, 1]


def test_blend_words_are_marked_in_the_prompt_that_has_them(eps_model):
    """A blend word marks its tokens in each branch whose prompt holds it: the target's own words count too."""
    pipe = eps_model.pipe
    prompts = [SOURCE, "a photo of a blue square"]
    controller = p2p.Controller(pipe.unet, pipe.tokenizer, prompts, p2p.Control(blend=["square"]), 10)
    marked = [controller.blend_alpha[b].nonzero().flatten().tolist() for b in range(2)]
    assert marked == [[], p2p.word_positions(pipe.tokenizer, prompts[1], "square")] and marked[1]
    several = p2p.Control(blend=["blue square"])  # several words in one --blend argument: each is a blend word
    assert several.blend == ["blue", "square"]
    assert p2p.Control(blend=[" blue  square\t"]).blend == ["blue", "square"]  # any spacing: no empty "word"
    controller = p2p.Controller(pipe.unet, pipe.tokenizer, prompts, several, 10)  # "blue square" was in no prompt
    expected = sorted(p2p.word_positions(pipe.tokenizer, prompts[1], "blue") + marked[1])
    assert controller.blend_alpha[1].nonzero().flatten().tolist() == expected


def test_a_pivot_noised_all_the_way_is_the_forward_process_at_every_timestep(eps_model, photo):
    """pivot_noise = 1 (allowed by the config) noises every step: no DDIM inversion step is left."""
    config, latent, cond, stub, scheduler = _stub_pivot_inputs(eps_model, photo, seed=1)
    pivots = ddim_invert(stub, config, latent, cond, 6, noised_steps=6, seed=5)
    assert len(pivots) == 7 and torch.equal(pivots[0], latent)
    noise = torch.randn(latent.shape, generator=torch.Generator().manual_seed(5))
    for k, t in enumerate(scheduler.timesteps.flip(0), start=1):
        assert torch.allclose(pivots[k], scheduler.add_noise(latent, noise, t.reshape(1)), atol=1e-6), k
    assert NullTextConfig(pivot_noise=1.0).pivot_noise == 1.0


def test_pivot_noise_rounds_to_the_nearest_step_count(eps_model, photo, monkeypatch):
    """0.4 of 4 steps noises 2 (1.6 truncated would noise 1; 0.58 of 50 is 28.999… in floating point)."""
    asked = []

    def spy(*args):
        asked.append(args[6])  # noised_steps
        return ddim_invert(*args)

    monkeypatch.setattr(nulltext, "ddim_invert", spy)
    for steps, share in ((4, 0.4), (50, 0.58)):
        _invert(eps_model, photo, "ddim", steps=steps, pivot_noise=share)
    assert asked == [2, 29]


def test_as_many_steps_as_training_timesteps_are_taken_one_more_is_not(eps_model):
    from peftedit.methods.common import check_steps

    most = eps_model.pipe.scheduler.config.num_train_timesteps
    check_steps(eps_model, most, "nulltext.steps")  # DDIM then visits every training timestep once
    with pytest.raises(PeftEditError, match=f"^nulltext.steps = {most + 1} is more than the model's {most} training"):
        check_steps(eps_model, most + 1, "nulltext.steps")


def test_a_scheduler_list_read_back_from_json_matches_the_tuple_it_was(eps_model):
    """An edit's header stores the scheduler as JSON, so trained_betas given as a tuple comes back a list."""
    import json

    from peftedit.methods.common import TRAINING_SCHEDULE, check_schedule

    original = eps_model.pipe.scheduler
    betas = tuple(float(b) for b in torch.linspace(1e-4, 2e-2, original.config.num_train_timesteps))
    eps_model.pipe.scheduler = DDIMScheduler.from_config(original.config, trained_betas=betas)
    try:
        saved = json.loads(json.dumps(dict(eps_model.pipe.scheduler.config)))
        check_schedule(eps_model, SimpleNamespace(meta={"scheduler": saved}), TRAINING_SCHEDULE)
        saved["trained_betas"][-1] *= 2
        with pytest.raises(ArtifactError, match="differs from the one this edit was made with .trained_betas"):
            check_schedule(eps_model, SimpleNamespace(meta={"scheduler": saved}), TRAINING_SCHEDULE)
    finally:
        eps_model.pipe.scheduler = original


@pytest.mark.parametrize("cross_replace", [0.0, 0.05, 0.09])  # 0.9 of a step is no step: it is not rounded
def test_a_reweight_that_cannot_act_is_refused(eps_model, cross_replace):
    """The factors scale the target's cross-attention only in the steps that borrow the source's (as in the P2P
    reference): with no such step the edit ran and silently ignored --reweight."""
    pipe, target = eps_model.pipe, "a photo of a blue circle"
    control = p2p.Control(reweight={"blue": 2.0}, cross_replace=cross_replace)
    with pytest.raises(
        PeftEditError, match=r"--reweight \(reweight\) .* --cross-replace \(cross_replace\) = .* of the 10; raise it$"
    ):
        p2p.Controller(pipe.unet, pipe.tokenizer, [SOURCE, target], control, 10)
    control = p2p.Control(reweight={"blue": 2.0}, cross_replace=0.1)  # one step of ten: it acts there
    assert p2p.Controller(pipe.unet, pipe.tokenizer, [SOURCE, target], control, 10).equalizer.max() == 2.0
    control = p2p.Control(blend=["blue"], cross_replace=cross_replace)  # no reweight: nothing to act, nothing refused
    assert p2p.Controller(pipe.unet, pipe.tokenizer, [SOURCE, target], control, 10).blend_alpha.max() == 1.0
