"""What a quantize() run did: linears per type, sizes on disk, time, and what --max-loss kept float."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from slimquant.format.schemes import FLOAT


@dataclass
class FallbackResult:
    """What --max-loss did: the bound, the measured loss, and the linears it kept float."""

    max_loss: float  # P, percent
    loss: float  # measured loss of the written checkpoint, percent
    met: bool
    kept_float: list[str] = field(default_factory=list)  # full linear names
    tried: list[tuple[int, float]] = field(default_factory=list)  # (units kept float, loss %) in search order
    units: int = 0  # keep-float units that were candidates
    heldout_tokens: int = 0
    interval: tuple[float, float] | None = None  # 95% interval of loss, paired by window (None: one window)

    def rows(self) -> list[tuple[str, str]]:
        """Lines for the printed summary."""
        verdict = "met" if self.met else f"NOT met even with all {self.units} quantized units float"
        kept = ", ".join(self.kept_float[:6]) + (f", ... ({len(self.kept_float)})" if len(self.kept_float) > 6 else "")
        spread = (
            f" [{self.interval[0]:+.2f}, {self.interval[1]:+.2f}] (95%)"
            if self.interval
            else " (one window: no interval; a longer --loss-data gives one)"
        )
        loss = f"held-out loss {self.loss:+.3f}%{spread} on {self.heldout_tokens} tokens"
        return [
            ("max-loss", f"{self.max_loss:g}% ({verdict}); {loss}"),
            ("max-loss kept float", kept or "none"),
            ("max-loss search", " ".join(f"{k}:{loss:+.2f}%" for k, loss in self.tried)),
        ]


@dataclass
class QuantizeSummary:
    """Returned by slimquant.quantize() and printed by `slimquant quantize`."""

    output: Path
    model_quant_type: str  # W8A8 | W8A8_DYNAMIC (the shard-name type; a --mix may hold others)
    anti_outlier: str  # none | smoothquant | iterative
    rotated: bool = False  # Hadamard rotations folded into the weights first (quant/rotation.py)
    linears: dict[str, int] = field(default_factory=dict)  # type -> count (lm_head in FLOAT)
    num_layers: int = 0
    float_layers: int = 0  # layers past num_hidden_layers (multi-token prediction), written FLOAT
    mtp_quantized: int = 0  # multi-token-prediction layers quantized (--quant-mtp)
    idle_experts: int = 0  # routed experts that received no calibration token (quantized all the same)
    source_bytes: int = 0  # float checkpoint on disk (weights only; the .gguf file for a GGUF source)
    output_bytes: int = 0  # everything written to the output folder
    seconds: float = 0.0
    report: Path | None = None  # sensitivity.md written with report=True (+ .json, .png beside it)
    fallback: FallbackResult | None = None  # what max_loss= kept float, and the measured held-out loss
    default_mix: str = ""  # what the default w8a8 recipe made dynamic (empty with static_all or none applied)
    notes: list[str] = field(default_factory=list)  # what a user should know about where the checkpoint runs
    kv_cache: str = "float"  # "int8 (C8)" when KV-cache scales were calibrated
    peak_rss_bytes: int = 0  # this process's peak resident memory during the run
    resumed_layers: int = 0  # decoder layers a resumed run took from the interrupted run's checkpoint

    @property
    def _layers_run(self) -> int:
        return self.num_layers - self.resumed_layers

    def __str__(self) -> str:
        quantized = {k: v for k, v in self.linears.items() if k != FLOAT}
        rows = [
            ("output", str(self.output)),
            ("model_quant_type", self.model_quant_type),
            ("anti-outlier", self.anti_outlier),
            ("rotation", "Hadamard, folded into the weights (--no-rotate: none)" if self.rotated else "none"),
            ("decoder layers", str(self.num_layers)),
            ("linears quantized", ", ".join(f"{n} {t}" for t, n in quantized.items()) or "0"),
            ("linears kept float", str(self.linears.get(FLOAT, 0))),
            ("KV cache", self.kv_cache),
            *([("default mix", f"{self.default_mix} (--static-all: all static)")] if self.default_mix else []),
            *([("MTP layers (float)", str(self.float_layers))] if self.float_layers else []),
            *([("MTP layers (quantized)", str(self.mtp_quantized))] if self.mtp_quantized else []),
            *([("experts with no tokens", str(self.idle_experts))] if self.idle_experts else []),
            ("size before", _human(self.source_bytes)),
            ("size after", f"{_human(self.output_bytes)} ({self.output_bytes / max(self.source_bytes, 1):.2f}x)"),
            *(
                [("resumed", f"after layer {self.resumed_layers - 1} (the interrupted run's)")]
                if self.resumed_layers
                else []
            ),
            ("time", f"{self.seconds:.1f} s ({self.seconds / max(self._layers_run, 1):.1f} s per decoder layer)"),
            ("peak memory", f"{_human(self.peak_rss_bytes)} (resident, this process)"),
            *(self.fallback.rows() if self.fallback else []),
            *([("sensitivity report", str(self.report))] if self.report else []),
            *(("note", note) for note in self.notes),
        ]
        width = max(len(k) for k, _ in rows)
        return "\n".join(f"{k:<{width}}  {v}" for k, v in rows)


def _human(n: int) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if n < 1024 or unit == "GiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.2f} {unit}"
        n /= 1024
    return str(n)
