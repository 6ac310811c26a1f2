"""Ops whose result the host has to read back from the device, caught as they run on any device.

On a GPU each of these makes the CPU wait for the GPU (``torch.cuda.set_sync_debug_mode`` catches
them there); ``HostReads`` names them on the CPU too, so a test can keep the training step free of
them without a GPU: reading a value (``.item()``, ``int(t)``, ``bool(t)``, ``torch.equal``) and ops
whose output size depends on the values (boolean-mask indexing, ``nonzero``, ``masked_select``,
``unique``, ``repeat_interleave`` without an output size).
"""
from __future__ import annotations

import torch
from torch.utils._python_dispatch import TorchDispatchMode

_aten = torch.ops.aten
_READS = {getattr(_aten, n).default for n in ("_local_scalar_dense", "is_nonzero", "equal", "nonzero",
                                               "masked_select", "_unique2", "unique_consecutive",
                                               "unique_dim") if hasattr(_aten, n)}


def _bool_index(func, args) -> bool:
    if func not in (_aten.index.Tensor, _aten.index_put.default, _aten.index_put_.default):
        return False
    return any(isinstance(i, torch.Tensor) and i.dtype == torch.bool for i in (args[1] or ()))


def _sized_by_values(func, args, kwargs) -> bool:
    return func is _aten.repeat_interleave.Tensor and kwargs.get("output_size") is None


class HostReads(TorchDispatchMode):
    """``with HostReads() as r: ...`` then ``r.ops``: the host-reading ops that ran, in order."""

    def __init__(self):
        super().__init__()
        self.ops: list[str] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func in _READS or _bool_index(func, args) or _sized_by_values(func, args, kwargs):
            self.ops.append(str(func.overloadpacket.__name__))
        return func(*args, **kwargs)
