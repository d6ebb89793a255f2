"""The tensor-parallel ranks as the native kernels reduce across them (csrc/exports.h: SqRanks): a C function
pointer that calls a TensorParallel's collectives back on the kernel's own buffers."""

from __future__ import annotations

import ctypes

import torch

from slimquant.distributed.tensor_parallel import TensorParallel
from slimquant.kernels import native

_REDUCE = ctypes.CFUNCTYPE(ctypes.c_int, ctypes.c_int, ctypes.c_void_p, ctypes.c_int64)  # SqRanks.reduce
_REDUCE_OPS = {  # SqRanks.reduce's op -> (element, TensorParallel collective)
    0: (torch.int32, "sum"),
    1: (torch.float32, "max"),
    2: (torch.float32, "sum_disjoint"),
}


class NativeRanks:
    """The SqRanks of a tensor-parallel rank: a native call (sq_decoder_model, sq_routed_experts) calls tp's
    collectives back from its calling thread on its buffers; a collective's exception is kept for raise_failure."""

    def __init__(self, lib: native.Library, tp: TensorParallel):
        self.tp, self.error = tp, None
        self._callback = _REDUCE(self._reduce)  # alive as long as the struct points at it
        self.struct = lib.structs["SqRanks"](size=tp.size, reduce=ctypes.cast(self._callback, ctypes.c_void_p))

    def _reduce(self, op: int, data: int, count: int) -> int:
        try:
            dtype, collective = _REDUCE_OPS[op]
            raw = (ctypes.c_byte * (count * dtype.itemsize)).from_address(data)
            getattr(self.tp, collective)(torch.frombuffer(raw, dtype=dtype))  # in place, in the native buffer
            return 0
        except BaseException as e:  # noqa: BLE001 - a callback cannot raise into C: raise_failure does
            self.error = e
            return 1

    def raise_failure(self) -> None:
        """Raise what failed inside the last native call."""
        error, self.error = self.error, None
        raise error if error is not None else RuntimeError("a tensor-parallel reduction of a native call failed")
