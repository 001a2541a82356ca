"""Imagic on tiny models: each stage learns, LoRA is a no-op at init, artifacts round-trip and load in diffusers."""

from __future__ import annotations

import logging

import numpy as np
import pytest
import torch
from peft import LoraConfig
from PIL import Image
from safetensors.torch import load_file

from peftedit import (
    Artifact,
    ArtifactError,
    ImagicConfig,
    NullTextConfig,
    NumericalError,
    PeftEditError,
    RuntimeConfig,
    generate,
    imagic,
    load_model,
    nulltext,
)
from peftedit.diffusion import (
    encode_image,
    encode_text,
    fresh_scheduler,
    initial_noise,
    mean_denoising_loss,
    sample,
)
from peftedit.images import eta_seed_grid, grid, load_image

FAST = dict(embedding_steps=60, finetune_steps=60, render_steps=8, preview_etas=[0.5, 0.9])
RUNTIME = RuntimeConfig(device="cpu")


@pytest.fixture(scope="module")
def fitted(tiny_dir, shared_photo):
    """One fit per prediction type, shared by the tests that only read it and render it on their own ``tiny_model``
    (a fit was ~6 s, and nine tests took one each). The model it is fitted on is loaded as ``tiny_model`` is, and the
    photo is the ``photo`` fixture's picture (``shared_photo``); fitting leaves the model as loaded (checked below)."""
    model = load_model(str(tiny_dir), RUNTIME)
    return imagic.fit(model, shared_photo, "a photo of a red circle", ImagicConfig(**FAST), RUNTIME, False)


def test_embedding_stage_lowers_the_loss(tiny_model, photo):
    pipe = tiny_model.pipe
    picture, _ = load_image(photo, tiny_model.resolution)
    latent, e_tgt = encode_image(pipe, picture), encode_text(pipe, "a photo of a red circle")
    scheduler = fresh_scheduler(pipe)
    generator = torch.Generator().manual_seed(0)
    config = ImagicConfig(embedding_steps=150, embedding_lr=5e-2)
    e_opt, _ = imagic.optimize_embedding(pipe.unet, scheduler, latent, e_tgt, config, RUNTIME, generator, False)
    before = mean_denoising_loss(pipe.unet, scheduler, latent, e_tgt, samples=32)
    after = mean_denoising_loss(pipe.unet, scheduler, latent, e_opt, samples=32)
    assert after < 0.985 * before, (before, after)


def test_lora_stage_lowers_the_loss_and_reconstructs_better(tiny_model, photo):
    pipe = tiny_model.pipe
    config = ImagicConfig(embedding_steps=0, finetune_steps=250, lora_lr=3e-3, render_steps=10, preview_etas=[0.0])
    artifact = imagic.fit(tiny_model, photo, "a photo of a red circle", config, RUNTIME, False)
    picture, _ = load_image(photo, tiny_model.resolution)
    latent, e_opt = encode_image(pipe, picture), artifact.tensors["e_opt"]
    scheduler = fresh_scheduler(pipe)
    before = mean_denoising_loss(pipe.unet, scheduler, latent, e_opt, samples=32)
    with imagic.lora_applied(pipe.unet, artifact):
        after = mean_denoising_loss(pipe.unet, scheduler, latent, e_opt, samples=32)
    assert after < 0.95 * before, (before, after)
    untrained = Artifact(
        artifact.method,
        artifact.tensors,
        artifact.meta,
        lora_config=artifact.lora_config,
        lora={k: torch.zeros_like(v) if "lora_B" in k else v for k, v in artifact.lora.items()},
    )
    # A random VAE cannot decode the photo, so reconstruction is measured on the sampled latent at eta = 0.
    error_before, error_after = (_eta0_latent_error(tiny_model, a, latent) for a in (untrained, artifact))
    assert error_after < 0.93 * error_before, (error_before, error_after)


