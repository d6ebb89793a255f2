"""The native library's interface comes from csrc/exports.h alone: definitions are checked against it by the
compiler, Python's prototypes and structs are built from the library's own tables and checked at load."""

from __future__ import annotations

import inspect
import shutil
import subprocess

import pytest

from slimquant.kernels import native

pytestmark = pytest.mark.skipif(not native.available(), reason="native kernels unavailable (no AVX2 or compiler)")
CSRC = native.SOURCES[0].parent


def test_every_exported_function_takes_its_c_parameter_names():
    lib = native.load()
    signatures = native._signatures(lib.cdll.sq_signatures().decode())
    assert {name for _, name, _ in signatures} >= {"sq_decoder_model", "sq_decode_attention", "sq_int8_gemm"}
    for _, name, params in signatures:
        assert list(inspect.signature(getattr(lib, name)).parameters) == [n for _, n in params], name


def test_a_wrong_parameter_name_is_a_type_error():
    with pytest.raises(TypeError, match="unexpected keyword argument 'rows'"):
        native.load().sq_silu_and_mul(x=0, t=0, inter=0, ldx=0, y=0, rows=1)


def test_structs_take_the_cpp_layout_and_refuse_another():
    lib = native.load()
    step = lib.structs["SqStep"](batch=3, kv_type=1)
    assert (step.batch, step.kv_type, step.slots) == (3, 1, None)
    text = lib.cdll.sq_struct_layouts().decode()
    line = next(x for x in text.splitlines() if x.startswith("SqStep "))
    moved = line.replace("int32_t kv_type 4;", "int32_t kv_type 8;")
    assert moved != line
    with pytest.raises(OSError, match="SqStep"):
        native._structs(moved)


@pytest.mark.skipif(shutil.which("g++") is None, reason="no C++ compiler")
def test_a_definition_unlike_its_declaration_does_not_compile(tmp_path):
    bad = tmp_path / "bad.cpp"
    bad.write_text('#include "exports.h"\nextern "C" void sq_silu_and_mul(const float* x, int t, float* y) {}\n')
    run = subprocess.run(["g++", "-std=c++17", "-fsyntax-only", f"-I{CSRC}", str(bad)], capture_output=True, text=True)
    assert run.returncode != 0 and "conflicting declaration" in run.stderr
