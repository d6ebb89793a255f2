"""Structured outputs in the engine: every token a constrained request samples is one a plain brute-force check of
the language allows (the reference: each vocabulary token's text tried against the language's prefixes, no
xgrammar), greedy picks the best allowed token of the full head's logits (also on cpu-native, whose int8 screen
must not pick for a constrained row), and batching, chunked prefill and preemption leave the results unchanged."""

from __future__ import annotations

import json
import re

import pytest
import torch

from slimquant import LLM, SamplingParams
from slimquant.errors import ParamError
from slimquant.sampling_params import StructuredOutputsParams

CHOICES = ["yes", "no", "maybe so"]
REGEX = r"[0-9]{3}-[a-z]{2}"
REGEX_PREFIX = re.compile(r"[0-9]{0,3}|[0-9]{3}-[a-z]{0,2}")  # every prefix of REGEX's strings
PROMPTS = ["Hello, my name is", "The capital of France is", "It is a truth universally"]


def choice_prefix(text: str) -> bool:
    return any(c.startswith(text) for c in CHOICES)


LANGUAGES = {  # constraint -> (is a prefix of the language, is in the language)
    "choice": (StructuredOutputsParams(choice=CHOICES), choice_prefix, lambda t: t in CHOICES),
    "regex": (StructuredOutputsParams(regex=REGEX), REGEX_PREFIX.fullmatch, lambda t: re.fullmatch(REGEX, t)),
}


def allowed_tokens(tokenizer, eos: set[int], vocab: int, out_ids: list[int], prefix, complete) -> set[int]:
    """Brute force: the tokens that keep the text a prefix of the language, and EOS once it is complete."""
    text = tokenizer.decode(out_ids)
    special = set(tokenizer.all_special_ids)
    assert vocab >= len(tokenizer)  # ids past the tokenizer's (padding rows of the head) are never allowed
    ok = {t for t in range(len(tokenizer)) if t not in special and prefix(tokenizer.decode(out_ids + [t]))}
    return (ok | eos) if complete(text) else ok


def check_greedy_against_brute_force(llm: LLM, name: str) -> None:
    """Each greedy token is the argmax, over the brute-force allowed set, of the full vocabulary's raw logprobs
    reported in the same step."""
    structured, prefix, complete = LANGUAGES[name]
    engine, tok = llm.llm_engine, llm.get_tokenizer()
    params = SamplingParams(temperature=0, max_tokens=12, logprobs=-1, structured_outputs=structured)
    plain = SamplingParams(temperature=0, max_tokens=12, structured_outputs=structured)
    for prompt, out, without in zip(
        PROMPTS,
        llm.generate(PROMPTS, params, use_tqdm=False),
        llm.generate(PROMPTS, plain, use_tqdm=False),
        strict=True,
    ):
        sample = out.outputs[0]
        assert sample.token_ids == without.outputs[0].token_ids, prompt  # asking for logprobs changes nothing
        assert complete(sample.text) and sample.finish_reason == "stop", (prompt, sample.text)
        for i, (token, logprobs) in enumerate(zip(sample.token_ids, sample.logprobs, strict=True)):
            allowed = allowed_tokens(
                tok, set(engine.eos_token_ids), engine.vocab_size, sample.token_ids[:i], prefix, complete
            )
            best = max(allowed, key=lambda t: logprobs[t].logprob)
            assert token == best, (prompt, i, tok.decode(sample.token_ids[:i]), token, best)


@pytest.mark.parametrize("name", sorted(LANGUAGES))
def test_greedy_picks_the_best_allowed_token(llm, name):
    check_greedy_against_brute_force(llm, name)


@pytest.fixture(scope="module")
def screened_llm(tiny_model):
    """A bf16 tiny llama on cpu-native, whose greedy steps take the int8 head screen."""
    llm = LLM(
        str(tiny_model("llama", dtype=torch.bfloat16)),
        max_model_len=128,
        num_kv_blocks=64,
        kernels={"backend": "cpu-native"},
    )
    assert llm.llm_engine.runner.sampler.head.screens(), "the test needs the greedy screen"
    return llm


@pytest.mark.parametrize("name", sorted(LANGUAGES))
def test_the_greedy_screen_never_picks_for_a_constrained_row(screened_llm, name):
    check_greedy_against_brute_force(screened_llm, name)


@pytest.mark.parametrize("seed", range(3))
@pytest.mark.parametrize("which", ["llm", "screened_llm"])
def test_sampled_tokens_stay_in_the_language(request, which, seed):
    """Top-k / top-p sampling (on cpu-native, the top-k screen's territory) draws only allowed tokens: the text is
    a prefix of the language at every token and whole at the end."""
    llm = request.getfixturevalue(which)
    structured, prefix, complete = LANGUAGES["regex"]
    params = SamplingParams(
        temperature=1.5, top_k=20, top_p=0.9, seed=seed, n=2, max_tokens=16, structured_outputs=structured
    )
    tok = llm.get_tokenizer()
    for out in llm.generate(PROMPTS, params, use_tqdm=False):
        for sample in out.outputs:
            ids = sample.token_ids
            assert all(prefix(tok.decode(ids[:i])) for i in range(len(ids))) and complete(sample.text), sample.text