def _eta0_latent_error(model, artifact, latent) -> float:
    pipe = model.pipe
    scheduler = fresh_scheduler(pipe, 10)
    noise = initial_noise(tuple(latent.shape), seed=0)
    with imagic.lora_applied(pipe.unet, artifact):
        out = sample(pipe.unet, scheduler, noise, artifact.tensors["e_opt"], artifact.tensors["e_uncond"], 1.0)
    return float(torch.nn.functional.mse_loss(out, latent))


def test_lora_at_init_changes_nothing(eps_model):
    unet = eps_model.pipe.unet
    x, t = torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(1)), torch.tensor(400)
    cond = torch.randn(1, 77, 32, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        base = unet(x, t, encoder_hidden_states=cond).sample
        unet.add_adapter(
            LoraConfig(**ImagicConfig(lora_targets=["attention", "feedforward", "conv"]).lora_config()),
            adapter_name="probe",
        )
        adapted = unet(x, t, encoder_hidden_states=cond).sample
        unet.delete_adapters("probe")
    assert torch.equal(base, adapted)


def test_fit_and_render_leave_the_model_as_loaded(eps_model, photo):
    """Same weights and the same modules: no emptied LoRA wrapper stays around a layer (later stages and renders
    would run through it)."""
    unet = eps_model.pipe.unet
    before = {k: v.clone() for k, v in unet.state_dict().items()}
    layers = [type(m) for m in unet.modules()]
    artifact = imagic.fit(eps_model, photo, "a red circle", ImagicConfig(**FAST), RUNTIME, False)
    imagic.render(eps_model, artifact, eta=0.5)
    after = unet.state_dict()
    assert before.keys() == after.keys()
    assert all(torch.equal(before[k], after[k]) for k in before)
    assert [type(m) for m in unet.modules()] == layers
    assert not any(p.requires_grad for p in unet.parameters())


def test_roundtrip_renders_bit_identically(tiny_model, fitted, tmp_path):
    first = imagic.render(tiny_model, fitted, eta=0.7, seed=3)
    fitted.save(tmp_path / "edit")
    loaded = Artifact.load(tmp_path / "edit")
    assert loaded.tensors.keys() == fitted.tensors.keys()
    assert all(torch.equal(loaded.tensors[k], fitted.tensors[k]) for k in fitted.tensors)
    assert all(torch.equal(loaded.lora[k], fitted.lora[k]) for k in fitted.lora)
    second = imagic.render(tiny_model, loaded, eta=0.7, seed=3)
    assert np.array_equal(np.asarray(first), np.asarray(second))
    other_seed = imagic.render(tiny_model, loaded, eta=0.7, seed=4)
    assert not np.array_equal(np.asarray(first), np.asarray(other_seed))


def test_vanilla_diffusers_loads_the_lora_unchanged(tiny_dir, tiny_model, fitted, tmp_path):
    from diffusers import StableDiffusionPipeline

    fitted.save(tmp_path / "edit")
    vanilla = StableDiffusionPipeline.from_pretrained(str(tiny_dir))
    vanilla.load_lora_weights(str(tmp_path / "edit"))
    x, t = torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(5)), torch.tensor(300)
    cond = fitted.tensors["e_opt"]
    with torch.no_grad():
        theirs = vanilla.unet(x, t, encoder_hidden_states=cond).sample
        with imagic.lora_applied(tiny_model.pipe.unet, fitted):
            ours = tiny_model.pipe.unet(x, t, encoder_hidden_states=cond).sample
        base = tiny_model.pipe.unet(x, t, encoder_hidden_states=cond).sample
    assert torch.allclose(theirs, ours, atol=1e-5)
    assert not torch.allclose(base, ours, atol=1e-5)


def test_artifact_records_what_it_was_made_with(fitted, photo):
    meta = fitted.meta
    assert meta["prompts"] == {"target": "a photo of a red circle"}
    assert meta["image"]["name"] == photo.name and len(meta["image"]["sha256"]) == 64
    assert meta["recipe"]["imagic"]["finetune_steps"] == 60
    assert meta["scheduler"]["prediction_type"] in ("epsilon", "v_prediction")
    assert meta["dtype"] == "fp32"  # what the runtime's "auto" became on the CPU
    assert fitted.preview.size[0] == 3 * fitted.preview.size[1] - 3 * 14  # input + 2 renders, labels below


