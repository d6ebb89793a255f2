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
