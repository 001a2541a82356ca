"""Measuring one stage: peak CUDA memory and seconds per step, without touching the code being measured.

Steps are counted by hooks on official extension points: a forward pre-hook on the UNet for training stages that
make one UNet call per step (``"train"``: every call with gradients on starts a step, so a step that float16 loss
scaling skips is still one), a global optimizer step-post hook for the others (``"optimizer"``; it also sees the
optimizer the library builds inside its own loop, so its state can be inspected, and counts the steps taken) and a
forward hook on the UNet for sampling stages (one guided UNet call per denoising step). The first ``warmup`` steps are
not timed.
With ``track``, the peak of live tensor bytes is also counted at the dispatch level (:mod:`benchmarks.tensor_memory`):
on a CPU that is the estimate of what the GPU's ``max_memory_allocated`` would be; on a GPU it checks the estimate.
``track`` also counts floating-point operations per step (:mod:`benchmarks.flops`), over the same steps as the timing:
the work a step does, the same on any device.
"""

from __future__ import annotations

import contextlib
import gc
import logging
import time
from collections import Counter
from dataclasses import dataclass, field

import torch
from torch.optim.optimizer import register_optimizer_step_post_hook

from peftedit.errors import RenderDiverged, out_of_memory
from peftedit.methods.common import OFFLOADED_PARTS, encoders_offloaded
from peftedit.models import PARTS, TEXT_ENCODERS, pipe_parts

from .flops import FlopCount
from .tensor_memory import TensorMemory

log = logging.getLogger("benchmarks")

GIB = 2**30
COUNTS = ("train", "optimizer", "unet")  # what a step is: see measure()
# What an out-of-memory row's status ends with (after the error's own words).
DID_NOT_FIT = "did not fit this device"


@dataclass
class Measurement:
    """What one stage cost. CUDA memory fields are None off CUDA, tensor ones None when not tracked;
    ``seconds_per_step`` is None when nothing was timed."""

    peak_allocated_gib: float | None = None
    peak_reserved_gib: float | None = None
    tensor_peak_gib: float | None = None
    tensor_resident_gib: float | None = None
    seconds_per_step: float | None = None
    tflop_per_step: float | None = None
    steps_timed: int = 0
    optimizer_steps: int = 0
    seconds_total: float = 0.0
    optimizer_state: dict | None = None
    stamps: list[float] = field(default_factory=list, repr=False)
    flop_stamps: list[int] = field(default_factory=list, repr=False)

    def fields(self) -> dict:
        """The measurement as row fields."""
        out = {
            "peak_allocated_gib": self.peak_allocated_gib,
            "peak_reserved_gib": self.peak_reserved_gib,
            "tensor_peak_gib": self.tensor_peak_gib,
            "tensor_resident_gib": self.tensor_resident_gib,
            "seconds_per_step": self.seconds_per_step,
            "tflop_per_step": self.tflop_per_step,
            "steps_timed": self.steps_timed,
            "optimizer_steps": self.optimizer_steps,
            "seconds_total": self.seconds_total,
        }
        if self.optimizer_state is not None:
            out["optimizer_state"] = self.optimizer_state
        return out


def synchronize(device: torch.device) -> None:
    """Wait for queued CUDA work so a timestamp means what it says."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def release(device: torch.device) -> None:
    """Collect garbage and return cached CUDA blocks, so the next stage's reserved peak starts from live tensors.

    Nothing to do off CUDA, where memory is not measured (and a full collection of this heap takes a while).
    """
    if device.type == "cuda":
        gc.collect()
        torch.cuda.synchronize(device)
        torch.cuda.empty_cache()


def optimizer_state_summary(optimizer: torch.optim.Optimizer) -> dict:
    """How an optimizer keeps its state: tensor count per dtype, MiB in all, and the largest tensor's state dtypes."""
    dtypes: Counter = Counter()
    nbytes = 0
    largest: tuple[int, list[int], list[str]] = (0, [], [])
    for param, state in optimizer.state.items():
        tensors = [v for v in state.values() if torch.is_tensor(v) and v.numel() == param.numel()]
        for value in tensors:
            dtypes[str(value.dtype).removeprefix("torch.")] += 1
        nbytes += sum(v.numel() * v.element_size() for v in state.values() if torch.is_tensor(v))
        if param.numel() > largest[0]:
            kinds = sorted({str(v.dtype).removeprefix("torch.") for v in tensors})
            largest = (param.numel(), list(param.shape), kinds)
    return {
        "class": type(optimizer).__name__,
        "params": sum(len(g["params"]) for g in optimizer.param_groups),
        "state_dtypes": dict(dtypes),
        "state_mib": nbytes / 2**20,
        "largest_param_shape": largest[1],
        "largest_param_state_dtypes": largest[2],
    }


