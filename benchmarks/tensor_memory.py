"""Peak bytes of live tensors on one device type, counted at the ATen dispatch level: a CUDA memory estimate from CPU.

A GPU's ``max_memory_allocated`` is the peak of the bytes held by live tensors (plus kernel workspaces, rounded to
the caching allocator's blocks). The same tensors, with the same shapes and dtypes, are created when the same code runs
on the CPU, so counting them there predicts the GPU's figure without a GPU. :class:`TensorMemory` is a
``TorchDispatchMode`` that sees every tensor an operator returns or receives, counts each storage once (views share
it) and uncounts it when the storage is freed (a weak reference to the storage, whose Python object lives as long as
the storage does). Tensors alive when the mode is entered (weights and their gradients) are found with the garbage
collector.

What it does not see, so an estimate is a lower bound of ``max_memory_allocated`` on that count: kernel workspaces
that do not become tensors (cuBLAS, cuDNN, attention kernels), and whatever the CUDA path allocates that the CPU path
does not (and the reverse: a CPU kernel's outputs can differ from the CUDA kernel's, e.g. which fused attention runs).
``max_memory_reserved`` adds the allocator's rounding and fragmentation on top; it cannot be estimated here.
"""

from __future__ import annotations

import gc
import weakref
from collections.abc import Callable, Iterable

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves


def storage_key(storage: torch.UntypedStorage) -> int:
    """What identifies a storage while it lives: its C++ object, which keeps its identity when ``resize_`` moves its
    bytes to a new address (the data pointer does not)."""
    return storage._cdata


class TensorMemory(TorchDispatchMode):
    """Counts live tensor bytes on ``device_type`` while active; ``peak`` and ``current`` are in bytes.

    ``with TensorMemory("cpu") as tracked: ...`` then ``tracked.peak``. Storages alive at entry count from the start
    (``resident``); a storage first seen later (one created outside the mode, e.g. in C++) counts from then on.
    ``exclude``: tensors whose storages never count (weights the code being measured keeps off the GPU, which on a
    CPU are on the same device as everything else). ``hooks``: called with the tracker on entry, returns hook handles
    removed on exit: hooks that call :meth:`away` and :meth:`back` where the code measured moves tensors off the GPU
    and back.
    """

    def __init__(
        self,
        device_type: str = "cpu",
        exclude: Iterable[torch.Tensor] = (),
        hooks: Callable[[TensorMemory], list] | None = None,
    ) -> None:
        super().__init__()
        self.device_type = device_type
        self.excluded = {storage_key(t.untyped_storage()) for t in exclude}
        self.hooks = hooks
        self._hooks: list = []
        self._away: set[int] = set()
        self.live: dict[int, int] = {}
        self.current = 0
        self.peak = 0
        self.resident = 0
        self._finalizers: dict[int, weakref.finalize] = {}

    def _track(self, tensor: torch.Tensor) -> None:
        if tensor.device.type != self.device_type or tensor.is_sparse:
            return
        try:
            storage = tensor.untyped_storage()
        except (RuntimeError, NotImplementedError):  # tensors without a storage of their own (e.g. nested)
            return
        key, nbytes = storage_key(storage), storage.nbytes()
        if nbytes == 0 or key in self.excluded:
            return
        known = self.live.get(key)
        if known is None:
            self._finalizers[key] = weakref.finalize(storage, self._free, key)
            known = 0
        if nbytes > known:  # new, or grown in place (resize_: same storage, a new and larger buffer)
            self.live[key] = nbytes
            self.current += nbytes - known
            self.peak = max(self.peak, self.current)

    def _free(self, key: int) -> None:
        self.current -= self.live.pop(key, 0)
        self._finalizers.pop(key, None)

    def away(self, tensors: Iterable[torch.Tensor]) -> None:
        """These tensors stop counting (moved off the device) until :meth:`back`."""
        for tensor in tensors:
            key = storage_key(tensor.untyped_storage())
            if key in self.live:
                self.current -= self.live.pop(key)
                self._finalizers.pop(key).detach()
                self.excluded.add(key)
                self._away.add(key)

    def back(self, tensors: Iterable[torch.Tensor]) -> None:
        """Tensors sent :meth:`away` count again (back on the device)."""
        tensors = list(tensors)
        for tensor in tensors:
            key = storage_key(tensor.untyped_storage())
            if key in self._away:
                self._away.discard(key)
                self.excluded.discard(key)
        for tensor in tensors:
            self._track(tensor)

    def __enter__(self):
        gc.collect()  # unreachable tensors (an earlier run's model in a reference cycle) are not resident
        for obj in gc.get_objects():
            if issubclass(type(obj), torch.Tensor):  # type(), not isinstance: no __class__ look-ups
                self._track(obj)
                if obj.is_leaf and obj.grad is not None:  # gradients live in C++ until they are read
                    self._track(obj.grad)
        self._hooks = self.hooks(self) if self.hooks else []  # may send some of them away at once
        self.resident = self.peak = self.current
        return super().__enter__()

    def __exit__(self, *exc):
        for hook in self._hooks:
            hook.remove()
        self._hooks.clear()
        out = super().__exit__(*exc)
        for finalizer in self._finalizers.values():  # the tracker keeps no reference to anything once it is done
            finalizer.detach()
        self._finalizers.clear()
        return out

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for value in tree_leaves((out, args, kwargs)):
            if isinstance(value, torch.Tensor):
                self._track(value)
        return out
