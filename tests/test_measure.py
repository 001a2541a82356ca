"""How the benchmark counts steps (a training step that float16 loss scaling skips is still a step), and what a
stage that fails leaves."""

from __future__ import annotations

import math

import pytest
import torch

from benchmarks.measure import DID_NOT_FIT, Recorder, measure
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


def _out_of_memory(*args, **kwargs):
    raise torch.OutOfMemoryError(
        "CUDA out of memory. Tried to allocate 20.00 GiB. GPU 0 has a total capacity of 79 GiB"
    )


def test_a_stage_out_of_memory_is_a_row_and_the_next_stage_runs():
    """A full fine-tune too large for the GPU (the Imagic baseline at SDXL size) leaves a row saying so, without
    peaks that would make ratios, and the stages after it are measured."""
    recorder = Recorder(torch.device("cpu"), Net(), warmup=0)
    assert recorder.run("imagic", "lora", _out_of_memory) is None
    assert recorder.run("imagic", "render", lambda: 7) == 7
    failed, after = recorder.results
    assert failed.out_of_memory and failed.measurement is None and failed.out_of_memory_at_gib is None  # off CUDA
    assert failed.status.startswith("out of memory (CUDA out of memory. Tried to allocate 20.00 GiB")
    assert failed.status.endswith(DID_NOT_FIT)
    assert after.status == "ok" and not after.out_of_memory and after.measurement.seconds_total > 0
    recorder.run("imagic", "embedding", lambda: 1 / 0)  # any other failure stays an error row
    assert (
        recorder.results[-1].status.startswith("error: ZeroDivisionError") and not recorder.results[-1].out_of_memory
    )


def test_idle_offload_counts_only_what_the_library_placed():
    """``runtime.offload_idle`` on a CPU (hooks in the live-tensor count), on SDXL's layout: a model loaded with it
    has nothing on the device when the count starts; then, whenever a part runs, exactly the parts ``Model.place``
    put on the device count (the UNet alone, both text encoders, the VAE alone)."""
    from benchmarks import measure
    from benchmarks.build_model import build_pipeline
    from benchmarks.tensor_memory import TensorMemory
    from peftedit import RuntimeConfig
    from peftedit.models import Model

    pipe = build_pipeline("tiny-xl")
    runtime = RuntimeConfig(device="cpu", offload_idle=True)
    model = Model(pipe=pipe, name="tiny-xl", device=torch.device("cpu"), dtype=torch.float32, runtime=runtime)
    size = lambda *parts: sum(t.numel() * t.element_size() for t in measure.offloaded_tensors(pipe, parts))
    unet = pipe.unet.config
    latent, t = torch.zeros(1, 4, unet.sample_size, unet.sample_size), torch.tensor([10])
    context, ids = torch.zeros(1, 77, unet.cross_attention_dim), torch.zeros(1, 77, dtype=torch.long)
    added = {"text_embeds": torch.zeros(1, pipe.text_encoder_2.config.projection_dim), "time_ids": torch.zeros(1, 6)}
    with TensorMemory("cpu") as plain:  # what lives in this process, weights included
        everything = plain.current
    with torch.no_grad(), TensorMemory("cpu", hooks=measure.idle_offload(model)) as tracked:
        small = tracked.current  # the same without the weights
        assert tracked.peak == small == everything - size("unet", "vae", "text_encoder", "text_encoder_2")
        model.place("unet")
        pipe.unet(latent, t, encoder_hidden_states=context, added_cond_kwargs=added)
        assert tracked.current - small == size("unet")
        model.place("text_encoder", "text_encoder_2")
        pipe.text_encoder_2(ids)
        assert tracked.current - small == size("text_encoder", "text_encoder_2")
        model.place("vae")
        pipe.vae.decoder(latent)
        assert tracked.current - small == size("vae")
        assert tracked.peak - small < size("unet", "vae", "text_encoder", "text_encoder_2")
    assert size("text_encoder_2") > 0 and measure.offloaded_tensors(build_pipeline("tiny"), ("text_encoder_2",)) == []


def test_a_render_that_diverges_on_random_weights_is_still_measured():
    """Random weights in half precision may render a NaN picture: the render raises once its work is done, and the
    benchmark keeps the stage's measurement with a note instead of an error row."""
    from peftedit.errors import RenderDiverged

    def diverged():
        torch.ones(64, 64) @ torch.ones(64, 64)
        raise RenderDiverged("the render diverged: its latents are NaN or infinite; try a lower guidance")

    recorder = Recorder(torch.device("cpu"), Net(), warmup=0)
    assert recorder.run("imagic", "render", diverged, note="50 steps") is None
    (row,) = recorder.results
    assert row.status == "ok" and row.measurement.seconds_total > 0
    assert row.note == "50 steps; picture not finite (random weights)"
