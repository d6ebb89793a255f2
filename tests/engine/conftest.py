"""Engine test fixtures: a tiny llama checkpoint, its transformers reference model, and an LLM over it."""

from __future__ import annotations

import pytest
import torch


@pytest.fixture(scope="session")
def llama_path(tiny_model):
    """A random tiny llama folder (float32)."""
    return tiny_model("llama")


@pytest.fixture(scope="session")
def hf_model(llama_path):
    """transformers' own model for the same checkpoint: the float reference."""
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(llama_path, dtype=torch.float32).eval()


@pytest.fixture(scope="session")
def llm(llama_path):
    """An LLM over the tiny llama with a roomy KV cache."""
    from slimquant import LLM

    return LLM(str(llama_path), max_model_len=256, num_kv_blocks=128)


@pytest.fixture(scope="session")
def tokenizer(llm):
    return llm.get_tokenizer()


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
