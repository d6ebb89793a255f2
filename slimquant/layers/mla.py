"""Multi-head latent attention (DeepSeek V2/V3) over a paged cache of the compressed latent.

Each cached token holds [kv_a_layernorm(latent) | roped k_pe] (kv_lora_rank + qk_rope_head_dim values), not
per-head K/V. Attention gathers a sequence's latents and up-projects them with kv_b_proj into per-head
k_nope and v; decode steps with a float kv_b_proj instead absorb it into q and the output (one shared
latent "head" of R + rope dims, the backend's mla_decode), which skips up-projecting the whole context every step.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from slimquant.backends.torch_ops import TORCH_OPS, TorchOps, causal_mask, context_span, decode_lens, gather_context
from slimquant.layers.attention import KVCacheLayer
from slimquant.layers.context import ForwardContext, get_context
from slimquant.layers.linear import Linear
from slimquant.layers.quant_methods import UnquantizedMethod


class MLAttention(KVCacheLayer):
    """q [T, NH, nope + rope], latent [T, R], k_pe [T, rope] -> [T, NH * V] through the latent cache."""

    ops: TorchOps = TORCH_OPS  # the backend's ops (Backend.bind)

    def __init__(self, num_heads: int, qk_nope_dim: int, qk_rope_dim: int, v_dim: int, kv_lora_rank: int, scale: float):
        super().__init__()
        self.num_heads, self.nope, self.rope, self.v_dim = num_heads, qk_nope_dim, qk_rope_dim, v_dim
        self.kv_lora_rank, self.scale = kv_lora_rank, scale

    def cache_shape(self, num_blocks: int, block_size: int) -> tuple[int, ...]:
        return (num_blocks, block_size, self.kv_lora_rank + self.rope)

    def forward(self, q: torch.Tensor, latent: torch.Tensor, k_pe: torch.Tensor, kv_b_proj: Linear) -> torch.Tensor:
        ctx = get_context()
        assert self.kv_cache is not None, "the engine must assign kv_cache before running attention"
        store_latent(self.kv_cache, torch.cat([latent, k_pe], dim=-1), ctx.slot_mapping, ctx.graph_step)
        if ctx.is_decode and absorbable(kv_b_proj):
            return self._decode_absorbed(q, ctx, kv_b_proj).reshape(q.shape[0], -1)
        if ctx.is_decode:  # one batched call, contexts padded to the longest (a graph step: to the table's width)
            return self._attend(q[:, None], ctx.block_tables, decode_lens(ctx), kv_b_proj).reshape(q.shape[0], -1)
        dtype = self.ops.prefill_attention_dtype(q.dtype, self.kv_cache.dtype)
        outs, start = [], 0
        for i, q_len in enumerate(ctx.query_lens):  # prefill chunks: one sequence at a time
            tables, lens = ctx.block_tables[i : i + 1], ctx.context_lens[i : i + 1]
            fresh = ctx.context_lens[i] == q_len  # nothing cached before this chunk
            outs.append(self._attend(q[None, start : start + q_len], tables, lens, kv_b_proj, fresh, dtype))
            start += q_len
        return torch.cat(outs, dim=1).to(q.dtype).reshape(q.shape[0], -1)

    def _attend(
        self,
        q: torch.Tensor,
        block_tables: torch.Tensor,
        context_lens: list[int] | torch.Tensor,
        kv_b_proj: Linear,
        causal: bool = False,
        dtype: torch.dtype | None = None,
    ) -> torch.Tensor:
        """Causal attention of q [B, Q, NH, Dqk] over the cached context (lengths as context_span takes them);
        returns [B, Q, NH, V] in dtype (default q's). The up-projection runs in q's dtype, or in bf16 where
        bf16_up_projection says so. causal: the context is q's own chunk (Q = S), so no mask is built."""
        dtype = dtype or q.dtype
        up_dtype = dtype if bf16_up_projection(kv_b_proj, dtype) else q.dtype
        lens, length = context_span(context_lens, block_tables, self.kv_cache.shape[1], q.device)
        cached = gather_context(self.kv_cache, block_tables, length).to(up_dtype)  # [B, S, R + rope]
        b, s = cached.shape[:2]
        latent, k_pe = cached.split([self.kv_lora_rank, self.rope], dim=-1)
        kv = kv_b_proj(latent.reshape(b * s, -1)).to(dtype).view(b, s, self.num_heads, self.nope + self.v_dim)
        k_nope, v = kv.split([self.nope, self.v_dim], dim=-1)  # [B, S, NH, nope], [B, S, NH, V]
        k_pe = k_pe.to(dtype)[:, :, None].expand(-1, -1, self.num_heads, -1)  # [B, S, NH, rope]
        k = torch.cat([k_nope, k_pe], dim=-1)  # [B, S, NH, Dqk]
        mask = None if causal else causal_mask(lens, q.shape[1], s)[:, None]  # [B, 1, Q, S]
        return padded_v_attention(q.to(dtype), k, v, mask, self.scale)

    def _decode_absorbed(self, q: torch.Tensor, ctx: ForwardContext, kv_b_proj: Linear) -> torch.Tensor:
        """Decode of q [B, NH, Dqk] with kv_b_proj's W_UK folded into q and W_UV applied after attention over the
        latents (the backend's mla_decode) -> [B, NH, V]."""
        w = kv_b_proj.weight.view(self.num_heads, self.nope + self.v_dim, self.kv_lora_rank)  # [NH, nope + V, R]
        w_uk, w_uv = w.split([self.nope, self.v_dim], dim=1)  # [NH, nope, R], [NH, V, R]: float, maybe bf16
        q_nope, q_pe = q.split([self.nope, self.rope], dim=-1)  # [B, NH, nope], [B, NH, rope]
        q_full = torch.cat([self.ops.head_matmul(q_nope, w_uk), q_pe], dim=-1)  # [B, NH, R + rope]
        out_lat = self.ops.mla_decode(q_full, self.kv_cache, ctx, self.scale, self.kv_lora_rank)  # [B, NH, R]
        return self.ops.head_matmul(out_lat, w_uv, transposed=True)  # [B, NH, V]


def padded_v_attention(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | None, scale: float
) -> torch.Tensor:
    """SDPA of q / k [B, Q or S, NH, Dqk] and v [B, S, NH, V] (V <= Dqk) -> [B, Q, NH, V], causal where mask
    [B, 1, Q, S] is None. v is zero-padded to Dqk: torch's fused CPU kernel takes only equal head dims, and
    otherwise falls back to its math path, which holds the [B, NH, Q, S] scores (4x the time at 2048 tokens)."""
    v_dim = v.shape[-1]
    v = F.pad(v, (0, q.shape[-1] - v_dim))  # [B, S, NH, Dqk]: the padding's output columns are zero
    out = F.scaled_dot_product_attention(
        q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), attn_mask=mask, is_causal=mask is None, scale=scale
    )  # [B, NH, Q, Dqk]
    return out.transpose(1, 2)[..., :v_dim]


