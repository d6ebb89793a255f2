"""Residual-stream rotation (QuaRot / SpinQuant's R1), folded into the float weights before quantization.

Every RMSNorm's weight g is folded into the linears that read it (norm weight -> 1), then the residual stream is
turned by one orthogonal matrix R [H, H]: the embeddings' rows E -> E R^T, each linear that reads the residual
W -> W diag(g) R^T, each linear that writes it W -> R W (bias b -> R b), the LM head W -> W diag(g_final) R^T.
RMSNorm commutes with R (|R x| = |x|), so the float model computes the same function, and the checkpoint is an
ordinary one: vLLM-Ascend runs it with no new operator. What it changes is what the int8 activations see: an
outlier channel (SmolLM2's attention sink holds 23,000 in one channel of the residual) is spread over all H
channels, so one token's per-token scale (W8A8_DYNAMIC) or the layer's per-tensor scale (W8A8) no longer has to
cover one huge channel, and every other channel keeps its resolution.

R is a Hadamard matrix with random signs where H = 2^a * (q + 1) for a prime q = 3 (mod 4) (Sylvester's
construction times Paley's; e.g. 576 = 72 * 8, 896 = 224 * 4, 1536 = 12 * 128, 7168 = 224 * 32), which spreads a
single channel perfectly evenly; otherwise a random orthogonal matrix. Both are fixed by the seed.

Each attention head's values are turned too (SpinQuant's R2): v_proj's rows of head h by one orthogonal R_h
[D, D], o_proj's columns of every query head by R_h^T, which attention (a weighted sum of values per head) carries
through exactly; o_proj's input, the attention output, is then as spread out as the residual.

A model with tied embeddings gets an LM head of its own (E diag(g_final) R^T differs from E R^T), and config.json
says tie_word_embeddings: false.
"""

from __future__ import annotations

import math

import torch

from slimquant.format.architectures import EMBED_PREFIX, SMOOTH_PAIRS

ROTATED_ARCHS = ("LlamaForCausalLM", "Qwen2ForCausalLM", "Qwen3ForCausalLM")
EMBED, FINAL_NORM, HEAD = EMBED_PREFIX + "weight", "model.norm.weight", "lm_head.weight"
# linear (relative to its layer) -> the norm whose output it reads: the norm producers of the smoothing table
READS = {linear: norm for norm, linears in SMOOTH_PAIRS if norm.endswith("layernorm") for linear in linears}
WRITES = ("self_attn.o_proj", "mlp.down_proj")  # linears whose output is added to the residual


def _is_prime(n: int) -> bool:
    return n >= 2 and all(n % d for d in range(2, math.isqrt(n) + 1))


def _paley(q: int) -> torch.Tensor:
    """Paley's construction I: a Hadamard matrix of order q + 1 for a prime q = 3 (mod 4), entries +-1."""
    residues = {(x * x) % q for x in range(1, q)}
    chi = torch.tensor([0] + [1 if x in residues else -1 for x in range(1, q)], dtype=torch.float64)  # [q]
    idx = torch.arange(q)
    jacobsthal = chi[(idx[None, :] - idx[:, None]) % q]  # [q, q], antisymmetric for q = 3 (mod 4)
    s = torch.zeros(q + 1, q + 1, dtype=torch.float64)
    s[0, 1:], s[1:, 0], s[1:, 1:] = 1.0, -1.0, jacobsthal
    return s + torch.eye(q + 1, dtype=torch.float64)


def _sylvester(n: int) -> torch.Tensor:
    """A Hadamard matrix of order n = 2^a, entries +-1."""
    h = torch.ones(1, 1, dtype=torch.float64)
    while h.shape[0] < n:
        h = torch.cat([torch.cat([h, h], 1), torch.cat([h, -h], 1)], 0)
    return h