def test_half_precision_base_trains_fp32_parameters(eps_dir, photo):
    from peftedit import load_model

    runtime = RuntimeConfig(device="cpu", dtype="bf16")
    model = load_model(str(eps_dir), runtime)
    config = ImagicConfig(embedding_steps=3, finetune_steps=3, render_steps=2, preview_etas=[0.5])
    artifact = imagic.fit(model, photo, "a red circle", config, runtime, False)
    assert all(t.dtype == torch.float32 for t in artifact.tensors.values())
    assert all(t.dtype == torch.float32 for t in artifact.lora.values())
    assert {p.dtype for p in model.pipe.unet.parameters()} == {torch.bfloat16}
    assert not torch.equal(artifact.tensors["e_opt"], artifact.tensors["e_tgt"])


def test_too_many_sampling_steps_are_refused_before_any_work(eps_model, photo, monkeypatch):
    """imagic.render_steps = 1001 trained both stages, then failed in the preview render (the LoRA lost)."""

    def started(*args, **kwargs):
        raise AssertionError("work started before the step count was checked")

    monkeypatch.setattr(imagic, "encode_photo", started)
    monkeypatch.setattr(nulltext, "encode_photo", started)
    monkeypatch.setattr(generate, "text_embedding", started)
    config = ImagicConfig(**{**FAST, "render_steps": 1001})
    with pytest.raises(PeftEditError, match="imagic.render_steps = 1001 is more than the model's 1000 training"):
        imagic.fit(eps_model, photo, "a red circle", config, RUNTIME, False)
    with pytest.raises(PeftEditError, match="nulltext.steps = 1001 is more than the model's 1000 training"):
        nulltext.invert(eps_model, photo, "a red circle", NullTextConfig(steps=1001, lr_decay=0), RUNTIME, False)
    with pytest.raises(PeftEditError, match="steps = 1001 is more than the model's 1000 training"):
        generate.generate(eps_model, "a red circle", steps=1001)


def test_a_lora_rank_above_the_narrowest_adapted_layer_is_refused_before_any_work(eps_model, photo, monkeypatch):
    """A rank past a layer's width adds parameters, not capacity; a huge one (a typo) ran stage 1, then exhausted
    memory building the adapter, with no message."""
    from peftedit.methods.imagic import check_lora_rank

    def started(*args, **kwargs):
        raise AssertionError("work started before the rank was checked")

    unet = eps_model.pipe.unet  # the tiny model's narrowest attention layer: 32 wide; its feed-forward ones: 64
    check_lora_rank(unet, ImagicConfig(lora_rank=32))
    check_lora_rank(unet, ImagicConfig(lora_rank=64, lora_targets=["feedforward"]))
    with pytest.raises(PeftEditError, match="^imagic.lora_rank = 65 is above the narrowest adapted layer's width, 64"):
        check_lora_rank(unet, ImagicConfig(lora_rank=65, lora_targets=["feedforward"]))
    monkeypatch.setattr(imagic, "encode_photo", started)
    with pytest.raises(PeftEditError, match="^imagic.lora_rank = 100000 is above the narrowest adapted layer's wid"):
        imagic.fit(eps_model, photo, "a red circle", ImagicConfig(**{**FAST, "lora_rank": 10**5}), RUNTIME, False)


