"""The llama.cpp row of `slimquant bench`, through llama-cpp-python's C API (optional: only when it is installed;
dev tooling for the comparison tables, not part of the library's API).

bench.py times it in the same three columns as the other rows: greedy decode of one stream, one prefill, N
streams decoded together in one llama_decode batch per step (each sequence its own seq_id), with llama.cpp's
own threads set to torch's.
The GGUF is the user's (--gguf) or, for the built-in SmolLM2, a Q8_0 made once from the package's Q4_1 GGUF by
llama.cpp's own quantizer (same weights' values as Q4_1, the speed of Q8_0).
"""

from __future__ import annotations

import ctypes
import importlib.util
from pathlib import Path

Q8_0_NAME = "SmolLM2-135M-Instruct-Q8_0.gguf"


def installed() -> bool:
    """True when llama-cpp-python can be imported."""
    return importlib.util.find_spec("llama_cpp") is not None


def default_gguf() -> Path:
    """A Q8_0 GGUF of the built-in SmolLM2, requantized once from its Q4_1 GGUF and cached."""
    import llama_cpp as L

    from slimquant import zoo

    out = zoo.cache_dir() / "bench" / Q8_0_NAME
    if out.is_file():
        return out
    out.parent.mkdir(parents=True, exist_ok=True)
    params = L.llama_model_quantize_default_params()
    params.ftype, params.allow_requantize = L.LLAMA_FTYPE_MOSTLY_Q8_0, True
    tmp = out.with_suffix(".tmp")
    if L.llama_model_quantize(str(zoo.smollm2_gguf()).encode(), str(tmp).encode(), ctypes.byref(params)) != 0:
        raise ValueError(f"llama.cpp could not quantize {zoo.smollm2_gguf()} to Q8_0")
    tmp.rename(out)
    return out


class LlamaCppRunner:
    """A llama.cpp model and context sized for `streams` sequences of `max_len` tokens."""

    def __init__(self, gguf: Path, streams: int, max_len: int, batch: int, threads: int):
        import llama_cpp as L

        self.L = L
        L.llama_backend_init()
        L.llama_log_set(_QUIET, ctypes.c_void_p(0))
        self.model = L.llama_model_load_from_file(str(gguf).encode(), L.llama_model_default_params())
        if not self.model:
            raise ValueError(f"llama.cpp could not load {gguf}")
        cp = L.llama_context_default_params()
        cp.n_ctx, cp.n_batch, cp.n_ubatch, cp.n_seq_max = streams * max_len, batch, batch, streams
        cp.n_threads = cp.n_threads_batch = threads
        cp.kv_unified, cp.no_perf = True, True
        self.ctx = L.llama_init_from_model(self.model, cp)
        self.batch = L.llama_batch_init(batch, 0, 1)
        self.vocab = L.llama_vocab_n_tokens(L.llama_model_get_vocab(self.model))

    def close(self) -> None:
        """Free the context, batch and model."""
        self.L.llama_batch_free(self.batch)
        self.L.llama_free(self.ctx)
        self.L.llama_model_free(self.model)

    def decode(self, prompts: list[list[int]], new_tokens: int) -> list[list[int]]:
        """Greedy-decode new_tokens for every prompt, all sequences in one batch per step -> the new tokens."""
        self.L.llama_memory_clear(self.L.llama_get_memory(self.ctx), True)
        lens = [len(p) for p in prompts]
        out = [[self._prefill_seq(p, s)] for s, p in enumerate(prompts)]
        for _ in range(new_tokens - 1):
            last = self._run([(toks[-1], lens[s], s, True) for s, toks in enumerate(out)])
            for toks, tok in zip(out, last, strict=True):
                toks.append(tok)
            lens = [n + 1 for n in lens]
        return out

    def prefill(self, prompt: list[int]) -> None:
        """One forward over the prompt (logits of its last token only)."""
        self.L.llama_memory_clear(self.L.llama_get_memory(self.ctx), True)
        self._prefill_seq(prompt, 0)

    def _prefill_seq(self, prompt: list[int], seq: int) -> int:
        """Prompt of sequence `seq` in one batch -> its greedy next token."""
        return self._run([(t, pos, seq, pos == len(prompt) - 1) for pos, t in enumerate(prompt)])[0]

    def _run(self, tokens: list[tuple[int, int, int, bool]]) -> list[int]:
        """llama_decode one batch of (token, position, sequence, wants logits); argmax of each wanted row."""
        b = self.batch
        b.n_tokens = len(tokens)
        for i, (tok, pos, seq, wants) in enumerate(tokens):
            b.token[i], b.pos[i], b.n_seq_id[i], b.seq_id[i][0], b.logits[i] = tok, pos, 1, seq, wants
        if self.L.llama_decode(self.ctx, b) != 0:
            raise RuntimeError("llama_decode failed")
        return [self._argmax(i) for i, t in enumerate(tokens) if t[3]]

    def _argmax(self, i: int) -> int:
        import numpy as np

        row = np.ctypeslib.as_array(self.L.llama_get_logits_ith(self.ctx, i), shape=(self.vocab,))
        return int(row.argmax())


@ctypes.CFUNCTYPE(None, ctypes.c_int, ctypes.c_char_p, ctypes.c_void_p)
def _QUIET(level, text, user_data):  # noqa: N802 - a C callback: llama.cpp's log goes nowhere
    return None
