"""The CUDA Triton kernels compile for an H100 / H200 (sm_90) and an A100 (sm_80) with no GPU here: Triton's own
ptxas builds each at the shapes the model runs, so a kernel the interpreter runs but the compiler refuses fails in
CI, not on a lent GPU's clock. Pointers are marked 16-byte aligned, as Triton's launcher marks a torch tensor's;
without that no load is vectorized and the int8 GEMM's K loop is not software-pipelined, so a build here would say
nothing of the GPU's. The GEMM's K loop must be pipelined (cp.async into shared memory, `stages` deep) within the
shared memory a block may have. (The numbers are test_triton_int8.py's and tests/gpu's.)"""

from __future__ import annotations

import importlib.util
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

if importlib.util.find_spec("triton") is None:  # imported only by the builds (no TRITON_INTERPRET)
    pytest.skip("needs Triton", allow_module_level=True)

ROOT = Path(__file__).resolve().parents[2]
GEMM_TILES = [(16, 64, 256, 1, 4), (16, 64, 256, 4, 4), (64, 128, 128, 1, 4), (128, 128, 128, 1, 8)]
MOE_TILES = [(16, 64, 256, 4), (64, 128, 128, 4), (64, 128, 128, 8)]  # (block m, n, k, warps): moe_tiles'
MAX_SHARED = {90: 232448, 80: 166912}  # bytes of shared memory a block may opt in to: H100 / H200, A100


def _sig(**kinds: str) -> dict[str, str]:
    return kinds


