"""Incremental detokenization: multi-byte characters never come out half-done; stop-string search."""

from __future__ import annotations

import pytest

from slimquant.engine.detokenizer import IncrementalDetokenizer, find_stop_string
from slimquant.random_models import make_tokenizer
from slimquant.sampling_params import SamplingParams

TEXT = " Café naïve 你好, こんにちは 😀 日本語🎉 über"


@pytest.fixture(scope="module")
def tok():
    return make_tokenizer()


def stream(tok, prompt_ids, ids, **params):
    detok = IncrementalDetokenizer(tok, prompt_ids, SamplingParams(**params))
    pieces = []
    for t in ids:
        n = detok.add(t)
        pieces.append(detok.text[len(detok.text) - n :] if n else "")
    return detok, pieces


def test_multibyte_characters_come_out_whole(tok):
    prompt, ids = tok.encode("Hello"), tok.encode(TEXT)
    assert any("\ufffd" in tok.decode([t]) for t in ids)  # some tokens really are partial characters
    detok, pieces = stream(tok, prompt, ids)
    assert all("\ufffd" not in p for p in pieces)
    assert "".join(pieces) == detok.text == TEXT
    assert "😀" in pieces or any("😀" in p for p in pieces)


def test_flush_emits_a_cut_character(tok):
    ids = tok.encode("ab 🎉")
    detok, pieces = stream(tok, tok.encode("x"), ids[:-1])  # the emoji's last byte never comes
    assert detok.text.rstrip() == "ab" and "\ufffd" not in detok.text
    detok.flush()
    assert detok.text.startswith("ab ") and detok.text.endswith("\ufffd")


def test_special_tokens_skipped_or_kept(tok):
    ids = tok.encode("Hi") + [tok.convert_tokens_to_ids("<|im_end|>")]
    assert stream(tok, [], ids)[0].text == "Hi"
    assert stream(tok, [], ids, skip_special_tokens=False)[0].text == "Hi<|im_end|>"
    assert stream(tok, [], ids, detokenize=False)[0].text == ""


def test_find_stop_string():
    assert find_stop_string("hello world", 3, ["wor", "xyz"], include=False) == ("wor", 6)
    assert find_stop_string("hello world", 3, ["wor"], include=True) == ("wor", 9)
    assert find_stop_string("hello world", 1, ["hello"], include=False) is None  # ended before the new chars
    assert find_stop_string("abcab", 2, ["cab", "ab"], include=False) == ("cab", 2)  # earliest wins
