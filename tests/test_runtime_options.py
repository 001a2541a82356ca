"""The runtime options: channels-last UNet and ``torch.compile`` (their speed only a GPU shows, ``benchmarks.savers``;
here: they are applied, compute the same, and a compiled UNet survives a P2P edit), ``offload_idle``'s moves, and
which runtime a method call runs with."""

from __future__ import annotations

import dataclasses
from types import SimpleNamespace

import numpy as np
import pytest
import torch

from peftedit import ImagicConfig, NullTextConfig, RuntimeConfig, imagic, load_model, nulltext, p2p
from peftedit.generate import generate
from peftedit.methods.common import call_runtime, checkpointing, encoders_offloaded, parts_offloaded
from peftedit.models import TEXT_ENCODERS, Model

SHORT_IMAGIC = ImagicConfig(embedding_steps=3, finetune_steps=3, render_steps=3, preview_etas=[0.7])


def _unet_output(model) -> torch.Tensor:
    unet = model.pipe.unet
    side = unet.config.sample_size
    generator = torch.Generator().manual_seed(0)
    sample = torch.randn(2, 4, side, side, generator=generator)
    context = torch.randn(2, 77, unet.config.cross_attention_dim, generator=generator)
    with torch.no_grad():
        return unet(sample, torch.tensor(500), encoder_hidden_states=context).sample


def test_channels_last_lays_out_the_unet_convolutions_and_computes_the_same(eps_dir):
    plain = load_model(str(eps_dir), RuntimeConfig(device="cpu"))
    nhwc = load_model(str(eps_dir), RuntimeConfig(device="cpu", channels_last=True))
    convs = [m.weight for m in nhwc.pipe.unet.modules() if isinstance(m, torch.nn.Conv2d)]
    assert convs and all(w.is_contiguous(memory_format=torch.channels_last) for w in convs)
    plain_convs = [m.weight for m in plain.pipe.unet.modules() if isinstance(m, torch.nn.Conv2d)]
    assert not all(w.is_contiguous(memory_format=torch.channels_last) for w in plain_convs)
    torch.testing.assert_close(_unet_output(nhwc), _unet_output(plain), rtol=1e-4, atol=1e-5)


def test_channels_last_imagic_trains_like_the_default(eps_dir, photo):
    losses = []
    for channels_last in (False, True):
        runtime = RuntimeConfig(device="cpu", channels_last=channels_last)
        model = load_model(str(eps_dir), runtime)
        artifact = imagic.fit(model, photo, "a photo of a red circle", SHORT_IMAGIC, runtime, show_progress=False)
        losses.append(artifact.meta["losses"])
    for stage in ("embedding", "finetune"):
        assert losses[1][stage] == pytest.approx(losses[0][stage], rel=1e-4)


def test_compiled_unet_runs_a_p2p_edit_without_recompiling_every_step(eps_dir, photo):
    """The P2P processors keep their step counter out of the compiled graph. Traced, each of the 10 steps would
    recompile the UNet; with a limit of 4 recompilations that raises here (checked by removing the guard)."""
    model = load_model(str(eps_dir), RuntimeConfig(device="cpu"))
    inversion = nulltext.invert(
        model, photo, "a photo of a red circle", NullTextConfig(method="direct", steps=10), show_progress=False
    )
    control = p2p.Control(blend=["red", "blue"])
    eager = nulltext.edit(model, inversion, "a photo of a blue circle", control)
    torch._dynamo.reset()
    model.pipe.unet.compile(backend="eager")  # Dynamo's tracing without inductor: the recompiles, not the kernels
    try:
        with torch._dynamo.config.patch(recompile_limit=4, fail_on_recompile_limit_hit=True):
            compiled = nulltext.edit(model, inversion, "a photo of a blue circle", control)
    finally:
        torch._dynamo.reset()
    assert np.abs(np.asarray(compiled, dtype=int) - np.asarray(eager, dtype=int)).max() <= 1


@pytest.mark.slow
def test_runtime_compile_trains_and_renders_like_eager(eps_dir, photo):
    """``runtime.compile`` with inductor (needs a C compiler; minutes on a CPU): same losses and render as eager."""
    results = []
    for compile_unet in (False, True):
        runtime = RuntimeConfig(device="cpu", compile=compile_unet)
        model = load_model(str(eps_dir), runtime)
        torch._dynamo.reset()
        artifact = imagic.fit(model, photo, "a photo of a red circle", SHORT_IMAGIC, runtime, show_progress=False)
        results.append((artifact.meta["losses"], np.asarray(imagic.render(model, artifact), dtype=int)))
    torch._dynamo.reset()
    (eager_losses, eager_image), (compiled_losses, compiled_image) = results
    for stage in ("embedding", "finetune"):
        assert compiled_losses[stage] == pytest.approx(eager_losses[stage], rel=1e-3)
    assert np.abs(compiled_image - eager_image).max() <= 2


