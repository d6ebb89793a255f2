"""Structured outputs with xgrammar (vLLM's default backend): a request's constraint compiles to a grammar, each of
its sequences walks the grammar with a matcher, and each step's matchers give the token masks the sampler applies.

The tokenizer's tables are built and the grammars compiled on first use (xgrammar caches compiled grammars), so an
engine that never sees a constraint never pays for them.
"""

from __future__ import annotations

import json
import re
from typing import TYPE_CHECKING

from slimquant.errors import ParamError
from slimquant.sampling_params import StructuredOutputsParams

if TYPE_CHECKING:
    import xgrammar

_XGRAMMAR_PREFIX = re.compile(r"^\[[0-9:]+\] \S+:\d+: ")  # "[23:00:37] /project/cpp/x.cc:94: " before a reason


class Grammars:
    """Compiles requests' constraints for one tokenizer and model vocabulary, and makes their matchers."""

    def __init__(self, tokenizer, vocab_size: int, stop_token_ids: frozenset[int]):
        self.tokenizer, self.vocab_size, self.stop_token_ids = tokenizer, vocab_size, sorted(stop_token_ids)
        self._compiler: xgrammar.GrammarCompiler | None = None

    def matchers(self, params: StructuredOutputsParams, n: int) -> list[xgrammar.GrammarMatcher]:
        """n fresh matchers of the constraint (one per sample); ParamError with xgrammar's reason when it does not
        compile."""
        import xgrammar

        compiled = self.compile(params)
        return [xgrammar.GrammarMatcher(compiled) for _ in range(n)]

    def compile(self, params: StructuredOutputsParams) -> xgrammar.CompiledGrammar:
        """The constraint's grammar, compiled (or from xgrammar's cache: a server compiles off its event loop first,
        so that adding the request finds it there); ParamError with xgrammar's reason when it does not compile.
        Thread-safe."""
        try:
            return self._compile(params)
        except (RuntimeError, ValueError, TypeError, KeyError) as e:  # xgrammar's (its own types derive from these)
            raise ParamError("structured_outputs", f"the {_kind(params)} does not compile: {_reason(e)}") from None

    def _compile(self, p: StructuredOutputsParams) -> xgrammar.CompiledGrammar:
        compiler = self.compiler
        if p.json is not None:
            schema = p.json
            if p.disable_additional_properties:
                schema = _no_additional_properties(schema)
            return compiler.compile_json_schema(json.dumps(schema), any_whitespace=not p.disable_any_whitespace)
        if p.json_object:  # OpenAI's JSON mode: an object
            return compiler.compile_json_schema('{"type": "object"}', any_whitespace=not p.disable_any_whitespace)
        if p.regex is not None:
            return compiler.compile_regex(p.regex)
        if p.choice is not None:  # EBNF string literals take JSON's escapes
            return compiler.compile_grammar("root ::= " + " | ".join(json.dumps(c) for c in p.choice))
        if p.grammar is not None:
            return compiler.compile_grammar(p.grammar) if "::=" in p.grammar else compiler.compile_lark(p.grammar)
        assert p.structural_tag is not None, "StructuredOutputsParams checks that one constraint is set"
        return compiler.compile_structural_tag(_structural_tag(p.structural_tag))

    @property
    def compiler(self) -> xgrammar.GrammarCompiler:
        """The grammar compiler over this tokenizer, built on first use."""
        if self._compiler is None:
            import xgrammar

            info = xgrammar.TokenizerInfo.from_huggingface(
                self.tokenizer, vocab_size=self.vocab_size, stop_token_ids=self.stop_token_ids
            )
            self._compiler = xgrammar.GrammarCompiler(info)
        return self._compiler


def _structural_tag(text: str) -> str:
    """xgrammar's structural tag JSON, from itself or from vLLM's older form ({"structures": [{"begin", "schema",
    "end"}], "triggers": [...]})."""
    import xgrammar

    tag = json.loads(text)
    if not isinstance(tag, dict) or "structures" not in tag:
        return text
    items = [xgrammar.StructuralTagItem(begin=s["begin"], schema=s["schema"], end=s["end"]) for s in tag["structures"]]
    return xgrammar.StructuralTag.from_legacy_structural_tag(items, tag["triggers"]).model_dump_json()


def _no_additional_properties(schema: object) -> object:
    """The schema with "additionalProperties": false on each object that does not say otherwise."""
    if isinstance(schema, list):
        return [_no_additional_properties(s) for s in schema]
    if not isinstance(schema, dict):
        return schema
    out = {k: _no_additional_properties(v) for k, v in schema.items()}
    if out.get("type") == "object" or "properties" in out:
        out.setdefault("additionalProperties", False)
    return out


def _kind(p: StructuredOutputsParams) -> str:
    names = {"json": "json schema", "json_object": "json grammar", "choice": "choice list"}
    return names.get(p.constraint, p.constraint)


def _reason(error: Exception) -> str:
    """xgrammar's message without its time and source location."""
    return _XGRAMMAR_PREFIX.sub("", str(error).strip())