@contextlib.contextmanager
def measure(device: torch.device, count: str, unet=None, warmup: int = 1, track: bool = False, exclude=(), hooks=None):
    """Measure the block; yields a :class:`Measurement` filled in when the block ends.

    ``count`` says what a step is: ``"train"`` (from one call of ``unet`` with gradients on to the next, the last
    ending with its optimizer step, or with the block when that step was skipped; for loops of one UNet call per step,
    where float16 loss scaling may skip an optimizer step), ``"optimizer"`` (every optimizer step anywhere) or
    ``"unet"`` (every forward call of ``unet``). Optimizer steps are counted in every mode (``optimizer_steps``). Peak
    memory counters are reset at the start, after releasing cached blocks. ``track`` also counts live tensor bytes on
    ``device`` and the floating-point operations per step (slower: every operator goes through Python; do not compare
    its timings); ``exclude`` are tensors that count never (see :class:`TensorMemory`).
    """
    if count not in COUNTS:
        raise ValueError(f"count = {count!r}: use one of {', '.join(COUNTS)}")
    result = Measurement()
    flops = FlopCount() if track else None

    last_step_end: list[tuple[float, int]] = []  # "train": where the last step ends, if an optimizer step ended it

    def now() -> tuple[float, int]:
        synchronize(device)
        return time.perf_counter(), flops.total if flops is not None else 0

    def stamp(at: tuple[float, int] | None = None) -> None:
        seconds, flop = at or now()
        result.stamps.append(seconds)
        if flops is not None:
            result.flop_stamps.append(flop)

    def on_step(optimizer, args, kwargs) -> None:
        result.optimizer_steps += 1
        if count == "optimizer":
            stamp()
        elif count == "train":
            last_step_end[:] = [now()]
        if result.optimizer_steps == warmup + 1:
            result.optimizer_state = optimizer_state_summary(optimizer)

    def on_training_call(module, args) -> None:
        if torch.is_grad_enabled():
            stamp()
            last_step_end.clear()

    release(device)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    handles = [register_optimizer_step_post_hook(on_step)]
    # Kept out of a compiled UNet's graph (runtime.compile): the clock must be read when the call starts or ends.
    if count == "train":
        handles.append(unet.register_forward_pre_hook(torch.compiler.disable(on_training_call)))
    elif count == "unet":
        handles.append(unet.register_forward_hook(torch.compiler.disable(lambda module, args, output: stamp())))
    tracker = TensorMemory(device.type, exclude, hooks) if track else contextlib.nullcontext()
    synchronize(device)
    start = time.perf_counter()
    try:
        with tracker, flops or contextlib.nullcontext():
            yield result
    finally:
        for handle in handles:
            handle.remove()
        synchronize(device)
        result.seconds_total = time.perf_counter() - start
    origin, flop_origin = start, 0
    if count == "train" and result.stamps:
        # Step k runs from call k to call k + 1; the last one to its optimizer step (what the block does after the
        # loop, like saving the LoRA, is no step's), or to the block's end when loss scaling skipped that step.
        stamp(last_step_end[0] if last_step_end else None)
        origin, flop_origin = result.stamps.pop(0), result.flop_stamps.pop(0) if flops is not None else 0
    if track:
        result.tensor_peak_gib, result.tensor_resident_gib = tracker.peak / GIB, tracker.resident / GIB
    if device.type == "cuda":
        result.peak_allocated_gib = torch.cuda.max_memory_allocated(device) / GIB
        result.peak_reserved_gib = torch.cuda.max_memory_reserved(device) / GIB
    result.steps_timed, result.seconds_per_step = _per_step(result.stamps, origin, warmup)
    flop_per_step = _per_step(result.flop_stamps, flop_origin, warmup)[1]
    result.tflop_per_step = flop_per_step / 1e12 if flop_per_step is not None else None


def _per_step(marks: list, origin, warmup: int) -> tuple[int, float | None]:
    """(steps after warm-up, their mean size) from a running count read at the end of each step (``origin``: its
    value at the start); the mean is None when no step is left."""
    sizes = [b - a for a, b in zip([origin, *marks], marks, strict=False)][warmup:]
    return len(sizes), sum(sizes) / len(sizes) if sizes else None


@dataclass
class StageResult:
    """One row's worth: a method's stage and what it cost, or why it was not measured.

    ``out_of_memory``: the stage (or the run around it) ran out of memory, so it has no measurement;
    ``out_of_memory_at_gib``: then, on CUDA, the peak allocated since the stage started, what fit before the
    allocation that failed (None off CUDA or outside a stage).
    """

    method: str
    stage: str
    measurement: Measurement | None = None
    status: str = "ok"
    note: str = ""
    out_of_memory: bool = False
    out_of_memory_at_gib: float | None = None


def out_of_memory_status(err: BaseException) -> str | None:
    """A row status for an out-of-memory error (CUDA's, the CPU allocator's, cuBLAS' or cuDNN's allocation
    failures, as the library tells them); None for any other error."""
    return out_of_memory(err, DID_NOT_FIT)


