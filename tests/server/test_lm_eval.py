"""lm-evaluation-harness's own client (`local-completions`, the model people point at a vLLM server) against the
server gives what lm-eval's own `hf` model gives on the same float checkpoint: log-likelihoods within 1e-4 and the
same greedy flags, rolling log-likelihoods, and the same generate_until text."""

from __future__ import annotations

import pytest

from tests.server.conftest import API_KEY, MODEL

lm_eval = pytest.importorskip("lm_eval")
from lm_eval.api.instance import Instance  # noqa: E402
from lm_eval.models.huggingface import HFLM  # noqa: E402
from lm_eval.models.openai_completions import LocalCompletionsAPI  # noqa: E402

PAIRS = [("The capital of France is", " Paris"), ("0 1 2 3", " 4 5"), ("Hello, my name", " is Ada and I")]
TEXT = "It is a truth universally acknowledged, that a single man in possession of a good fortune, must be in want"


@pytest.fixture(scope="module")
def models(server, tiny_model):
    """(lm-eval's client of the server, lm-eval's hf model of the same checkpoint), both with 100-token windows
    (within the test server's 128-token context)."""
    path = str(tiny_model("llama"))
    api = LocalCompletionsAPI(
        base_url=f"{server}/v1/completions", model=MODEL, tokenizer=path, tokenizer_backend="huggingface",
        header={"Authorization": f"Bearer {API_KEY}"}, max_length=100, max_retries=1,
    )  # fmt: skip
    return api, HFLM(pretrained=path, device="cpu", batch_size=1, max_length=100)


def _requests(kind: str, args: list[tuple]) -> list[Instance]:
    return [Instance(request_type=kind, doc={}, arguments=a, idx=i) for i, a in enumerate(args)]


def test_loglikelihood(models):
    api, hf = models
    requests = _requests("loglikelihood", PAIRS)
    got, want = api.loglikelihood(requests), hf.loglikelihood(requests)
    for (lp, greedy), (lp_ref, greedy_ref) in zip(got, want, strict=True):
        assert abs(lp - lp_ref) < 1e-4 and greedy == greedy_ref


def test_loglikelihood_rolling(models):
    api, hf = models
    # one window each: past one, lm-eval's API model drops a window's first token to fit max_length where its hf
    # model does not (against vLLM as here), so multi-window sums differ by lm-eval's own design
    requests = _requests("loglikelihood_rolling", [(TEXT,), (TEXT * 4,)])
    for got, want in zip(api.loglikelihood_rolling(requests), hf.loglikelihood_rolling(requests), strict=True):
        assert abs(got - want) < 1e-4


def test_generate_until(models):
    api, hf = models
    until = {"until": ["\n\n"], "max_gen_toks": 8, "do_sample": False}
    requests = _requests("generate_until", [(c, dict(until)) for c, _ in PAIRS])
    assert api.generate_until(requests) == hf.generate_until(requests)
