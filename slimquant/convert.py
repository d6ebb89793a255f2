"""slimquant.quantize(): the quantizer, and --max-loss bound to the engine's perplexity (the one module that joins
the offline quantizer with the engine; slimquant.quant never imports the engine)."""

from __future__ import annotations

import functools
import os
from pathlib import Path

from slimquant.quant.calibration import load_texts
from slimquant.quant.fallback import quantize_within_loss
from slimquant.quant.options import QuantizeOptions
from slimquant.quant.pipeline import run
from slimquant.quant.summary import QuantizeSummary

HELDOUT_CONTEXT, HELDOUT_MAX_TOKENS = 512, 8192  # --max-loss: windows and budget of the held-out perplexity


def quantize(
    src: str | os.PathLike,
    dst: str | os.PathLike,
    quant_type: str = "w8a8",
    *,
    max_loss: float | None = None,
    loss_data: str | os.PathLike | None = None,
    overwrite: bool = False,
    progress: bool = True,
    resume: bool = False,
    **options,
) -> QuantizeSummary:
    """Quantize the HF folder or .gguf file src into the ascend folder dst; options: QuantizeOptions.parse's
    (quant.pipeline.quantize); max_loss: keep the most sensitive linears float until perplexity on held-out text
    is within max_loss % (quant/fallback.py): loss_data's texts (a .txt, .json or .jsonl as --calib-data takes), by
    default the packaged Pride and Prejudice chapters (zoo.DEV_TEXT); resume: go on from where an interrupted run
    into dst stopped."""
    opts = QuantizeOptions.parse(quant_type, **options)
    if max_loss is None:
        if loss_data is not None:
            raise ValueError("--loss-data is the text --max-loss measures on; give --max-loss too")
        return run(src, dst, opts, overwrite=overwrite, progress=progress, resume=resume)
    if resume:
        raise ValueError("--resume continues one quantization; --max-loss runs several: use one or the other")
    score = functools.partial(heldout_perplexity, trust_remote_code=opts.trust_remote_code)
    text = loss_text(loss_data)
    return quantize_within_loss(
        src, dst, opts, max_loss=max_loss, score=score, loss_text=text, overwrite=overwrite, progress=progress
    )


def loss_text(loss_data: str | os.PathLike | None) -> str:
    """The text --max-loss measures on: loss_data's texts joined, or the packaged dev prose."""
    if loss_data is None:
        from slimquant import zoo

        return zoo.DEV_TEXT.read_text(encoding="utf-8")
    return "\n\n".join(load_texts(loss_data))


def heldout_perplexity(model: Path, text: str, trust_remote_code: bool = False) -> tuple[float, int, list[float]]:
    """(perplexity, tokens scored, each window's mean NLL) of the model folder on text, through the engine
    (slimquant.evaluation)."""
    from slimquant.evaluation import evaluate

    kw = dict(max_tokens=HELDOUT_MAX_TOKENS, progress=False, trust_remote_code=trust_remote_code)
    (res,) = evaluate([str(model)], text, HELDOUT_CONTEXT, **kw)
    return res.perplexity, res.tokens, res.window_nll
