"""SamplingParams: vLLM's per-request sampling settings, fields, defaults and checks."""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass, fields
from enum import IntEnum
from typing import Any, ClassVar

from slimquant.errors import ParamError

logger = logging.getLogger(__name__)

SAMPLING_EPS = 1e-5  # temperature below this is greedy


class RequestOutputKind(IntEnum):
    """What step() reports for a request: everything so far, only the new part, or only the final output."""

    CUMULATIVE = 0
    DELTA = 1
    FINAL_ONLY = 2


@dataclass
class StructuredOutputsParams:
    """One constraint on a request's output, as vLLM's: a JSON schema, any JSON object, a regex, one of some
    choices, a grammar (xgrammar's EBNF, or Lark) or an xgrammar structural tag."""

    json: str | dict | None = None
    regex: str | None = None
    choice: list[str] | None = None
    grammar: str | None = None
    json_object: bool | None = None
    structural_tag: str | None = None
    disable_any_whitespace: bool = False  # JSON without whitespace between its tokens
    disable_additional_properties: bool = False  # objects of a json schema get no properties it does not name
    disable_fallback: bool = False  # accepted for vLLM's clients: xgrammar is the only backend, there is no fallback
    whitespace_pattern: str | None = None

    CONSTRAINTS: ClassVar[tuple[str, ...]] = ("json", "regex", "choice", "grammar", "json_object", "structural_tag")

    def __post_init__(self) -> None:
        given = self._given()
        if len(given) != 1:
            raise ParamError(
                "structured_outputs",
                f"structured_outputs needs exactly one of {', '.join(self.CONSTRAINTS)}; got {given or 'none'}",
            )
        if self.whitespace_pattern is not None:
            raise ParamError(
                "structured_outputs",
                "whitespace_pattern is not supported by xgrammar; use disable_any_whitespace for compact JSON",
            )
        if self.choice is not None and not (self.choice and all(isinstance(c, str) and c for c in self.choice)):
            raise ParamError("structured_outputs", f"choice must be a list of non-empty strings, got {self.choice!r}")
        if hasattr(self.json, "model_json_schema"):  # a pydantic model class
            self.json = self.json.model_json_schema()
        if isinstance(self.json, str):
            try:
                self.json = json.loads(self.json)
            except ValueError as e:
                raise ParamError("structured_outputs", f"the json schema is not valid JSON: {e}") from None

    @property
    def constraint(self) -> str:
        """The name of the one constraint set (json, regex, choice, grammar, json_object or structural_tag)."""
        (name,) = self._given()
        return name

    def _given(self) -> list[str]:
        return [name for name in self.CONSTRAINTS if getattr(self, name) not in (None, False)]

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> StructuredOutputsParams:
        """From a request's structured_outputs object; ParamError naming a field this does not know."""
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise ParamError("structured_outputs", f"structured_outputs has unknown fields {unknown}")
        return cls(**data)


