"""SamplingParams: vLLM defaults and ValueError checks that name the field."""

from __future__ import annotations

import pytest

from slimquant import SamplingParams


def test_defaults_match_vllm():
    p = SamplingParams()
    assert (p.n, p.temperature, p.top_p, p.top_k, p.min_p, p.max_tokens, p.min_tokens) == (1, 1.0, 1.0, 0, 0.0, 16, 0)
    assert (p.presence_penalty, p.frequency_penalty, p.repetition_penalty) == (0.0, 0.0, 1.0)
    assert p.stop == [] and p.stop_token_ids == [] and p.logprobs is None and p.skip_special_tokens


def test_stop_string_becomes_list_and_greedy_resets_filters():
    p = SamplingParams(stop="\n", temperature=0, top_k=5, top_p=0.5)
    assert p.stop == ["\n"] and (p.top_k, p.top_p) == (0, 1.0)
    assert SamplingParams(stop=["ab", "abcd"]).output_text_buffer_length == 3


@pytest.mark.parametrize(
    "kwargs, field",
    [
        ({"n": 0}, "n"),
        ({"temperature": -0.1}, "temperature"),
        ({"top_p": 0.0}, "top_p"),
        ({"top_p": 1.5}, "top_p"),
        ({"top_k": -2}, "top_k"),
        ({"min_p": 1.5}, "min_p"),
        ({"presence_penalty": 3.0}, "presence_penalty"),
        ({"frequency_penalty": -2.5}, "frequency_penalty"),
        ({"repetition_penalty": 0.0}, "repetition_penalty"),
        ({"max_tokens": 0}, "max_tokens"),
        ({"min_tokens": -1}, "min_tokens"),
        ({"min_tokens": 5, "max_tokens": 4}, "min_tokens"),
        ({"logprobs": -2}, "logprobs"),
        ({"prompt_logprobs": -3}, "prompt_logprobs"),
        ({"stop": ["a", ""]}, "stop"),
        ({"stop": "a", "detokenize": False}, "detokenize"),
        ({"n": 2, "temperature": 0.0}, "n"),
        ({"best_of": 1, "n": 2}, "best_of"),
        ({"truncate_prompt_tokens": 0}, "truncate_prompt_tokens"),
        ({"truncate_prompt_tokens": -2}, "truncate_prompt_tokens"),
        ({"bad_words": "word"}, "bad_words"),
        ({"bad_words": ["ok", " "]}, "bad_words"),
    ],
)
def test_invalid_values_raise_naming_the_field(kwargs, field):
    with pytest.raises(ValueError, match=field):
        SamplingParams(**kwargs)


def test_logit_bias_is_clamped_like_vllm():
    assert SamplingParams(logit_bias={"3": 500}).logit_bias == {3: 100.0}
