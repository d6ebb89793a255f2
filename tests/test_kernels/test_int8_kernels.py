"""Native int8 ops (NativeOps) vs the torch definitions (TorchOps, format.primitives): exact integers,
bit-identical fused (de)quantization; the backend choice when the native build cannot load."""

from __future__ import annotations

import shutil

import pytest
import torch

from slimquant.backends.native_ops import NativeOps
from slimquant.backends.select import select_backend
from slimquant.backends.torch_ops import TorchOps, quantize_static
from slimquant.config import KernelConfig
from slimquant.format import primitives as P
from slimquant.kernels import native
from slimquant.kernels.cpu import cpu_flags

needs_native = pytest.mark.skipif(not native.available(), reason="native kernels unavailable (no AVX2 or compiler)")
K = NativeOps(native.load()) if native.available() else None  # the default build's ops
_ISAS_HERE = native.isas_here()  # before any test fakes the CPU's flags
T = TorchOps()
F32 = torch.float32
SHAPES = [
    (1, 1, 1), (1, 17, 5), (2, 31, 3), (3, 33, 17), (5, 1025, 7), (6, 64, 5), (8, 70, 11),  # decode: rows stream
    (17, 64, 9), (65, 100, 13), (130, 40, 4),
]  # fmt: skip


def test_native_kernels_build_where_the_cpu_and_compiler_allow():
    """A broken build must fail here, not silently fall back to the slow path."""
    if "avx2" in cpu_flags() and shutil.which("g++"):
        assert native.available()


def _torch_form(w_q: torch.Tensor) -> torch.Tensor:
    return T.pack_weight(w_q)  # TorchOps' exact fp32 [K, N]


