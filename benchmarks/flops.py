"""Floating-point operations per step, counted at the dispatch level: the work a stage does, whatever the device.

:class:`FlopCount` is a ``TorchDispatchMode`` that runs every operator as it is and adds up the FLOPs of those
``torch.utils.flop_counter`` has a formula for (matrix multiplies, convolutions, the CUDA attention kernels). It does
not use ``FlopCounterMode`` itself: that one decomposes operators it has no formula for and hooks every module, which
changes what is alive when (measured: with it, gradient checkpointing seemed to cost memory instead of saving it), and
the live-tensor count runs in the same pass. On a CPU, ``scaled_dot_product_attention`` runs
``_scaled_dot_product_flash_attention_for_cpu``, which the registry does not know; it is counted with the CUDA flash
kernel's formulas, so a stage counts the same on either device. Elementwise work (norms, activations, optimizer
updates) is not counted: it is memory-bound, small in FLOPs and large in time, so a FLOP ratio is not a time ratio.
"""

from __future__ import annotations

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils.flop_counter import flop_registry, sdpa_backward_flop_count, sdpa_flop_count
from torch.utils.flop_counter import shape_wrapper as _with_shapes

aten = torch.ops.aten


def _cpu_flash_forward(query_shape, key_shape, value_shape, *args, out_shape=None, **kwargs) -> int:
    return sdpa_flop_count(query_shape, key_shape, value_shape)


def _cpu_flash_backward(grad_out_shape, query_shape, key_shape, value_shape, *args, out_shape=None, **kwargs) -> int:
    return sdpa_backward_flop_count(grad_out_shape, query_shape, key_shape, value_shape)


FORMULAS = {
    **flop_registry,
    aten._scaled_dot_product_flash_attention_for_cpu: _with_shapes(_cpu_flash_forward),
    aten._scaled_dot_product_flash_attention_for_cpu_backward: _with_shapes(_cpu_flash_backward),
}


class FlopCount(TorchDispatchMode):
    """``with FlopCount() as counted: ...``; ``counted.total`` is the FLOPs so far, ``counted.by_op`` per operator."""

    def __init__(self) -> None:
        super().__init__()
        self.total = 0
        self.by_op: dict[str, int] = {}

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        formula = FORMULAS.get(func._overloadpacket)
        if formula is not None:
            flops = formula(*args, **kwargs, out_val=out)
            self.total += flops
            name = str(func._overloadpacket)
            self.by_op[name] = self.by_op.get(name, 0) + flops
        return out
