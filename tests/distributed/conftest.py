"""Checkpoints the tensor-parallel tests share: tiny Llama, Qwen2 (qkv bias, and shift biases) and Qwen3 with 4
kv heads, float and written as W8A8, W8A8_DYNAMIC and a mix with float down_proj; Qwen2 also with W8A16 linears."""

from __future__ import annotations

import pytest

from tests.models.ascend_ckpt import write_ascend


def _mixed(prefix: str) -> str:
    """Attention static, MLP dynamic, down_proj float: a float row-parallel layer inside an int8 model."""
    if prefix.endswith("down_proj"):
        return "FLOAT"
    return "W8A8_DYNAMIC" if ".mlp." in prefix else "W8A8"


def _weight_only(prefix: str) -> str:
    """Attention and down_proj W8A16 (column- and row-parallel weight-only linears), gate / up dynamic."""
    return "W8A8_DYNAMIC" if prefix.endswith(("gate_proj", "up_proj")) else "W8A16"


@pytest.fixture(scope="package")
def checkpoints(tiny_model, tmp_path_factory) -> dict[str, str]:
    """name ("<arch>-<float|W8A8|W8A8_DYNAMIC|mixed>", "qwen2-W8A16") -> folder."""
    out = {}
    for arch in ("llama", "qwen2", "qwen3"):
        src = tiny_model(arch, num_key_value_heads=4)
        out[f"{arch}-float"] = str(src)
        for name, kind in (("W8A8", lambda p: "W8A8"), ("W8A8_DYNAMIC", lambda p: "W8A8_DYNAMIC"), ("mixed", _mixed)):
            dst = tmp_path_factory.mktemp(f"{arch}-{name}")
            out[f"{arch}-{name}"] = str(write_ascend(src, dst, kind, shift=arch == "qwen2"))
        if arch == "qwen2":
            dst = tmp_path_factory.mktemp("qwen2-W8A16")
            out["qwen2-W8A16"] = str(write_ascend(src, dst, _weight_only, shift=True))
    return out