def hadamard(n: int) -> torch.Tensor | None:
    """A Hadamard matrix of order n (entries +-1, H H^T = n I) from Sylvester's and Paley's constructions, or
    None where neither covers n."""
    power = n & -n  # the largest power of two dividing n
    if power == n:
        return _sylvester(n)
    m = n // power
    while m <= n:  # m = q + 1 with n / m a power of two
        if _is_prime(m - 1) and (m - 1) % 4 == 3:
            return torch.kron(_paley(m - 1), _sylvester(n // m))
        m *= 2
    return None


def rotation_matrix(n: int, seed: int = 0) -> torch.Tensor:
    """An orthogonal matrix [n, n] in fp64: a Hadamard matrix with random column signs, scaled by 1 / sqrt(n), or a
    random orthogonal one where no Hadamard matrix of order n is built here."""
    g = torch.Generator().manual_seed(seed)
    h = hadamard(n)
    if h is None:
        q, r = torch.linalg.qr(torch.randn(n, n, generator=g, dtype=torch.float64))
        return q * torch.sign(torch.diagonal(r))[None, :]
    signs = torch.randint(0, 2, (n,), generator=g).to(torch.float64) * 2 - 1  # [n]
    return h * signs[None, :] / math.sqrt(n)


def can_rotate(config: dict) -> bool:
    """Whether rotation folds into this architecture."""
    return (config.get("architectures") or ["?"])[0] in ROTATED_ARCHS


class RotatedSource:
    """A float source checkpoint (quant/sources.py) seen with its residual stream rotated and its norms folded:
    get() turns each tensor as it is read, so memory still follows one tensor."""

    def __init__(self, ckpt, seed: int = 0):
        if not can_rotate(ckpt.config):
            arch = (ckpt.config.get("architectures") or ["?"])[0]
            raise ValueError(
                f"--rotate supports {', '.join(ROTATED_ARCHS)}; this checkpoint is {arch} (its residual stream is "
                "read by layers that rotation does not fold yet): quantize it without --rotate"
            )
        self._src, self.path = ckpt, ckpt.path
        self.config = ckpt.config | {"tie_word_embeddings": False}
        hidden, heads = int(ckpt.config["hidden_size"]), int(ckpt.config["num_attention_heads"])
        self.rotation = rotation_matrix(hidden, seed)  # R [H, H], fp64
        self.head_rotation = rotation_matrix(int(ckpt.config.get("head_dim") or hidden // heads), seed + 1)  # [D, D]
        self._tied = bool(ckpt.config.get("tie_word_embeddings")) and HEAD not in ckpt

    def keys(self) -> list[str]:
        """The source's tensors, plus an LM head of its own where the source ties it to the embeddings."""
        return self._src.keys() + ([HEAD] if self._tied else [])

    def __contains__(self, name: str) -> bool:
        return name in self._src or (name == HEAD and self._tied)

    def get(self, name: str) -> torch.Tensor:
        """The tensor of the rotated model, in the source's dtype for float tensors that stay float, fp32 for the
        linears (which the quantizer reads in fp32 anyway)."""
        if name == HEAD:
            head = self._src.get(EMBED if self._tied else HEAD)
            return self._reader(head, self._src.get(FINAL_NORM))
        t = self._src.get(name)
        if name == EMBED:
            return (t.double() @ self.rotation.T).to(t.dtype)  # [V, H]
        if name == FINAL_NORM or name.endswith("layernorm.weight"):
            return torch.ones_like(t)
        prefix, _, rest = name.partition(".layers.")
        _, _, rel = rest.partition(".")
        linear, _, kind = rel.rpartition(".")
        if linear in READS and kind == "weight":
            norm = self._src.get(f"{prefix}.layers.{rest.split('.')[0]}.{READS[linear]}.weight")
            t = self._reader(t, norm)
        elif linear in WRITES and kind in ("weight", "bias"):
            t = (self.rotation @ t.double()).float()  # [H, K] or [H]
        if linear == "self_attn.v_proj" and kind in ("weight", "bias"):
            return self._per_head(t, rows=True)
        if linear == "self_attn.o_proj" and kind == "weight":
            return self._per_head(t, rows=False)
        return t

    def _per_head(self, t: torch.Tensor, rows: bool) -> torch.Tensor:
        """v_proj's weight [KVH * D, H] or bias [KVH * D] with each head's rows turned by R_h, or o_proj's weight
        [H, NH * D] with each head's columns turned by R_h^T; fp32."""
        r, d = self.head_rotation, self.head_rotation.shape[0]
        if rows:
            heads = t.double().reshape(-1, d, *t.shape[1:])  # [KVH, D, (H)]
            return torch.einsum("ij,kj...->ki...", r, heads).reshape(t.shape).float()
        cols = t.double().reshape(t.shape[0], -1, d)  # [H, NH, D]
        return torch.einsum("hkj,ij->hki", cols, r).reshape(t.shape).float()

    def _reader(self, w: torch.Tensor, norm: torch.Tensor) -> torch.Tensor:
        """W [N, H] of a linear reading a norm's output -> W diag(g) R^T, fp32."""
        return ((w.double() * norm.double()[None, :]) @ self.rotation.T).float()
