"""The 8-bit optimizer path is real (uint8 states for large tensors, and it trains), and the step's loss scaling keeps
small losses' gradients through a float16 UNet."""

from __future__ import annotations

import pytest
import torch

from peftedit import ImagicConfig, NullTextConfig, RuntimeConfig, imagic, load_model, nulltext
from peftedit.diffusion import denoising_loss, encode_text, fresh_scheduler
from peftedit.errors import NumericalError
from peftedit.optim import descend, loss_scaler, make_optimizer, numeric_advice

CUDA = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


def test_adamw8bit_keeps_uint8_state_for_large_tensors():
    big = torch.nn.Parameter(torch.randn(77, 768))  # an SD 1.5 text embedding
    small = torch.nn.Parameter(torch.randn(8, 8))  # under bitsandbytes' 4096-value threshold
    optimizer = make_optimizer([big, small], lr=1e-2)
    assert type(optimizer).__name__ == "AdamW8bit"
    start = (big.detach() ** 2).sum()
    for _ in range(5):
        optimizer.zero_grad()
        ((big**2).sum() + (small**2).sum()).backward()
        optimizer.step()
    state = optimizer.state[big]
    assert state["state1"].dtype == torch.uint8 and state["state2"].dtype == torch.uint8
    assert optimizer.state[small]["state1"].dtype == torch.float32
    assert (big.detach() ** 2).sum() < start


def test_torch_adamw_on_request():
    optimizer = make_optimizer([torch.nn.Parameter(torch.zeros(3))], lr=1e-3, kind="adamw")
    assert isinstance(optimizer, torch.optim.AdamW)


def _step_on_small_loss(folder, dtype: str, scale: bool, device: str = "cpu") -> torch.Tensor:
    """The gradient one step (``descend``, which unscales it in place) sees on a text embedding, through the UNet in
    ``dtype``, for a denoising loss shrunk to 1e-5 (the size null-text's losses reach). The gradient, not the update:
    added to embedding values near 1, a 1e-10 step rounds away in fp32 (one element in 2464 moved)."""
    model = load_model(str(folder), RuntimeConfig(device=device, dtype=dtype))
    unet = model.pipe.unet
    embedding = encode_text(model.pipe, "a red circle").float().requires_grad_(True)
    generator = torch.Generator().manual_seed(0)
    side = unet.config.sample_size
    latent = torch.randn(1, 4, side, side, generator=generator).to(device)
    loss = denoising_loss(unet, fresh_scheduler(model.pipe), latent, embedding, generator)
    scaler = loss_scaler(unet.dtype if scale else torch.float32, latent.device)
    descend(torch.optim.SGD([embedding], lr=1.0), scaler, loss * 1e-5 / loss.detach(), "test", "advice")
    return embedding.grad.detach().cpu()


def test_both_optimizers_take_the_weight_decay_asked_for():
    """make_optimizer passes weight_decay on (torch's AdamW would default to 0.01, bitsandbytes' too)."""
    for kind in ("adamw", "adamw8bit"):
        optimizer = make_optimizer([torch.nn.Parameter(torch.ones(4))], lr=0.1, kind=kind)
        assert optimizer.param_groups[0]["weight_decay"] == 0.0, kind


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=[pytest.mark.gpu, CUDA])])
def test_loss_scaling_keeps_small_gradients_through_a_float16_unet(eps_dir, device):
    exact = _step_on_small_loss(eps_dir, "fp32", True, device)  # no scaling in fp32: nothing to keep
    scaled = _step_on_small_loss(eps_dir, "fp16", True, device)
    plain = _step_on_small_loss(eps_dir, "fp16", False, device)
    assert exact.abs().max() > 0
    assert float((scaled - exact).norm() / exact.norm()) < 0.05
    assert float((plain - exact).norm() / exact.norm()) > 0.5  # what the scaler prevents: most of it flushed to 0
    assert not loss_scaler(torch.bfloat16, torch.device("cpu")).is_enabled()


