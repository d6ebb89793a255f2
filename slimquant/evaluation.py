"""Perplexity and next-token agreement of several models on exactly the same token windows, with a 95% interval
of each model's change against the first (paired by window) and, on request, its sensitivity: how far the
per-window perplexity moves when every RMSNorm weight moves by about 1e-6 (a change below it is noise)."""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import asdict, dataclass

import torch

from slimquant.format.tokenizer import load_tokenizer
from slimquant.layers.attention import KVCacheLayer
from slimquant.layers.context import ForwardContext
from slimquant.layers.norm import RMSNorm
from slimquant.models.loader import LoadedModel, kv_cache_dtype, load_model
from slimquant.stats import change_interval


@dataclass
class EvalResult:
    """One model's score on the shared windows; top1_agreement is against the first model."""

    model: str
    perplexity: float
    mean_nll: float
    tokens: int
    top1_agreement: float | None = None
    windows: int = 1
    change_interval: tuple[float, float] | None = None  # 95%, of perplexity / the first model's - 1
    sensitivity: float | None = None  # mean |relative per-window perplexity change| under perturb_norms
    window_nll: list[float] | None = None  # each window's mean NLL, for paired comparisons between any two models

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
def score_window(
    lm: LoadedModel, ids: torch.Tensor, cache_dtype: torch.dtype | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """ids [L] -> (nll of tokens 1..L-1 [L-1], argmax prediction for them [L-1]), one prefill step over a KV
    cache of cache_dtype (default: the model's dtype; prefill attention may run in it)."""
    n = ids.numel()
    _attach_cache(lm, n, cache_dtype or lm.dtype)
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


def _attach_cache(lm: LoadedModel, block_size: int, cache_dtype: torch.dtype) -> None:
    """Give every attention layer a one-block KV cache that holds a whole window."""
    for m in lm.model.modules():
        if isinstance(m, KVCacheLayer):
            shape = m.cache_shape(1, block_size)
            if m.kv_cache is None or tuple(m.kv_cache.shape) != shape or m.kv_cache.dtype != cache_dtype:
                m.kv_cache = torch.zeros(shape, dtype=cache_dtype)


def evaluate(
    models: Sequence[str],
    text: str,
    context: int = 512,
    stride: int | None = None,
    max_tokens: int | None = None,
    dtype: str = "auto",
    progress: bool = True,
    sensitivity: bool = False,
    trust_remote_code: bool = False,
    perturbation: float = 1e-6,
) -> list[EvalResult]:
    """Perplexity of each model on the same windows of text (tokenized by the first model's tokenizer);
    sensitivity: score each model a second time with every norm weight multiplied by (1 + perturbation) (twice the
    time); trust_remote_code: let the model folders' own code run (Kimi-K2's tokenizer and config)."""
    if not models:
        raise ValueError("give at least one model to evaluate")
    if not 0 < abs(perturbation) <= 0.01:
        raise ValueError(f"the perturbation is a relative change of the norm weights in (0, 0.01], got {perturbation}")
    tokenizer = load_tokenizer(models[0], trust_remote_code)
    ids = torch.tensor(tokenizer(text).input_ids, dtype=torch.int64)
    ids = ids[:max_tokens] if max_tokens else ids
    if ids.numel() < 2:
        raise ValueError("the corpus is too short: it needs at least two tokens")
    windows = token_windows(ids.numel(), context, stride or context)
    results, reference, base = [], None, None
    for path in models:
        lm = load_model(path, dtype=dtype, trust_remote_code=trust_remote_code)
        cache = kv_cache_dtype("auto", dtype, lm, "cpu")  # the engine's cache for it: scored as it runs
        nlls, pred = _score_model(lm, cache, ids, windows, path, progress)
        per_window = _window_means(nlls)
        agree = None if reference is None else (pred == reference).float().mean().item()
        reference = pred if reference is None else reference
        base = per_window if base is None else base
        mean = torch.cat(nlls).double().mean().item()
        result = EvalResult(
            str(path), math.exp(mean), mean, pred.numel(), agree, len(windows), window_nll=per_window.tolist()
        )
        result.change_interval = None if len(results) == 0 else change_interval(base, per_window)
        if sensitivity:
            perturb_norms(lm.model, perturbation)
            moved = _window_means(_score_model(lm, cache, ids, windows, path, progress)[0])
            result.sensitivity = (moved - per_window).exp().sub(1).abs().mean().item()
        results.append(result)
    return results


def _score_model(lm, cache_dtype, ids, windows, name, progress) -> tuple[list[torch.Tensor], torch.Tensor]:
    """Each window's NLL of the tokens it scores, and all predictions."""
    from tqdm import tqdm

    nlls, preds = [], []
    for start, end, first in tqdm(windows, desc=f"eval {name}", disable=not progress, leave=False):
        nll, pred = score_window(lm, ids[start:end], cache_dtype)
        keep = slice(first - start - 1, None)  # row r predicts token start + r + 1
        nlls.append(nll[keep])
        preds.append(pred[keep])
    return nlls, torch.cat(preds)


def _window_means(nlls: list[torch.Tensor]) -> torch.Tensor:
    """[W] mean NLL of each window, in float64."""
    return torch.stack([n.double().mean() for n in nlls])


def perturb_norms(model: torch.nn.Module, rel: float = 1e-6) -> None:
    """Multiply every RMSNorm weight by (1 + rel), and where its dtype cannot hold that change, move it by one unit
    in the last place away from zero (bf16: 0.4%)."""
    for m in model.modules():
        if isinstance(m, RMSNorm):
            w = m.weight.data
            moved = (w.double() * (1 + rel)).to(w.dtype)
            stuck = moved == w
            ints = {2: torch.int16, 4: torch.int32, 8: torch.int64}[w.element_size()]
            bumped = (w.view(ints) + 1).view(w.dtype)  # the next magnitude up, sign kept
            w.copy_(torch.where(stuck, bumped, moved))
