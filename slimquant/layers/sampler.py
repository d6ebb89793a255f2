"""Token sampling over a batch of logits rows: constraints, penalties, temperature, min-p, top-k/top-p, logprobs.

Order follows vLLM V1: logprobs are taken from the raw logits; then allowed tokens / logit bias / min_tokens
masks, penalties, greedy argmax or temperature -> min-p -> top-k/top-p -> a draw with each row's generator.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

SAMPLING_EPS = 1e-5
TopLogprobs = list[tuple[int, float, int]]  # (token id, logprob, rank); the chosen token first


@dataclass
class SamplingBatch:
    """Per-row sampling settings; lists are one entry per logits row."""

    temperature: torch.Tensor  # [N] float32, 0 = greedy
    top_k: torch.Tensor  # [N] int64, <= 0 = off
    top_p: torch.Tensor  # [N] float32
    min_p: torch.Tensor  # [N] float32
    presence_penalty: torch.Tensor  # [N] float32
    frequency_penalty: torch.Tensor  # [N] float32
    repetition_penalty: torch.Tensor  # [N] float32
    prompt_ids: list[list[int]]
    output_ids: list[list[int]]
    logit_bias: list[dict[int, float] | None]
    allowed_ids: list[list[int] | None]
    banned_ids: list[list[int]]  # e.g. EOS and stop tokens before min_tokens is reached
    grammars: list[Any]  # an xgrammar GrammarMatcher whose next-token mask applies (structured outputs), or None
    generators: list[torch.Generator | None]  # None = the sampler's shared generator
    num_logprobs: list[int | None]  # top logprobs to return (-1 = whole vocabulary)


@dataclass
class SamplerOutput:
    """Sampled token, its raw logprob and the requested top logprobs, per row."""

    token_ids: list[int]
    logprobs: list[float]
    top_logprobs: list[TopLogprobs | None]


class Sampler:
    """Samples one token per row of logits."""

    def __init__(self, generator: torch.Generator):
        self.generator = generator

    def __call__(self, logits: torch.Tensor, batch: SamplingBatch) -> SamplerOutput:
        """logits: [N, V] float32 -> one token per row."""
        raw = logits.float()  # [N, V]
        logits = apply_penalties(apply_constraints(raw, batch), batch)
        tokens = self.sample(logits, batch)  # [N]
        chosen = raw.gather(1, tokens[:, None])[:, 0] - torch.logsumexp(raw, dim=-1)  # the raw logprob
        if all(k is None for k in batch.num_logprobs):
            return SamplerOutput(tokens.tolist(), chosen.tolist(), [None] * len(tokens))
        top = top_logprobs(torch.log_softmax(raw, dim=-1), tokens, batch.num_logprobs)
        return SamplerOutput(tokens.tolist(), chosen.tolist(), top)

    @staticmethod
    def argmax(logits: torch.Tensor) -> SamplerOutput:
        """Greedy rows with no logprobs asked for: logits [N, V] -> the argmax; logprobs are not computed (0.0)."""
        return Sampler.unscored_output(logits.argmax(dim=-1).tolist())

    @staticmethod
    def unscored_output(tokens: list[int]) -> SamplerOutput:
        """The output of rows with no logprobs asked for (logprobs not computed: 0.0)."""
        return SamplerOutput(tokens, [0.0] * len(tokens), [None] * len(tokens))

    def sample(self, logits: torch.Tensor, batch: SamplingBatch) -> torch.Tensor:
        """logits: [N, V] processed -> [N] int64 tokens (argmax for greedy rows)."""
        greedy = batch.temperature < SAMPLING_EPS  # [N]
        if bool(greedy.all()):
            return logits.argmax(dim=-1)
        temperature = torch.where(greedy, torch.ones_like(batch.temperature), batch.temperature)
        scaled = apply_min_p(logits / temperature[:, None], batch.min_p)  # [N, V]
        ids, kept = top_k_top_p_candidates(scaled, batch.top_k, batch.top_p)  # [N, C] each (ids None: all of V)
        picked = self._draw(torch.softmax(kept, dim=-1), batch.generators)  # [N] positions in C
        sampled = picked if ids is None else ids.gather(1, picked[:, None])[:, 0]
        return torch.where(greedy, logits.argmax(dim=-1), sampled)

    def _draw(self, probs: torch.Tensor, generators: list[torch.Generator | None]) -> torch.Tensor:
        """One draw per row of probs [N, C] by inverse CDF (one uniform per row, from its own generator)."""
        cdf = probs.cumsum(dim=-1)  # [N, C]
        u = self._uniform(probs.shape[0], probs.device, generators) * cdf[:, -1]  # [N]
        picked = torch.searchsorted(cdf, u[:, None], right=True)[:, 0]  # first position whose cdf exceeds u
        last = probs.shape[1] - 1 - (probs > 0).flip(-1).to(torch.int32).argmax(dim=-1)  # [N] last possible token
        return torch.minimum(picked, last)  # u rounded up to the total: the last token with probability > 0

    def _uniform(self, n: int, device: torch.device, generators: list[torch.Generator | None]) -> torch.Tensor:
        """[N] uniforms in [0, 1); each row from its own generator where it has one, else the shared one."""
        if all(g is None for g in generators):
            return torch.rand(n, generator=self.generator, device=device)
        return torch.cat([torch.rand(1, generator=g or self.generator, device=device) for g in generators])


def apply_constraints(logits: torch.Tensor, batch: SamplingBatch) -> torch.Tensor:
    """Grammar masks, allowed-token masks, logit bias and banned tokens, row by row (on a copy, where any applies);
    a ban never leaves a row nothing to pick (a complete grammar allows only stop tokens). logits: [N, V]."""
    rows = list(zip(batch.allowed_ids, batch.logit_bias, batch.banned_ids, strict=True))
    grammars = any(g is not None for g in batch.grammars)
    if not grammars and all(allowed is None and not bias and not banned for allowed, bias, banned in rows):
        return logits
    logits = logits.clone()
    if grammars:
        apply_grammar_masks(logits, batch.grammars)
    for i, (allowed, bias, banned) in enumerate(rows):
        if allowed is not None:
            keep = torch.full_like(logits[i], float("-inf"))
            keep[allowed] = 0.0
            logits[i] += keep
        if bias:
            logits[i, list(bias)] += torch.tensor(list(bias.values()), dtype=logits.dtype, device=logits.device)
        if banned:
            kept = logits[i].index_fill(0, torch.tensor(banned, device=logits.device), float("-inf"))
            if bool(torch.isfinite(kept).any()):
                logits[i] = kept
    return logits


def apply_grammar_masks(logits: torch.Tensor, grammars: list[Any]) -> None:
    """Set to -inf, in place, the logits [N, V] of the tokens each row's grammar matcher does not allow next."""
    import xgrammar

    bitmask = xgrammar.allocate_token_bitmask(len(grammars), logits.shape[1])  # [N, ceil(V / 32)] all allowed
    for i, grammar in enumerate(grammars):
        if grammar is not None:
            grammar.fill_next_token_bitmask(bitmask, i)
    xgrammar.apply_token_bitmask_inplace(logits, bitmask.to(logits.device))


