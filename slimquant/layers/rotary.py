"""Rotary position embeddings (neox / rotate-half layout, as transformers' llama and qwen).

Supported rope types: default, linear, llama3, yarn (as DeepSeek V2/V3 configure it), on whole heads or on
their first partial_rotary_factor part (GLM-4.5). Both config styles are read: transformers-5 `rope_parameters`
dicts and the older `rope_theta` + `rope_scaling`. DeepSeek's interleaved pair layout is apply_rotary_interleaved.
"""

from __future__ import annotations

import math

import torch
from torch import nn

SUPPORTED_ROPE_TYPES = ("default", "linear", "llama3", "yarn")


def rope_parameters(config) -> dict:
    """The rope settings of a HF config as one dict with 'rope_type' and 'rope_theta'."""
    params = dict(getattr(config, "rope_parameters", None) or {})
    scaling = getattr(config, "rope_scaling", None) or {}
    params = {**scaling, **params}
    params.setdefault("rope_theta", getattr(config, "rope_theta", 10000.0))
    params["rope_type"] = params.get("rope_type", params.get("type", "default"))
    return params


def rotary_dim(head_dim: int, params: dict) -> int:
    """The dims of a head that rope turns: all, or its first int(head_dim * partial_rotary_factor) (GLM-4.5: half)."""
    dim = int(head_dim * params.get("partial_rotary_factor", 1.0))
    if dim % 2 or not 0 < dim <= head_dim:
        raise ValueError(
            f"partial_rotary_factor {params['partial_rotary_factor']} turns {dim} of a head's {head_dim} dims; "
            "it must be an even number from 2 to head_dim"
        )
    return dim


def inverse_frequencies(head_dim: int, params: dict) -> torch.Tensor:
    """inv_freq fp32 [R / 2] for the given rope settings (R = rotary_dim); ValueError on unsupported types."""
    rope_type = params["rope_type"]
    if rope_type not in SUPPORTED_ROPE_TYPES:
        raise ValueError(f"rope type {rope_type!r} is not supported; supported: {SUPPORTED_ROPE_TYPES}")
    dim = rotary_dim(head_dim, params)
    base = float(params["rope_theta"])
    inv_freq = 1.0 / (base ** (torch.arange(0, dim, 2, dtype=torch.int64).float() / dim))
    if rope_type == "linear":
        return inv_freq / params["factor"]
    if rope_type == "llama3":
        return _llama3_scaling(inv_freq, params)
    if rope_type == "yarn":
        return _yarn_scaling(inv_freq, dim, base, params)
    return inv_freq


def _llama3_scaling(inv_freq: torch.Tensor, params: dict) -> torch.Tensor:
    """Llama 3.1 frequency scaling: slow long wavelengths by `factor`, interpolate the medium band."""
    factor, low, high = params["factor"], params["low_freq_factor"], params["high_freq_factor"]
    old_len = params["original_max_position_embeddings"]
    wavelen = 2 * math.pi / inv_freq
    scaled = torch.where(wavelen > old_len / low, inv_freq / factor, inv_freq)
    smooth = (old_len / wavelen - low) / (high - low)
    smoothed = (1 - smooth) * scaled / factor + smooth * scaled
    is_medium = (wavelen >= old_len / high) & (wavelen <= old_len / low)
    return torch.where(is_medium, smoothed, scaled)


