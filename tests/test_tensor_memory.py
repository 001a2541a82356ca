"""The live-tensor counter behind the CPU memory estimate: exact on known tensors, and in line with the allocator."""

from __future__ import annotations

import torch
from torch.profiler import ProfilerActivity, profile

from benchmarks.tensor_memory import TensorMemory, storage_key
from peftedit.tiny import build_pipeline

MIB = 2**20


def test_counts_new_tensors_once_and_uncounts_freed_ones():
    with TensorMemory("cpu") as tracked:
        base = tracked.current
        a = torch.zeros(MIB // 4)  # 1 MiB of float32
        assert tracked.current - base == MIB
        view = a[10:].view(-1, 2)  # a view shares the storage: nothing new
        b = a.to(torch.float64)  # 2 MiB
        assert tracked.current - base == 3 * MIB
        del a
        assert tracked.current - base == 3 * MIB  # the view keeps the storage alive
        del view
        assert tracked.current - base == 2 * MIB
        del b
        assert tracked.current == base
    assert tracked.peak - base == 3 * MIB


def test_resident_tensors_and_their_gradients_count_from_the_start():
    layer = torch.nn.Linear(512, 512, bias=False)  # 1 MiB of weight
    layer(torch.ones(1, 512)).sum().backward()  # and 1 MiB of gradient, held in C++
    with TensorMemory("cpu") as tracked:
        assert tracked.resident >= 2 * MIB
        keys = {storage_key(layer.weight.untyped_storage()), storage_key(layer.weight.grad.untyped_storage())}
        assert keys <= set(tracked.live)
        before = tracked.current
        layer(torch.ones(1, 512)).sum().backward()  # accumulates in place: no new gradient storage
        assert tracked.current - before < 0.01 * MIB


def test_a_storage_resized_to_a_new_address_counts_once():
    grown = torch.ones(MIB // 4)  # 1 MiB
    with TensorMemory("cpu") as tracked:
        base = tracked.current
        before = grown.untyped_storage().data_ptr()
        grown.resize_(MIB // 2)  # 2 MiB: the bytes move
        assert grown.untyped_storage().data_ptr() != before
        assert tracked.current - base == MIB  # the storage grew by 1 MiB; it is still one storage
        del grown
        assert tracked.current == base - MIB


def test_excluded_tensors_never_count():
    kept = torch.ones(MIB // 4)  # 1 MiB, alive at entry
    with TensorMemory("cpu", exclude=[kept]) as tracked:
        base = tracked.current
        view = kept[:10] * 1  # a new 40-byte tensor: counts
        kept.add_(1)  # the excluded storage seen through an operator: still does not count
        assert storage_key(kept.untyped_storage()) not in tracked.live
        assert 0 < tracked.current - base < 0.01 * MIB
    assert view.numel() == 10


def test_tensors_sent_away_do_not_count_until_back():
    weights = torch.zeros(1000)  # 4000 bytes, resident

    class Work(torch.nn.Module):
        def forward(self, x):
            scratch = torch.ones(2000)  # 8000 bytes, only during the call
            return x + scratch[:10].sum()

    def run(hooks_for):
        work, x = Work(), torch.zeros(10)
        with TensorMemory("cpu", hooks=hooks_for(work)) as tracked:
            out = work(x)
            after = tracked.current - tracked.resident
        return tracked.peak, after, out, work

    def away_while_running(work):
        return lambda tracker: [
            work.register_forward_pre_hook(lambda *_: tracker.away([weights])),
            work.register_forward_hook(lambda *_: tracker.back([weights])),
        ]

    plain_peak, plain_after, _, _ = run(lambda work: None)
    peak, after, out, work = run(away_while_running)
    assert plain_peak - peak == 4000  # the weights were away while the scratch lived
    assert after == plain_after == out.untyped_storage().nbytes()  # and count again once the call is over
    assert not work._forward_pre_hooks and not work._forward_hooks  # no hook left behind


def test_other_devices_are_not_counted():
    with TensorMemory("cuda") as tracked:
        kept = torch.ones(MIB)
        assert tracked.current == 0 and tracked.peak == 0
    assert kept.numel() == MIB


def test_training_step_agrees_with_the_cpu_allocator(tokenizer_dir):
    """Above what was live at entry, the counted peak is within 10% of what the CPU allocator reports.

    The allocator's figure comes from the profiler's memory events (every allocation and free with its size).
    """
    unet = build_pipeline(tokenizer_dir).unet
    unet.enable_gradient_checkpointing()
    unet.train()
    side = unet.config.sample_size
    sample = torch.randn(2, unet.config.in_channels, 2 * side, 2 * side)  # enough activations to dwarf scratch
    context = torch.randn(2, 77, unet.config.cross_attention_dim, requires_grad=True)

    def step() -> None:
        unet(sample, 500, context).sample.pow(2).mean().backward()

    step()  # allocate the gradients and warm the kernels' caches, so both counts start from the same state
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof, TensorMemory("cpu") as tracked:
        step()
    current = allocator_peak = 0
    events = sorted(prof.profiler.kineto_results.events(), key=lambda e: e.start_ns())
    for event in (e for e in events if e.name() == "[memory]"):
        current += event.nbytes()
        allocator_peak = max(allocator_peak, current)
    counted = tracked.peak - tracked.resident
    assert allocator_peak > 0.5 * MIB
    assert abs(counted - allocator_peak) <= 0.1 * allocator_peak, (counted / MIB, allocator_peak / MIB)
