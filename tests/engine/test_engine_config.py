"""EngineConfig / LLM keyword handling: vLLM-only arguments warn, unknown ones are a TypeError."""

from __future__ import annotations

import logging

import pytest
import torch

from slimquant.config import EngineConfig


def test_vllm_only_arguments_warn_in_one_line(caplog):
    with caplog.at_level(logging.WARNING):
        cfg = EngineConfig.from_kwargs("m", gpu_memory_utilization=0.9, swap_space=4, tensor_parallel_size=1)
    assert cfg.model == "m"
    [record] = [r for r in caplog.records if "ignoring" in r.getMessage()]
    assert "swap_space" in record.getMessage() and "gpu_memory_utilization" in record.getMessage()
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
        ({"tensor_parallel_size": 0}, "tensor_parallel_size"),
        ({"join_timeout": 0}, "join_timeout"),
        ({"join_timeout": "10"}, "join_timeout"),
        ({"execute_model_timeout": -1}, "execute_model_timeout"),
        ({"execute_model_timeout": True}, "execute_model_timeout"),
        ({"node_timeout": 0}, "node_timeout"),
        ({"pipeline_parallel_size": 2}, "pipeline_parallel_size"),
        ({"kv_cache_dtype": "int4"}, "kv_cache_dtype"),
        ({"kv_cache_dtype": "fp8_e4m3"}, "kv_cache_dtype='fp8_e4m3' is not supported"),
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


def test_kv_cache_memory_bytes_sets_the_block_count(llama_path):
    from slimquant import LLM

    # tiny llama: 2 layers x (k, v) x 16 tokens x 2 kv heads x 16 dims x 4 bytes = 8 KiB per block
    llm = LLM(str(llama_path), max_model_len=64, kv_cache_memory_bytes=20 * 8192 + 100)
    assert llm.llm_engine.runner.num_blocks == 20


def test_bfloat16_runs_with_a_bfloat16_cache(llama_path):
    import torch

    from slimquant import LLM, SamplingParams
    from slimquant.layers.attention import KVCacheLayer

    llm = LLM(str(llama_path), dtype="bfloat16", max_model_len=64)
    out = llm.generate("Hello", SamplingParams(max_tokens=3, temperature=0, ignore_eos=True), use_tqdm=False)
    assert len(out[0].outputs[0].token_ids) == 3
    caches = [m.kv_cache for m in llm.llm_engine.runner.model.modules() if isinstance(m, KVCacheLayer)]
    assert caches and all(c.dtype == torch.bfloat16 for c in caches)


def test_bfloat16_kv_cache_halves_its_bytes_and_keeps_greedy_tokens(llama_path):
    """kv_cache_dtype='bfloat16' with fp32 activations: twice the blocks for the same budget; the tiny model's
    greedy tokens stay those of the fp32 cache, the logprobs within bf16 rounding."""
    from slimquant import LLM, SamplingParams
    from slimquant.layers.attention import KVCacheLayer

    params = SamplingParams(max_tokens=8, temperature=0, ignore_eos=True, logprobs=0)
    runs = {}
    for kv_dtype in ("auto", "bfloat16"):
        llm = LLM(str(llama_path), max_model_len=64, kv_cache_memory_bytes=20 * 8192, kv_cache_dtype=kv_dtype)
        caches = [m.kv_cache for m in llm.llm_engine.runner.model.modules() if isinstance(m, KVCacheLayer)]
        assert {c.dtype for c in caches} == {torch.float32 if kv_dtype == "auto" else torch.bfloat16}
        out = llm.generate(["Hello, my name is", "It is a truth"], params, use_tqdm=False)
        runs[kv_dtype] = (llm.llm_engine.runner.num_blocks, out)
    (blocks32, out32), (blocks16, out16) = runs["auto"], runs["bfloat16"]
    assert (blocks32, blocks16) == (20, 40)
    for a, b in zip(out32, out16, strict=True):
        assert a.outputs[0].token_ids == b.outputs[0].token_ids
        chosen = [
            [s[t].logprob for s, t in zip(o.logprobs, o.token_ids, strict=True)] for o in (a.outputs[0], b.outputs[0])
        ]
        assert chosen[0] != chosen[1]  # the bf16 cache really rounds
        torch.testing.assert_close(torch.tensor(chosen[0]), torch.tensor(chosen[1]), rtol=0, atol=0.05)