class _Part:
    """A pipeline part that only records where it is sent (a CPU machine has no GPU to move real weights to)."""

    def __init__(self, name: str, device: str, log: list) -> None:
        self.name, self.device, self.log = name, torch.device(device), log

    def parameters(self):
        yield SimpleNamespace(device=self.device)

    def to(self, device):
        self.log.append((self.name, str(device)))
        self.device = torch.device(device)
        return self


def test_parts_offloaded_moves_gpu_parts_out_and_each_back_where_it_was():
    log: list = []
    pipe = SimpleNamespace(**{n: _Part(n, "cuda:0", log) for n in ("unet", "vae", "text_encoder")})
    with parts_offloaded(pipe, ("vae", "text_encoder", "text_encoder_2"), True):  # SD has no text_encoder_2
        assert [p.device.type for p in (pipe.unet, pipe.vae, pipe.text_encoder)] == ["cuda", "cpu", "cpu"]
        with parts_offloaded(pipe, ("unet", "text_encoder"), True):  # nested: the text encoder is already out
            assert [p.device.type for p in (pipe.unet, pipe.vae, pipe.text_encoder)] == ["cpu", "cpu", "cpu"]
        assert [p.device.type for p in (pipe.unet, pipe.vae, pipe.text_encoder)] == ["cuda", "cpu", "cpu"]
    assert all(str(p.device) == "cuda:0" for p in (pipe.unet, pipe.vae, pipe.text_encoder))
    assert log == [
        ("vae", "cpu"), ("text_encoder", "cpu"), ("unet", "cpu"), ("unet", "cuda:0"), ("vae", "cuda:0"),
        ("text_encoder", "cuda:0"),
    ]  # fmt: skip
    log.clear()
    with parts_offloaded(pipe, ("unet", "text_encoder"), False):
        pass
    assert log == []


def test_offload_idle_renders_the_same_pictures(eps_dir, photo):
    """On a CPU nothing moves, but the render and edit paths with ``offload_idle`` run and give the same pictures."""
    pictures = []
    for idle in (False, True):
        runtime = RuntimeConfig(device="cpu", offload_idle=idle)
        model = load_model(str(eps_dir), runtime)
        assert model.runtime.offload_idle is idle
        artifact = imagic.fit(model, photo, "a photo of a red circle", SHORT_IMAGIC, runtime, show_progress=False)
        inversion = nulltext.invert(
            model, photo, "a photo of a red circle", NullTextConfig(method="direct", steps=4), show_progress=False
        )
        images = imagic.render(model, artifact, eta=[0.5, 0.9])
        images.append(nulltext.edit(model, inversion, "a photo of a blue circle"))
        pictures.append([np.asarray(image, dtype=int) for image in images])
    for plain, idle in zip(*pictures, strict=True):
        assert np.array_equal(plain, idle)


def test_place_moves_the_needed_parts_on_and_the_others_off_and_leaves_them_there():
    """``Model.place`` with ``offload_idle``: what is needed goes to the device (a part already there is not copied:
    ``.to`` of its own device), what was there and is not needed goes to the CPU first, and everything stays where
    it is put until the next call; ``on_device`` says what is on the device. Without the option nothing moves."""
    log: list = []
    pipe = SimpleNamespace(**{n: _Part(n, "cpu", log) for n in ("unet", "vae", "text_encoder")}, text_encoder_2=None)
    runtime = RuntimeConfig(device="cuda", offload_idle=True)
    model = Model(pipe=pipe, name="fake", device=torch.device("cuda:0"), dtype=torch.float16, runtime=runtime)
    assert model.on_device == ()
    model.place("vae")
    model.place(*TEXT_ENCODERS)
    assert model.on_device == ("text_encoder",)  # SD has no text_encoder_2
    model.place("unet")
    model.place("unet")
    assert model.on_device == ("unet",)
    assert log == [
        ("vae", "cuda:0"), ("vae", "cpu"), ("text_encoder", "cuda:0"), ("text_encoder", "cpu"), ("unet", "cuda:0"),
        ("unet", "cuda:0"),
    ]  # fmt: skip
    assert [p.device.type for p in (pipe.unet, pipe.vae, pipe.text_encoder)] == ["cuda", "cpu", "cpu"]
    model.place("unet", "vae", "text_encoder", "text_encoder_2")  # README: before running model.pipe directly
    assert model.on_device == ("unet", "vae", "text_encoder")
    assert all(p.device.type == "cuda" for p in (pipe.unet, pipe.vae, pipe.text_encoder))
    log.clear()
    model.runtime = dataclasses.replace(runtime, offload_idle=False)
    model.place("vae")
    assert log == []