def test_a_failed_render_leaves_the_model_usable_and_renders_leave_the_global_rng(fitted, tiny_model):
    """An adapter that failed to go on (peft refused its settings) left diffusers' UNet marked as holding adapters,
    so every later fit and render failed; a LoRA for other layer sizes gave torch's multi-line size mismatch; peft's
    random init of the adapter (overwritten at once) moved the global torch RNG."""
    bad = Artifact(
        fitted.method, fitted.tensors, fitted.meta, lora=fitted.lora,
        lora_config={**fitted.lora_config, "init_lora_weights": "bogus"},
    )  # fmt: skip
    with pytest.raises(ValueError, match="bogus"):
        imagic.render(tiny_model, bad, steps=2)
    narrow = {k: v[:, :-1] if "lora_A" in k else v for k, v in fitted.lora.items()}
    wrong = Artifact(fitted.method, fitted.tensors, fitted.meta, lora=narrow, lora_config=fitted.lora_config)
    with pytest.raises(ArtifactError, match="LoRA weights do not fit this UNet .size mismatch for"):
        imagic.render(tiny_model, wrong, steps=2)
    state = torch.random.get_rng_state()
    first = imagic.render(tiny_model, fitted, steps=2)
    assert torch.equal(state, torch.random.get_rng_state())
    assert np.array_equal(np.asarray(first), np.asarray(imagic.render(tiny_model, fitted, steps=2)))
    assert not any("lora" in name for name, _ in tiny_model.pipe.unet.named_modules())


def test_embeddings_that_do_not_fit_the_model_are_refused(fitted, tiny_model):
    """Consistent with each other (so the load checks pass) but not with the base model's text width."""
    narrow = {**fitted.tensors, **{k: fitted.tensors[k][..., :4] for k in ("e_tgt", "e_opt", "e_uncond")}}
    artifact = Artifact(fitted.method, narrow, fitted.meta, lora=fitted.lora, lora_config=fitted.lora_config)
    with pytest.raises(ArtifactError, match=r"e_tgt has shape \[1, 77, 4\], but .* takes \[1, 77, "):
        imagic.render(tiny_model, artifact, steps=2)


def test_api_misuse_is_named(eps_model, photo, fitted, tiny_model):
    with pytest.raises(PeftEditError, match="the prompt must be a string, not NoneType"):
        imagic.fit(eps_model, photo, None, ImagicConfig(**FAST), RUNTIME, False)  # it trained on the prompt "None"
    with pytest.raises(TypeError, match="config must be an ImagicConfig, not NullTextConfig"):
        imagic.fit(eps_model, photo, "a red circle", NullTextConfig(), RUNTIME, False)
    with pytest.raises(TypeError, match="runtime must be a RuntimeConfig .* not dict"):
        imagic.fit(eps_model, photo, "a red circle", ImagicConfig(**FAST), {"seed": 1}, False)
    with pytest.raises(TypeError, match="config must be a NullTextConfig, not ImagicConfig"):
        nulltext.invert(eps_model, photo, "a red circle", ImagicConfig(), RUNTIME, False)
    with pytest.raises(PeftEditError, match="seed = None must be an integer"):
        imagic.render(tiny_model, fitted, seed=None)


def test_render_takes_tuples_and_numpy_seeds_and_names_an_empty_list(eps_model, photo):
    """A tuple of etas or seeds rendered as the list does (it was "must be a number"), a numpy seed as its int (it was
    torch's TypeError), and an empty list is named (it was an IndexError)."""
    config = ImagicConfig(embedding_steps=1, finetune_steps=1, render_steps=2, preview_etas=[0.5])
    fitted = imagic.fit(eps_model, photo, "a red circle", config, RUNTIME, False)
    listed = imagic.render(eps_model, fitted, eta=[0.5, 0.9], seed=[1, 2])
    paired = imagic.render(eps_model, fitted, eta=(0.5, 0.9), seed=(1, 2))
    assert len(paired) == 4
    assert all(np.array_equal(np.asarray(a), np.asarray(b)) for a, b in zip(listed, paired, strict=True))
    one = imagic.render(eps_model, fitted, eta=0.5, seed=np.int64(1))
    assert np.array_equal(np.asarray(one), np.asarray(listed[0]))
    assert np.array_equal(np.asarray(generate.generate(eps_model, "a red circle", np.int64(3), steps=2)),
                          np.asarray(generate.generate(eps_model, "a red circle", 3, steps=2)))  # fmt: skip
    for empty in ({"eta": []}, {"seed": ()}):
        with pytest.raises(PeftEditError, match=r"^(eta = \[\]|seed = \(\)): give at least one value$"):
            imagic.render(eps_model, fitted, **empty)
    with pytest.raises(PeftEditError, match=r"^eta = \[\]: give at least one value$"):
        imagic.render_grid(eps_model, fitted, [], [0])
    for bad, said in ((float("nan"), "eta = nan must be a finite number"), ("0.5", "eta = '0.5' must be a number")):
        with pytest.raises(PeftEditError, match=f"^{said}$"):  # every eta of a list, before any render
            imagic.render(eps_model, fitted, eta=[0.5, bad])


