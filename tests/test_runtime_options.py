"""The speed options of ``runtime``: channels-last UNet and ``torch.compile``. Their speed only a GPU shows
(``benchmarks.savers``); here: they are applied, they compute the same, and a compiled UNet survives a P2P edit."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from peftedit import ImagicConfig, NullTextConfig, RuntimeConfig, imagic, load_model, nulltext, p2p

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
