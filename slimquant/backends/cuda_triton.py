"""The cuda-triton backend: Triton kernels around cuBLASLt (triton_ops.py), decode steps as CUDA-graph replays
(cuda_graphs.py) unless enforce_eager, or where the model's forward needs host values (float MoE experts)."""

from __future__ import annotations

from slimquant.backends.base import Backend
from slimquant.backends.triton_ops import TritonOps


class CudaTritonBackend(Backend):
    """TritonOps per op; decode by graph replay."""

    name = "cuda-triton"

    def __init__(self, int8_gemm: str = "cublas", graphs: bool = True):
        super().__init__(TritonOps(int8_gemm), graphs=graphs)
        if int8_gemm != "cublas":
            self.notes.append(f"int8 GEMMs: {int8_gemm} (cuda_int8_gemm)")
