"""LLM: vLLM's offline API (generate / chat) over the slimquant engine."""

from __future__ import annotations

import dataclasses
import itertools
from collections.abc import Sequence as Seq
from typing import Any

from tqdm.auto import tqdm

from slimquant.engine.inputs import PromptType
from slimquant.engine.llm_engine import LLMEngine
from slimquant.entrypoints import chat_messages
from slimquant.outputs import RequestOutput
from slimquant.sampling_params import RequestOutputKind, SamplingParams

Conversation = list[dict[str, Any]]


class LLM:
    """An offline LLM: `LLM(model).generate(prompts, SamplingParams(...))`, like vLLM."""

    def __init__(
        self,
        model: str,
        tokenizer: str | None = None,
        dtype: str = "auto",
        quantization: str | None = None,
        max_model_len: int | None = None,
        trust_remote_code: bool = False,
        seed: int = 0,
        **kwargs: Any,
    ):
        self.llm_engine = LLMEngine.from_kwargs(
            model,
            tokenizer=tokenizer,
            dtype=dtype,
            quantization=quantization,
            max_model_len=max_model_len,
            trust_remote_code=trust_remote_code,
            seed=seed,
            **kwargs,
        )
        self._ids = itertools.count()

    def get_tokenizer(self):
        """The tokenizer prompts are encoded with."""
        return self.llm_engine.get_tokenizer()

    def get_default_sampling_params(self) -> SamplingParams:
        """SamplingParams with the model's generation_config.json defaults."""
        return self.llm_engine.default_sampling_params()

    def generate(
        self,
        prompts: PromptType | Seq[PromptType],
        sampling_params: SamplingParams | Seq[SamplingParams] | None = None,
        use_tqdm: bool = True,
    ) -> list[RequestOutput]:
        """Complete every prompt; outputs come back in input order."""
        return self._run(_as_prompt_list(prompts), sampling_params, use_tqdm)

    def chat(
        self,
        messages: Conversation | list[Conversation],
        sampling_params: SamplingParams | Seq[SamplingParams] | None = None,
        use_tqdm: bool = True,
        chat_template: str | None = None,
        add_generation_prompt: bool = True,
        continue_final_message: bool = False,
        tools: list[dict[str, Any]] | None = None,
        chat_template_kwargs: dict[str, Any] | None = None,
    ) -> list[RequestOutput]:
        """Answer one conversation or a list of them, rendered with the tokenizer's chat template (OpenAI's content
        parts joined into one text, as the server does)."""
        conversations = [messages] if messages and isinstance(messages[0], dict) else list(messages)
        options = dict(
            chat_template=chat_template,
            add_generation_prompt=add_generation_prompt,
            continue_final_message=continue_final_message,
            tools=tools,
            chat_template_kwargs=chat_template_kwargs,
        )
        prompts = [chat_messages.prompt(self.get_tokenizer(), conv, **options) for conv in conversations]
        return self._run(prompts, sampling_params, use_tqdm)

    def _run(self, prompts: list[PromptType], sampling_params, use_tqdm: bool) -> list[RequestOutput]:
        params = self._params_list(sampling_params, len(prompts))
        engine, ids = self.llm_engine, []
        try:
            for prompt, p in zip(prompts, params, strict=True):
                ids.append(str(next(self._ids)))
                engine.add_request(ids[-1], prompt, dataclasses.replace(p, output_kind=RequestOutputKind.FINAL_ONLY))
            return self._drain(ids, use_tqdm and engine.tp.rank == 0)  # one progress bar for all ranks
        except BaseException:
            engine.abort_request(ids)
            raise

    def _params_list(self, sampling_params, n: int) -> list[SamplingParams]:
        if sampling_params is None:
            return [self.get_default_sampling_params()] * n
        if isinstance(sampling_params, SamplingParams):
            return [sampling_params] * n
        if len(sampling_params) != n:
            raise ValueError(f"got {n} prompts but {len(sampling_params)} sampling_params: the lengths must match")
        return list(sampling_params)

    def _drain(self, ids: list[str], use_tqdm: bool) -> list[RequestOutput]:
        done: dict[str, RequestOutput] = {}
        with tqdm(total=len(ids), desc="Processed prompts", disable=not use_tqdm) as bar:
            while self.llm_engine.has_unfinished_requests():
                for out in self.llm_engine.step():
                    if out.finished:
                        done[out.request_id] = out
                        bar.update(1)
        return [done[i] for i in ids]


def _as_prompt_list(prompts) -> list[PromptType]:
    """One prompt (text, token ids, dict) or a list of them -> a list."""
    if isinstance(prompts, (str, dict)):
        return [prompts]
    prompts = list(prompts)
    if prompts and all(isinstance(t, int) for t in prompts):
        return [prompts]
    return prompts
