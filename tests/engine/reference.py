"""Naive transformers references for engine tests (full recompute, no KV cache)."""

from __future__ import annotations

import torch


def hf_greedy(hf_model, prompt_ids: list[int], n: int) -> list[int]:
    """Naive greedy decoding: full recompute and argmax at every step."""
    ids = list(prompt_ids)
    with torch.no_grad():
        for _ in range(n):
            logits = hf_model(torch.tensor([ids])).logits[0, -1]
            ids.append(int(logits.argmax()))
    return ids[len(prompt_ids) :]


def hf_logprobs(hf_model, ids: list[int]) -> torch.Tensor:
    """[len(ids), V] log_softmax of transformers' logits at every position."""
    with torch.no_grad():
        return torch.log_softmax(hf_model(torch.tensor([ids])).logits[0].float(), dim=-1)


def tokens_and_logprobs(outputs) -> list[tuple[list[int], list[float]]]:
    """(token ids, logprob of each chosen token) of each RequestOutput's first completion (logprobs=0 asked)."""
    return [
        (list(o.outputs[0].token_ids), [next(iter(d.values())).logprob for d in o.outputs[0].logprobs]) for o in outputs
    ]