def test_auto_kv_cache_keeps_a_bf16_checkpoint_in_bf16(tiny_model, tmp_path):
    """dtype='auto' runs an int8 model's activations in fp32 on the CPU; its cache keeps the checkpoint's bf16
    (as vLLM caches in the model's dtype). An explicit dtype, or kv_cache_dtype, decides otherwise."""
    from slimquant import LLM
    from slimquant.layers.attention import KVCacheLayer
    from tests.models.ascend_ckpt import write_ascend

    bf16_int8 = write_ascend(tiny_model("llama", dtype=torch.bfloat16), tmp_path / "q", lambda p: "W8A8_DYNAMIC")
    cases = [
        (bf16_int8, {}, torch.bfloat16),
        (bf16_int8, {"dtype": "float32"}, torch.float32),
        (bf16_int8, {"kv_cache_dtype": "float32"}, torch.float32),
        (tiny_model("llama"), {}, torch.float32),  # an fp32 checkpoint
        (tiny_model("llama"), {"kv_cache_dtype": "bf16"}, torch.bfloat16),
    ]
    for path, kwargs, expected in cases:
        llm = LLM(str(path), max_model_len=32, num_kv_blocks=16, **kwargs)
        caches = [m.kv_cache for m in llm.llm_engine.runner.model.modules() if isinstance(m, KVCacheLayer)]
        assert {c.dtype for c in caches} == {expected}, kwargs
        assert llm.llm_engine.runner.model.model.norm.weight.dtype == torch.float32  # activations stay fp32


BAD_PROMPTS = [("", "empty"), ([3.5], "must be a str"), ({"text": "x"}, "needs 'prompt'")]


@pytest.mark.parametrize("prompt, message", BAD_PROMPTS)
def test_bad_prompts(llm, prompt, message):
    with pytest.raises(ValueError, match=message):
        llm.generate(prompt, use_tqdm=False)


def test_eos_and_sampling_defaults_from_generation_config(tmp_path):
    import json
    from types import SimpleNamespace

    from slimquant.engine.inputs import stop_token_ids

    generation = {"eos_token_id": [5, 6], "temperature": 0.6, "top_p": 0.9, "max_new_tokens": 99, "do_sample": True}
    (tmp_path / "generation_config.json").write_text(json.dumps(generation))
    eos, defaults = stop_token_ids(
        EngineConfig(str(tmp_path)), SimpleNamespace(eos_token_id=7), SimpleNamespace(eos_token_id=8)
    )
    assert eos == {5, 6, 7, 8}
    assert defaults == {"temperature": 0.6, "top_p": 0.9, "max_tokens": 99}


def test_missing_tokenizer_is_a_value_error(llama_path, tmp_path):
    from slimquant import LLM

    with pytest.raises(ValueError, match="cannot load a tokenizer"):
        LLM(str(llama_path), tokenizer=str(tmp_path), max_model_len=64)


@pytest.mark.parametrize(
    "device,match",
    [("tpu", "device must be 'cpu', 'cuda' or 'cuda:N'"), ("cuda:x", "device must be"), ("cpu:0", "device must be")],
)
def test_bad_devices_are_a_value_error(device, match):
    with pytest.raises(ValueError, match=match):
        EngineConfig(model="m", device=device)


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the error where no GPU is seen")
def test_cuda_without_a_gpu_says_what_to_do():
    with pytest.raises(ValueError, match="torch sees no CUDA GPU.*use device 'cpu'"):
        EngineConfig(model="m", device="cuda")
