"""A decoder layer's non-GEMM work on CUDA, one Triton kernel each: residual add + RMSNorm (and Qwen3's per-head
norms), SiLU-and-mul, rotary + KV-cache store, paged decode attention (two kernels where the block table is split
over programs of their own: flash-decoding).

A small model's decode step is bound by kernel count, even as a CUDA graph: the pure-torch forms of these take
about thirty kernels per layer. Each kernel computes in fp32 and rounds where the torch form rounds (to the model
dtype after each elementwise op), so the rotary and the store equal it exactly and the reductions (norm,
softmax) differ only in summation order. The KV store masks padding slots (-1) on the device: no host sync.
`TRITON_INTERPRET=1` runs the kernels on CPU tensors for tests.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from slimquant.kernels.cuda_int8 import _EXACT, _round_to, _static_value, _to_int8, _token_scale, q_buffer
from slimquant.kernels.int8_input import InputQuant, Int8Rows

_BLOCK_COLS = 1024


@triton.jit
def _add_rms_norm(
    x_ptr, stride_x, stride_h, res_ptr, stride_r, w_ptr, b_ptr, y_ptr, sum_ptr, H, eps,
    scale_ptr, inv_ptr, off_ptr,
    HEADS: tl.constexpr, HAS_RES: tl.constexpr, HAS_BIAS: tl.constexpr, QUANT: tl.constexpr, BLOCK: tl.constexpr,
):  # fmt: skip
    """Row r (token r // HEADS, head r % HEADS): s = x + res (rounded to the dtype);
    y = w * (s * rsqrt(mean(s^2) + eps)) (+ b); QUANT 1 / 2: y quantized per token / static into int8 y_ptr."""
    row = tl.program_id(0).to(tl.int64)
    cols = tl.arange(0, BLOCK)
    mask = cols < H
    dt = sum_ptr.dtype.element_ty
    x_row = x_ptr + (row // HEADS) * stride_x + (row % HEADS) * stride_h
    x = tl.load(x_row + cols, mask=mask, other=0.0).to(tl.float32)
    if HAS_RES:
        x = _round_to(x + tl.load(res_ptr + row * stride_r + cols, mask=mask, other=0.0).to(tl.float32), dt)
        tl.store(sum_ptr + row * H + cols, x.to(dt), mask=mask)
    inv_rms = tl.math.div_rn(1.0, tl.sqrt_rn(tl.sum(x * x, axis=0) / H + eps))
    y = _round_to(tl.load(w_ptr + cols, mask=mask, other=0.0).to(tl.float32) * _round_to(x * inv_rms, dt), dt)
    if HAS_BIAS:
        y = _round_to(y + tl.load(b_ptr + cols, mask=mask, other=0.0).to(tl.float32), dt)
    _store_quantized(y_ptr + row * H, y, cols, mask, scale_ptr + row, inv_ptr, off_ptr, QUANT, dt)


@triton.jit
def _store_quantized(out_row, y, cols, mask, scale_at, inv_ptr, off_ptr, QUANT: tl.constexpr, dt: tl.constexpr):
    """Store a row's values y (fp32, already rounded to dt): as dt (QUANT 0), or int8 per token with its scale at
    scale_at (1), or int8 static with inv / offset (2), as TorchOps quantizes the stored dt values."""
    if QUANT == 0:
        tl.store(out_row + cols, y.to(dt), mask=mask)
    elif QUANT == 1:
        scale = _token_scale(tl.max(tl.where(mask, tl.abs(y), 0.0), axis=0))
        tl.store(scale_at, scale)
        tl.store(out_row + cols, _to_int8(tl.math.div_rn(y, scale)), mask=mask)
    else:
        inv, off = tl.load(inv_ptr).to(tl.float32), tl.load(off_ptr).to(tl.float32)
        tl.store(out_row + cols, _to_int8(_static_value(y, inv, off, dt)), mask=mask)


@triton.jit
def _silu_mul_values(x_row, cols, mask, inter, dt: tl.constexpr):
    """silu(gate) * up at cols of one row of [gate | up], each op rounded to dt, in fp32."""
    gate = tl.load(x_row + cols, mask=mask, other=0.0).to(tl.float32)
    up = tl.load(x_row + inter + cols, mask=mask, other=0.0).to(tl.float32)
    silu = _round_to(tl.math.div_rn(gate, 1.0 + tl.exp(-gate)), dt)
    return _round_to(silu * up, dt)


@triton.jit
def _silu_and_mul(x_ptr, stride_x, y_ptr, inter, inv_ptr, off_ptr, QUANT: tl.constexpr, BLOCK: tl.constexpr):
    """Block of row r of x [T, 2I] = [gate | up]: y = silu(gate) * up, as dt (QUANT 0) or int8 static (2)."""
    row = tl.program_id(0).to(tl.int64)
    cols = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    mask = cols < inter
    dt = x_ptr.dtype.element_ty
    y = _silu_mul_values(x_ptr + row * stride_x, cols, mask, inter, dt)
    _store_quantized(y_ptr + row * inter, y, cols, mask, inv_ptr, inv_ptr, off_ptr, QUANT, dt)


@triton.jit
def _silu_and_mul_per_token(x_ptr, stride_x, q_ptr, scale_ptr, INTER: tl.constexpr, BLOCK: tl.constexpr):
    """Row r of x [T, 2I]: silu(gate) * up quantized per token (its max |y| first, then y again, quantized)."""
    row = tl.program_id(0).to(tl.int64)
    x_row = x_ptr + row * stride_x
    dt = x_ptr.dtype.element_ty
    amax = tl.zeros([BLOCK], dtype=tl.float32)
    for c0 in range(0, INTER, BLOCK):
        cols = c0 + tl.arange(0, BLOCK)
        amax = tl.maximum(amax, tl.abs(_silu_mul_values(x_row, cols, cols < INTER, INTER, dt)))
    scale = _token_scale(tl.max(amax, axis=0))
    tl.store(scale_ptr + row, scale)
    for c0 in range(0, INTER, BLOCK):
        cols = c0 + tl.arange(0, BLOCK)
        y = _silu_mul_values(x_row, cols, cols < INTER, INTER, dt)
        tl.store(q_ptr + row * INTER + cols, _to_int8(tl.math.div_rn(y, scale)), mask=cols < INTER)


@triton.jit
def _rotate_half(x1, x2, c1, c2, s1, s2, dt: tl.constexpr):
    """neox rotary of halves (x1, x2): (x1 c1 - x2 s1, x2 c2 + x1 s2), rounded as torch's x*cos + rot(x)*sin."""
    y1 = _round_to(_round_to(x1 * c1, dt) + _round_to(-x2 * s1, dt), dt)
    y2 = _round_to(_round_to(x2 * c2, dt) + _round_to(x1 * s2, dt), dt)
    return y1, y2


@triton.jit
def _rope_store(
    q_ptr, sq_t, sq_h, k_ptr, sk_t, sk_h, v_ptr, sv_t, sv_h, cos_ptr, sin_ptr, stride_c,
    qo_ptr, ko_ptr, kc_ptr, vc_ptr, slot_ptr, NH, KVH,
    D: tl.constexpr, HALF: tl.constexpr, ROPE: tl.constexpr,
):  # fmt: skip
    """Program (t, h): h < NH rotates q[t, h]; else kv head h - NH: rotates k, stores k and v at slot[t] (>= 0)."""
    t, h = tl.program_id(0).to(tl.int64), tl.program_id(1)
    lo = tl.arange(0, HALF)
    mask = lo < D // 2
    hi = lo + D // 2
    dt = qo_ptr.dtype.element_ty
    if h < NH:
        src, dst = q_ptr + t * sq_t + h * sq_h, qo_ptr + (t * NH + h) * D
    else:
        src, dst = k_ptr + t * sk_t + (h - NH) * sk_h, ko_ptr + (t * KVH + h - NH) * D
    x1 = tl.load(src + lo, mask=mask, other=0.0).to(tl.float32)
    x2 = tl.load(src + hi, mask=mask, other=0.0).to(tl.float32)
    if ROPE:
        c1 = tl.load(cos_ptr + t * stride_c + lo, mask=mask, other=0.0).to(tl.float32)
        c2 = tl.load(cos_ptr + t * stride_c + hi, mask=mask, other=0.0).to(tl.float32)
        s1 = tl.load(sin_ptr + t * stride_c + lo, mask=mask, other=0.0).to(tl.float32)
        s2 = tl.load(sin_ptr + t * stride_c + hi, mask=mask, other=0.0).to(tl.float32)
        x1, x2 = _rotate_half(x1, x2, c1, c2, s1, s2, dt)
    tl.store(dst + lo, x1.to(dt), mask=mask)
    tl.store(dst + hi, x2.to(dt), mask=mask)
    slot = tl.load(slot_ptr + t).to(tl.int64)
    if (h >= NH) & (slot >= 0):
        at = slot * (KVH * D) + (h - NH) * D
        tl.store(kc_ptr + at + lo, x1.to(dt), mask=mask)
        tl.store(kc_ptr + at + hi, x2.to(dt), mask=mask)
        v = v_ptr + t * sv_t + (h - NH) * sv_h
        tl.store(vc_ptr + at + lo, tl.load(v + lo, mask=mask, other=0.0), mask=mask)
        tl.store(vc_ptr + at + hi, tl.load(v + hi, mask=mask, other=0.0), mask=mask)


@triton.jit
def _paged_decode_attention(
    q_ptr, stride_qb, kc_ptr, vc_ptr, tables_ptr, stride_tb, W, lens_ptr, o_ptr, q8_ptr, inv_ptr, off_ptr, part_acc,
    part_m, part_l, scale,
    W_LOOP: tl.constexpr, SPLITS: tl.constexpr, KVH: tl.constexpr, G: tl.constexpr, G_BLOCK: tl.constexpr,
    D: tl.constexpr, D_BLOCK: tl.constexpr, BS: tl.constexpr, BS_BLOCK: tl.constexpr, QUANT: tl.constexpr,
):  # fmt: skip
    """Program (b, kv head, split s): the G query heads of that kv head over blocks s * W_LOOP ... of sequence b's
    table, online softmax. SPLITS 1: the output (QUANT: quantized into q8, see _store_heads); else the split's
    running max, denominator and unnormalized sum into part_m / part_l [B, KVH, SPLITS, G_BLOCK] and part_acc
    [B, KVH, SPLITS, G_BLOCK, D_BLOCK] fp32 (_combine_splits adds them)."""
    b, kv, split = tl.program_id(0).to(tl.int64), tl.program_id(1), tl.program_id(2)
    gs, ds, ts = tl.arange(0, G_BLOCK), tl.arange(0, D_BLOCK), tl.arange(0, BS_BLOCK)
    heads = kv * G + gs  # [G]
    qd_mask = (gs < G)[:, None] & (ds < D)[None, :]  # [G, D]
    q = tl.load(q_ptr + b * stride_qb + heads[:, None] * D + ds[None, :], mask=qd_mask, other=0.0).to(tl.float32)
    length = tl.load(lens_ptr + b)
    m = tl.full([G_BLOCK], float("-inf"), tl.float32)  # running max [G]
    denom = tl.zeros([G_BLOCK], tl.float32)  # [G]
    acc = tl.zeros([G_BLOCK, D_BLOCK], tl.float32)  # [G, D]
    for jj in range(0, W_LOOP):  # a constexpr bound (Triton's interpreter takes no runtime one)
        j = split * W_LOOP + jj  # this split's blocks; W <= SPLITS * W_LOOP
        if (j < W) & (j * BS < length):
            block = tl.load(tables_ptr + b * stride_tb + j).to(tl.int64)
            valid = (ts < BS) & (j * BS + ts < length)  # [BS]
            at = (block * BS + ts)[:, None] * (KVH * D) + kv * D + ds[None, :]  # [BS, D]
            kd_mask = valid[:, None] & (ds < D)[None, :]
            k = tl.load(kc_ptr + at, mask=kd_mask, other=0.0).to(tl.float32)  # [BS, D]
            s = tl.sum(q[:, None, :] * k[None, :, :], axis=2) * scale  # [G, BS]
            s = tl.where(valid[None, :], s, float("-inf"))
            m_new = tl.maximum(m, tl.max(s, axis=1))
            alpha = tl.exp(m - m_new)  # [G]
            p = tl.exp(s - m_new[:, None])  # [G, BS]
            v = tl.load(vc_ptr + at, mask=kd_mask, other=0.0).to(tl.float32)  # [BS, D]
            acc = acc * alpha[:, None] + tl.sum(p[:, :, None] * v[None, :, :], axis=1)
            denom = denom * alpha + tl.sum(p, axis=1)
            m = m_new
    if SPLITS == 1:
        rows = (o_ptr + b * stride_qb, q8_ptr + b * (KVH * G * D), inv_ptr, off_ptr)
        _store_heads(*rows, acc, denom, heads, ds, qd_mask, D, QUANT)
    else:
        at = (b * KVH + kv) * SPLITS + split
        tl.store(part_m + at * G_BLOCK + gs, m)
        tl.store(part_l + at * G_BLOCK + gs, denom)
        tl.store(part_acc + (at * G_BLOCK + gs)[:, None] * D_BLOCK + ds[None, :], acc)


@triton.jit
def _combine_splits(
    part_acc, part_m, part_l, o_ptr, q8_ptr, inv_ptr, off_ptr, stride_qb,
    SPLITS: tl.constexpr, KVH: tl.constexpr, G: tl.constexpr, G_BLOCK: tl.constexpr, D: tl.constexpr,
    D_BLOCK: tl.constexpr, QUANT: tl.constexpr,
):  # fmt: skip
    """Program (b, kv head): the output of the G query heads from the SPLITS parts of _paged_decode_attention,
    rescaled to their common max (flash-decoding's reduction); a split that saw no token (max -inf) adds nothing.
    QUANT: quantized into q8 (_store_heads)."""
    b, kv = tl.program_id(0).to(tl.int64), tl.program_id(1)
    gs, ds = tl.arange(0, G_BLOCK), tl.arange(0, D_BLOCK)
    first = (b * KVH + kv) * SPLITS
    top = tl.full([G_BLOCK], float("-inf"), tl.float32)  # [G]
    for s in range(0, SPLITS):
        top = tl.maximum(top, tl.load(part_m + (first + s) * G_BLOCK + gs))
    top = tl.where(top == float("-inf"), 0.0, top)  # no split saw a token (a padding row): every weight is 0
    denom = tl.zeros([G_BLOCK], tl.float32)  # [G]
    acc = tl.zeros([G_BLOCK, D_BLOCK], tl.float32)  # [G, D]
    for s in range(0, SPLITS):
        weight = tl.exp(tl.load(part_m + (first + s) * G_BLOCK + gs) - top)  # [G]: 0 for a split that saw none
        denom += tl.load(part_l + (first + s) * G_BLOCK + gs) * weight
        part = tl.load(part_acc + ((first + s) * G_BLOCK + gs)[:, None] * D_BLOCK + ds[None, :])  # [G, D]
        acc += part * weight[:, None]
    mask = (gs < G)[:, None] & (ds < D)[None, :]  # [G, D]
    rows = (o_ptr + b * stride_qb, q8_ptr + b * (KVH * G * D), inv_ptr, off_ptr)
    _store_heads(*rows, acc, denom, kv * G + gs, ds, mask, D, QUANT)


@triton.jit
def _store_heads(row_ptr, q8_row, inv_ptr, off_ptr, acc, denom, heads, ds, mask, D: tl.constexpr, QUANT: tl.constexpr):
    """The attention output of query heads [G] of one sequence's row: acc [G, D] / denom [G] in the row's dtype; a
    zero-length row (padding) gives zeros. QUANT: instead, that output quantized statically for the int8 linear that
    reads it (inv / off [1] in the row's dtype, as _quantize_static quantizes the stored row) into the int8 row q8."""
    dt = row_ptr.dtype.element_ty
    out = (acc / tl.where(denom > 0, denom, 1.0)[:, None]).to(dt)  # [G, D]
    at = heads[:, None] * D + ds[None, :]
    if QUANT:
        inv, off = tl.load(inv_ptr).to(tl.float32), tl.load(off_ptr).to(tl.float32)
        tl.store(q8_row + at, _to_int8(_static_value(out.to(tl.float32), inv, off, dt)), mask=mask)
    else:
        tl.store(row_ptr + at, out, mask=mask)


def add_rms_norm(
    x, residual, weight, bias, eps: float, quant: InputQuant | None = None
) -> tuple[torch.Tensor | Int8Rows, torch.Tensor]:
    """(norm(x + residual) * weight (+ bias), x + residual) for x [T, H] (unit column stride); x itself as the
    second value when residual is None. quant: the norm's output quantized so, for the int8 linear that reads it."""
    t, h = x.shape
    summed = torch.empty_like(x) if residual is not None else x  # [T, H]
    res = residual if residual is not None else x
    y, scale, out = _quantized_out(t, h, x, quant)
    inv, off = _static_params(quant, x)
    _add_rms_norm[(t,)](
        x, x.stride(0), 0, res, res.stride(0), weight, weight if bias is None else bias, y, summed, h, eps,
        scale, inv, off, HEADS=1, HAS_RES=residual is not None, HAS_BIAS=bias is not None, QUANT=_mode(quant),
        BLOCK=triton.next_power_of_2(h), **_EXACT,
    )  # fmt: skip
    return out, summed


def _mode(quant: InputQuant | None) -> int:
    """The kernels' QUANT: 0 float out, 1 per token, 2 static."""
    return 0 if quant is None else 1 if quant.inv_scale is None else 2


def _quantized_out(t: int, k: int, x: torch.Tensor, quant: InputQuant | None):
    """(output buffer, per-token scale buffer or a placeholder, what the op returns) for a [T, K] result."""
    if quant is None:
        y = torch.empty(t, k, dtype=x.dtype, device=x.device)  # [T, K]
        return y, y, y
    q = q_buffer(t, k, x.device)  # int8 [R, K]
    scale = torch.empty(t, dtype=torch.float32, device=x.device) if quant.inv_scale is None else None  # [T]
    return q, q if scale is None else scale, Int8Rows(q, scale, t, x.dtype)


def _static_params(quant: InputQuant | None, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(inv_scale, offset) of a static quant, else placeholders the kernel does not read."""
    if quant is None or quant.inv_scale is None:
        return x, x
    return quant.inv_scale, quant.offset


def rms_norm_heads(x: torch.Tensor, weight, bias, eps: float) -> torch.Tensor:
    """Per-head RMSNorm (Qwen3's q/k norms) of x [T, heads, D] (unit column stride) -> contiguous [T, heads, D]."""
    t, heads, d = x.shape
    y = torch.empty(t, heads, d, dtype=x.dtype, device=x.device)  # [T, heads, D]
    _add_rms_norm[(t * heads,)](
        x, x.stride(0), x.stride(1), x, 0, weight, weight if bias is None else bias, y, y, d, eps, y, y, y,
        HEADS=heads, HAS_RES=False, HAS_BIAS=bias is not None, QUANT=0, BLOCK=triton.next_power_of_2(d), **_EXACT,
    )  # fmt: skip
    return y


def silu_and_mul(x: torch.Tensor, quant: InputQuant | None = None) -> torch.Tensor | Int8Rows:
    """silu(gate) * up for x [T, 2I] = [gate | up] (unit column stride) -> [T, I], or quantized as quant says
    for the int8 linear that reads it."""
    t, inter = x.shape[0], x.shape[1] // 2
    y, scale, out = _quantized_out(t, inter, x, quant)
    block = min(triton.next_power_of_2(inter), _BLOCK_COLS)
    if _mode(quant) == 1:
        _silu_and_mul_per_token[(t,)](x, x.stride(0), y, scale, INTER=inter, BLOCK=block, **_EXACT)
        return out
    inv, off = _static_params(quant, x)
    _silu_and_mul[(t, triton.cdiv(inter, block))](
        x, x.stride(0), y, inter, inv, off, QUANT=_mode(quant), BLOCK=block, **_EXACT
    )
    return out


def rope_store(q, k, v, rope, k_cache, v_cache, slots) -> tuple[torch.Tensor, torch.Tensor]:
    """Rotate q [T, NH, D] and k [T, KVH, D] (neox; rope = (cos, sin) [T, D] or None: no rotation), store k and v
    into caches [NB, BS, KVH, D] at flat slots int64 [T] (-1: skipped) -> (q, k) rotated, contiguous."""
    t, nh, d = q.shape
    kvh = k.shape[1]
    q_out = torch.empty(t, nh, d, dtype=q.dtype, device=q.device)  # [T, NH, D]
    k_out = torch.empty(t, kvh, d, dtype=k.dtype, device=k.device)  # [T, KVH, D]
    cos, sin = rope if rope is not None else (q_out, q_out)
    _rope_store[(t, nh + kvh)](
        q, q.stride(0), q.stride(1), k, k.stride(0), k.stride(1), v, v.stride(0), v.stride(1), cos, sin,
        cos.stride(0), q_out, k_out, k_cache, v_cache, slots, nh, kvh,
        D=d, HALF=triton.next_power_of_2(d // 2), ROPE=rope is not None, **_EXACT,
    )  # fmt: skip
    return q_out, k_out


def decode_splits(b: int, kvh: int, w: int, programs: int = 264, min_blocks: int = 4) -> int:
    """How many parts each sequence's block table [W] splits into (flash-decoding): enough for about `programs`
    programs (two per SM of an H100 / H200) where B * KVH leave the GPU idle, each part min_blocks blocks or more."""
    if 2 * b * kvh >= programs:
        return 1
    return max(1, min(programs // (b * kvh), w // min_blocks))


def table_parts(w: int, splits: int) -> tuple[int, int]:
    """(parts, blocks per part) that a block table of w blocks runs in for about `splits` parts: blocks per part a
    power of two (a constexpr: few compiles), so the parts may be fewer."""
    per_part = triton.next_power_of_2(triton.cdiv(w, splits))
    return triton.cdiv(w, per_part), per_part


def paged_decode_attention(
    q, k_cache, v_cache, block_tables, context_lens, scale: float, splits: int | None = None,
    quant: InputQuant | None = None,
) -> torch.Tensor | Int8Rows:  # fmt: skip
    """One query token per sequence: q [B, NH, D] (contiguous) over caches [NB, BS, KVH, D] by block_tables int32
    [B, W] and context_lens int32 [B] (device) -> [B, NH, D], or with a static quant that output quantized for the
    int8 linear that reads it (Int8Rows of [B, NH * D]: a row's heads are written by several programs, so a
    per-token scale cannot be taken here). The table splits in `splits` parts (default: decode_splits) that run
    side by side and are combined after."""
    assert quant is None or quant.inv_scale is not None, "only static quantization: per token spans programs"
    b, nh, d = q.shape
    bs, kvh = k_cache.shape[1], k_cache.shape[2]
    g, w = nh // kvh, block_tables.shape[1]
    pow2 = triton.next_power_of_2
    splits, per_split = table_parts(w, splits or decode_splits(b, kvh, w))
    out = torch.empty_like(q) if quant is None else q  # [B, NH, D]; quantized: q gives the dtype, never written
    q8 = q_buffer(b, nh * d, q.device) if quant is not None else out  # int8 [R >= B, NH * D]
    inv, off = _static_params(quant, q)
    part_acc = part_m = part_l = out  # unused where splits is 1
    if splits > 1:
        part_m = torch.empty(b, kvh, splits, pow2(g), dtype=torch.float32, device=q.device)  # [B, KVH, S, G]
        part_l = torch.empty_like(part_m)  # [B, KVH, S, G]
        part_acc = torch.empty(b, kvh, splits, pow2(g), pow2(d), dtype=torch.float32, device=q.device)
    heads = dict(KVH=kvh, G=g, G_BLOCK=pow2(g), D=d, D_BLOCK=pow2(d), QUANT=quant is not None)
    _paged_decode_attention[(b, kvh, splits)](
        q, q.stride(0), k_cache, v_cache, block_tables, block_tables.stride(0), w, context_lens, out, q8, inv, off,
        part_acc, part_m, part_l, scale, W_LOOP=per_split, SPLITS=splits, BS=bs, BS_BLOCK=pow2(bs), **heads,
        **_EXACT,
    )  # fmt: skip
    if splits > 1:
        parts = (part_acc, part_m, part_l, out, q8, inv, off, q.stride(0))
        _combine_splits[(b, kvh)](*parts, SPLITS=splits, **heads, **_EXACT)
    return out if quant is None else Int8Rows(q8, None, b, q.dtype)
