"""select_backend: the backend a model loads with, by device and KernelConfig."""

from __future__ import annotations

from slimquant.backends.base import Backend
from slimquant.config import KernelConfig
from slimquant.distributed.tensor_parallel import SINGLE, TensorParallel
from slimquant.kernels import native
from slimquant.kernels.cpu import has_native_half
from slimquant.kernels.triton_kernels import triton_module


def select_backend(
    device: str, kernels: KernelConfig, enforce_eager: bool = False, tp: TensorParallel = SINGLE
) -> Backend:
    """The backend for a device: kernels.backend, or for "auto" the fastest that runs here (cpu-native on a CPU,
    cuda-triton on a GPU; torch-reference where their kernels cannot load, said in its notes). A backend asked
    for by name that cannot run here is a ValueError with the reason. Tensor parallel (tp.size > 1) on a GPU
    runs without CUDA graphs (a step's collectives are not captured)."""
    on_cuda = str(device).startswith("cuda")
    graphs = on_cuda and not enforce_eager and tp.size == 1
    wanted = kernels.backend
    if wanted == "auto":
        wanted = "cuda-triton" if on_cuda else "cpu-native"
    if wanted != "torch-reference" and (wanted == "cuda-triton") != on_cuda:
        raise ValueError(f"backend {wanted!r} does not run on device {device!r}; use 'auto' or 'torch-reference'")
    try:
        return _make(wanted, kernels, graphs=graphs, tp=tp)
    except _Unavailable as e:
        if kernels.backend != "auto":
            raise ValueError(f"backend {wanted!r} cannot run here: {e}") from None
        backend = Backend(graphs=graphs)
        backend.notes.append(f"{wanted} unavailable ({e}): every op in torch, slower")
        return backend


class _Unavailable(Exception):
    pass


def _make(name: str, kernels: KernelConfig, graphs: bool, tp: TensorParallel = SINGLE) -> Backend:
    if name == "cpu-native":
        from slimquant.backends.cpu_native import CpuNativeBackend

        try:
            lib = native.load(kernels.isa, kernels.cache_dir)
        except native.NativeUnavailable as e:
            raise _Unavailable(str(e)) from None
        return CpuNativeBackend(
            lib, kernels.greedy_screen, kernels.hugepages, tp, bf16_prefill_attention=has_native_half()
        )
    if name == "cuda-triton":
        if triton_module("cuda_layers") is None:
            raise _Unavailable("Triton is not installed")
        from slimquant.backends.cuda_triton import CudaTritonBackend

        return CudaTritonBackend(kernels.cuda_int8_gemm, graphs)
    return Backend(graphs=graphs)
