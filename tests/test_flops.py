"""The FLOP count behind the benchmark's work-per-step column: CPU attention counted as CUDA's, steps split exactly."""

from __future__ import annotations

import contextlib

import torch
import torch.nn.functional as F

from benchmarks.flops import FlopCount
from benchmarks.measure import measure
from benchmarks.tensor_memory import TensorMemory
from peftedit.tiny import build_pipeline


def test_cpu_attention_counts_as_the_math_it_replaces():
    q, k, v = (torch.randn(2, 4, n, 16, requires_grad=True) for n in (24, 10, 10))
    with FlopCount() as fused:
        out = F.scaled_dot_product_attention(q, k, v)
        forward = fused.total
        out.sum().backward()
    with FlopCount() as math:
        ((q @ k.transpose(-1, -2)) * 0.25).softmax(-1).matmul(v)
    assert forward == math.total == 2 * (2 * 2 * 4 * 24 * 10 * 16)
    assert fused.by_op["aten._scaled_dot_product_flash_attention_for_cpu"] == forward
    # the backward counts like the CUDA flash kernel's, which recomputes the scores: 2.5 forwards
    assert fused.total - forward == 5 * forward // 2


def test_flops_per_step_are_those_of_one_step():
    """A linear layer's training step: the forward and the weight gradient (the input needs none), warm-up left out."""
    layer = torch.nn.Linear(64, 32, bias=False)
    optimizer = torch.optim.SGD(layer.parameters(), lr=0.1)
    with measure(torch.device("cpu"), "optimizer", warmup=1, track=True) as result:
        for batch in (8, 4, 4, 4):  # the first (warm-up) step is twice the size of the timed ones
            layer(torch.randn(batch, 64)).sum().backward()
            optimizer.step()
            optimizer.zero_grad()
    assert result.steps_timed == 3
    assert result.tflop_per_step * 1e12 == 2 * (2 * 4 * 64 * 32)


def test_counting_flops_leaves_the_memory_count_alone(tokenizer_dir):
    """Both counters run in one pass: with the FLOP count on, a checkpointed UNet step peaks at the same live bytes
    (torch's FlopCounterMode did not: its module hooks and decompositions raised this peak above the unchecked one)."""
    unet = build_pipeline(tokenizer_dir).unet
    unet.enable_gradient_checkpointing()
    unet.train()
    side = unet.config.sample_size
    sample = torch.randn(1, unet.config.in_channels, side, side)
    context = torch.randn(1, 77, unet.config.cross_attention_dim, requires_grad=True)

    def step() -> None:
        unet(sample, 10, encoder_hidden_states=context).sample.square().mean().backward()
        context.grad = None

    step()  # first call allocates lazily-built things once
    peaks = []
    for count_flops in (False, True):
        with TensorMemory("cpu") as tracked, FlopCount() if count_flops else contextlib.nullcontext() as counted:
            step()
        peaks.append(tracked.peak)
    assert counted.total > 0 and counted.by_op["aten.convolution"] > 0
    assert peaks[0] == peaks[1]
