"""How the benchmark counts steps: a training step that float16 loss scaling skips is still a step."""

from __future__ import annotations

import math

import pytest
import torch

from benchmarks.measure import measure
from peftedit.optim import descend


class Net(torch.nn.Module):
    """Stands in for the UNet: the hooks see its calls."""

    def __init__(self) -> None:
        super().__init__()
        self.layer = torch.nn.Linear(4, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.layer(x)


def _train(net: Net, steps: int, overflow_at: set[int]) -> torch.amp.GradScaler:
    """The library's step (``optim.descend``) with loss scaling on; the loss is infinite at ``overflow_at``."""
    optimizer = torch.optim.SGD(net.parameters(), lr=0.1)
    scaler = torch.amp.GradScaler("cpu", enabled=True)
    x = torch.ones(1, 4)
    for step in range(steps):
        loss = net(x).square().mean()
        if step in overflow_at:
            loss = loss * math.inf
        with torch.no_grad():
            net(x)  # a call without gradients (a check) starts no step
        descend(optimizer, scaler, loss, "test", "advice")
    torch.ones(64, 64) @ torch.ones(64, 64)  # after the loop (saving the result): part of no step
    return scaler


def test_steps_skipped_by_loss_scaling_still_count():
    results = {}
    for count in ("train", "optimizer"):
        net = Net()
        with measure(torch.device("cpu"), count, net, warmup=1, track=True) as results[count]:
            scaler = _train(net, 5, overflow_at={1, 3})
        assert scaler.get_scale() == 2.0**16 / 4  # both overflows were skipped, each halving the scale
        assert results[count].optimizer_steps == 3
    train, optimizer = results["train"], results["optimizer"]
    assert train.steps_timed == 4  # steps 2-5, two of them skipped
    assert optimizer.steps_timed == 2  # optimizer steps 2-3: each skipped step merged into the next
    # Every step does the same work: a "train" step is one step's FLOPs; the merged steps hold more.
    steps = [b - a for a, b in zip(train.flop_stamps, train.flop_stamps[1:], strict=False)]
    assert len(set(steps)) == 1 and steps[0] > 0
    assert train.tflop_per_step * 1e12 == pytest.approx(steps[0])
    assert optimizer.tflop_per_step > 1.4 * train.tflop_per_step


def test_a_skipped_last_step_ends_with_the_block():
    """With no optimizer step after the last UNet call, the last step runs to the block's end (its tail included)."""
    net = Net()
    with measure(torch.device("cpu"), "train", net, warmup=1, track=True) as result:
        _train(net, 3, overflow_at={2})
    steps = [b - a for a, b in zip(result.flop_stamps, result.flop_stamps[1:], strict=False)]
    assert result.optimizer_steps == 2 and result.steps_timed == 2
    assert steps[1] == steps[0] + 2 * 64**3  # the step, then the 64x64 product after the loop
