"""QuantizeOptions: every setting of one quantize() run, validated once; the pipeline and its steps read only this."""

from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass
from pathlib import Path

from slimquant.devices import check_device
from slimquant.format.schemes import W8A8, Scheme, parse_scheme
from slimquant.quant import steps
from slimquant.quant.activations import ACTIVATION_BYTES
from slimquant.quant.expert_stream import EXPERT_GROUP_BYTES
from slimquant.quant.output import parse_size
from slimquant.quant.plan import parse_mix
from slimquant.quant.rotation import RotatedSource, can_rotate
from slimquant.quant.sources import HFCheckpoint
from slimquant.quant.steps.alpha import FixedAlpha
from slimquant.quant.steps.rounding import NearestRounding
from slimquant.quant.steps.smoothing import Smoother

KV_CACHE_CHOICES = ("float", "int8")


@dataclass(frozen=True)
class QuantizeOptions:
    """What to quantize to and how (quantize()'s keyword arguments, parsed)."""

    quant_type: Scheme = W8A8
    anti_outlier: str | None = None  # a steps.SMOOTHERS name; None: the architecture's default for the plan
    alpha: float | str = 0.5  # a migration strength in [0, 1], or a steps.ALPHA_SEARCHES name ("auto")
    rounding: str = "nearest"  # a steps.ROUNDERS name
    calib_data: Path | None = None  # texts to calibrate on (None: the built-in set)
    num_samples: int = 16
    seq_len: int = 256
    keep_float: tuple[str, ...] = ()  # globs of linears kept float
    mix: tuple[tuple[str, Scheme], ...] = ()  # (glob, scheme), first match wins
    device: str = "cpu"  # where calibration runs
    shard_bytes: int = 4 * 1024**3
    batch_size: int = 4
    report: bool = False  # also write the per-linear sensitivity report
    static_all: bool = False  # w8a8: no default dynamic mix (Llama / Qwen mlp.down_proj)
    kv_cache: str = "float"  # "int8": also calibrate int8 (C8) KV-cache scales
    quant_mtp: bool = False  # also quantize DeepSeek's MTP layers, as ModelSlim's --quant_mtp mix (quant/mtp.py)
    trust_remote_code: bool = False  # the source's own tokenizer code (Kimi-K2's tokenization_kimi.py) may run
    expert_memory: int = EXPERT_GROUP_BYTES  # float routed-expert weights held at once (quant/expert_stream.py)
    activation_memory: int = ACTIVATION_BYTES  # calibration activations held in memory (quant/activations.py)
    rotate: bool | None = None  # fold Hadamard rotations into the weights first (quant/rotation.py); None: for w8a8

    def __post_init__(self) -> None:
        steps.alpha_chooser(self.alpha)  # each raises ValueError naming the choices
        steps.rounder(self.rounding)
        if self.anti_outlier is not None:
            steps.smoother(self.anti_outlier)
        if self.kv_cache not in KV_CACHE_CHOICES:
            raise ValueError(f"kv cache must be one of {list(KV_CACHE_CHOICES)}, got {self.kv_cache!r}")
        if not isinstance(self.batch_size, int) or self.batch_size < 1:  # num_samples, seq_len: calibration.py
            raise ValueError(f"batch size must be at least 1, got {self.batch_size!r}")

    @classmethod
    def parse(
        cls,
        quant_type: str = "w8a8",
        *,
        keep_float: str | list[str] | tuple[str, ...] = (),
        mix: list[str] | dict[str, str] | None = None,
        calib_data: str | os.PathLike | None = None,
        shard_size: int | str = "4GiB",
        expert_memory: int | str = EXPERT_GROUP_BYTES,
        activation_memory: int | str = ACTIVATION_BYTES,
        device: str = "cpu",
        **kw,
    ) -> QuantizeOptions:
        """From quantize()'s keyword arguments: names and sizes as users write them (ValueError otherwise)."""
        unknown = sorted(set(kw) - {f.name for f in dataclasses.fields(cls)})
        if unknown:
            raise TypeError(f"quantize() got unexpected keyword argument(s): {', '.join(unknown)}")
        return cls(
            quant_type=parse_scheme(quant_type),
            keep_float=(keep_float,) if isinstance(keep_float, str) else tuple(keep_float),
            mix=tuple(parse_mix(mix)),
            calib_data=None if calib_data is None else Path(calib_data),
            shard_bytes=parse_size(shard_size),
            expert_memory=parse_size(expert_memory, "expert memory"),
            activation_memory=parse_size(activation_memory, "activation memory"),
            device=check_device(device),
            **kw,
        )

    def rotates(self, config: dict) -> bool:
        """Whether this run rotates the model: rotate where given, else for --type w8a8 on the architectures it
        folds into (its static per-tensor scales gain most: +2.1% -> +0.8% on held-out text, docs/benchmarks.md)."""
        return self.rotate if self.rotate is not None else self.quant_type == W8A8 and can_rotate(config)

    def source(self, hf_dir: Path) -> HFCheckpoint | RotatedSource:
        """The float source as the quantizer reads it: the folder, or its rotated view."""
        ckpt = HFCheckpoint(hf_dir)
        return RotatedSource(ckpt) if self.rotates(ckpt.config) else ckpt

    def smoother(self, default: str) -> Smoother:
        """The smoothing step: anti_outlier, or the architecture's default for this plan."""
        return steps.smoother(self.anti_outlier if self.anti_outlier is not None else default)

    def alpha_chooser(self) -> FixedAlpha:
        """The alpha step."""
        return steps.alpha_chooser(self.alpha)

    def rounder(self) -> NearestRounding:
        """The rounding step."""
        return steps.rounder(self.rounding)