@pytest.mark.parametrize(
    "call",
    [
        lambda: imagic.render(None, None, 0.7, 0, 30, 10),
        lambda: imagic.render_grid(None, None, [0.7], [0], 30, 10),
        lambda: nulltext.edit(None, None, "a blue circle", None, 10, 30),
        lambda: nulltext.run_edit(None, None, "a blue circle", None, 10, 30),
        lambda: generate.generate(None, "a blue circle", 0, 10, 30),
    ],
)
def test_guidance_and_steps_are_keywords_in_every_render(call):
    """Imagic's render took (guidance, steps) in that order, nulltext.edit and generate (steps, guidance): a call
    written for one order ran guidance 30 at 10 steps in the other, without a word."""
    with pytest.raises(TypeError, match="positional argument"):
        call()


def test_an_imagic_edit_is_refused_on_another_prediction_type(fitted, tiny_model, tiny_dir):
    """The epsilon and v-prediction tiny models share their weights: only the scheduler tells them apart, and an
    Imagic LoRA trained for one target renders garbage under the other."""
    from peftedit import load_model

    other = "epsilon" if tiny_model.pipe.scheduler.config.prediction_type == "v_prediction" else "v_prediction"
    model = load_model(str(tiny_dir), RUNTIME)
    model.pipe.scheduler.register_to_config(prediction_type=other)
    with pytest.raises(ArtifactError, match=f"scheduler differs .*prediction_type '.*' -> '{other}'"):
        imagic.render(model, fitted, steps=2)


def test_the_documented_vanilla_render_is_peftedits_picture(tiny_dir, tiny_model, fitted, tmp_path):
    """adapters/README's snippet: DDIM, the edit's steps and guidance, and the same CPU-seeded starting noise give the
    picture imagic.render gives, in a pipeline that never imports peftedit's rendering."""
    from diffusers import DDIMScheduler, StableDiffusionPipeline

    fitted.save(tmp_path / "edit")
    pipe = StableDiffusionPipeline.from_pretrained(str(tiny_dir))
    pipe.scheduler = DDIMScheduler.from_config(pipe.scheduler.config)
    pipe.load_lora_weights(str(tmp_path / "edit"))
    t = load_file(str(tmp_path / "edit" / "edit.safetensors"))
    recipe = fitted.meta["recipe"]["imagic"]
    eta, seed, side = 0.6, 3, pipe.unet.config.sample_size
    latents = torch.randn(
        (1, pipe.unet.config.in_channels, side, side), generator=torch.Generator("cpu").manual_seed(seed)
    )
    theirs = pipe(
        prompt_embeds=eta * t["e_tgt"] + (1 - eta) * t["e_opt"], negative_prompt_embeds=t["e_uncond"],
        latents=latents, num_inference_steps=recipe["render_steps"], guidance_scale=recipe["guidance"],
    ).images[0]  # fmt: skip
    ours = imagic.render(tiny_model, fitted, eta=eta, seed=seed)
    assert np.abs(np.asarray(theirs, dtype=int) - np.asarray(ours, dtype=int)).max() <= 1


