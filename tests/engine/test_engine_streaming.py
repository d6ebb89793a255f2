"""LLMEngine: incremental outputs, preemption under a small KV cache, abort, prefix caching, multi-byte text."""

from __future__ import annotations

from slimquant import SamplingParams
from slimquant.engine.llm_engine import LLMEngine
from slimquant.sampling_params import RequestOutputKind

PROMPTS = ["Hello, my name is Ada", "The capital of France is Paris", "It is a truth", "Numbers: 0 1 2 3 4 5 6"]


def run_all(engine: LLMEngine, prompts, params, cached: list | None = None) -> dict[str, list[int]]:
    """Token ids of each prompt's first sample; cached collects num_cached_tokens."""
    for i, p in enumerate(prompts):
        engine.add_request(str(i), p, params)
    done = {}
    while engine.has_unfinished_requests():
        for out in engine.step():
            if out.finished:
                done[out.request_id] = out.outputs[0].token_ids
                cached is not None and cached.append(out.num_cached_tokens)
    return done


def test_preemption_gives_the_same_greedy_results(llama_path):
    params = SamplingParams(temperature=0, max_tokens=24, ignore_eos=True)
    big = LLMEngine.from_kwargs(str(llama_path), max_model_len=40, num_kv_blocks=64, block_size=4)
    small = LLMEngine.from_kwargs(str(llama_path), max_model_len=40, num_kv_blocks=10, block_size=4)
    assert run_all(small, PROMPTS[:3], params) == run_all(big, PROMPTS[:3], params)
    assert small.scheduler.num_preemptions > 0 and big.scheduler.num_preemptions == 0
    assert small.stats()["kv_cache_usage"] == 0.0


def test_chunked_prefill_and_prefix_cache_give_the_same_results(llama_path):
    params = SamplingParams(temperature=0, max_tokens=6, ignore_eos=True)
    prompts = [PROMPTS[1] + " and " + p for p in PROMPTS]  # a shared prefix
    plain = LLMEngine.from_kwargs(str(llama_path), max_model_len=64, enable_prefix_caching=False)
    expected = run_all(plain, prompts, params)
    cached = LLMEngine.from_kwargs(str(llama_path), max_model_len=64, block_size=4, max_num_batched_tokens=8)
    assert run_all(cached, prompts, params) == expected
    hits = []
    again = run_all(cached, prompts, params, hits)  # second pass reads the shared prefix from the cache
    assert again == expected and min(hits) >= 4


def test_delta_outputs_concatenate_to_the_final_output(llama_path):
    engine = LLMEngine.from_kwargs(str(llama_path), max_model_len=64)
    kinds = (RequestOutputKind.DELTA, RequestOutputKind.CUMULATIVE)
    for kind in kinds:
        params = SamplingParams(max_tokens=10, seed=5, n=2, output_kind=kind, logprobs=1, ignore_eos=True)
        engine.add_request(kind.name, PROMPTS[0], params)
    texts = {(k.name, i): "" for k in kinds for i in range(2)}
    tokens = {key: [] for key in texts}
    while engine.has_unfinished_requests():
        for out in engine.step():
            for c in out.outputs:
                key = (out.request_id, c.index)
                if out.request_id == "DELTA":
                    texts[key] += c.text
                    tokens[key] += c.token_ids
                    assert len(c.logprobs) == len(c.token_ids)
                else:
                    texts[key], tokens[key] = c.text, c.token_ids
    for i in range(2):
        assert texts[("DELTA", i)] == texts[("CUMULATIVE", i)] and len(tokens[("DELTA", i)]) == 10
        assert tokens[("DELTA", i)] == tokens[("CUMULATIVE", i)]


def test_abort_frees_blocks(llama_path):
    engine = LLMEngine.from_kwargs(str(llama_path), max_model_len=64, num_kv_blocks=32)
    engine.add_request("a", PROMPTS[0], SamplingParams(max_tokens=30))
    engine.add_request("b", PROMPTS[1], SamplingParams(max_tokens=3))
    engine.step()
    assert engine.stats()["kv_cache_usage"] > 0
    engine.abort_request(["a", "b", "unknown"])
    assert not engine.has_unfinished_requests() and engine.step() == []
    assert engine.stats() == {"running": 0, "waiting": 0, "kv_cache_usage": 0.0, "num_preemptions": 0}


def test_request_id_in_use(llama_path):
    import pytest

    engine = LLMEngine.from_kwargs(str(llama_path), max_model_len=64)
    engine.add_request("x", PROMPTS[0])
    with pytest.raises(ValueError, match="already in use"):
        engine.add_request("x", PROMPTS[0])


def test_delta_stream_holds_back_a_stop_string(llama_path):
    engine = LLMEngine.from_kwargs(str(llama_path), max_model_len=64)
    greedy = dict(temperature=0, max_tokens=12, ignore_eos=True)
    engine.add_request("full", PROMPTS[2], SamplingParams(**greedy))
    finals = []
    while engine.has_unfinished_requests():
        finals += [out for out in engine.step() if out.finished]
    text = finals[0].outputs[0].text
    stop = text[5:8]
    engine.add_request("s", PROMPTS[2], SamplingParams(**greedy, stop=stop, output_kind=RequestOutputKind.DELTA))
    pieces = []
    while engine.has_unfinished_requests():
        pieces += [c.text for out in engine.step() for c in out.outputs]
    assert "".join(pieces) == text[: text.index(stop)]


class ScriptedSampler:
    """Stands in for the sampler: emits a fixed token sequence (one request at a time)."""

    def __init__(self, ids: list[int]):
        self.ids = iter(ids)

    def __call__(self, logits, batch):
        from slimquant.layers.sampler import SamplerOutput

        return SamplerOutput([next(self.ids)], [0.0], [None])


def test_streamed_multibyte_text_is_never_cut_mid_character(llama_path):
    text = " Café naïve 你好 😀 日本語🎉 über"
    engine = LLMEngine.from_kwargs(str(llama_path), max_model_len=64)
    ids = engine.tokenizer.encode(text)
    assert any("\ufffd" in engine.tokenizer.decode([t]) for t in ids)
    for stop, expected in ((None, text), ("😀", text[: text.index("😀")])):
        engine.runner.sampler.sampler = ScriptedSampler(ids)
        params = SamplingParams(max_tokens=len(ids), stop=stop, output_kind=RequestOutputKind.DELTA)
        engine.add_request("mb", "Hello", params)
        pieces = []
        while engine.has_unfinished_requests():
            pieces += [c.text for out in engine.step() for c in out.outputs]
        assert all("\ufffd" not in p for p in pieces) and "".join(pieces) == expected
