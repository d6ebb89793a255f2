"""Activation statistics of linear inputs: per-channel min / max, a bounded token sample, the second moment."""

from __future__ import annotations

from contextlib import contextmanager

import torch
from torch import nn


class ChannelRange:
    """Running per-input-channel min / max of one linear's input."""

    def __init__(self) -> None:
        self.min: torch.Tensor | None = None  # [K] fp32
        self.max: torch.Tensor | None = None  # [K] fp32

    def update(self, x: torch.Tensor) -> None:
        """Fold in a batch x: [..., K]."""
        x = x.detach().reshape(-1, x.shape[-1]).float()  # [T, K]
        lo, hi = x.amin(dim=0), x.amax(dim=0)  # [K]
        self.min = lo if self.min is None else torch.minimum(self.min, lo)
        self.max = hi if self.max is None else torch.maximum(self.max, hi)

    def absmax(self) -> torch.Tensor:
        """Per-channel max |x|: [K]."""
        return torch.maximum(self.min.abs(), self.max.abs())

    def transformed(self, shift: torch.Tensor, scale: torch.Tensor) -> ChannelRange:
        """The range of (x - shift) / scale per channel (scale > 0): exact for a per-channel affine map."""
        out = ChannelRange()
        out.min, out.max = (self.min - shift) / scale, (self.max - shift) / scale
        return out

    def tensor_range(self) -> tuple[float, float]:
        """Per-tensor (min, max)."""
        return float(self.min.min()), float(self.max.max())


class TokenSample:
    """A deterministic strided sample of at most `cap` input rows: every stride-th token, stride doubling when full."""

    def __init__(self, cap: int = 2048) -> None:
        assert cap >= 1, cap
        self.cap, self.stride, self.seen = cap, 1, 0
        self.rows: list[torch.Tensor] = []  # [t_i, K] fp32
        self.index: list[torch.Tensor] = []  # [t_i] token numbers of those rows

    def update(self, x: torch.Tensor) -> None:
        """Fold in a batch x: [..., K]."""
        x = x.detach().reshape(-1, x.shape[-1])  # [T, K]
        idx = torch.arange(self.seen, self.seen + x.shape[0])  # [T]
        keep = idx % self.stride == 0
        self.rows.append(x[keep.to(x.device)].float())
        self.index.append(idx[keep])
        self.seen += x.shape[0]
        while sum(len(i) for i in self.index) > self.cap:
            self._thin()

    def _thin(self) -> None:
        """Double the stride: keep every other sampled token."""
        self.stride *= 2
        rows, idx = torch.cat(self.rows), torch.cat(self.index)  # [t, K], [t]
        keep = idx % self.stride == 0
        self.rows, self.index = [rows[keep.to(rows.device)]], [idx[keep]]

    def tensor(self) -> torch.Tensor:
        """The sampled rows: [n, K] fp32 (n <= cap)."""
        assert self.rows, "no token was sampled"
        return torch.cat(self.rows)


class SecondMoment:
    """Running sum of x x^T and of x over input tokens: the GPTQ Hessian in any per-channel affine coordinates."""

    def __init__(self) -> None:
        self.xtx: torch.Tensor | None = None  # [K, K] fp32
        self.sum: torch.Tensor | None = None  # [K] fp32
        self.count = 0

    def update(self, x: torch.Tensor) -> None:
        """Fold in a batch x: [..., K]."""
        x = x.detach().reshape(-1, x.shape[-1]).float()  # [T, K]
        xtx, s = x.t() @ x, x.sum(dim=0)  # [K, K], [K]
        self.xtx = xtx if self.xtx is None else self.xtx.add_(xtx)
        self.sum = s if self.sum is None else self.sum.add_(s)
        self.count += x.shape[0]

    def hessian(self, shift: torch.Tensor | None = None, scale: torch.Tensor | None = None) -> torch.Tensor:
        """H = 2/n sum x' x'^T of x' = (x - shift) / scale (per channel), exactly: [K, K] fp32."""
        assert self.count > 0, "no token was observed"
        h = self.xtx.double()  # [K, K]
        if shift is not None:
            c, u = shift.double(), self.sum.double()  # [K]
            h = h - c[:, None] * u[None, :] - u[:, None] * c[None, :] + self.count * c[:, None] * c[None, :]
        if scale is not None:
            inv = 1.0 / scale.double()  # [K]
            h = h * inv[:, None] * inv[None, :]
        return (h * (2.0 / self.count)).float()


@contextmanager
def observe_inputs(layer: nn.Module, names: list[str], extra: dict[str, list] | None = None):
    """Within the block, every forward of the named linears records its input; yields {name: ChannelRange}.

    extra: further recorders (objects with update(x), e.g. TokenSample, SecondMoment) per linear name.
    """
    ranges = {n: ChannelRange() for n in names}
    recorders = {n: [ranges[n], *(extra or {}).get(n, [])] for n in names}
    hooks = [layer.get_submodule(n).register_forward_pre_hook(_recorder_hook(recorders[n])) for n in names]
    try:
        yield ranges
    finally:
        for h in hooks:
            h.remove()


def _recorder_hook(recorders: list):
    """A forward pre-hook that passes the linear's input to every recorder."""

    def hook(_module: nn.Module, args: tuple) -> None:
        for r in recorders:
            r.update(args[0])

    return hook


class KvRange:
    """Stands in for transformers' cache in one decoder layer's forward: records the range of k (after RoPE) and of
    v per channel, and hands k / v back unchanged (the attention runs on them as without a cache).

    A key channel's range is that of its RoPE pair (d, d + D/2): the largest norm of the pair, which RoPE only
    rotates. Calibration sequences are short, and the slow pairs barely turn within them; at a later position the
    same key turns into the pair's other channel, which max |k| alone would have sized too small."""

    def __init__(self):
        self.k_amax: torch.Tensor | None = None  # [KVH, D] fp32
        self.v_amax: torch.Tensor | None = None

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args, **kwargs):
        # key_states / value_states: [B, KVH, T, D]
        k1, k2 = key_states.detach().float().chunk(2, dim=-1)  # the two halves RoPE rotates together
        pair = torch.sqrt(k1 * k1 + k2 * k2).amax(dim=(0, 2))  # [KVH, D/2]
        k, v = torch.cat([pair, pair], dim=-1), value_states.detach().abs().float().amax(dim=(0, 2))
        self.k_amax = k if self.k_amax is None else torch.maximum(self.k_amax, k)
        self.v_amax = v if self.v_amax is None else torch.maximum(self.v_amax, v)
        return key_states, value_states
