"""End to end on a tiny llama: greedy equals naive transformers decoding, batching, seeds, stops, n, lengths."""

from __future__ import annotations

import dataclasses

import pytest

from slimquant import SamplingParams
from tests.engine.reference import hf_greedy

PROMPTS = ["Hello, my name is", "The capital of France is", "It is a truth universally acknowledged", "1 2 3"]
GREEDY = SamplingParams(temperature=0, max_tokens=8, ignore_eos=True)


def test_greedy_matches_naive_transformers(llm, hf_model, tokenizer):
    outs = llm.generate(PROMPTS, GREEDY, use_tqdm=False)
    for prompt, out in zip(PROMPTS, outs, strict=True):
        ids = tokenizer.encode(prompt)
        assert out.prompt == prompt and out.prompt_token_ids == ids
        assert out.outputs[0].token_ids == hf_greedy(hf_model, ids, 8)
        assert out.finished and out.outputs[0].finish_reason == "length"


def test_batch_equals_each_prompt_alone(llm):
    batch = [o.outputs[0].token_ids for o in llm.generate(PROMPTS, GREEDY, use_tqdm=False)]
    alone = [llm.generate(p, GREEDY, use_tqdm=False)[0].outputs[0].token_ids for p in PROMPTS]
    assert batch == alone


def test_prompt_forms_give_the_same_result(llm, tokenizer):
    ids = tokenizer.encode(PROMPTS[0])
    expected = llm.generate(PROMPTS[0], GREEDY, use_tqdm=False)[0].outputs[0].token_ids
    for prompt in (ids, {"prompt_token_ids": ids}, {"prompt": PROMPTS[0]}):
        assert llm.generate(prompt, GREEDY, use_tqdm=False)[0].outputs[0].token_ids == expected
    outs = llm.generate([ids, ids], GREEDY, use_tqdm=False)
    assert [o.outputs[0].token_ids for o in outs] == [expected, expected] and outs[0].prompt is None


def test_truncate_prompt_tokens_keeps_the_prompts_last_tokens(llm, tokenizer):
    """vLLM's truncate_prompt_tokens: the prompt's last k tokens alone; -1 keeps max_model_len (256 here), which
    leaves no room to generate."""
    ids = tokenizer.encode(PROMPTS[2])
    expected = llm.generate(ids[-3:], GREEDY, use_tqdm=False)[0]
    for prompt in (ids, PROMPTS[2]):
        out = llm.generate(prompt, dataclasses.replace(GREEDY, truncate_prompt_tokens=3), use_tqdm=False)[0]
        assert out.prompt_token_ids == ids[-3:] and out.outputs[0].token_ids == expected.outputs[0].token_ids
    with pytest.raises(ValueError, match="the prompt has 256 tokens but max_model_len is 256"):
        llm.generate(list(range(1, 301)), SamplingParams(max_tokens=1, truncate_prompt_tokens=-1), use_tqdm=False)


def test_seed_reproduces_and_different_seeds_differ(llm):
    def sample(seed):
        params = SamplingParams(temperature=1.0, max_tokens=8, seed=seed, ignore_eos=True)
        return llm.generate(PROMPTS[0], params, use_tqdm=False)[0].outputs[0].token_ids

    assert sample(7) == sample(7)
    assert sample(7) != sample(8)


def test_one_sampling_params_per_prompt(llm):
    params = [SamplingParams(max_tokens=k, temperature=0) for k in (1, 3, 5)]
    outs = llm.generate(PROMPTS[:3], params, use_tqdm=False)
    assert [len(o.outputs[0].token_ids) for o in outs] == [1, 3, 5]
    with pytest.raises(ValueError, match="lengths must match"):
        llm.generate(PROMPTS[:2], params, use_tqdm=False)


def test_n_samples(llm):
    out = llm.generate(PROMPTS[0], SamplingParams(n=3, max_tokens=6, seed=1, ignore_eos=True), use_tqdm=False)[0]
    assert [c.index for c in out.outputs] == [0, 1, 2]
    assert all(len(c.token_ids) == 6 for c in out.outputs)
    assert len({tuple(c.token_ids) for c in out.outputs}) > 1


def test_stop_token_ids_and_eos(llm):
    first = llm.generate(PROMPTS[0], GREEDY, use_tqdm=False)[0].outputs[0].token_ids
    stop_at = first[3]
    params = SamplingParams(temperature=0, max_tokens=8, stop_token_ids=[stop_at], ignore_eos=True)
    c = llm.generate(PROMPTS[0], params, use_tqdm=False)[0].outputs[0]
    k = first.index(stop_at)
    assert c.token_ids == first[: k + 1] and c.finish_reason == "stop" and c.stop_reason == stop_at


