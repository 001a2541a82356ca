"""The 8-bit optimizer path is real (uint8 states for large tensors, and it trains), and the step's loss scaling keeps
small losses' gradients through a float16 UNet."""

from __future__ import annotations

import pytest
import torch

from peftedit import RuntimeConfig, load_model
from peftedit.diffusion import denoising_loss, encode_text, fresh_scheduler
from peftedit.errors import NumericalError
from peftedit.optim import descend, loss_scaler, make_optimizer


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


def _step_on_small_loss(folder, dtype: str, scale: bool) -> torch.Tensor:
    """The update one SGD step (lr 1: minus the gradient) makes to a text embedding, through the UNet in ``dtype``,
    on a denoising loss shrunk to 1e-5 (the size null-text's losses reach)."""
    model = load_model(str(folder), RuntimeConfig(device="cpu", dtype=dtype))
    unet = model.pipe.unet
    embedding = encode_text(model.pipe, "a red circle").float().requires_grad_(True)
    start = embedding.detach().clone()
    generator = torch.Generator().manual_seed(0)
    latent = torch.randn(1, 4, unet.config.sample_size, unet.config.sample_size, generator=generator)
    loss = denoising_loss(unet, fresh_scheduler(model.pipe), latent, embedding, generator)
    scaler = loss_scaler(unet.dtype if scale else torch.float32, latent.device)
    descend(torch.optim.SGD([embedding], lr=1.0), scaler, loss * 1e-5 / loss.detach(), "test")
    return embedding.detach() - start


def test_loss_scaling_keeps_small_gradients_through_a_float16_unet(eps_dir):
    exact = _step_on_small_loss(eps_dir, "fp32", scale=True)  # no scaling in fp32: nothing to keep
    scaled = _step_on_small_loss(eps_dir, "fp16", scale=True)
    plain = _step_on_small_loss(eps_dir, "fp16", scale=False)
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
            descend(optimizer, scaler, (param * float("inf")).sum(), "test")
    assert torch.equal(param.detach(), torch.ones(4))  # no overflowed step was taken