def test_encoders_offloaded_leaves_placement_to_place_with_offload_idle():
    """With ``offload_idle`` the training stages' encoder offload moves nothing: moving parts back where they were on
    exit undid a ``place`` made inside the block (the VAE back on the GPU beside the UNet, ``on_device`` wrong)."""
    log: list = []
    pipe = SimpleNamespace(**{n: _Part(n, "cpu", log) for n in ("unet", "vae", "text_encoder")}, text_encoder_2=None)
    runtime = RuntimeConfig(device="cuda", offload_idle=True)
    model = Model(pipe=pipe, name="fake", device=torch.device("cuda:0"), dtype=torch.float16, runtime=runtime)
    model.place("vae")
    with encoders_offloaded(model, True):
        model.place("unet")
    assert model.on_device == ("unet",)
    assert [p.device.type for p in (pipe.unet, pipe.vae, pipe.text_encoder)] == ["cuda", "cpu", "cpu"]
    model.runtime = dataclasses.replace(runtime, offload_idle=False)  # without it: off inside the block, back after
    pipe.vae.to("cuda:0")
    with encoders_offloaded(model, True):
        assert pipe.vae.device.type == "cpu"
    assert pipe.vae.device.type == "cuda"


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_offload_idle_leaves_only_the_part_at_work_on_the_gpu(eps_dir, photo):
    """On a GPU: the model loads onto the CPU; while the VAE encodes or decodes, the UNet and text encoder are on the
    CPU; while the UNet samples an edit, the VAE and text encoder; afterwards the VAE, which ran last, stays."""
    runtime = RuntimeConfig(device="cuda", offload_idle=True)
    model = load_model(str(eps_dir), runtime)
    pipe, seen = model.pipe, {"encoder": [], "decoder": [], "unet": []}
    assert all(p.device.type == "cpu" for p in (pipe.unet, pipe.vae, pipe.text_encoder))

    def where(phase, *parts):
        return lambda module, args: seen[phase].append(tuple(getattr(pipe, p).device.type for p in parts))

    pipe.vae.encoder.register_forward_pre_hook(where("encoder", "vae", "unet", "text_encoder"))
    pipe.vae.decoder.register_forward_pre_hook(where("decoder", "vae", "unet", "text_encoder"))
    inversion = nulltext.invert(
        model, photo, "a photo of a red circle", NullTextConfig(method="direct", steps=4), show_progress=False
    )
    pipe.unet.register_forward_pre_hook(where("unet", "unet", "vae", "text_encoder"))
    nulltext.edit(model, inversion, "a photo of a blue circle")
    for phase, devices in seen.items():
        assert devices and all(d == ("cuda", "cpu", "cpu") for d in devices), (phase, devices)
    assert [p.device.type for p in (pipe.unet, pipe.vae, pipe.text_encoder)] == ["cpu", "cuda", "cpu"]


def _placements(model, monkeypatch) -> list:
    """Hooks recording, each time a part runs or its ``.device`` is read (to put tensors beside it), its name and
    what ``Model.place`` had put on the device then."""
    pipe, seen = model.pipe, []
    runs = [("unet", pipe.unet), ("vae", pipe.vae.encoder), ("vae", pipe.vae.decoder)]
    runs += [(name, getattr(pipe, name)) for name in TEXT_ENCODERS if getattr(pipe, name, None) is not None]
    for name, module in runs:
        module.register_forward_pre_hook(lambda *_, name=name: seen.append((name, model.on_device)))
    parts = {id(module): name for name, module in runs if name != "vae"} | {id(pipe.vae): "vae"}
    for cls in {type(module) for module in (pipe.unet, pipe.vae, *[m for n, m in runs if n in TEXT_ENCODERS])}:
        read = cls.device.fget

        def device(module, read=read):
            if id(module) in parts:
                seen.append((parts[id(module)], model.on_device))
            return read(module)

        monkeypatch.setattr(cls, "device", property(device))
    return seen


