"""SDXL on a tiny model built in code: it loads as SDXL, samples exactly as diffusers' own SDXL pipeline, and both
methods train, save, reload and render through the pooled-text and size conditioning (the embeddings' extra row)."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from diffusers import StableDiffusionXLPipeline
from safetensors import safe_open
from safetensors.torch import save_file

from peftedit import (
    ArtifactError,
    ImagicConfig,
    NullTextConfig,
    PeftEditError,
    RuntimeConfig,
    imagic,
    load,
    load_model,
    models,
    nulltext,
    p2p,
)
from peftedit.cli import main
from peftedit.diffusion import (
    ddim_invert,
    encode_image,
    encode_text,
    fresh_scheduler,
    initial_noise,
    mean_denoising_loss,
    sample,
)
from peftedit.generate import recommended_sampling
from peftedit.images import load_image
from peftedit.models import SD, SDXL, check_same_base, is_xl
from peftedit.optim import make_optimizer
from peftedit.tiny import build_xl_pipeline

RUNTIME = RuntimeConfig(device="cpu")
SIDE = 16  # the tiny SDXL's pixel side: latent side 8 x its 2-block VAE
POOLED = 32  # the tiny second text encoder's projection size
TEXT = "a photo of a red circle"


@pytest.fixture(scope="module")
def xl_dir(tmp_path_factory, tokenizer_dir):
    folder = tmp_path_factory.mktemp("tiny-xl")
    build_xl_pipeline(tokenizer_dir).save_pretrained(folder)
    return folder


@pytest.fixture
def xl_model(xl_dir):
    return load_model(str(xl_dir), RUNTIME)


def _vanilla(xl_dir) -> StableDiffusionXLPipeline:
    pipe = StableDiffusionXLPipeline.from_pretrained(str(xl_dir))
    pipe.scheduler = fresh_scheduler(pipe)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def _split(embedding: torch.Tensor) -> dict[str, torch.Tensor]:
    """diffusers' SDXL keywords for one of peftedit's packed embeddings."""
    return {"prompt_embeds": embedding[:, :-1], "pooled_prompt_embeds": embedding[:, -1, :POOLED]}


def test_a_folder_loads_as_sdxl_and_samples_exactly_like_diffusers(xl_model, xl_dir):
    pipe = xl_model.pipe
    assert is_xl(pipe) and xl_model.resolution == SIDE
    cond, uncond = encode_text(pipe, TEXT), encode_text(pipe, "")
    assert cond.shape == (1, 78, 48)  # 77 tokens of both encoders side by side (16 + 32), then the added row
    sizes = torch.tensor([SIDE, SIDE, 0, 0, SIDE, SIDE], dtype=torch.float32)
    assert torch.equal(cond[0, -1, POOLED : POOLED + 6], sizes)
    assert not cond[0, -1, POOLED + 6 :].any()
    assert not uncond[0, :-1].any() and not uncond[0, -1, :POOLED].any()  # force_zeros_for_empty_prompt
    scheduler = fresh_scheduler(pipe, 4)
    noise = initial_noise((1, 4, 8, 8), seed=0) * scheduler.init_noise_sigma
    ours = sample(pipe.unet, scheduler, noise, cond, uncond, 5.0)
    theirs = _vanilla(xl_dir)(
        TEXT, num_inference_steps=4, guidance_scale=5.0, latents=noise.clone(), output_type="latent"
    ).images
    assert torch.allclose(ours, theirs, atol=1e-6), (ours - theirs).abs().max()


def test_imagic_trains_round_trips_and_renders_in_vanilla_diffusers(xl_model, xl_dir, photo, tmp_path):
    pipe = xl_model.pipe
    config = ImagicConfig(
        embedding_steps=100, embedding_lr=5e-2, finetune_steps=40, render_steps=4, preview_etas=[0.5, 0.9]
    )
    artifact = imagic.fit(xl_model, photo, TEXT, config, RUNTIME, False)
    e_tgt, e_opt, e_uncond = (artifact.tensors[k] for k in ("e_tgt", "e_opt", "e_uncond"))
    assert e_opt.shape == (1, 78, 48)
    assert torch.equal(e_opt[0, -1, POOLED:], e_tgt[0, -1, POOLED:])  # sizes and padding never trained
    assert not torch.equal(e_opt[0, -1, :POOLED], e_tgt[0, -1, :POOLED])  # the pooled text is
    picture, _ = load_image(photo, xl_model.resolution)
    latent, scheduler = encode_image(pipe, picture), fresh_scheduler(pipe)
    before = mean_denoising_loss(pipe.unet, scheduler, latent, e_tgt, samples=32)
    after = mean_denoising_loss(pipe.unet, scheduler, latent, e_opt, samples=32)
    assert after < 0.985 * before, (before, after)

    artifact.save(tmp_path / "edit")
    with safe_open(str(tmp_path / "edit" / "edit.safetensors"), framework="pt") as handle:
        assert handle.metadata()["peftedit.format_version"] == "3"  # SDXL's: older peftedit refuses it by version
    loaded = load(tmp_path / "edit")
    first, second = (np.asarray(imagic.render(xl_model, a, eta=0.7, seed=3)) for a in (artifact, loaded))
    assert np.array_equal(first, second)

    # Vanilla diffusers: the LoRA from the folder, the embeddings as prompt_embeds / pooled_prompt_embeds.
    vanilla = _vanilla(xl_dir)
    vanilla.load_lora_weights(str(tmp_path / "edit"))
    mixed = 0.7 * e_tgt + 0.3 * e_opt
    noise = initial_noise((1, 4, 8, 8), seed=3)
    theirs = vanilla(
        **_split(mixed),
        negative_prompt_embeds=e_uncond[:, :-1],
        negative_pooled_prompt_embeds=e_uncond[:, -1, :POOLED],
        num_inference_steps=4,
        guidance_scale=config.guidance,
        latents=noise.clone(),
        output_type="latent",
    ).images
    with imagic.lora_applied(pipe.unet, loaded):
        ours = sample(pipe.unet, fresh_scheduler(pipe, 4), noise, mixed, e_uncond, config.guidance)
    without = sample(pipe.unet, fresh_scheduler(pipe, 4), noise, mixed, e_uncond, config.guidance)
    assert torch.allclose(ours, theirs, atol=1e-5), (ours - theirs).abs().max()
    assert not torch.allclose(ours, without, atol=1e-4)


def test_null_text_reconstructs_better_than_ddim_and_edits_with_p2p(xl_model, photo):
    fast = dict(steps=10, inner_steps=4, lr=5e-2, pivot_noise=0.0)
    inverted = nulltext.invert(xl_model, photo, TEXT, NullTextConfig(**fast), RUNTIME, False)
    baseline = nulltext.invert(xl_model, photo, TEXT, NullTextConfig(method="ddim", **fast), RUNTIME, False)
    ours, theirs = inverted.meta["losses"], baseline.meta["losses"]
    assert ours["latent_error"] < 0.6 * theirs["latent_error"], (ours, theirs)
    nulls, uncond = inverted.tensors["null_embeddings"], inverted.tensors["e_uncond"]
    assert nulls.shape == (10, 78, 48)
    assert torch.equal(nulls[:, -1, POOLED:], uncond[:, -1, POOLED:].expand(10, -1))  # sizes kept at every step

    reconstruction = nulltext.run_edit(xl_model, inverted).latents
    same = nulltext.run_edit(xl_model, inverted, TEXT, p2p.Control(mode="replace")).latents
    scale = reconstruction.abs().max()
    assert torch.allclose(same[1], reconstruction[0], atol=1e-3 * scale)
    blend = p2p.Control(blend=["circle"])
    edited = nulltext.run_edit(xl_model, inverted, "a photo of a blue circle", blend, maps=True)
    assert edited.maps.shape[0] == 2 and edited.maps.shape[-1] == 77
    assert not torch.allclose(edited.latents[1], edited.latents[0])


def test_the_base_fingerprint_covers_the_second_text_encoder(xl_model, xl_dir, tmp_path, photo):
    config = ImagicConfig(embedding_steps=1, finetune_steps=1, render_steps=2, preview_etas=[0.5])
    artifact = imagic.fit(xl_model, photo, TEXT, config, RUNTIME, False)
    other = load_model(str(xl_dir), RUNTIME)
    with torch.no_grad():
        for param in other.pipe.text_encoder_2.parameters():
            param.mul_(1.5)
    saved = (artifact.meta["base_model"], artifact.meta["base_architecture"], artifact.tensors["base_probe"])
    check_same_base(xl_model.pipe, "same", *saved)
    with pytest.raises(
        ArtifactError, match=r"base model mismatch.*; pass --model \(model\) with the original base model$"
    ):
        check_same_base(other.pipe, "other", *saved)


def test_half_precision_keeps_sdxl_vae_in_float32(xl_dir, eps_dir):
    xl = load_model(str(xl_dir), RuntimeConfig(device="cpu", dtype="fp16"))
    assert xl.pipe.unet.dtype == torch.float16 and xl.pipe.vae.dtype == torch.float32  # its config: force_upcast
    sd = load_model(str(eps_dir), RuntimeConfig(device="cpu", dtype="fp16"))
    assert sd.pipe.vae.dtype == torch.float16  # SD's VAE runs in float16, as in diffusers' SD pipeline


def test_a_single_files_tensor_names_must_agree_with_its_configs(tmp_path, xl_dir, eps_dir):
    xl_file, sd_file = tmp_path / "xl.safetensors", tmp_path / "sd.safetensors"
    save_file({"conditioner.embedders.1.model.ln_final.weight": torch.zeros(2)}, str(xl_file))
    save_file({"cond_stage_model.transformer.text_model.final_layer_norm.weight": torch.zeros(2)}, str(sd_file))
    other_file = tmp_path / "other.safetensors"  # a layout whose names say nothing: as its configs say
    save_file({"unet.conv_in.weight": torch.zeros(2)}, str(other_file))

    def _single_file_kind(path, configs, source):  # with the file's tensor names, as load_model reads them
        with safe_open(str(path), framework="pt") as checkpoint:
            return models._single_file_kind(path, list(checkpoint.keys()), configs, source)

    assert _single_file_kind(other_file, str(xl_dir), "X") == SDXL
    assert _single_file_kind(other_file, str(eps_dir), "X") == SD
    assert _single_file_kind(xl_file, str(xl_dir), "X") == SDXL
    assert _single_file_kind(sd_file, str(eps_dir), "X") == SD
    # Configs of the other architecture: one clear line instead of diffusers' weight-shape error.
    with pytest.raises(PeftEditError, match="is an SDXL checkpoint but --single-file-config X is an SD pipeline"):
        _single_file_kind(xl_file, str(eps_dir), "--single-file-config X")
    with pytest.raises(PeftEditError, match="is an SD checkpoint but diffusers' guess, Y, is an SDXL pipeline"):
        _single_file_kind(sd_file, str(xl_dir), "diffusers' guess, Y,")


def test_cli_imagic_edit_invert_and_generate_on_sdxl(xl_dir, photo, tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    model = ["--model", str(xl_dir), "--set", "runtime.device=cpu"]
    fit = ["--embedding-steps", "2", "--finetune-steps", "2", "--set", "imagic.render_steps=2"]
    assert main(["--quiet", "imagic", str(photo), TEXT, *model, *fit, "-o", "edit"]) == 0
    assert main(["--quiet", "edit", "edit", "--eta", "0.6,0.8", "--steps", "2", "-o", "grid.png"]) == 0
    inversion = ["--steps", "3", "--inner-steps", "1"]
    assert main(["--quiet", "invert", str(photo), TEXT, *model, *inversion, "-o", "inv"]) == 0
    assert main(["--quiet", "edit", "inv", "a photo of a blue circle", "-o", "blue.png"]) == 0
    assert main(["--quiet", "generate", TEXT, "--model", str(xl_dir), "--steps", "2", "-o", "gen.png"]) == 0
    for name in ("edit/preview.png", "grid.png", "inv/preview.png", "blue.png", "gen.png"):
        assert (tmp_path / name).is_file(), name
    assert "pooled_prompt_embeds" in (tmp_path / "edit" / "README.md").read_text()  # how to render it in diffusers
    capsys.readouterr()
    assert main(["inspect", "edit", "--json"]) == 0
    info = json.loads(capsys.readouterr().out)
    assert info["base_pipeline"] == "StableDiffusionXLPipeline" and info["tensors"]["e_opt"] == [1, 78, 48]


def test_refiners_and_edits_of_the_other_architecture_are_refused_in_one_line(
    xl_dir, xl_model, eps_model, photo, tokenizer_dir, tmp_path
):
    refiner = build_xl_pipeline(tokenizer_dir)
    refiner.register_modules(text_encoder=None, tokenizer=None)  # what SDXL's refiner ships
    refiner.save_pretrained(tmp_path / "refiner")
    with pytest.raises(PeftEditError, match="is an SDXL refiner"):
        load_model(str(tmp_path / "refiner"), RUNTIME)
    config = ImagicConfig(embedding_steps=1, finetune_steps=1, render_steps=2, preview_etas=[0.5])
    sd_edit = imagic.fit(eps_model, photo, TEXT, config, RUNTIME, False)
    with pytest.raises(ArtifactError, match="a StableDiffusionPipeline, but .* is a StableDiffusionXLPipeline"):
        imagic.render(xl_model, sd_edit)
    xl_edit = imagic.fit(xl_model, photo, TEXT, config, RUNTIME, False)
    with pytest.raises(ArtifactError, match="a StableDiffusionXLPipeline, but .* is a StableDiffusionPipeline"):
        imagic.render(eps_model, xl_edit)


def test_generate_defaults_to_sdxls_guidance(xl_model, eps_model):
    assert recommended_sampling(xl_model) == (50, 5.0)  # diffusers' SDXL pipeline default
    assert recommended_sampling(eps_model) == (50, 7.5)


def test_8bit_adamw_leaves_the_size_numbers_of_an_sdxl_sized_row_exactly_as_they_were():
    """Real SDXL embeddings ([1, 78, 2048]) get bitsandbytes' 8-bit states (the tiny ones are under 4096 values): the
    size numbers and padding, which ``unet_output`` detaches, must come out of training bit-identical."""
    embedding = torch.randn(1, 78, 2048, generator=torch.Generator().manual_seed(0))
    embedding[0, -1, 1280:1286] = torch.tensor([1024.0, 1024, 0, 0, 1024, 1024])
    embedding[0, -1, 1286:] = 0
    before = embedding.clone()
    embedding.requires_grad_(True)
    optimizer = make_optimizer([embedding], 1e-2, "adamw8bit")
    assert type(optimizer).__name__ == "AdamW8bit"
    for _ in range(20):
        used = torch.cat([embedding[:, :-1].flatten(), embedding[:, -1, :1280].flatten()])
        detached = embedding[:, -1, 1280:1286].detach()
        loss = (used - 0.5).square().mean() + detached.sum() * 0
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    assert optimizer.state[embedding]["state1"].dtype == torch.uint8
    assert torch.equal(embedding[0, -1, 1280:], before[0, -1, 1280:])
    assert not torch.equal(embedding[0, -1, :1280], before[0, -1, :1280])


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_sdxl_trains_and_renders_in_half_precision_on_cuda(xl_dir, photo):
    """The recipes' settings on CUDA: fp16 UNet and text encoders, the VAE upcast to fp32, fp32 trained values."""
    model = load_model(str(xl_dir), RuntimeConfig(device="cuda", dtype="fp16"))
    assert model.pipe.unet.dtype == torch.float16 and model.pipe.vae.dtype == torch.float32
    config = ImagicConfig(embedding_steps=5, finetune_steps=5, render_steps=3, preview_etas=[0.7])
    artifact = imagic.fit(model, photo, TEXT, config, show_progress=False)
    assert artifact.tensors["e_opt"].dtype == torch.float32 and torch.isfinite(artifact.tensors["e_opt"]).all()
    picture = np.asarray(imagic.render(model, artifact, eta=0.7, seed=0))
    assert picture.shape == (SIDE, SIDE, 3)
    inverted = nulltext.invert(model, photo, TEXT, NullTextConfig(steps=4, inner_steps=2), show_progress=False)
    assert torch.isfinite(inverted.tensors["null_embeddings"]).all()


