"""After sampling: append tokens, detokenize, decide stops, and build RequestOutputs (cumulative/delta/final)."""

from __future__ import annotations

import logging

from slimquant.engine.detokenizer import TokenTexts, find_stop_string
from slimquant.engine.sequence import Request, Sequence
from slimquant.layers.sampler import TopLogprobs
from slimquant.outputs import CompletionOutput, Logprob, RequestOutput
from slimquant.sampling_params import RequestOutputKind

logger = logging.getLogger(__name__)


def to_logprobs(entries: TopLogprobs | None, texts: TokenTexts) -> dict[int, Logprob] | None:
    """(token, logprob, rank) triples -> {token: Logprob} with decoded token text."""
    if entries is None:
        return None
    return {t: Logprob(lp, rank, texts(t)) for t, lp, rank in entries}


def process_token(seq: Sequence, token: int, max_model_len: int) -> None:
    """Apply the stop rules to a just-appended token (vLLM order: stop tokens, stop strings, then length)."""
    params = seq.params
    checks_stops = seq.num_output_tokens >= params.min_tokens
    if checks_stops and token in seq.stop_ids:
        seq.finish("stop", token if token in params.stop_token_ids else None)
    if not seq.is_finished or params.include_stop_str_in_output:
        new_chars = seq.detok.add(token)
        if checks_stops and params.stop and not seq.is_finished:
            _check_stop_strings(seq, new_chars)
    if not seq.is_finished and (seq.num_output_tokens >= _max_tokens(seq, max_model_len)):
        seq.finish("length")
    if seq.is_finished and not isinstance(seq.stop_reason, str):
        seq.detok.flush()  # a character cut short by the end is emitted as is


def advance_grammar(seq: Sequence, token: int) -> None:
    """Move the sequence's structured-output matcher past its new token; a grammar that is complete (it took a stop
    token that does not stop this sequence, e.g. with ignore_eos) or that rejects the token (no token was both
    allowed and possible, e.g. allowed_token_ids outside the grammar) ends the sequence."""
    grammar = seq.grammar
    if grammar is None or seq.is_finished:
        return
    if not grammar.accept_token(token):
        logger.warning("request %s: the structured output cannot go on (no allowed token)", seq.request.request_id)
        seq.finish("abort")
    elif grammar.is_terminated():
        seq.finish("stop")
        seq.detok.flush()


def _check_stop_strings(seq: Sequence, new_chars: int) -> None:
    found = find_stop_string(seq.detok.text, new_chars, seq.params.stop, seq.params.include_stop_str_in_output)
    if found is not None:
        stop, cut = found
        seq.detok.text = seq.detok.text[:cut]
        seq.finish("stop", stop)


def _max_tokens(seq: Sequence, max_model_len: int) -> int:
    room = max_model_len - seq.num_prompt_tokens
    return room if seq.params.max_tokens is None else min(seq.params.max_tokens, room)


def make_output(request: Request) -> RequestOutput | None:
    """The RequestOutput to report now for this request, per its output_kind (None: nothing to report)."""
    kind = request.params.output_kind
    finished = request.is_finished
    if kind == RequestOutputKind.FINAL_ONLY and not finished:
        return None
    delta = kind == RequestOutputKind.DELTA
    seqs = [s for s in request.seqs if not (delta and s.finish_reported)]
    outputs = [completion(seq, delta) for seq in seqs]
    if delta:
        outputs = [o for o in outputs if o.token_ids or o.text or o.finish_reason]
        if not outputs:
            return None
    for seq in seqs:
        seq.finish_reported = seq.is_finished
    prompt_logprobs = request.seqs[0].prompt_logprobs
    if delta and request.sent_prompt_logprobs:
        prompt_logprobs = None
    request.sent_prompt_logprobs = True
    return RequestOutput(
        request_id=request.request_id,
        prompt=request.prompt,
        prompt_token_ids=request.prompt_token_ids,
        prompt_logprobs=prompt_logprobs,
        outputs=outputs,
        finished=finished,
        metrics=request.metrics,
        num_cached_tokens=request.seqs[0].num_cached_tokens,
    )


def completion(seq: Sequence, delta: bool) -> CompletionOutput:
    """The sample so far (or, with delta, what is new since the last report); stop-string prefixes held back."""
    text = seq.detok.text
    visible = len(text) if seq.is_finished else max(0, len(text) - seq.params.output_text_buffer_length)
    start_char, start_tok = (seq.num_sent_chars, seq.num_sent_tokens) if delta else (0, 0)
    visible = max(visible, start_char)
    out_ids = seq.output_token_ids
    seq.num_sent_chars, seq.num_sent_tokens = visible, len(out_ids)
    return CompletionOutput(
        index=seq.index,
        text=text[start_char:visible],
        token_ids=out_ids[start_tok:],
        cumulative_logprob=seq.cumulative_logprob if seq.logprobs is not None else None,
        logprobs=seq.logprobs[start_tok:] if seq.logprobs is not None else None,
        finish_reason=seq.finish_reason,
        stop_reason=seq.stop_reason,
    )