def _yarn_scaling(inv_freq: torch.Tensor, dim: int, base: float, params: dict) -> torch.Tensor:
    """YaRN: interpolate (divide by `factor`) the low frequencies, keep the high ones, ramp in between."""
    missing = [k for k in ("factor", "original_max_position_embeddings") if k not in params]
    if missing:
        raise ValueError(f"yarn rope settings lack {missing}; config.json's rope_scaling must give them")
    factor, old_len = params["factor"], params["original_max_position_embeddings"]
    beta_fast, beta_slow = params.get("beta_fast") or 32, params.get("beta_slow") or 1

    def correction_dim(rotations: float) -> float:
        return (dim * math.log(old_len / (rotations * 2 * math.pi))) / (2 * math.log(base))

    low, high = correction_dim(beta_fast), correction_dim(beta_slow)
    if params.get("truncate", True):
        low, high = math.floor(low), math.ceil(high)
    low, high = max(low, 0), min(high, dim - 1)
    if low == high:
        high += 0.001  # prevent a singular ramp
    ramp = torch.clamp((torch.arange(dim // 2, dtype=torch.float32) - low) / (high - low), 0, 1)
    extrapolation = 1 - ramp  # 1: keep the original frequency
    return (inv_freq / factor) * (1 - extrapolation) + inv_freq * extrapolation


def yarn_mscale(scale: float, mscale: float = 1.0) -> float:
    """YaRN's magnitude correction 0.1 * mscale * ln(scale) + 1 (1 for scale <= 1)."""
    return 1.0 if scale <= 1 else 0.1 * mscale * math.log(scale) + 1.0


def attention_factor(params: dict) -> float:
    """The factor YaRN multiplies cos/sin by (1 for other rope types)."""
    if params["rope_type"] != "yarn":
        return 1.0
    if params.get("attention_factor") is not None:
        return float(params["attention_factor"])
    factor, mscale, mscale_all_dim = params["factor"], params.get("mscale"), params.get("mscale_all_dim")
    if mscale and mscale_all_dim:
        return float(yarn_mscale(factor, mscale) / yarn_mscale(factor, mscale_all_dim))
    return yarn_mscale(factor)


def mla_softmax_scale(params: dict, qk_head_dim: int) -> float:
    """DeepSeek's softmax scale: qk_head_dim^-0.5, times mscale(factor, mscale_all_dim)^2 under scaled rope."""
    scale = qk_head_dim**-0.5
    if params["rope_type"] != "default" and params.get("mscale_all_dim"):
        m = yarn_mscale(params["factor"], params["mscale_all_dim"])
        scale = scale * m * m
    return scale


class RotaryEmbedding(nn.Module):
    """positions [T] -> (cos, sin) [T, R] (R = rotary_dim: D, or the part of a head that rope turns)."""

    def __init__(self, head_dim: int, params: dict):
        super().__init__()
        self.register_buffer("inv_freq", inverse_frequencies(head_dim, params), persistent=False)
        self.scaling = attention_factor(params)
        self._table: tuple[torch.Tensor, torch.Tensor] | None = None

    def table(self, n: int) -> tuple[torch.Tensor, torch.Tensor]:
        """(cos, sin) fp32 [P, D] for positions 0 .. P - 1, P >= n: row p is forward(p)'s (grown by doubling)."""
        if self._table is None or self._table[0].shape[0] < n:
            size = max(n, 256, 0 if self._table is None else 2 * self._table[0].shape[0])
            self._table = self(torch.arange(size, device=self.inv_freq.device), torch.float32)
        return self._table

    def forward(self, positions: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        freqs = positions[:, None].float() * self.inv_freq  # [T, D/2]
        emb = torch.cat((freqs, freqs), dim=-1)  # [T, D]
        if self.scaling == 1.0:
            return emb.cos().to(dtype), emb.sin().to(dtype)
        return (emb.cos() * self.scaling).to(dtype), (emb.sin() * self.scaling).to(dtype)


def apply_rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate x [T, heads, D] by cos/sin [T, R]: R = D, or (partial rotary) the first R dims, the rest kept."""
    if (r := cos.shape[-1]) < x.shape[-1]:
        return torch.cat([apply_rotary(x[..., :r], cos, sin), x[..., r:]], dim=-1)
    x1, x2 = x.chunk(2, dim=-1)
    rotated = torch.cat((-x2, x1), dim=-1)
    return x * cos[:, None] + rotated * sin[:, None]


def apply_rotary_interleaved(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate pairs (x0, x1), (x2, x3), ... of x [T, heads, D]; output de-interleaved [evens' | odds' ] like
    transformers' DeepSeek V3 (a fixed permutation of dims, the same for q and k, so q.k is unchanged)."""
    cos, sin = cos[:, None, : cos.shape[-1] // 2], sin[:, None, : sin.shape[-1] // 2]  # [T, 1, D/2]
    x1, x2 = x[..., 0::2], x[..., 1::2]
    return torch.cat([x1 * cos - x2 * sin, x2 * cos + x1 * sin], dim=-1)