def compile_all(arch: int) -> list[str]:
    """Compile every kernel of kernels/cuda_int8.py, cuda_moe.py and cuda_mla.py and the quantizing ones of
    kernels/cuda_layers.py for sm_<arch> in bf16 (names of what compiled)."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    from slimquant.kernels import cuda_int8 as C
    from slimquant.kernels import cuda_layers as L
    from slimquant.kernels import cuda_mla as A
    from slimquant.kernels import cuda_moe as M

    done, stages = [], C.GemmTiles(16, 64, 256, 1).stages

    def build(fn, signature: dict, constexprs: dict, warps: int = 4) -> Any:
        aligned = {(fn.arg_names.index(a),): [["tt.divisibility", 16]] for a, t in signature.items() if t[0] == "*"}
        signature = signature | dict.fromkeys(constexprs, "constexpr")
        source = ASTSource(fn=fn, signature=signature, constexprs=constexprs, attrs=aligned)
        options = {"num_warps": warps, "num_stages": stages, **C._EXACT}
        kernel = triton.compile(source, target=GPUTarget("cuda", arch, 32), options=options)
        done.append(fn.__name__)
        return kernel

    dt, f32, i8, i32 = "*bf16", "*fp32", "*i8", "*i32"
    for bm, bn, bk, splits, warps in GEMM_TILES:
        for static in (False, True):
            sig = _sig(a_ptr=i8, w_ptr=i8, out_ptr=dt if splits == 1 else i32, M="i32", N="i32", row_scale_ptr=f32,
                       col_scale_ptr=f32, add_ptr=i32 if static else dt)  # fmt: skip
            ce = dict(K=4096, K_PER_SPLIT=4096 // splits, SPLITS=splits, STATIC=static, HAS_ADD=True, BLOCK_M=bm,
                      BLOCK_N=bn, BLOCK_K=bk)  # fmt: skip
            gemm = build(C._int8_gemm, sig, ce, warps)
            tiles = f"sm_{arch} tiles {bm}x{bn}x{bk}, {splits} split(s), {stages} stages"
            assert "cp.async" in gemm.asm["ptx"], f"{tiles}: the K loop is not software-pipelined"
            assert gemm.metadata.shared <= MAX_SHARED[arch], f"{tiles}: {gemm.metadata.shared} bytes of shared memory"
    sig = _sig(acc_ptr=i32, y_ptr=dt, M="i32", T="i32", N="i32", row_scale_ptr=f32, col_scale_ptr=f32, add_ptr=dt)
    build(C._dequantize, sig, dict(SPLITS=4, STATIC=False, HAS_ADD=True, BLOCK_M=16, BLOCK_N=128))
    build(C._quantize_per_token, _sig(x_ptr=dt, stride_x="i32", q_ptr=i8, scale_ptr=f32), dict(K=4096, BLOCK=1024))
    sig = _sig(x_ptr=dt, stride_x="i32", inv_ptr=dt, off_ptr=dt, q_ptr=i8)
    build(C._quantize_static, sig, dict(K=4096, BLOCK=1024))
    for quant in (0, 1, 2):
        sig = _sig(x_ptr=dt, stride_x="i32", stride_h="i32", res_ptr=dt, stride_r="i32", w_ptr=dt, b_ptr=dt)
        sig |= _sig(y_ptr=i8 if quant else dt, sum_ptr=dt, H="i32", eps="fp32", scale_ptr=f32, inv_ptr=dt, off_ptr=dt)
        build(L._add_rms_norm, sig, dict(HEADS=1, HAS_RES=True, HAS_BIAS=False, QUANT=quant, BLOCK=4096))
    for quant in (0, 2):
        sig = _sig(x_ptr=dt, stride_x="i32", y_ptr=i8 if quant else dt, inter="i32", inv_ptr=dt, off_ptr=dt)
        build(L._silu_and_mul, sig, dict(QUANT=quant, BLOCK=1024))
    sig = _sig(x_ptr=dt, stride_x="i32", q_ptr=i8, scale_ptr=f32)
    build(L._silu_and_mul_per_token, sig, dict(INTER=14336, BLOCK=1024))
    strides = dict.fromkeys(("sq_t", "sq_h", "sk_t", "sk_h", "sv_t", "sv_h", "stride_c"), "i32")
    sig = _sig(q_ptr=dt, k_ptr=dt, v_ptr=dt, cos_ptr=dt, sin_ptr=dt, qo_ptr=dt, ko_ptr=dt, kc_ptr=dt, vc_ptr=dt)
    sig |= strides | _sig(slot_ptr="*i64", NH="i32", KVH="i32")
    build(L._rope_store, {a: sig[a] for a in L._rope_store.arg_names if a in sig}, dict(D=128, HALF=64, ROPE=True))
    heads = dict(KVH=4, G=7, G_BLOCK=8, D=128, D_BLOCK=128)  # Qwen2.5-7B's
    out8 = _sig(q8_ptr=i8, inv_ptr=dt, off_ptr=dt)  # the output quantized for a static o_proj (QUANT)
    for splits, quant in ((1, False), (1, True), (8, False)):
        part = f32 if splits > 1 else dt  # one split writes no parts: the output stands in
        sig = _sig(q_ptr=dt, stride_qb="i32", kc_ptr=dt, vc_ptr=dt, tables_ptr=i32, stride_tb="i32", W="i32")
        sig |= _sig(lens_ptr=i32, o_ptr=dt) | out8 | _sig(part_acc=part, part_m=part, part_l=part, scale="fp32")
        ce = dict(W_LOOP=32, SPLITS=splits, BS=16, BS_BLOCK=16, QUANT=quant)
        build(L._paged_decode_attention, sig, ce | heads)
    for quant in (False, True):
        sig = _sig(part_acc=f32, part_m=f32, part_l=f32, o_ptr=dt) | out8 | _sig(stride_qb="i32")
        build(L._combine_splits, sig, dict(SPLITS=8, QUANT=quant) | heads)
    for splits in (1, 8):  # DeepSeek-V3's MLA: a 512 latent and 64 rope dims, 16-token blocks
        part = f32 if splits > 1 else dt
        sig = _sig(q_ptr=dt, stride_qb="i32", c_ptr=dt, tables_ptr=i32, stride_tb="i32", W="i32", lens_ptr=i32)
        sig |= _sig(o_ptr=dt, part_acc=part, part_m=part, part_l=part, scale="fp32", NH="i32")
        ce = dict(W_LOOP=32, SPLITS=splits, G=A.HEADS, R=512, P=64, BS=16, BS_BLOCK=16, PRECISION="tf32", UPCAST=False)
        mla = build(A._mla_decode, sig, ce)
        assert mla.metadata.shared <= MAX_SHARED[arch], f"sm_{arch} MLA decode: {mla.metadata.shared} bytes shared"
    for bm, bn, bk, warps in MOE_TILES:  # DeepSeek-V3's experts: gate_up 7168 -> 4096, down 2048 -> 7168
        tiles = M.MoeTiles(bm, bn, bk, warps)
        # gate_up; down; under tensor parallel (split experts) down's int32 sums, then their dequantization
        for gate_up, acc in ((True, 0), (False, 0), (False, 1), (False, 2)):
            sig = _sig(a_ptr=i32 if acc == 2 else i8, a_rows_ptr="*i64", w_ptr=i8, y_ptr=i32 if acc == 1 else dt,
                       y_rows_ptr="*i64", row_scale_ptr=f32, col_scale_ptr=dt, mult_ptr=f32, expert_ptr=i32,
                       row0_ptr=i32, end_ptr=i32, N="i32")  # fmt: skip
            scatter = not gate_up and acc != 1
            ce = dict(K=7168 if gate_up else 2048, GATHER_A=gate_up, SCATTER_Y=scatter, HAS_MULT=scatter, ACC=acc,
                      BLOCK_M=tiles.block_m, BLOCK_N=tiles.block_n, BLOCK_K=tiles.block_k)  # fmt: skip
            gemm = build(M._grouped_int8_gemm, sig, ce, tiles.warps)
            if acc != 2:  # the others have a K loop
                assert "cp.async" in gemm.asm["ptx"], f"sm_{arch} {tiles}: the K loop is not software-pipelined"
            assert gemm.metadata.shared <= MAX_SHARED[arch], f"sm_{arch} {tiles}: {gemm.metadata.shared} bytes shared"
    return done


@pytest.mark.parametrize("arch", [90, 80])
def test_kernels_compile_for_nvidia_gpus(tmp_path, arch):
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"} | {"TRITON_CACHE_DIR": str(tmp_path)}
    code = f"from tests.test_kernels.test_cuda_compile import compile_all; print(len(compile_all({arch})))"
    run = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stderr[-3000:]
    built = 2 * len(GEMM_TILES) + 3 + 3 + 2 + 1 + 1 + 3 + 2 + 2 + 4 * len(MOE_TILES)
    assert run.stdout.split()[-1] == str(built)  # every kernel