def test_eos_stops_unless_ignored(llm_eos):
    llm, eos = llm_eos
    c = llm.generate(PROMPTS[0], SamplingParams(temperature=0, max_tokens=8), use_tqdm=False)[0].outputs[0]
    assert c.token_ids[-1] == eos and c.finish_reason == "stop" and c.stop_reason is None
    c = llm.generate(PROMPTS[0], SamplingParams(temperature=0, max_tokens=8, ignore_eos=True), use_tqdm=False)
    assert len(c[0].outputs[0].token_ids) == 8


def test_min_tokens_blocks_eos(llm_eos):
    llm, eos = llm_eos
    c = llm.generate(PROMPTS[0], SamplingParams(temperature=0, max_tokens=8, min_tokens=5), use_tqdm=False)
    ids = c[0].outputs[0].token_ids
    assert len(ids) >= 5 and eos not in ids[:5]


@pytest.fixture(scope="module")
def llm_eos(llama_path, tokenizer):
    """An LLM whose EOS is the first greedy token of PROMPTS[0] (so EOS really comes up)."""
    import json

    from slimquant import LLM

    llm = LLM(str(llama_path), max_model_len=256, num_kv_blocks=64)
    eos = llm.generate(PROMPTS[0], GREEDY, use_tqdm=False)[0].outputs[0].token_ids[2]
    llm.llm_engine.eos_token_ids = frozenset([eos])
    assert json.loads((llama_path / "generation_config.json").read_text())["eos_token_id"] != eos
    return llm, eos


def test_stop_strings_truncate(llm):
    full = llm.generate(PROMPTS[1], GREEDY, use_tqdm=False)[0].outputs[0].text
    stop = full[3:5]
    cut = full.index(stop)
    c = llm.generate(PROMPTS[1], SamplingParams(temperature=0, max_tokens=8, stop=[stop]), use_tqdm=False)
    c = c[0].outputs[0]
    assert c.text == full[:cut] and c.finish_reason == "stop" and c.stop_reason == stop
    params = SamplingParams(temperature=0, max_tokens=8, stop=stop, include_stop_str_in_output=True)
    assert llm.generate(PROMPTS[1], params, use_tqdm=False)[0].outputs[0].text == full[: cut + len(stop)]


def test_max_tokens_and_max_model_len(llama_path):
    from slimquant import LLM

    llm = LLM(str(llama_path), max_model_len=32, num_kv_blocks=8)
    out = llm.generate("1 2 3", SamplingParams(max_tokens=None, temperature=0, ignore_eos=True), use_tqdm=False)[0]
    assert len(out.prompt_token_ids) + len(out.outputs[0].token_ids) == 32
    assert out.outputs[0].finish_reason == "length"
    with pytest.raises(ValueError, match="max_model_len is 32"):
        llm.generate(list(range(40)), use_tqdm=False)
    with pytest.raises(ValueError, match="outside the vocabulary"):
        llm.generate([[1, 2, 99999]], use_tqdm=False)


def test_chat_uses_the_template(llm, tokenizer):
    messages = [{"role": "user", "content": "Hello"}]
    out = llm.chat(messages, GREEDY, use_tqdm=False)[0]
    assert out.prompt == "<|im_start|>user\nHello<|im_end|>\n<|im_start|>assistant\n"
    assert out.prompt_token_ids == tokenizer.encode(out.prompt, add_special_tokens=False)
    assert len(llm.chat([messages, messages], GREEDY, use_tqdm=False)) == 2


def test_chat_takes_content_parts_and_tools_as_the_server_does(llm):
    """OpenAI's content parts are joined into one text (they were written into the prompt as a Python list), a
    part that is not text is a ValueError naming the message, and tools reach the template."""
    plain = llm.chat([{"role": "user", "content": "Hello\nthere"}], GREEDY, use_tqdm=False)[0]
    parts = [{"type": "text", "text": "Hello"}, {"type": "text", "text": "there"}]
    assert llm.chat([{"role": "user", "content": parts}], GREEDY, use_tqdm=False)[0].prompt == plain.prompt
    image = [{"type": "image_url", "image_url": {"url": "x"}}]
    with pytest.raises(ValueError, match=r"messages\[1\].content: part type 'image_url' is not supported"):
        llm.chat([{"role": "system", "content": "Hi"}, {"role": "user", "content": image}], GREEDY, use_tqdm=False)
    tools = [{"type": "function", "function": {"name": "get_weather", "parameters": {}}}]
    template = "{% for t in tools %}{{ t['function']['name'] }};{% endfor %}{{ messages[0]['content'] }}"
    out = llm.chat([{"role": "user", "content": "Hi"}], GREEDY, use_tqdm=False, tools=tools, chat_template=template)
    assert out[0].prompt == "get_weather;Hi"