def test_gradients_that_overflow_at_every_scale_raise():
    param = torch.nn.Parameter(torch.ones(4))
    optimizer = torch.optim.SGD([param], lr=0.1)
    scaler = loss_scaler(torch.float16, torch.device("cpu"))
    with pytest.raises(NumericalError, match="overflow float16"):
        for _ in range(40):  # the scale starts at 2**16 and halves on each overflowed step
            descend(optimizer, scaler, (param * float("inf")).sum(), "test", "advice")
    assert torch.equal(param.detach(), torch.ones(4))  # no overflowed step was taken


def test_a_learning_rate_whose_step_overflows_float32_is_a_numerical_error():
    """bitsandbytes' CPU kernel raised a bare RuntimeError (a traceback through the CLI) for lr 1e38."""
    param = torch.nn.Parameter(torch.ones(64, 64))  # 4096 values: 8-bit states
    optimizer = make_optimizer([param], lr=1e38)
    if type(optimizer).__name__ != "AdamW8bit":
        pytest.skip("bitsandbytes is not loadable here")
    scaler = loss_scaler(torch.float32, torch.device("cpu"))
    message = r"^test: the optimizer step overflows float32 at learning rate 1e\+38; lower"
    with pytest.raises(NumericalError, match=message):
        descend(optimizer, scaler, (param**2).sum(), "test", "lower")


def test_an_optimizer_error_other_than_overflow_is_not_called_numerical():
    """Only an optimizer step's "overflow" RuntimeError becomes a NumericalError; other errors keep their own."""

    class Broken(torch.optim.SGD):
        def step(self, closure=None):
            raise RuntimeError("expected all tensors to be on the same device")

    param = torch.nn.Parameter(torch.ones(4))
    scaler = loss_scaler(torch.float32, torch.device("cpu"))
    with pytest.raises(RuntimeError, match="same device") as caught:
        descend(Broken([param], lr=0.1), scaler, (param**2).sum(), "test", "advice")
    assert not isinstance(caught.value, NumericalError)


@pytest.mark.gpu
@CUDA
def test_the_recipes_training_settings_train_on_cuda(eps_dir, photo):
    """fp16 UNet, 8-bit AdamW on CUDA tensors, checkpointing (RuntimeConfig's defaults, as in the 8 GB recipes):
    every trained tensor moves, every loss is finite, and the optimizer stepping is bitsandbytes'."""
    from torch.optim.optimizer import register_optimizer_step_post_hook

    model = load_model(str(eps_dir), RuntimeConfig(device="cuda"))
    assert model.dtype == torch.float16
    optimizers = set()
    handle = register_optimizer_step_post_hook(lambda optimizer, *_: optimizers.add(type(optimizer).__name__))
    try:
        config = ImagicConfig(embedding_steps=4, finetune_steps=4, render_steps=3, preview_etas=[0.7])
        fitted = imagic.fit(model, photo, "a red circle", config, show_progress=False)
        config = NullTextConfig(steps=3, inner_steps=2, early_stop=0.0, early_stop_slope=0.0)
        inverted = nulltext.invert(model, photo, "a red circle", config, show_progress=False)
    finally:
        handle.remove()
    assert optimizers == {"AdamW8bit"}
    assert all(value == value for value in fitted.meta["losses"].values())
    assert not torch.equal(fitted.tensors["e_opt"], fitted.tensors["e_tgt"])
    assert any(v.abs().max() > 0 for k, v in fitted.lora.items() if "lora_B" in k)  # B starts at zero
    nulls, start = inverted.tensors["null_embeddings"], inverted.tensors["e_uncond"][0]
    assert all(not torch.equal(null, start) for null in nulls)


def test_numeric_advice_names_full_precision_only_for_a_half_precision_model():
    assert numeric_advice("imagic.lora_lr", torch.float32) == "try a lower imagic.lora_lr"
    for dtype in (torch.float16, torch.bfloat16):
        assert numeric_advice("nulltext.lr", dtype) == "try a lower nulltext.lr or runtime.dtype=fp32"
