"""Which devices slimquant runs on, checked up front with a clear error."""

from __future__ import annotations


def check_device(device: str) -> str:
    """device ("cpu", "cuda" or "cuda:N") if torch can run there, else ValueError saying what to do."""
    import torch

    kind, _, index = str(device).partition(":")
    if kind not in ("cpu", "cuda") or (index and (kind == "cpu" or not index.isdigit())):
        raise ValueError(f"device must be 'cpu', 'cuda' or 'cuda:N', got {device!r}")
    if kind == "cuda" and not torch.cuda.is_available():
        raise ValueError(
            f"device {device!r}: torch sees no CUDA GPU (a CPU-only torch build, or no driver); use device 'cpu'"
        )
    if index and int(index) >= torch.cuda.device_count():
        raise ValueError(f"device {device!r}: torch sees {torch.cuda.device_count()} CUDA GPU(s)")
    return device


def rank_device(device: str, local_rank: int, tensor_parallel_size: int) -> str:
    """Where one tensor-parallel rank runs: cuda:local_rank for device 'cuda' (one GPU per rank on each machine, as
    vLLM places them), else device; ValueError where device names one GPU or this machine lacks the rank's GPU."""
    if tensor_parallel_size == 1 or not device.startswith("cuda"):
        return device
    if device != "cuda":
        raise ValueError(
            f"device {device!r} with tensor_parallel_size={tensor_parallel_size}: pass device 'cuda'; each rank runs "
            "on its own GPU, cuda:LOCAL_RANK (its index among the ranks on its machine)"
        )
    import torch

    count = torch.cuda.device_count()
    if local_rank >= count:
        raise ValueError(
            f"tensor parallel runs one rank per GPU: local rank {local_rank} needs cuda:{local_rank}, but torch sees "
            f"{count} CUDA GPU(s) here; run at most {count} ranks per machine (tensor_parallel_size / nnodes)"
        )
    return f"cuda:{local_rank}"
