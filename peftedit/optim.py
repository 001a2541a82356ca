"""Optimizer factory (bitsandbytes 8-bit AdamW by default, torch AdamW where bitsandbytes cannot load) and the
optimizer step, with loss scaling where gradients pass through a float16 model."""

from __future__ import annotations

import logging
import warnings
from collections.abc import Iterable

import torch

from .errors import NumericalError

log = logging.getLogger("peftedit")


def _bitsandbytes():
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            logging.getLogger("bitsandbytes").setLevel(logging.ERROR)
            import bitsandbytes
        return bitsandbytes
    except Exception as err:  # bitsandbytes raises many kinds of errors when its native library is missing
        log.warning(
            "bitsandbytes could not load (%s); falling back to torch AdamW (fp32 states)",
            err,
        )
        return None


def make_optimizer(
    params: Iterable[torch.nn.Parameter],
    lr: float,
    kind: str = "adamw8bit",
    weight_decay: float = 0.0,
) -> torch.optim.Optimizer:
    """An AdamW over ``params``: 8-bit states (bitsandbytes; tensors of >= 4096 values) or torch's fp32 AdamW."""
    params = list(params)
    if kind == "adamw8bit":
        bnb = _bitsandbytes()
        if bnb is not None:
            return bnb.optim.AdamW8bit(params, lr=lr, weight_decay=weight_decay)
    return torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay)


def set_lr(optimizer: torch.optim.Optimizer, lr: float) -> None:
    """Set every parameter group's learning rate (for schedules computed by the caller)."""
    for group in optimizer.param_groups:
        group["lr"] = lr


def loss_scaler(model_dtype: torch.dtype, device: torch.device) -> torch.amp.GradScaler:
    """Loss scaling for gradients that flow back through a float16 model (torch's GradScaler); a no-op otherwise.

    float16 has 5 exponent bits: the gradients of small losses (null-text's reach 1e-5) flush to zero on their way
    back through the UNet unless the loss is scaled up first. bfloat16 and float32 have float32's range and need none.
    """
    return torch.amp.GradScaler(device.type, enabled=model_dtype == torch.float16)


def numeric_advice(setting: str, model_dtype: torch.dtype) -> str:
    """What a :class:`NumericalError` advises: a lower ``setting`` (a learning rate), and full precision where the
    model runs in half (advising it where the model is already fp32 sends the user nowhere)."""
    return f"try a lower {setting}" + (" or runtime.dtype=fp32" if model_dtype != torch.float32 else "")


def descend(
    optimizer: torch.optim.Optimizer,
    scaler: torch.amp.GradScaler,
    loss: torch.Tensor,
    stage: str,
    advice: str,
) -> None:
    """One optimizer step on ``loss``. With scaling on, a step whose gradients overflowed is skipped and the scale
    halved (GradScaler); a scale driven below 1 means the gradients overflow at any scale: that raises.

    ``advice`` ends the :class:`NumericalError` raised when the step itself cannot be taken: bitsandbytes' CPU
    kernels refuse a learning rate whose step size overflows float32 (a RuntimeError saying "overflow")."""
    optimizer.zero_grad(set_to_none=True)
    scaler.scale(loss).backward()
    try:
        scaler.step(optimizer)
    except RuntimeError as err:
        if "overflow" not in str(err):
            raise
        lr = optimizer.param_groups[0]["lr"]
        message = f"{stage}: the optimizer step overflows float32 at learning rate {lr:g}; {advice}"
        raise NumericalError(message) from err
    scaler.update()
    if scaler.is_enabled() and scaler.get_scale() < 1.0:
        raise NumericalError(f"{stage}: gradients overflow float16 at every loss scale; try runtime.dtype=fp32")
