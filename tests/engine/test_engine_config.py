"""EngineConfig / LLM keyword handling: vLLM-only arguments warn, unknown ones are a TypeError."""

from __future__ import annotations

import logging

import pytest

from slimquant.config import EngineConfig


def test_vllm_only_arguments_warn_in_one_line(caplog):
    with caplog.at_level(logging.WARNING):
        cfg = EngineConfig.from_kwargs("m", gpu_memory_utilization=0.9, enforce_eager=True, tensor_parallel_size=1)
    assert cfg.model == "m"
    [record] = [r for r in caplog.records if "ignoring" in r.getMessage()]
    assert "enforce_eager" in record.getMessage() and "gpu_memory_utilization" in record.getMessage()
    assert "\n" not in record.getMessage()


def test_unknown_arguments_are_a_type_error_naming_them():
    with pytest.raises(TypeError, match="bogus_arg.*other_one"):
        EngineConfig.from_kwargs("m", bogus_arg=1, other_one=2)


def test_unknown_arguments_through_llm(llama_path):
    from slimquant import LLM

    with pytest.raises(TypeError, match="not_a_setting"):
        LLM(str(llama_path), not_a_setting=3)


@pytest.mark.parametrize(
    "kwargs, field",
    [
        ({"dtype": "int3"}, "dtype"),
        ({"block_size": 0}, "block_size"),
        ({"max_num_seqs": -1}, "max_num_seqs"),
        ({"quantization": "gptq"}, "quantization"),
        ({"kv_cache_memory_bytes": 0}, "kv_cache_memory_bytes"),
        ({"device": "tpu"}, "device"),
        ({"tensor_parallel_size": 2}, "tensor_parallel_size"),
    ],
)
def test_invalid_settings_raise_value_error(kwargs, field):
    with pytest.raises(ValueError, match=field):
        EngineConfig.from_kwargs("m", **kwargs)


def test_resolve_checks_lengths():
    cfg = EngineConfig("m", max_model_len=4096)
    with pytest.raises(ValueError, match="max_model_len"):
        cfg.resolve(2048)
    cfg = EngineConfig("m", enable_chunked_prefill=False, max_num_batched_tokens=64)
    with pytest.raises(ValueError, match="max_num_batched_tokens"):
        cfg.resolve(512)
    cfg = EngineConfig("m")
    cfg.resolve(512)
    assert cfg.max_model_len == 512 and cfg.max_num_batched_tokens == 8192


def test_kv_cache_too_small_for_one_sequence(llama_path):
    from slimquant import LLM

    with pytest.raises(ValueError, match="max_model_len"):
        LLM(str(llama_path), max_model_len=256, num_kv_blocks=4)