def _first(ids: list[int], runs: list[list[int]]) -> tuple[int, list[int]] | None:
    """Where in ids the first of runs starts, and which; None where none is there."""
    at = [(i, run) for i in range(len(ids)) for run in runs if ids[i : i + len(run)] == run]
    return min(at, default=None, key=lambda found: found[0])


def _of_length(runs: list[list[int]], length: int) -> list[list[int]]:
    return [run for run in runs if len(run) == length]


@pytest.mark.parametrize("length", [1, 2])
def test_bad_words_are_never_generated(llm, tokenizer, length):
    """vLLM's bad_words: no output holds a bad word's tokens (as it starts a text or after a space); a one-token
    word is banned everywhere, a longer one only right after the rest of it. The word is text of the greedy answer
    (the first that tokenizes back into it: a random model writes byte fragments too)."""
    from slimquant.engine.inputs import bad_word_ids

    greedy = dataclasses.replace(GREEDY, max_tokens=24)
    answers = [o.outputs[0].token_ids for o in llm.generate(PROMPTS, greedy, use_tqdm=False)]
    prompt, plain, word = next(
        (prompt, ids, text)
        for prompt, ids in zip(PROMPTS, answers, strict=True)
        for text in (tokenizer.decode(ids[i : i + length]) for i in range(len(ids) - length + 1))
        if text.strip() and _first(ids, _of_length(bad_word_ids([text], tokenizer), length))
    )
    words = bad_word_ids([word], tokenizer)
    got = llm.generate(prompt, dataclasses.replace(greedy, bad_words=[word]), use_tqdm=False)[0].outputs[0].token_ids
    assert _first(got, words) is None, (word, words, got)
    start, run = _first(plain, words)
    same = start + len(run) - 1  # the greedy answer's tokens before the word's last one
    assert got[:same] == plain[:same] and got[same] != plain[same], (word, run, plain, got)


def test_bad_word_ids_as_vllm_tokenizes_them(tokenizer):
    from slimquant.engine.inputs import bad_word_ids
    from slimquant.engine.step_sampler import banned_after

    alone, spaced = (tokenizer.encode(text, add_special_tokens=False) for text in ("fox", " fox"))
    want = [alone] + ([spaced] if len(spaced) == len(alone) and spaced[0] != alone[0] else [])
    assert bad_word_ids([" fox"], tokenizer) == want
    assert banned_after([5, 1, 2], [[1, 2, 3], [9], [2, 4], [7, 3]]) == [3, 4, 9]


def test_logit_bias_and_allowed_tokens(llm):
    out = llm.generate(PROMPTS[0], SamplingParams(max_tokens=4, logit_bias={42: 100.0}), use_tqdm=False)
    assert out[0].outputs[0].token_ids == [42] * 4
    out = llm.generate(PROMPTS[0], SamplingParams(max_tokens=6, allowed_token_ids=[7, 9]), use_tqdm=False)
    assert set(out[0].outputs[0].token_ids) <= {7, 9}


def test_repetition_penalty_reduces_repeats(llm):
    def distinct(**kw):
        params = SamplingParams(temperature=0, max_tokens=24, ignore_eos=True, **kw)
        return len(set(llm.generate(PROMPTS[0], params, use_tqdm=False)[0].outputs[0].token_ids))

    assert distinct(repetition_penalty=2.0) > distinct()


@pytest.mark.parametrize("arch", ["qwen2", "qwen3"])
def test_greedy_matches_transformers_on_other_architectures(tiny_model, arch):
    import torch
    from transformers import AutoModelForCausalLM

    from slimquant import LLM

    path = tiny_model(arch)
    llm = LLM(str(path), max_model_len=64, num_kv_blocks=16, block_size=4)
    hf = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    params = SamplingParams(temperature=0, max_tokens=6, ignore_eos=True)
    for out in llm.generate(PROMPTS[:2], params, use_tqdm=False):
        assert out.outputs[0].token_ids == hf_greedy(hf, out.prompt_token_ids, 6)
