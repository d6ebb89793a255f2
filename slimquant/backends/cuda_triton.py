"""The cuda-triton backend: Triton kernels around cuBLASLt (triton_ops.py), decode steps as CUDA-graph replays
(cuda_graphs.py) unless enforce_eager, or where the model's forward needs host values (DeepSeek)."""

from __future__ import annotations

from slimquant.backends.base import Backend
from slimquant.backends.triton_ops import TritonOps


class CudaTritonBackend(Backend):
    """TritonOps per op; decode by graph replay."""

    name = "cuda-triton"

    def __init__(self, fused_int8: bool = False, graphs: bool = True):
        super().__init__(TritonOps(fused_int8), graphs=graphs)
        if fused_int8:
            self.notes.append("int8 linears in one Triton kernel each (cuda_fused_int8)")