@pytest.mark.parametrize("kind", ["sd", "sdxl"])
def test_offload_idle_places_each_part_alone_before_it_runs(
    kind, eps_dir, tokenizer_dir, tmp_path, photo, monkeypatch
):
    """On a CPU nothing can move, but the record ``Model.place`` keeps says what would be on a GPU: a model loaded
    with ``offload_idle`` starts with nothing there, and through Imagic's fit and render, an inversion and its P2P
    edit, and plain generation, every part runs with only its own kind placed (the UNet alone, the VAE alone, the
    text encoders together), and no code puts tensors beside a part (reading its ``.device``) before placing it."""
    folder = eps_dir
    if kind == "sdxl":
        from peftedit.tiny import build_xl_pipeline

        folder = tmp_path / "xl"
        build_xl_pipeline(tokenizer_dir).save_pretrained(folder)
    model = load_model(str(folder), RuntimeConfig(device="cpu", offload_idle=True))
    assert model.on_device == ()
    encoders = tuple(name for name in TEXT_ENCODERS if getattr(model.pipe, name, None) is not None)
    seen = _placements(model, monkeypatch)
    artifact = imagic.fit(model, photo, "a photo of a red circle", SHORT_IMAGIC, show_progress=False)
    imagic.render(model, artifact, eta=0.5, steps=2)
    inversion = nulltext.invert(
        model,
        photo,
        "a photo of a red circle",
        NullTextConfig(method="null-text", steps=3, inner_steps=2),
        show_progress=False,
    )
    nulltext.edit(model, inversion, "a photo of a blue circle")
    generate(model, "a red circle", steps=2)
    ran = {name for name, _ in seen}
    assert ran == {"unet", "vae", *encoders}
    for name, placed in seen:
        assert placed == (encoders if name in encoders else (name,)), (name, placed)


def test_a_method_call_runs_and_records_the_models_load_time_settings(eps_dir, photo, caplog):
    """``fit(model, …)`` without a runtime records the one the model was loaded with; a call's own runtime sets the
    training settings, and a load-time one it cannot change (here offload_idle, vae_slicing) stays the model's."""
    loaded = RuntimeConfig(device="cpu", vae_slicing=False, offload_idle=True, seed=5)
    model = load_model(str(eps_dir), loaded)
    config = ImagicConfig(embedding_steps=2, finetune_steps=2, render_steps=2, preview_etas=[0.7])
    plain = imagic.fit(model, photo, "a red circle", config, show_progress=False)
    assert plain.meta["recipe"]["runtime"] == dataclasses.asdict(loaded)
    assert "set when the model is loaded" not in caplog.text

    call = RuntimeConfig(optimizer="adamw", gradient_checkpointing=False, seed=3)  # load-time ones left at defaults
    inversion = nulltext.invert(model, photo, "a red circle", NullTextConfig(steps=2, inner_steps=1), call, False)
    recorded = inversion.meta["recipe"]["runtime"]
    assert (recorded["optimizer"], recorded["gradient_checkpointing"], recorded["seed"]) == ("adamw", False, 3)
    assert (recorded["device"], recorded["vae_slicing"], recorded["offload_idle"]) == ("cpu", False, True)
    assert "set when the model is loaded" not in caplog.text  # the defaults asked for nothing
    same = call_runtime(model, dataclasses.replace(loaded, seed=7))  # asks for what the model was loaded with
    assert same.seed == 7 and "set when the model is loaded" not in caplog.text
    asked = RuntimeConfig(channels_last=True, seed=3)  # one asked for, which the model was not loaded with
    inversion = nulltext.invert(model, photo, "a red circle", NullTextConfig(steps=2, inner_steps=1), asked, False)
    assert inversion.meta["recipe"]["runtime"]["channels_last"] is False
    said = "runtime.channels_last is set when the model is loaded: using the model's (runtime.channels_last=False)"
    assert said in caplog.text


def test_checkpointing_block_leaves_a_unet_that_had_it_on_as_it_was():
    calls: list = []
    unet = SimpleNamespace(is_gradient_checkpointing=True)
    unet.enable_gradient_checkpointing = lambda: calls.append("on")
    unet.disable_gradient_checkpointing = lambda: calls.append("off")
    with checkpointing(unet, True):
        pass
    assert calls == []  # it was on: not switched off on the way out
    unet.is_gradient_checkpointing = False
    with checkpointing(unet, True):
        pass
    with checkpointing(unet, False):
        pass
    assert calls == ["on", "off"]