def test_json_schema_output_parses_and_follows_the_schema(llm):
    schema = {
        "type": "object",
        "properties": {"answer": {"enum": ["red", "green"]}, "sure": {"type": "boolean"}},
        "required": ["answer", "sure"],
    }
    structured = StructuredOutputsParams(json=schema, disable_any_whitespace=True)
    for out in llm.generate(PROMPTS, SamplingParams(temperature=0, max_tokens=40, structured_outputs=structured)):
        value = json.loads(out.outputs[0].text)
        assert set(value) == {"answer", "sure"} and value["answer"] in ("red", "green"), value
        assert isinstance(value["sure"], bool) and out.outputs[0].text == json.dumps(value)  # no free whitespace


def test_batching_chunked_prefill_and_preemption_keep_the_results(llama_path):
    """Constrained and plain requests together, with a KV cache small enough to preempt and prefill in chunks,
    give what each gives alone."""
    structured = [LANGUAGES[n][0] for n in ("choice", "regex")] + [None]
    params = [SamplingParams(temperature=0, max_tokens=14, structured_outputs=s) for s in structured]
    roomy = LLM(str(llama_path), max_model_len=32, num_kv_blocks=64, block_size=4)
    alone = [roomy.generate(p, sp, use_tqdm=False)[0].outputs[0].text for p, sp in zip(PROMPTS, params, strict=True)]
    tight = LLM(str(llama_path), max_model_len=32, num_kv_blocks=9, block_size=4, max_num_batched_tokens=8)
    together = [o.outputs[0].text for o in tight.generate(PROMPTS, params, use_tqdm=False)]
    assert together == alone
    assert tight.llm_engine.scheduler.num_preemptions > 0


@pytest.mark.parametrize(
    "fields,words",
    [
        (dict(regex="("), "regex does not compile: .*parenthesis"),
        (dict(grammar="root ::= "), "grammar does not compile"),
        (dict(json={"type": "objectx"}), "json schema does not compile: .*objectx"),
        (dict(json="{not json"), "not valid JSON"),
        (dict(choice=["a"], regex="b"), "exactly one of"),
        (dict(), "exactly one of"),
        (dict(choice=[]), "choice must be"),
        (dict(json_object=True, whitespace_pattern=" "), "whitespace_pattern is not supported"),
    ],
)
def test_a_bad_constraint_is_a_param_error_and_queues_nothing(llm, fields, words):
    with pytest.raises(ParamError, match=words):
        llm.llm_engine.add_request("bad", "Hello", SamplingParams(structured_outputs=StructuredOutputsParams(**fields)))
    assert not llm.llm_engine.has_unfinished_requests()


def test_a_complete_grammar_ends_a_sequence_that_ignores_eos(llm):
    params = SamplingParams(temperature=0, max_tokens=20, ignore_eos=True, structured_outputs={"choice": CHOICES})
    sample = llm.generate(PROMPTS[0], params, use_tqdm=False)[0].outputs[0]
    assert sample.text in CHOICES and sample.finish_reason == "stop"


def test_min_tokens_does_not_block_a_complete_grammar(llm):
    """EOS banned until min_tokens, but the grammar allows only EOS: the grammar wins, as nothing else can follow."""
    params = SamplingParams(temperature=0, max_tokens=20, min_tokens=15, structured_outputs={"choice": CHOICES})
    sample = llm.generate(PROMPTS[0], params, use_tqdm=False)[0].outputs[0]
    assert sample.text in CHOICES and sample.finish_reason == "stop"


def test_structural_tags_new_and_older_form(llm):
    """xgrammar's structural tag, and vLLM's older {"structures", "triggers"} form (converted to it)."""
    digits = {"type": "tag", "begin": "<n>", "content": {"type": "regex", "pattern": "[0-9]{2}"}, "end": "</n>"}
    tag = json.dumps({"type": "structural_tag", "format": digits})
    params = SamplingParams(temperature=0, max_tokens=20, structured_outputs={"structural_tag": tag})
    assert re.fullmatch(r"<n>[0-9]{2}</n>", llm.generate(PROMPTS[0], params, use_tqdm=False)[0].outputs[0].text)
    older = {"structures": [{"begin": "<f>", "schema": {"type": "integer"}, "end": "</f>"}], "triggers": ["<f>"]}
    params = SamplingParams(temperature=0, max_tokens=4, structured_outputs={"structural_tag": json.dumps(older)})
    assert len(llm.generate(PROMPTS[0], params, use_tqdm=False)[0].outputs[0].token_ids) > 0
    with pytest.raises(ParamError, match="structural_tag does not compile"):
        llm.generate(PROMPTS[0], SamplingParams(structured_outputs={"structural_tag": '{"structures": [{}]}'}))
