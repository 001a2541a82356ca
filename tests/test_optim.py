"""The 8-bit optimizer path is real: uint8 states for large tensors, and it trains."""

from __future__ import annotations

import torch

from peftedit.optim import make_optimizer


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
