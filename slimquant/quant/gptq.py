"""GPTQ rounding: int8 weights whose rounding error is compensated on the columns not yet quantized.

Frantar et al. 2022 (OPTQ): with H = 2 X^T X of the linear's calibration inputs, quantize column by column and
spread each column's error over the remaining columns through the Cholesky factor of H^-1, in blocks of 128 with
lazy updates. Scales are exactly round-to-nearest's (symmetric per output channel, absmax / 127) and the int8
values stay in [-127, 127] as round-to-nearest's do, so the checkpoint format and the engine do not change.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import torch

from slimquant.format import primitives as P

QLIM = 127  # |w_q| <= 127, as quantize_weight gives (its scale is absmax / 127)


@torch.no_grad()
def gptq_quantize(
    w: torch.Tensor, h: torch.Tensor, block: int = 128, damp: float = 0.01, act_order: bool = False
) -> tuple[torch.Tensor, torch.Tensor]:
    """w [N, K] fp32, h [K, K] (2 X^T X / n) -> (w_q int8 [N, K], scale fp32 [N, 1] = quantize_weight's)."""
    _, scale = P.quantize_weight(w)  # [N, 1]
    w = w.float().clone()  # [N, K]
    h = h.double().clone()  # [K, K]
    dead = torch.diag(h) <= 0  # inputs never seen: rounded to nearest, no error spread from or to them
    h[dead, :], h[:, dead] = 0.0, 0.0
    h[dead, dead] = 1.0
    perm = torch.argsort(torch.diag(h), descending=True) if act_order else torch.arange(w.shape[1])  # [K]
    w, h = w[:, perm], h[perm][:, perm]
    u = _inverse_cholesky(h, damp).to(w.dtype)  # [K, K] upper
    with _one_thread():  # thousands of small ops: thread hand-offs cost more than they save
        q = _quantize_columns(w, u, scale, block)  # [N, K] int8 values as fp32
    return q[:, torch.argsort(perm)].to(torch.int8), scale


@contextmanager
def _one_thread() -> Iterator[None]:
    """torch on one intra-op thread within the block, the previous count restored after."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def _inverse_cholesky(h: torch.Tensor, damp: float) -> torch.Tensor:
    """Upper Cholesky factor of (H + damp * mean(diag H) * I)^-1: [K, K] fp64."""
    k = h.shape[0]
    h = h + damp * torch.diag(h).mean() * torch.eye(k, dtype=h.dtype, device=h.device)
    lower = torch.linalg.cholesky(h)  # [K, K]
    return torch.linalg.cholesky(torch.cholesky_inverse(lower), upper=True)


def _quantize_columns(w: torch.Tensor, u: torch.Tensor, scale: torch.Tensor, block: int) -> torch.Tensor:
    """The column-by-column loop with lazy block updates; w [N, K] is consumed, returns int8 values [N, K]."""
    q = torch.empty_like(w)  # [N, K]
    for i1 in range(0, w.shape[1], block):
        i2 = min(i1 + block, w.shape[1])
        err = _quantize_block(w[:, i1:i2], u[i1:i2, i1:i2], scale, q[:, i1:i2])  # [N, B]
        w[:, i2:] -= err @ u[i1:i2, i2:]  # lazy update of the columns after the block
    return q


def _quantize_block(w: torch.Tensor, u: torch.Tensor, scale: torch.Tensor, q: torch.Tensor) -> torch.Tensor:
    """Quantize w [N, B] in place order into q [N, B]; returns the scaled errors [N, B] for the lazy update."""
    w = w.clone()
    err = torch.empty_like(w)  # [N, B]
    for i in range(w.shape[1]):
        col = w[:, i : i + 1]  # [N, 1]
        qi = (col / scale).round().clamp(-QLIM, QLIM)  # [N, 1]
        q[:, i : i + 1] = qi
        e = (col - qi * scale) / u[i, i]  # [N, 1]
        w[:, i:] -= e @ u[i : i + 1, i:]  # [N, B - i]
        err[:, i : i + 1] = e
    return err