def test_the_unet_is_conditioned_on_eta_times_the_target_plus_the_rest_of_the_optimized(eps_model, photo):
    """eta and 1 - eta swapped gave a picture the vanilla comparison could not tell apart on the tiny model."""
    config = ImagicConfig(embedding_steps=0, finetune_steps=1, render_steps=2, preview_etas=[0.5])
    fitted = imagic.fit(eps_model, photo, "a red circle", config, RUNTIME, False)
    e_tgt = fitted.tensors["e_tgt"]
    e_opt = e_tgt + torch.randn(e_tgt.shape, generator=torch.Generator().manual_seed(0))  # apart from the target
    artifact = Artifact("imagic", {**fitted.tensors, "e_opt": e_opt}, fitted.meta, fitted.lora, fitted.lora_config)
    seen = []
    hook = eps_model.pipe.unet.register_forward_pre_hook(
        lambda module, args, kwargs: seen.append(kwargs["encoder_hidden_states"].clone()), with_kwargs=True
    )
    try:
        imagic.render(eps_model, artifact, eta=0.8, steps=2)
    finally:
        hook.remove()
    assert len(seen) == 2 and all(len(batch) == 2 for batch in seen)  # [unconditional, conditional] per step
    for batch in seen:
        assert torch.equal(batch[0], fitted.tensors["e_uncond"][0])
        assert torch.allclose(batch[1], 0.8 * e_tgt[0] + 0.2 * e_opt[0], atol=1e-6)


def test_several_seeds_render_in_one_call_like_one_call_each(fitted, tiny_model):
    """A seed list renders under one LoRA application (and, with offload_idle, one UNet and one VAE placement)."""
    together = imagic.render(tiny_model, fitted, eta=[0.5, 0.9], seed=[1, 2], steps=3)
    apart = [imagic.render(tiny_model, fitted, eta=e, seed=s, steps=3) for s in (1, 2) for e in (0.5, 0.9)]
    assert len(together) == 4
    for one, other in zip(together, apart, strict=True):
        assert np.array_equal(np.asarray(one), np.asarray(other))
    assert len(imagic.render(tiny_model, fitted, eta=0.5, seed=[1], steps=3)) == 1  # a list in, a list out
    sheet = imagic.render_grid(tiny_model, fitted, [0.5, 0.9], [1, 2], steps=3)  # the CLI's grid, in the API
    assert np.array_equal(np.asarray(sheet), np.asarray(eta_seed_grid(together, [0.5, 0.9], [1, 2])))
    cell = max(128, together[0].width)  # images.grid enlarges small renders to 128 px cells, under a 14 px label
    assert sheet.size == (2 * cell, 2 * (16 + cell + 14))  # a row per seed under a 16 px caption
    top = 16 + cell + 14 + 16  # second row (seed 2), second column (eta 0.9)
    picked = np.asarray(sheet.crop((cell, top, 2 * cell, top + cell)))
    assert np.array_equal(picked, np.asarray(together[3].resize((cell, cell), Image.NEAREST)))
    one = imagic.render_grid(tiny_model, fitted, (0.5,), 1, steps=3)  # a number or tuple as render takes them
    assert np.array_equal(np.asarray(one), np.asarray(eta_seed_grid(together[:1], [0.5], [1])))
    guided = imagic.render(tiny_model, fitted, eta=0.5, seed=1, steps=3, guidance=1.5)  # not the recipe's guidance
    assert not np.array_equal(np.asarray(guided), np.asarray(together[0]))
    sheet = imagic.render_grid(tiny_model, fitted, 0.5, 1, steps=3, guidance=1.5)
    assert np.array_equal(np.asarray(sheet), np.asarray(eta_seed_grid([guided], [0.5], [1])))


