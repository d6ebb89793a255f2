"""A request's structured-output fields -> one StructuredOutputsParams: OpenAI's response_format, vLLM's
structured_outputs object, and the guided_* fields vLLM took before v0.12 (older clients still send them)."""

from __future__ import annotations

import json
from typing import Any

from slimquant.entrypoints.openai.protocol import OpenAIError, SamplingFields
from slimquant.errors import ParamError
from slimquant.sampling_params import StructuredOutputsParams

_GUIDED = {"guided_json": "json", "guided_regex": "regex", "guided_choice": "choice", "guided_grammar": "grammar"}


def structured_outputs(
    req: SamplingFields, forced: StructuredOutputsParams | None = None
) -> StructuredOutputsParams | None:
    """The request's one constraint (forced: a tool call's, which admits no other); OpenAIError for a field that
    is malformed or a second constraint."""
    given = {name: value for name, value in _sources(req).items() if value is not None}
    if forced is not None:
        given["tool_choice"] = forced
    if len(given) > 1:
        raise OpenAIError(f"give one structured output, not {' and '.join(sorted(given))}", param=sorted(given)[-1])
    if not given:
        return None
    ((name, value),) = given.items()
    if isinstance(value, StructuredOutputsParams):
        return value
    try:
        return StructuredOutputsParams.from_dict(value)
    except ParamError as e:
        raise OpenAIError(str(e).replace("structured_outputs", name, 1), param=name) from None


def _sources(req: SamplingFields) -> dict[str, Any]:
    """Each field that can hold a constraint, as a structured_outputs object (None where unset or plain text)."""
    sources: dict[str, Any] = {"structured_outputs": req.structured_outputs}
    sources["response_format"] = _response_format(req.response_format)
    guided = {key: getattr(req, field) for field, key in _GUIDED.items() if getattr(req, field) is not None}
    if guided or req.guided_whitespace_pattern is not None:
        sources["guided_*"] = guided | {"whitespace_pattern": req.guided_whitespace_pattern}
    return sources


def _response_format(fmt: dict[str, Any] | None) -> dict[str, Any] | None:
    """OpenAI's response_format (text, json_object, json_schema) or vLLM's structural_tag one."""
    kind = None if fmt is None else fmt.get("type")
    if fmt is None or kind == "text":
        return None
    if kind == "json_object":
        return {"json_object": True}
    if kind == "json_schema":
        spec = fmt.get("json_schema")
        if not isinstance(spec, dict):
            raise OpenAIError("response_format json_schema needs a 'json_schema' object", param="response_format")
        schema = spec.get("schema")
        return {"json_object": True} if schema is None else {"json": schema}
    if kind == "structural_tag":
        return {"structural_tag": json.dumps(fmt)}
    raise OpenAIError(
        f"response_format type {kind!r} is not one of 'text', 'json_object', 'json_schema', 'structural_tag'",
        param="response_format",
    )