def token_counts(ids: list[list[int]], vocab_size: int, device: torch.device) -> torch.Tensor:
    """[N, V] float32 count of each token id in each row's list."""
    width = max((len(r) for r in ids), default=0)
    padded = torch.full((len(ids), width), vocab_size, dtype=torch.int64)  # pad with a dropped extra column
    for i, r in enumerate(ids):
        padded[i, : len(r)] = torch.tensor(r, dtype=torch.int64)
    counts = torch.zeros(len(ids), vocab_size + 1, device=device)
    counts.scatter_add_(1, padded.to(device), torch.ones(padded.shape, device=device))
    return counts[:, :vocab_size]


def apply_penalties(logits: torch.Tensor, batch: SamplingBatch) -> torch.Tensor:
    """vLLM penalties: repetition over prompt+output tokens, frequency and presence over output tokens."""
    rep, freq, pres = batch.repetition_penalty, batch.frequency_penalty, batch.presence_penalty
    if bool((rep == 1.0).all() and (freq == 0.0).all() and (pres == 0.0).all()):
        return logits
    counts = token_counts(batch.output_ids, logits.shape[1], logits.device)  # [N, V]
    seen = (counts > 0) | (token_counts(batch.prompt_ids, logits.shape[1], logits.device) > 0)
    rep = rep[:, None].expand_as(logits)
    logits = torch.where(seen, torch.where(logits > 0, logits / rep, logits * rep), logits)
    return logits - freq[:, None] * counts - pres[:, None] * (counts > 0).float()


def apply_min_p(logits: torch.Tensor, min_p: torch.Tensor) -> torch.Tensor:
    """Drop tokens whose probability is below min_p times the top probability. logits: [N, V]."""
    if not bool((min_p > 0).any()):
        return logits
    probs = torch.softmax(logits, dim=-1)
    threshold = probs.max(dim=-1, keepdim=True).values * min_p[:, None]
    return logits.masked_fill(probs < threshold, float("-inf"))