def test_a_render_that_diverges_is_an_error_not_a_black_picture(eps_model, photo, caplog):
    """An eta or guidance large enough to overflow rendered an all-black picture without a word; a fit whose preview
    diverges keeps its training (a warning, and a preview of the input and the etas that rendered)."""
    short = dict(embedding_steps=2, finetune_steps=2, render_steps=2, preview_etas=[0.5, 1e30])
    with caplog.at_level(logging.WARNING, "peftedit"):
        artifact = imagic.fit(eps_model, photo, "a red circle", ImagicConfig(**short), RUNTIME, False)
    assert "render eta 1e+30: the render diverged" in caplog.text and "no preview" not in caplog.text
    picture, _ = load_image(photo, eps_model.resolution)
    rendered = imagic.render(eps_model, artifact, eta=[0.5, 1e30], steps=2, skip_diverged=True)
    assert rendered[1] is None and artifact.preview.size == grid([picture, rendered[0]], ["input", "eta 0.5"]).size
    assert np.array_equal(np.asarray(artifact.preview), np.asarray(grid([picture, rendered[0]], ["input", "eta 0.5"])))
    short["preview_etas"] = [1e30]
    with caplog.at_level(logging.WARNING, "peftedit"):
        alone = imagic.fit(eps_model, photo, "a red circle", ImagicConfig(**short), RUNTIME, False)
    assert "no preview: the render diverged" in caplog.text
    assert alone.lora and alone.preview.size == grid([picture], ["input"]).size
    with pytest.raises(NumericalError, match="^the render diverged"):  # skipped only while some render did not
        imagic.render(eps_model, artifact, eta=[1e30, 1e31], skip_diverged=True)
    with pytest.raises(NumericalError, match="^the render diverged"):  # and only when asked to: no None in the list
        imagic.render(eps_model, artifact, eta=[0.5, 1e30], steps=2)
    caplog.clear()
    with caplog.at_level(logging.WARNING, "peftedit"):  # of several seeds, the warning names the render's
        imagic.render(eps_model, artifact, eta=[0.5, 1e30], seed=[1, 2], steps=2, skip_diverged=True)
    assert "render eta 1e+30, seed 2: the render diverged" in caplog.text
    with pytest.raises(NumericalError, match="^the render diverged: its latents are NaN or infinite; try a lower eta"):
        imagic.render(eps_model, artifact, eta=1e30)
    with pytest.raises(NumericalError, match="latents are NaN or infinite; try a lower eta or guidance$"):
        imagic.render(eps_model, artifact, guidance=1e30)
    eps_model.pipe.vae.decoder.conv_out.bias.data.fill_(float("nan"))  # finite latents, a VAE that decodes NaN
    with pytest.raises(NumericalError, match="^the VAE's decoded picture is NaN or infinite; try a lower guidance$"):
        generate.generate(eps_model, "a red circle", steps=2)


@pytest.mark.parametrize("stage", ["embedding", "lora"])
def test_each_stage_trains_only_its_own_parameters(eps_model, photo, stage):
    """Stage 1 trains the embedding alone (the LoRA starts after it) and stage 2 the LoRA alone (e_opt stays fixed)."""
    steps = {"embedding_steps": 3, "finetune_steps": 0} if stage == "embedding" else {"embedding_steps": 0}
    config = ImagicConfig(**{"finetune_steps": 3, **steps}, embedding_lr=1e-2, lora_lr=1e-2, render_steps=2)
    artifact = imagic.fit(eps_model, photo, "a photo of a red circle", config, RUNTIME, False)
    trained_lora = any(bool(v.abs().max() > 0) for k, v in artifact.lora.items() if "lora_B" in k)
    moved_embedding = not torch.equal(artifact.tensors["e_opt"], artifact.tensors["e_tgt"])
    assert (moved_embedding, trained_lora) == (stage == "embedding", stage == "lora")


def test_the_lora_init_follows_the_run_seed_not_the_global_rng(eps_model, photo):
    """LoRA A's random init is drawn from runtime.seed: a run's LoRA does not depend on torch's global seed."""
    config = ImagicConfig(embedding_steps=0, finetune_steps=1, render_steps=2, preview_etas=[0.7])
    loras = []
    for global_seed in (1, 2):
        torch.manual_seed(global_seed)
        loras.append(imagic.fit(eps_model, photo, "a photo of a red circle", config, RUNTIME, False).lora)
    assert loras[0].keys() == loras[1].keys() and all(torch.equal(loras[0][k], loras[1][k]) for k in loras[0])
