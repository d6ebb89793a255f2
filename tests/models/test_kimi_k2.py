"""Kimi-K2 from an unedited folder as Moonshot ships it (tests/models/kimi.py: model_type kimi_k2, its own
configuration_deepseek.py, a tiktoken tokenizer in tokenization_kimi.py written for transformers 4): quantized,
run offline and served a chat turn with trust_remote_code, its own files carried over; without that flag, each
entry point says which flag to pass."""

from __future__ import annotations

import json

import httpx
import pytest

from slimquant import LLM, SamplingParams, quantize
from slimquant.format.tokenizer import load_tokenizer
from tests.models.kimi import make_tiny_kimi
from tests.server.conftest import MODEL, auth, start_server, stop_server

OWN_FILES = ("configuration_deepseek.py", "tokenization_kimi.py", "tiktoken.model", "tokenizer_config.json")


@pytest.fixture(scope="module")
def kimi(tmp_path_factory):
    return make_tiny_kimi(tmp_path_factory.mktemp("kimi") / "Kimi-K2-tiny")


@pytest.fixture(scope="module")
def quantized(kimi, tmp_path_factory):
    dst = tmp_path_factory.mktemp("kimi-w8a8") / "Kimi-K2-tiny-w8a8"
    quantize(kimi, dst, "w8a8", trust_remote_code=True, num_samples=8, seq_len=32, progress=False)
    return dst


def test_quantize_without_the_flag_says_which_to_pass(kimi, tmp_path):
    with pytest.raises(ValueError, match="the model's own code.*--trust-remote-code"):
        quantize(kimi, tmp_path / "out", "w8a8", num_samples=8, seq_len=32, progress=False)


def test_the_output_keeps_kimis_own_files_and_config(kimi, quantized):
    for name in OWN_FILES:
        assert (quantized / name).read_bytes() == (kimi / name).read_bytes(), name
    src, out = (json.loads((p / "config.json").read_text()) for p in (kimi, quantized))
    assert out["model_type"] == "kimi_k2" and out["auto_map"] == src["auto_map"]
    assert out["quantize"] == "w8a8_dynamic" and out["mla_quantize"] == "w8a8"  # vLLM-Ascend's DeepSeek fields


def test_generates_offline_and_refuses_without_the_flag(kimi, quantized):
    with pytest.raises(ValueError, match="trust_remote_code=True"):
        LLM(str(quantized), quantization="ascend")
    llm = LLM(str(quantized), quantization="ascend", trust_remote_code=True, max_model_len=128)
    tokenizer = load_tokenizer(kimi, trust_remote_code=True)
    params = SamplingParams(temperature=0, max_tokens=8, ignore_eos=True)
    out = llm.generate("the cat is in the hat", params, use_tqdm=False)[0]
    assert out.prompt_token_ids == tokenizer.encode("the cat is in the hat") and len(out.outputs[0].token_ids) == 8
    assert out.outputs[0].text == tokenizer.decode(out.outputs[0].token_ids)


def test_serves_a_chat_turn_through_kimis_template(kimi, quantized):
    proc, base = start_server(quantized, "--quantization", "ascend", "--trust-remote-code")
    try:
        messages = [{"role": "user", "content": "is the hat in the tin"}]
        body = {"model": MODEL, "messages": messages, "max_tokens": 6, "temperature": 0}
        r = httpx.post(f"{base}/v1/chat/completions", json=body, headers=auth(), timeout=60)
        assert r.status_code == 200, r.text
        prompt = load_tokenizer(kimi, trust_remote_code=True).apply_chat_template(messages, add_generation_prompt=True)
        ids = prompt["input_ids"] if hasattr(prompt, "keys") else prompt  # transformers 5: a BatchEncoding
        assert r.json()["usage"]["prompt_tokens"] == len(ids)  # <|im_user|>user<|im_middle|>...<|im_assistant|>...
    finally:
        stop_server(proc)