def apply_top_k_top_p(logits: torch.Tensor, top_k: torch.Tensor, top_p: torch.Tensor) -> torch.Tensor:
    """Keep each row's k most likely tokens, then the smallest set with probability >= p. logits: [N, V]."""
    vocab = logits.shape[1]
    k = torch.where((top_k <= 0) | (top_k > vocab), torch.full_like(top_k, vocab), top_k)  # [N]
    if bool((k == vocab).all() and (top_p >= 1.0).all()):
        return logits
    sorted_logits, order = logits.sort(dim=-1, descending=False)  # [N, V] ascending
    kth = sorted_logits.gather(1, (vocab - k)[:, None].to(order.device))  # [N, 1] k-th largest
    sorted_logits = sorted_logits.masked_fill(sorted_logits < kth, float("-inf"))
    cumulative = torch.softmax(sorted_logits, dim=-1).cumsum(dim=-1)
    drop = cumulative <= (1.0 - top_p[:, None])
    drop[:, -1] = False  # always keep the most likely token
    sorted_logits = sorted_logits.masked_fill(drop, float("-inf"))
    return torch.empty_like(logits).scatter_(1, order, sorted_logits)


def top_k_top_p_candidates(
    logits: torch.Tensor, top_k: torch.Tensor, top_p: torch.Tensor, width: int = 64
) -> tuple[torch.Tensor | None, torch.Tensor]:
    """apply_top_k_top_p without sorting the vocabulary: the k most likely tokens (torch.topk), then the nucleus
    within them, widening the window until it holds every row's nucleus. logits [N, V] -> (token ids [N, C] or
    None, their logits [N, C] with -inf where dropped); None and logits unchanged when no row filters."""
    vocab = logits.shape[1]
    k = torch.where((top_k <= 0) | (top_k > vocab), torch.full_like(top_k, vocab), top_k).to(logits.device)  # [N]
    nucleus = top_p < 1.0  # [N]
    if not bool(nucleus.any()) and bool((k == vocab).all()):
        return None, logits
    unfiltered = (k == vocab) & ~nucleus  # such a row in a mixed batch needs the whole vocabulary
    width = vocab if bool(unfiltered.any()) else min(vocab, max(width, int(k.masked_fill(k == vocab, 0).max())))
    while True:
        values, ids = logits.topk(width, dim=-1)  # [N, W] descending
        values = values.masked_fill(torch.arange(width, device=logits.device) >= k[:, None], float("-inf"))
        whole = torch.where(k <= width, torch.logsumexp(values, -1), torch.logsumexp(logits, -1))  # [N]
        probs = torch.exp(values - whole[:, None])  # [N, W] of the top-k-filtered distribution
        before = probs.cumsum(dim=-1) - probs  # mass of the more likely tokens
        p = top_p.to(logits.device)[:, None]
        drop = (before >= p) & nucleus.to(logits.device)[:, None]
        covered = (k <= width) | (probs.sum(dim=-1) >= p[:, 0])  # every row's kept tokens are in the window
        if width == vocab or bool(covered.all()):
            return ids, values.masked_fill(drop, float("-inf"))
        width = min(vocab, width * 4)


def top_logprobs(logprobs: torch.Tensor, chosen: torch.Tensor, ks: list[int | None]) -> list[TopLogprobs | None]:
    """For rows with k set: the chosen token (logprob, rank) followed by the k most likely others."""
    if all(k is None for k in ks):
        return [None] * len(ks)
    vocab = logprobs.shape[1]
    widths = [vocab if k == -1 else min(k, vocab) for k in ks if k is not None]
    values, ids = logprobs.topk(max(widths), dim=-1)  # [N, kmax]
    chosen_lp = logprobs.gather(1, chosen[:, None])  # [N, 1]
    ranks = ((logprobs > chosen_lp).sum(dim=-1) + 1).tolist()
    values, ids, chosen_lp, chosen = values.tolist(), ids.tolist(), chosen_lp[:, 0].tolist(), chosen.tolist()
    out: list[TopLogprobs | None] = []
    for i, k in enumerate(ks):
        if k is None:
            out.append(None)
            continue
        width = vocab if k == -1 else k
        pairs = zip(ids[i][:width], values[i][:width], strict=True)
        top = [(t, v, r + 1) for r, (t, v) in enumerate(pairs) if t != chosen[i]]
        out.append([(chosen[i], chosen_lp[i], ranks[i])] + top[:width])
    return out
