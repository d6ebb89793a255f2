"""Incremental detokenization (no partial UTF-8 characters mid-stream) and stop-string search."""

from __future__ import annotations

from slimquant.sampling_params import SamplingParams

PROMPT_CONTEXT_TOKENS = 5  # prompt tokens decoded along with the output, so leading spaces/merges come out right
REPLACEMENT_CHAR = "\ufffd"  # what a decoder emits for an incomplete UTF-8 sequence


class IncrementalDetokenizer:
    """Turns a growing list of token ids into text, emitting characters only once they are complete."""

    def __init__(self, tokenizer, prompt_token_ids: list[int], params: SamplingParams):
        self.tokenizer = tokenizer
        self.enabled = params.detokenize
        self.skip_special_tokens = params.skip_special_tokens
        self.ids = list(prompt_token_ids[-PROMPT_CONTEXT_TOKENS:])
        self.prefix_offset = 0  # ids[prefix_offset:read_offset] is context already turned into text
        self.read_offset = len(self.ids)
        self.text = ""

    def add(self, token_id: int) -> int:
        """Append one token; returns how many characters were added to self.text."""
        if not self.enabled:
            return 0
        self.ids.append(token_id)
        return self._emit(final=False)

    def flush(self) -> int:
        """Emit whatever is pending, even an incomplete character (the sequence has ended)."""
        return self._emit(final=True) if self.enabled and self.read_offset < len(self.ids) else 0

    def _emit(self, final: bool) -> int:
        prefix = self._decode(self.ids[self.prefix_offset : self.read_offset])
        full = self._decode(self.ids[self.prefix_offset :])
        if len(full) <= len(prefix) or (full.endswith(REPLACEMENT_CHAR) and not final):
            return 0
        new = full[len(prefix) :]
        self.text += new
        self.prefix_offset, self.read_offset = self.read_offset, len(self.ids)
        return len(new)

    def _decode(self, ids: list[int]) -> str:
        return self.tokenizer.decode(ids, skip_special_tokens=self.skip_special_tokens) if ids else ""


def find_stop_string(text: str, num_new_chars: int, stops: list[str], include: bool) -> tuple[str, int] | None:
    """The earliest stop string that ends inside the new characters, and where to cut the text; else None."""
    best: tuple[str, int, int] | None = None
    for stop in stops:
        start = max(0, len(text) - num_new_chars - len(stop) + 1)
        index = text.find(stop, start)
        if index != -1 and (best is None or index < best[1]):
            best = (stop, index, index + len(stop) if include else index)
    return None if best is None else (best[0], best[2])


class TokenTexts:
    """Text of single tokens (for Logprob.decoded_token), cached."""

    def __init__(self, tokenizer):
        self.tokenizer = tokenizer
        self.cache: dict[int, str] = {}

    def __call__(self, token_id: int) -> str:
        text = self.cache.get(token_id)
        if text is None:
            text = self.cache[token_id] = self.tokenizer.decode([token_id])
        return text