def offloaded_tensors(pipe, names: tuple[str, ...] = OFFLOADED_PARTS) -> list[torch.Tensor]:
    """The weights and buffers of these pipeline parts that ``pipe`` has (default: what ``encoders_offloaded`` moves
    off the GPU; SD has no ``text_encoder_2``)."""
    return [t for m in pipe_parts(pipe, names).values() for t in [*m.parameters(), *m.buffers()]]


@contextlib.contextmanager
def encoders_away(model, enabled: bool):
    """The library's ``encoders_offloaded`` over the block; yields the tensors it moves, which the live-tensor count
    leaves out (on a GPU they are gone from the device, on a CPU they cannot move): none when ``enabled`` is false, or
    with ``runtime.offload_idle``, where nothing moves there (``idle_offload`` follows ``Model.place`` instead)."""
    with encoders_offloaded(model, enabled):
        yield offloaded_tensors(model.pipe) if enabled and not model.runtime.offload_idle else []


def idle_offload(model):
    """What ``runtime.offload_idle`` keeps off the GPU, as hooks for the live-tensor count on a CPU, where nothing can
    leave the device (None on a GPU, where the parts really move, or with the option off).

    The library places each part before it runs (``Model.place``) and records which parts it put on the device
    (``Model.on_device``); every other part is on the CPU. The count follows that record: when the measured block
    starts and whenever a part runs, the parts on the device count and the others do not.
    """
    if not model.runtime.offload_idle or model.device.type != "cpu":
        return None
    pipe = model.pipe

    def install(tracker) -> list:
        def follow(*_):
            tracker.away(offloaded_tensors(pipe, tuple(p for p in PARTS if p not in model.on_device)))
            tracker.back(offloaded_tensors(pipe, model.on_device))

        follow()
        runs = [pipe.unet, pipe.vae.encoder, pipe.vae.decoder, *pipe_parts(pipe, TEXT_ENCODERS).values()]
        return [part.register_forward_pre_hook(follow) for part in runs]

    return install


class Recorder:
    """Runs stages on one model under :func:`measure` and collects a :class:`StageResult` for each."""

    def __init__(self, device: torch.device, unet, warmup: int, track: bool = False, hooks=None) -> None:
        self.device, self.unet, self.warmup, self.track = device, unet, warmup, track
        self.hooks = hooks  # see TensorMemory: where the code measured moves parts off the device
        self.results: list[StageResult] = []
        self.off_device: list[torch.Tensor] = []

    @contextlib.contextmanager
    def encoders_offloaded(self, model, enabled: bool):
        """:func:`encoders_away` over the block, for the stages measured inside it."""
        before = self.off_device
        try:
            with encoders_away(model, enabled) as away:
                self.off_device = [*before, *away]
                yield
        finally:
            self.off_device = before

    def run(self, method: str, stage: str, fn, count: str = "unet", note: str = "", timed: bool = True):
        """Measure ``fn()``; returns its value, or None when it raised.

        ``count`` is what a step is (see :func:`measure`); ``timed=False`` for whole-pipeline runs, whose steps are of
        several kinds. A failure becomes a row, so one broken stage does not lose the others: out of memory (CUDA's,
        or the CPU allocator's) a row with ``out_of_memory`` set and ``status = "out of memory (...)"``, with what
        fit before on CUDA (``out_of_memory_at_gib``); anything else (a missing feature) ``status = "error: ..."``.
        """
        warmup = self.warmup if timed else 10**9
        log.info("measuring %s / %s", method, stage)
        try:
            with measure(self.device, count, self.unet, warmup, self.track, self.off_device, self.hooks) as result:
                try:
                    value = fn()
                except RenderDiverged:  # random weights may render a NaN picture: raised after all the work
                    value, note = None, "; ".join(filter(None, [note, "picture not finite (random weights)"]))
        except Exception as err:  # a benchmark reports every failure as a row and goes on
            log.exception("%s / %s failed", method, stage)
            failed = StageResult(method, stage, None, note=note)
            said = out_of_memory_status(err)
            if said is None:
                first = (str(err).strip().splitlines() or [""])[0][:300]
                failed.status = f"error: {type(err).__name__}: {first}"
            else:
                failed.status, failed.out_of_memory = said, True
                if self.device.type == "cuda":  # peaks were reset when the stage started
                    failed.out_of_memory_at_gib = torch.cuda.max_memory_allocated(self.device) / GIB
        else:
            self.results.append(StageResult(method, stage, result, note=note))
            return value
        self.results.append(failed)
        # Out of the except block: while it ran, the error's traceback held the failed stage's frames and their
        # tensors (a full fine-tune's gradients and Adam states), so the next stage starts without them.
        release(self.device)
        return None

    def skip(self, method: str, stages: list[str], why: str) -> None:
        """Record that these stages were not measured, and why."""
        self.results.extend(StageResult(method, stage, None, why) for stage in stages)
