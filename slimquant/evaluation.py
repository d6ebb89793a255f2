"""Perplexity and next-token agreement of several models on exactly the same token windows."""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import asdict, dataclass

import torch

from slimquant.layers.attention import KVCacheLayer
from slimquant.layers.context import ForwardContext
from slimquant.models.loader import LoadedModel, load_model


@dataclass
class EvalResult:
    """One model's score on the shared windows; top1_agreement is against the first model."""

    model: str
    perplexity: float
    mean_nll: float
    tokens: int
    top1_agreement: float | None = None

    def to_dict(self) -> dict:
        """Plain dict for JSON output."""
        return asdict(self)


def token_windows(n_tokens: int, context: int, stride: int) -> list[tuple[int, int, int]]:
    """Sliding windows (start, end, first_scored) so that every target token is scored exactly once."""
    if context < 2 or stride < 1 or stride > context:
        raise ValueError(f"need context >= 2 and 1 <= stride <= context, got context={context}, stride={stride}")
    windows, scored_to = [], 1  # token 0 has no prediction
    for start in range(0, max(n_tokens - 1, 1), stride):
        end = min(start + context, n_tokens)
        if end > scored_to:
            windows.append((start, end, max(scored_to, start + 1)))
            scored_to = end
        if end == n_tokens:
            break
    return windows


@torch.inference_mode()
def score_window(lm: LoadedModel, ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """ids [L] -> (nll of tokens 1..L-1 [L-1], argmax prediction for them [L-1]), one prefill step."""
    n = ids.numel()
    _attach_cache(lm, n)
    ctx = ForwardContext(
        query_lens=[n],
        context_lens=[n],
        slot_mapping=torch.arange(n, dtype=torch.int64),
        block_tables=torch.zeros(1, 1, dtype=torch.int32),
        block_size=n,
    )
    hidden = lm.backend.forward(lm.model, ids, torch.arange(n), ctx)  # [L, H]
    logits = lm.model.compute_logits(hidden[:-1])  # [L-1, V]
    logp = torch.log_softmax(logits.float(), dim=-1)
    nll = -logp.gather(1, ids[1:, None]).squeeze(1)
    return nll, logits.argmax(dim=-1)


def _attach_cache(lm: LoadedModel, block_size: int) -> None:
    """Give every attention layer a one-block KV cache that holds a whole window."""
    for m in lm.model.modules():
        if isinstance(m, KVCacheLayer):
            shape = m.cache_shape(1, block_size)
            if m.kv_cache is None or tuple(m.kv_cache.shape) != shape:
                m.kv_cache = torch.zeros(shape, dtype=lm.dtype)


def evaluate(
    models: Sequence[str],
    text: str,
    context: int = 512,
    stride: int | None = None,
    max_tokens: int | None = None,
    dtype: str = "auto",
    progress: bool = True,
) -> list[EvalResult]:
    """Perplexity of each model on the same windows of text (tokenized by the first model's tokenizer)."""
    from transformers import AutoTokenizer

    if not models:
        raise ValueError("give at least one model to evaluate")
    ids = torch.tensor(AutoTokenizer.from_pretrained(models[0])(text).input_ids, dtype=torch.int64)
    ids = ids[:max_tokens] if max_tokens else ids
    if ids.numel() < 2:
        raise ValueError("the corpus is too short: it needs at least two tokens")
    windows = token_windows(ids.numel(), context, stride or context)
    results, reference = [], None
    for path in models:
        nll, pred = _score_model(load_model(path, dtype=dtype), ids, windows, path, progress)
        agree = None if reference is None else (pred == reference).float().mean().item()
        reference = pred if reference is None else reference
        mean = nll.double().mean().item()
        results.append(EvalResult(str(path), math.exp(mean), mean, nll.numel(), agree))
    return results


def _score_model(lm, ids, windows, name, progress) -> tuple[torch.Tensor, torch.Tensor]:
    from tqdm import tqdm

    nlls, preds = [], []
    for start, end, first in tqdm(windows, desc=f"eval {name}", disable=not progress, leave=False):
        nll, pred = score_window(lm, ids[start:end])
        keep = slice(first - start - 1, None)  # row r predicts token start + r + 1
        nlls.append(nll[keep])
        preds.append(pred[keep])
    return torch.cat(nlls), torch.cat(preds)
