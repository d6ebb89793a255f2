"""What a step samples from its hidden rows, and how: the sampling policy between the model's head and the sampler.

Plain greedy rows need only each row's argmax, and rows that sample with top-k only need each row's top-k
candidates: a backend's head may compute those without the whole head (cpu-native screens with an int8 copy).
Everything else (logprobs, penalties, biases, allowed or banned tokens, prompt logprobs) takes full logits.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from slimquant.backends.base import LogitsHead
from slimquant.engine.sequence import Sequence
from slimquant.layers.sampler import SAMPLING_EPS, Sampler, SamplerOutput, SamplingBatch, TopLogprobs, top_logprobs
from slimquant.sampling_params import SamplingParams

PromptScores = tuple[Sequence, list[TopLogprobs]]  # a sequence and its next prompt tokens' logprobs
PromptRows = tuple[Sequence, list[int]]  # a sequence and the packed rows that score its prompt tokens


@dataclass
class LogitRows:
    """Which packed rows need logits: each sampling sequence's last token, and rows that score prompt tokens."""

    sample_rows: list[int] = field(default_factory=list)  # [S]
    sample_seqs: list[Sequence] = field(default_factory=list)  # [S]
    prompt_rows: list[PromptRows] = field(default_factory=list)

    def add(self, seq: Sequence, start: int, end: int, row0: int) -> None:
        """seq runs positions [start, end) at packed rows row0 ...; note the rows it needs logits for."""
        if end == seq.num_tokens:
            self.sample_rows.append(row0 + end - start - 1)
            self.sample_seqs.append(seq)
        if seq.needs_prompt_logprobs:
            first = max(start, len(seq.prompt_logprobs) - 1)  # row at position p scores prompt token p + 1
            last = min(end, seq.num_prompt_tokens - 1)
            self.prompt_rows.append((seq, [row0 + p - start for p in range(first, last)]))

    def greedy(self) -> bool:
        """Whether there are rows to sample and all are plain greedy."""
        return bool(self.sample_seqs) and all(plain_greedy(s) for s in self.sample_seqs)

    def argmax_only(self) -> bool:
        """Whether the step needs only each sampled row's argmax: plain greedy rows, no prompt rows to score."""
        return not self.prompt_rows and self.greedy()

    def indices(self) -> list[int]:
        """Rows to compute logits for: sampling rows first, then prompt-scoring rows."""
        return self.sample_rows + [r for _, rows in self.prompt_rows for r in rows]

    def renumbered(self) -> LogitRows:
        """The same rows numbered as they come in indices(): 0 .. n-1."""
        out, n = LogitRows(list(range(len(self.sample_rows))), self.sample_seqs), len(self.sample_rows)
        for seq, rows in self.prompt_rows:
            out.prompt_rows.append((seq, list(range(n, n + len(rows)))))
            n += len(rows)
        return out


@dataclass
class StepResult:
    """Sampled tokens of the sequences that reached their end, and new prompt logprobs."""

    seqs: list[Sequence]
    sampled: SamplerOutput | None
    prompt_logprobs: list[PromptScores]