def test_inversion_gives_the_inverse_scheduler_only_its_own_keys(xl_model, photo):
    """SDXL base ships an Euler scheduler config, whose keys the DDIM scheduler peftedit loads keeps; DDIM inversion
    builds its DDIMInverseScheduler from the keys that class takes, so diffusers does not warn about the others on
    every inversion, and inverts the same."""
    import logging

    from diffusers import DDIMScheduler, EulerDiscreteScheduler

    from benchmarks.build_model import load_config

    euler = EulerDiscreteScheduler.from_config(load_config("sdxl")["scheduler"])  # SDXL base's own config
    config = DDIMScheduler.from_config(euler.config).config  # as load_model converts it
    assert "use_karras_sigmas" in config  # Euler's keys are there to leave out
    pipe = xl_model.pipe
    latent, embedding = encode_image(pipe, load_image(photo, xl_model.resolution)[0]), encode_text(pipe, TEXT)
    records: list[logging.LogRecord] = []
    handler = logging.Handler()
    handler.emit = records.append
    logger = logging.getLogger("diffusers")
    logger.addHandler(handler)
    try:
        inverted = ddim_invert(pipe.unet, config, latent, embedding, 2)
    finally:
        logger.removeHandler(handler)
    assert not [r for r in records if "DDIMInverseScheduler" in r.getMessage()]
    plain = {k: v for k, v in config.items() if k not in ("use_karras_sigmas", "interpolation_type", "skip_prk_steps")}
    for ours, reference in zip(inverted, ddim_invert(pipe.unet, plain, latent, embedding, 2), strict=True):
        assert torch.equal(ours, reference)
