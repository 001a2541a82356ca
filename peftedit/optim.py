"""Optimizer factory: bitsandbytes 8-bit AdamW by default, torch AdamW where bitsandbytes cannot load."""

from __future__ import annotations

import logging
import warnings
from collections.abc import Iterable

import torch

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