@dataclass
class SamplingParams:
    """Sampling settings of one request (vLLM field names and defaults)."""

    n: int = 1
    best_of: int | None = None
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    repetition_penalty: float = 1.0
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0
    min_p: float = 0.0
    seed: int | None = None
    stop: str | list[str] | None = None
    stop_token_ids: list[int] | None = None
    ignore_eos: bool = False
    max_tokens: int | None = 16
    min_tokens: int = 0
    logprobs: int | None = None
    prompt_logprobs: int | None = None
    detokenize: bool = True
    skip_special_tokens: bool = True
    spaces_between_special_tokens: bool = True
    include_stop_str_in_output: bool = False
    logit_bias: dict[int, float] | None = None
    allowed_token_ids: list[int] | None = None
    bad_words: list[str] | None = None  # words never generated (their last token is banned after the others)
    truncate_prompt_tokens: int | None = None
    structured_outputs: StructuredOutputsParams | None = None
    output_kind: RequestOutputKind = RequestOutputKind.CUMULATIVE

    def __post_init__(self) -> None:
        if self.stop is None:
            self.stop = []
        elif isinstance(self.stop, str):
            self.stop = [self.stop]
        else:
            self.stop = list(self.stop)
        self.stop_token_ids = [int(t) for t in self.stop_token_ids or []]
        if self.logit_bias is not None:
            self.logit_bias = {int(k): max(-100.0, min(100.0, float(v))) for k, v in self.logit_bias.items()}
        if isinstance(self.structured_outputs, dict):
            self.structured_outputs = StructuredOutputsParams.from_dict(self.structured_outputs)
        self._verify()
        if self.best_of is not None and self.best_of > self.n:
            logger.warning("best_of=%d is ignored: slimquant returns the n=%d samples", self.best_of, self.n)
        if self.temperature < SAMPLING_EPS:
            self.top_p, self.top_k, self.min_p = 1.0, 0, 0.0
            _require(self.n == 1, "n", self.n, "must be 1 when using greedy sampling (temperature=0)")

    @property
    def sampling_type_greedy(self) -> bool:
        """True when temperature is 0: argmax decoding."""
        return self.temperature < SAMPLING_EPS

    @property
    def output_text_buffer_length(self) -> int:
        """Characters held back while streaming, since they may start a stop string."""
        if not self.stop or self.include_stop_str_in_output:
            return 0
        return max(len(s) for s in self.stop) - 1

    def _verify(self) -> None:
        _require(self.n >= 1, "n", self.n, "must be at least 1")
        _require(self.best_of is None or self.best_of >= self.n, "best_of", self.best_of, "must be >= n")
        _require(-2.0 <= self.presence_penalty <= 2.0, "presence_penalty", self.presence_penalty, "must be in [-2, 2]")
        _require(
            -2.0 <= self.frequency_penalty <= 2.0, "frequency_penalty", self.frequency_penalty, "must be in [-2, 2]"
        )
        _require(self.repetition_penalty > 0.0, "repetition_penalty", self.repetition_penalty, "must be > 0")
        _require(self.temperature >= 0.0, "temperature", self.temperature, "must be non-negative")
        _require(0.0 < self.top_p <= 1.0, "top_p", self.top_p, "must be in (0, 1]")
        _require(self.top_k >= -1, "top_k", self.top_k, "must be 0 or -1 (disable), or at least 1")
        _require(0.0 <= self.min_p <= 1.0, "min_p", self.min_p, "must be in [0, 1]")
        _require(self.max_tokens is None or self.max_tokens >= 1, "max_tokens", self.max_tokens, "must be at least 1")
        _require(self.min_tokens >= 0, "min_tokens", self.min_tokens, "must be non-negative")
        if self.max_tokens is not None:
            _require(self.min_tokens <= self.max_tokens, "min_tokens", self.min_tokens, "must be <= max_tokens")
        for name in ("logprobs", "prompt_logprobs"):
            value = getattr(self, name)
            _require(value is None or value >= -1, name, value, "must be non-negative (or -1 for all)")
        _require(all(self.stop), "stop", self.stop, "cannot contain an empty string")
        _require(self.detokenize or not self.stop, "stop", self.stop, "needs detokenize=True")
        trunc = self.truncate_prompt_tokens
        ok = trunc is None or trunc >= 1 or trunc == -1
        _require(ok, "truncate_prompt_tokens", trunc, "must be at least 1, or -1 (the model's context)")
        allowed = self.allowed_token_ids
        _require(allowed is None or len(allowed) > 0, "allowed_token_ids", allowed, "must not be empty")
        bad = self.bad_words
        ok = bad is None or (isinstance(bad, list) and all(isinstance(w, str) and w.strip() for w in bad))
        _require(ok, "bad_words", bad, "must be a list of words (non-empty strings)")


def _require(ok: bool, name: str, value: object, why: str) -> None:
    if not ok:
        raise ParamError(name, f"{name} {why}, got {value!r}.")