class StepSampler:
    """Samples a step's tokens (and prompt logprobs) from its hidden rows with the fewest head computations."""

    def __init__(self, head: LogitsHead, sampler: Sampler, device: torch.device):
        self.head, self.sampler, self.device = head, sampler, device

    def sample(self, hidden: torch.Tensor, rows: LogitRows) -> StepResult:
        """hidden [T, H] of the step -> the tokens of the sequences that reached their end, and prompt logprobs."""
        if rows.argmax_only():  # a screen may skip most of the head
            tokens = self.head.argmax(rows_at(hidden, rows.sample_rows))
            return StepResult(rows.sample_seqs, Sampler.unscored_output(tokens), [])
        if (screened := self._sample_top_k(hidden, rows)) is not None:
            return screened
        logits = self._logits(hidden, rows.indices())  # [S + P, V] float32, or None
        sampled = None
        if rows.greedy():
            sampled = Sampler.argmax(logits[: len(rows.sample_rows)])
        elif rows.sample_seqs:
            sampled = self.sampler(logits[: len(rows.sample_rows)], self.sampling_batch(rows.sample_seqs))
        return StepResult(rows.sample_seqs, sampled, self._prompt_logprobs(rows, logits))

    def sample_logits(self, logits: torch.Tensor | None, rows: LogitRows) -> StepResult:
        """As sample, from the logits of rows.indices() [S + P, V] computed already (a head split over ranks)."""
        return StepSampler(GivenLogits(), self.sampler, self.device).sample(logits, rows.renumbered())

    def _sample_top_k(self, hidden: torch.Tensor, rows: LogitRows) -> StepResult | None:
        """Top-k sampling among the head screen's candidates (backends/greedy_screen.py) where each sampled row needs
        only its top-k logits; None where that does not apply."""
        top_k = plain_top_k(rows.sample_seqs)
        if top_k is None or rows.prompt_rows:
            return None
        if not self.head.screens(top_k):
            return None
        ids, logits = self.head.top_k(rows_at(hidden, rows.sample_rows), top_k)  # [S, C] each
        picked = self.sampler.sample(logits, self.sampling_batch(rows.sample_seqs))  # [S] positions in C
        return StepResult(rows.sample_seqs, Sampler.unscored_output(ids.gather(1, picked[:, None])[:, 0].tolist()), [])

    def _logits(self, hidden: torch.Tensor, indices: list[int]) -> torch.Tensor | None:
        """Logits of the hidden rows at indices."""
        return self.head.logits(rows_at(hidden, indices)) if indices else None

    def sampling_batch(self, seqs: list[Sequence]) -> SamplingBatch:
        """Per-row sampling settings of the sequences being sampled."""
        params = [s.params for s in seqs]

        def column(name: str, dtype: torch.dtype = torch.float32) -> torch.Tensor:
            return self._tensor([getattr(p, name) for p in params], dtype)

        return SamplingBatch(
            temperature=column("temperature"),
            top_k=column("top_k", torch.int64),
            top_p=column("top_p"),
            min_p=column("min_p"),
            presence_penalty=column("presence_penalty"),
            frequency_penalty=column("frequency_penalty"),
            repetition_penalty=column("repetition_penalty"),
            prompt_ids=[s.token_ids[: s.num_prompt_tokens] if penalized(s.params) else [] for s in seqs],
            output_ids=[s.output_token_ids if penalized(s.params) else [] for s in seqs],
            logit_bias=[p.logit_bias for p in params],
            allowed_ids=[p.allowed_token_ids for p in params],
            banned_ids=[_banned(s) for s in seqs],
            grammars=[s.grammar for s in seqs],
            generators=[s.generator for s in seqs],
            num_logprobs=[p.logprobs for p in params],
        )

    def _prompt_logprobs(self, rows: LogitRows, logits: torch.Tensor | None) -> list[PromptScores]:
        """Logprobs of the prompt tokens scored this step, per sequence."""
        out, offset = [], len(rows.sample_rows)
        for seq, prompt_rows in rows.prompt_rows:
            n = len(prompt_rows)
            if n:
                first = len(seq.prompt_logprobs)  # prompt token index scored by the first row
                targets = self._tensor(seq.token_ids[first : first + n], torch.int64)
                raw = torch.log_softmax(logits[offset : offset + n], dim=-1)  # [n, V]
                out.append((seq, top_logprobs(raw, targets, [seq.params.prompt_logprobs] * n)))
            offset += n
        return out

    def _tensor(self, data: list, dtype: torch.dtype) -> torch.Tensor:
        return torch.tensor(data, dtype=dtype, device=self.device)


class GivenLogits(LogitsHead):
    """A head whose input rows are their logits already."""

    def __init__(self):
        super().__init__(None)

    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        return hidden


def rows_at(hidden: torch.Tensor, indices: list[int]) -> torch.Tensor:
    """hidden [T, H] -> the rows at indices (a plain slice when they are 0 .. n-1, as in decode)."""
    if indices == list(range(len(indices))):
        return hidden[: len(indices)]
    return hidden[torch.tensor(indices, dtype=torch.long, device=hidden.device)]


def _banned(seq: Sequence) -> list[int]:
    """Tokens seq may not sample now: its stop tokens before min_tokens, and those that would complete a bad word."""
    stops = sorted(seq.stop_ids) if seq.num_output_tokens < seq.params.min_tokens else []
    words = seq.request.bad_word_ids
    return stops + banned_after(seq.output_token_ids, words) if words else stops


def banned_after(output_ids: list[int], words: list[list[int]]) -> list[int]:
    """The tokens that would complete a bad word after output_ids: each word's last token where the output ends with
    the rest of it."""
    return sorted({w[-1] for w in words if len(w) == 1 or output_ids[len(output_ids) - len(w) + 1 :] == w[:-1]})


def plain_greedy(seq: Sequence) -> bool:
    """Greedy with nothing to apply or report (no logprobs, penalties, biases, grammar, allowed or banned tokens):
    argmax."""
    return seq.params.temperature < SAMPLING_EPS and plain_logits(seq)


def plain_logits(seq: Sequence) -> bool:
    """The row's raw logits decide alone: no logprobs to report, no penalties, biases, grammar, allowed or banned
    tokens."""
    p = seq.params
    return (
        seq.grammar is None
        and p.logprobs is None
        and not penalized(p)
        and not p.logit_bias
        and p.allowed_token_ids is None
        and not p.bad_words
        and seq.num_output_tokens >= p.min_tokens
    )


def plain_top_k(seqs: list[Sequence]) -> int | None:
    """The largest top_k of sampling rows that need only their top-k logits (top-k sampling with nothing else to
    apply or report, as plain_greedy), or None where a row needs more or there are none."""
    if not seqs:
        return None
    ks = [s.params.top_k for s in seqs]
    return max(ks) if all(plain_logits(s) for s in seqs) and all(k > 0 for k in ks) else None


def penalized(params: SamplingParams) -> bool:
    """Whether any penalty applies (then the sampler needs the token history)."""
    return params.repetition_penalty != 1.0 or params.frequency_penalty != 0.0 or params.presence_penalty != 0.0
