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