@needs_native
@pytest.mark.parametrize(("m", "k", "n"), SHAPES)
def test_int8_gemm_is_exact(m, k, n):
    g = torch.Generator().manual_seed(m * 1000 + k + n)
    x_q = torch.randint(-128, 128, (m, k), dtype=torch.int8, generator=g)
    w_q = torch.randint(-127, 128, (n, k), dtype=torch.int8, generator=g)
    packed = K.pack_weight(w_q)
    assert packed.dtype == torch.int8 and packed.shape == (n, -(-k // 32) * 32)
    assert torch.equal(K.int8_mm(x_q, packed), P.int8_matmul_reference(x_q, w_q))


@needs_native
def test_int8_gemm_extremes_do_not_saturate():
    x_q = torch.full((3, 1024), -128, dtype=torch.int8)
    w_q = torch.cat([torch.full((2, 1024), 127), torch.full((2, 1024), -127)]).to(torch.int8)  # [4, 1024]
    assert torch.equal(K.int8_mm(x_q, K.pack_weight(w_q)), P.int8_matmul_reference(x_q, w_q))


@needs_native
def test_weight_with_minus_128_keeps_the_exact_fp32_form():
    w_q = torch.tensor([[-128, 3], [5, 7]], dtype=torch.int8)
    packed = K.pack_weight(w_q)
    assert packed.dtype == torch.float32
    x_q = torch.tensor([[-128, 127]], dtype=torch.int8)
    assert torch.equal(K.int8_mm(x_q, packed), P.int8_matmul_reference(x_q, w_q))


@needs_native
@pytest.mark.parametrize(("m", "k", "n"), SHAPES)
@pytest.mark.parametrize("with_bias", [False, True])
def test_fused_dynamic_linear_equals_unfused(m, k, n, with_bias):
    g = torch.Generator().manual_seed(k * 7 + n)
    x = torch.randn(m, k, generator=g) * 4
    x[0, : min(k, 3)] = 0.0  # exact zeros, and an all-zero row below
    if m > 2:
        x[2] = 0.0
    w_q = torch.randint(-127, 128, (n, k), dtype=torch.int8, generator=g)
    w_s, bias = torch.rand(n, generator=g) / 50, torch.randn(n, generator=g) if with_bias else None
    fused = K.dynamic_linear(x, K.pack_weight(w_q), w_s, bias, F32)
    assert torch.equal(fused, T.dynamic_linear(x, _torch_form(w_q), w_s, bias, F32))
    x_q, s_t = P.quantize_per_token(x)  # the definition, step by step
    y = P.int8_matmul_reference(x_q, w_q).float() * s_t * w_s
    assert torch.equal(fused, y if bias is None else y + bias)


@needs_native
@pytest.mark.parametrize(("m", "k", "n"), SHAPES)
def test_fused_static_linear_equals_unfused(m, k, n):
    g = torch.Generator().manual_seed(k * 5 + n)
    x = torch.randn(m, k, generator=g) * 3
    x[0, 0] = 1e4  # saturates at 127
    inv, off = torch.tensor([1 / 0.02]), torch.tensor([-7.0])
    w_q = torch.randint(-127, 128, (n, k), dtype=torch.int8, generator=g)
    qb = torch.randint(-5000, 5000, (n,), dtype=torch.int32, generator=g)
    deq = torch.rand(n, generator=g) / 1000
    fused = K.static_linear(x, K.pack_weight(w_q), inv, off, qb, deq, F32)
    assert torch.equal(fused, T.static_linear(x, _torch_form(w_q), inv, off, qb, deq, F32))
    acc = P.int8_matmul_reference(quantize_static(x, inv, off), w_q)
    assert torch.equal(fused, (acc + qb).float() * deq)


@needs_native
def test_strided_and_bf16_inputs():
    g = torch.Generator().manual_seed(3)
    base = torch.randn(6, 80, generator=g)
    x = base[::2, 5:70]  # rows with a stride of their own, and a non-unit offset
    w_q = torch.randint(-127, 128, (9, 65), dtype=torch.int8, generator=g)
    w_s = torch.rand(9, generator=g)
    assert torch.equal(
        K.dynamic_linear(x, K.pack_weight(w_q), w_s, None, F32),
        T.dynamic_linear(x.clone(), _torch_form(w_q), w_s, None, F32),
    )
    xb = x.bfloat16()
    assert torch.equal(
        K.dynamic_linear(xb, K.pack_weight(w_q), w_s, None, F32), T.dynamic_linear(xb, _torch_form(w_q), w_s, None, F32)
    )


@needs_native
@pytest.mark.parametrize(("m", "k"), [(1, 1), (3, 17), (40, 1025)])
def test_quantize_per_token_equals_the_definition(m, k):
    x = torch.randn(m, k) * 10
    x[0, 0] = 0.5 * float(x[0].abs().max())  # a value near a rounding boundary is still decided alike
    x_q, s = K.quantize_per_token(x)
    ref_q, ref_s = P.quantize_per_token(x)
    assert torch.equal(x_q, ref_q) and torch.equal(s, ref_s)


@needs_native
def test_stacked_expert_weights_pack_alike():
    w = torch.randint(-127, 128, (3, 5, 40), dtype=torch.int8)
    packed = K.pack_weight(w)
    x_q = torch.randint(-128, 128, (4, 40), dtype=torch.int8)
    for e in range(3):
        assert torch.equal(K.int8_mm(x_q, packed[e]), P.int8_matmul_reference(x_q, w[e]))


def test_failed_build_picks_the_torch_backend_and_says_why(monkeypatch, tmp_path):
    monkeypatch.setenv("CXX", "false")  # a "compiler" that always fails
    settings = KernelConfig(cache_dir=tmp_path)
    try:
        backend = select_backend("cpu", settings)
        assert backend.name == "torch-reference" and "cpu-native unavailable" in backend.describe()
        assert "compiling" in backend.describe() or "no C++ compiler" in backend.describe()
        with pytest.raises(ValueError, match="backend 'cpu-native' cannot run here"):
            select_backend("cpu", KernelConfig(backend="cpu-native", cache_dir=tmp_path))
        w_q = torch.randint(-127, 128, (5, 40), dtype=torch.int8)
        packed = backend.ops.pack_weight(w_q)
        assert packed.dtype == torch.float32  # the exact fp32 form
        x = torch.randn(3, 40)
        x_q, s_t = P.quantize_per_token(x)
        expected = P.int8_matmul_reference(x_q, w_q).float() * s_t * torch.ones(5)
        assert torch.equal(backend.ops.dynamic_linear(x, packed, torch.ones(5), None, F32), expected)
    finally:
        native.load.cache_clear()  # the next caller loads the real library again


needs_vnni = pytest.mark.skipif(
    not (native.available() and cpu_flags() >= {"avx512f", "avx512bw", "avx512vl", "avx512_vnni"}),
    reason="the CPU has no AVX-512 VNNI",
)


def _gemm_with(lib, x_q: torch.Tensor, packed: torch.Tensor) -> torch.Tensor:
    out = torch.empty(x_q.shape[0], packed.shape[0], dtype=torch.int32)
    m, k = x_q.shape
    lib.sq_int8_gemm(
        x_q.data_ptr(), m, k, x_q.stride(0), packed.data_ptr(), packed.shape[0], packed.shape[1], out.data_ptr()
    )
    return out


def _dynamic_with(lib, x: torch.Tensor, packed: torch.Tensor, w_s: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
    y = torch.empty(x.shape[0], packed.shape[0], dtype=torch.float32)
    lib.sq_dynamic_linear(
        x.data_ptr(), x.shape[0], x.shape[1], x.stride(0), packed.data_ptr(), packed.shape[0], packed.shape[1],
        w_s.data_ptr(), bias.data_ptr(), y.data_ptr(),
    )  # fmt: skip
    return y


# 2-4: the single-pass few-token blocks; from 16, AMX tiles of 16 tokens (up to 4 in a token tile of 64) and the
# VNNI kernels for the rest
@needs_vnni
@pytest.mark.parametrize("m", [1, 2, 3, 4, 16, 17, 40, 70, 130])
@pytest.mark.parametrize("k", [5, 33, 100, 576])  # Kp 32 (no tiles: 64 bytes of K each), 64, 128, 576
@pytest.mark.parametrize("n", [1, 7, 16, 24, 65])  # whole blocks of 16 rows (+ rows in plain layout)
def test_every_build_computes_the_same_integers(m, k, n):
    """The builds this CPU runs (AVX2, AVX-512 VNNI, AMX) compute the same exact integers (and so the same fused
    outputs) at odd sizes."""
    libs = {isa: native.load(isa) for isa in native.isas_here()}
    assert {isa: lib.isa for isa, lib in libs.items()} == {isa: isa for isa in libs}
    g = torch.Generator().manual_seed(m * 100 + k * 10 + n)
    x_q = torch.randint(-128, 128, (m, k), dtype=torch.int8, generator=g)
    x_q[0, : min(k, 4)] = -128  # the extremes, where a sign or offset trick would overflow first
    w_q = torch.randint(-127, 128, (n, k), dtype=torch.int8, generator=g)
    w_q[0, : min(k, 4)] = 127
    packed = {isa: NativeOps(lib).pack_weight(w_q) for isa, lib in libs.items()}
    want = P.int8_matmul_reference(x_q, w_q)
    for isa, lib in libs.items():
        assert torch.equal(_gemm_with(lib, x_q, packed[isa]), want), isa
    x = torch.randn(m, k, generator=g) * 3
    w_s, bias = torch.rand(n, generator=g) / 50, torch.randn(n, generator=g)
    y = {isa: _dynamic_with(lib, x, packed[isa], w_s, bias) for isa, lib in libs.items()}
    for isa in libs:
        assert torch.equal(y[isa], y["avx2"]), isa


@needs_native
def test_isa_names_the_build():
    assert native.load().isa == native.isas_here()[-1]  # auto: the best build that runs here
    for isa in native.isas_here():
        assert native.load(isa).isa == isa
        assert native.load(isa).sq_amx_ready() == (isa == "amx")


def test_a_build_this_cpu_cannot_run_is_refused_by_name(monkeypatch):
    monkeypatch.setattr(native, "cpu_flags", lambda: frozenset({"avx2", "fma"}))  # an AVX2-only CPU
    assert (native.best_isa(), native.isas_here()) == ("avx2", ["avx2"])
    with pytest.raises(native.NativeUnavailable, match="this CPU has no amx_int8 / amx_tile / avx512_vnni"):
        native.load.__wrapped__("amx")  # past load's cache
    with pytest.raises(ValueError, match="isa must be"):
        native.load.__wrapped__("avx512")


def test_isas_here_leaves_out_an_amx_build_that_cannot_run(monkeypatch):
    monkeypatch.setattr(native, "cpu_flags", lambda: native._CPU_FLAGS["amx"])  # AMX in /proc/cpuinfo, but ...

    def load(isa="auto", cache_dir=None):
        raise native.NativeUnavailable("the AMX build cannot run: the kernel refused this process the tile state")

    monkeypatch.setattr(native, "load", load)
    assert native.isas_here() == ["avx2", "avx512vnni"]


@needs_native
def test_auto_takes_the_vnni_build_where_the_amx_one_cannot_run(monkeypatch, caplog):
    """A compiler without AMX support, or a kernel that refuses the tile state: "auto" warns and loads the VNNI
    build; asking for "amx" by name is an error."""
    monkeypatch.setattr(native, "cpu_flags", lambda: native._CPU_FLAGS["amx"] | {"fma"})
    real = native._load_build

    def no_amx(target, cache_dir):
        if target == "amx":
            raise native.NativeUnavailable("compiling failed: unrecognized command-line option '-mamx-tile'")
        return real(target, cache_dir)

    monkeypatch.setattr(native, "_load_build", no_amx)
    with pytest.raises(native.NativeUnavailable, match="-mamx-tile"):
        native.load.__wrapped__("amx")
    if "avx512vnni" not in _ISAS_HERE:
        pytest.skip("this CPU cannot run the VNNI build that auto falls back to")
    assert native.load.__wrapped__("auto").isa == "avx512vnni"
    assert "'-mamx-tile'; using the AVX-512 VNNI build" in caplog.text