def bf16_up_projection(kv_b_proj: Linear, dtype: torch.dtype) -> bool:
    """Whether attention in dtype up-projects the bf16 latents in bf16 too: a plain float kv_b_proj held in bf16
    (bf16 x bf16 products are exact in fp32 either way; the sums' order differs, and the output is rounded to bf16,
    as attention in bf16 rounds it anyway): a bf16 GEMM instead of fp32 BLAS on a copy of the weight."""
    return dtype == torch.bfloat16 and absorbable(kv_b_proj) and kv_b_proj.weight.dtype == torch.bfloat16


def absorbable(kv_b_proj: Linear) -> bool:
    """Whether kv_b_proj is a plain float weight that decode can fold into q and the output."""
    return isinstance(kv_b_proj.method, UnquantizedMethod) and kv_b_proj.bias is None


def store_latent(
    cache: torch.Tensor, entries: torch.Tensor, slot_mapping: torch.Tensor, all_valid: bool = False
) -> None:
    """Write entries [T, C] into cache [NB, BS, C] at flat slots [T]; slots of -1 are skipped (all_valid: there are
    none, as in a CUDA-graph step, whose padding rows write a scratch block: no host check)."""
    slots = slot_mapping.to(device=entries.device, dtype=torch.long)
    valid = slots >= 0
    if not all_valid and not bool(valid.all()):
        slots, entries = slots[valid], entries[valid]
    cache.view(-1, cache.shape[-1]).index_copy_(0, slots, entries.to(cache.dtype))
