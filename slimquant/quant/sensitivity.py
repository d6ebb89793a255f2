"""Per-linear sensitivity: relative output error of each quantized linear on the calibration activations.

For every quantized linear L of a written checkpoint, rel_error = ||y_q - y_f||_F / ||y_f||_F over all calibration
tokens, where y_f is the float linear of the SOURCE model and y_q the int8 linear read from the CHECKPOINT and run
with docs/FORMAT.md's runtime math (qlinear.SimLinear -> format.primitives.static_linear / dynamic_linear).

Each linear is measured in isolation: the hidden states entering every decoder layer, and every linear's input, are
those of the float source model (layer by layer with LayerRunner, as the quantizer calibrates), so an error is
charged to the linear that makes it, not to the ones after it. Memory does not grow with the model.

Smoothing is undone exactly where the checkpoint allows it, so that y_q and y_f are the same quantity:
- a linear behind a norm (q/k/v after input_layernorm, ...) reads the CHECKPOINT's norm (smoothed weight, and
  the bias of iterative smoothing) applied to the float norm input: the input the runtime gives it;
- a linear behind a linear producer (down_proj behind up_proj) reads x_f / s, and the producer's own output is
  compared as y_q * s. The checkpoint does not store s: it is recovered from the consumer's written int8 weight
  and its source weight (each row's rounding bounds s to an interval; their intersection pins it, typically to
  1e-4), or by a least-squares column ratio where that fails (a FLOAT consumer; rounding not to nearest);
- other linears (o_proj) read x_f unchanged.
FLOAT linears are not listed.
"""

from __future__ import annotations

import copy
import json
import os
import re
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
from torch import nn
from torch.nn import functional as F
from tqdm import tqdm

from slimquant.format.architectures import EMBED_PREFIX, arch_spec, layer_prefix
from slimquant.format.checkpoint import read_description, tensor_types
from slimquant.format.schemes import FLOAT
from slimquant.quant.activations import Activations
from slimquant.quant.calibration import load_texts, load_tokenizer, token_batches
from slimquant.quant.decoder import BiasedNorm, LayerRunner
from slimquant.quant.qlinear import SimLinear
from slimquant.quant.rotation import RotatedSource
from slimquant.quant.sources import HFCheckpoint

REPORT_FILES = ("sensitivity.md", "sensitivity.json", "sensitivity.png")
_LINEAR_SUFFIXES = ("weight", "bias", "weight_scale", "weight_offset", "input_scale", "input_offset")
_LINEAR_SUFFIXES += ("quant_bias", "deq_scale")
_LAYER = re.compile(r"^model\.layers\.(\d+)\.(.+)$")


@dataclass
class SensitivityRow:
    """One quantized linear: full name, description type, relative output error."""

    name: str
    type: str
    rel_error: float


@dataclass
class SensitivityReport:
    """Rows in model order; tokens: calibration tokens each linear was measured on (routed experts: fewer)."""

    rows: list[SensitivityRow] = field(default_factory=list)
    tokens: int = 0

    def ranked(self) -> list[SensitivityRow]:
        """Rows, most sensitive first."""
        return sorted(self.rows, key=lambda r: -r.rel_error)

    def to_json(self) -> str:
        """The report as JSON text."""
        metric = "||y_q - y_f|| / ||y_f|| per linear, float inputs"
        return json.dumps({"metric": metric, "tokens": self.tokens, "rows": [asdict(r) for r in self.rows]}, indent=2)

    @classmethod
    def from_json(cls, text: str) -> SensitivityReport:
        """Inverse of to_json()."""
        data = json.loads(text)
        return cls([SensitivityRow(**r) for r in data["rows"]], int(data["tokens"]))

    @classmethod
    def load(cls, folder: str | os.PathLike) -> SensitivityReport:
        """The report saved in folder."""
        return cls.from_json((Path(folder) / "sensitivity.json").read_text())

    def to_markdown(self) -> str:
        """A table, most sensitive first."""
        lines = [
            f"# Per-linear sensitivity ({len(self.rows)} quantized linears, {self.tokens} calibration tokens)",
            "",
            "Relative error of each linear's output, int8 vs float, on float inputs (most sensitive first).",
            "",
            "| rank | linear | type | rel. error % |",
            "|---:|---|---|---:|",
        ]
        lines += [f"| {k} | {r.name} | {r.type} | {100 * r.rel_error:.3f} |" for k, r in enumerate(self.ranked(), 1)]
        return "\n".join(lines) + "\n"

    def save(self, folder: str | os.PathLike) -> list[Path]:
        """Write sensitivity.md, .json and .png into folder; returns their paths."""
        folder = Path(folder)
        md, js, png = (folder / name for name in REPORT_FILES)
        md.write_text(self.to_markdown())
        js.write_text(self.to_json() + "\n")
        plot_heatmap(self, png)
        return [md, js, png]


def plot_heatmap(report: SensitivityReport, path: Path) -> None:
    """Heat map of rel. error %, decoder layer (rows) x linear kind (columns); routed experts: their max."""
    import matplotlib

    matplotlib.use("Agg")
    from matplotlib import pyplot as plt

    grid = _grid(report.rows)  # {(layer, kind): error %}
    if not grid:
        fig, ax = plt.subplots(figsize=(4, 1.5))
        ax.axis("off")
        ax.text(0.5, 0.5, "no quantized linears", ha="center", va="center")
        fig.savefig(path, dpi=110)
        plt.close(fig)
        return
    layers = sorted({i for i, _ in grid})
    kinds = list(dict.fromkeys(k for _, k in grid))
    values = torch.full((len(layers), len(kinds)), float("nan"))  # [L, K], NaN: float or absent
    for (i, kind), v in grid.items():
        values[layers.index(i), kinds.index(kind)] = v
    fig, ax = plt.subplots(figsize=(2.5 + 1.3 * len(kinds), 1.5 + 0.28 * max(len(layers), 4)))
    im = ax.imshow(values.numpy(), aspect="auto", cmap="magma_r", interpolation="nearest")
    ax.set_xticks(range(len(kinds)), [k.replace("self_attn.", "").replace("mlp.", "") for k in kinds], rotation=30)
    ax.set_yticks(range(len(layers)), [str(i) for i in layers])
    ax.set_xlabel("linear")
    ax.set_ylabel("decoder layer")
    ax.set_title("relative output error % (int8 vs float)")
    _annotate(ax, values)
    fig.colorbar(im, ax=ax, label="rel. error %")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def _grid(rows: list[SensitivityRow]) -> dict[tuple[int, str], float]:
    """(layer, kind) -> rel. error %, kind like 'mlp.down_proj'; 'mlp.experts.*.x' keeps the max over experts."""
    grid: dict[tuple[int, str], float] = {}
    for r in rows:
        m = _LAYER.match(r.name)
        if m is None:
            continue
        key = (int(m.group(1)), re.sub(r"\.experts\.\d+\.", ".experts.*.", m.group(2)))
        grid[key] = max(grid.get(key, 0.0), 100 * r.rel_error)
    return grid


def _annotate(ax, values: torch.Tensor) -> None:
    """Write each cell's value (small font) when the grid is small enough to read."""
    if values.numel() > 400:
        return
    seen = values[~values.isnan()]
    mid = float(seen.min() + seen.max()) / 2 if seen.numel() else 0.0  # dark cells above the middle: white text
    for y, row in enumerate(values.tolist()):
        for x, v in enumerate(row):
            if v == v:  # not NaN
                ax.text(x, y, f"{v:.1f}", ha="center", va="center", fontsize=6, color="white" if v > mid else "black")


@torch.no_grad()
def measure_sensitivity(
    src: str | os.PathLike,
    dst: str | os.PathLike,
    *,
    calib_data: str | os.PathLike | None = None,
    num_samples: int = 16,
    seq_len: int = 256,
    batch_size: int = 4,
    device: str = "cpu",
    progress: bool = False,
    trust_remote_code: bool = False,
    rotate: bool = False,
) -> SensitivityReport:
    """Sensitivity of every quantized linear of checkpoint dst (quantized from the HF folder src; rotate: with
    quantize's rotate, against the rotated float model)."""
    ckpt, quant = HFCheckpoint(src), _Shards(Path(dst))
    ckpt = RotatedSource(ckpt) if rotate else ckpt
    types = tensor_types(read_description(dst))
    spec = arch_spec(ckpt.config)
    dtype = quant.get(EMBED_PREFIX + "weight").dtype  # the model dtype the quantizer wrote
    runner = LayerRunner(src, spec, dtype, device)
    ids = token_batches(load_tokenizer(src, trust_remote_code), load_texts(calib_data), num_samples, seq_len)  # [S, T]
    embed = ckpt.get(EMBED_PREFIX + "weight").to(runner.device, runner.dtype)  # [V, H]
    hidden = Activations.of(F.embedding(r.to(runner.device), embed) for r in ids.split(batch_size))  # [B, T, H]
    del embed
    rows: list[SensitivityRow] = []
    for i in tqdm(range(int(ckpt.config["num_hidden_layers"])), desc="sensitivity", disable=not progress):
        layer = runner.build(i, {r: ckpt.get(layer_prefix(i) + r) for r in runner.param_names(i)})
        probe = _LayerProbe(layer, layer_prefix(i), spec.layer_linears(ckpt.config, i), spec, quant, types, dtype)
        with probe.attached():
            hidden = runner.run(layer, hidden)  # float
        rows += probe.rows()
        del layer, probe
        quant.close()
    return SensitivityReport(rows, ids.numel())


class _Shards:
    """The written tensors by name: the index is read once, shards are opened per layer (close() unmaps them)."""

    def __init__(self, path: Path):
        self.path, self._open = path, {}
        index = sorted(path.glob("*.safetensors.index.json"))
        if index:
            self.where = json.loads(index[0].read_text())["weight_map"]
        else:
            self.where = {k: f.name for f in sorted(path.glob("*.safetensors")) for k in self._file(f.name).keys()}

    def __contains__(self, name: str) -> bool:
        return name in self.where

    def get(self, name: str) -> torch.Tensor:
        """One tensor (KeyError if absent)."""
        return self._file(self.where[name]).get_tensor(name)

    def _file(self, file: str):
        from safetensors import safe_open

        if file not in self._open:
            self._open[file] = safe_open(str(self.path / file), framework="pt")
        return self._open[file]

    def close(self) -> None:
        """Drop the open shards (and their mapped pages)."""
        self._open.clear()


class _LayerProbe:
    """Hooks on one float source layer that run each quantized linear beside its float twin and sum the errors."""

    def __init__(self, layer: nn.Module, prefix: str, linears, spec, quant: _Shards, types, dtype):
        self.layer, self.prefix = layer, prefix
        self.written = types  # full tensor name -> description type
        self.types = {rel: types[prefix + rel + ".weight"] for rel in linears}
        self.quantized = [rel for rel in linears if self.types[rel] != FLOAT]
        self.sims = {rel: _sim_linear(quant, types, prefix + rel, dtype, layer) for rel in self.quantized}
        self.norm_of: dict[str, str] = {}  # linear -> the norm it reads
        self.norms: dict[str, nn.Module] = {}  # norm -> the checkpoint's (smoothed) norm
        self.col_scale: dict[str, torch.Tensor] = {}  # consumer of a linear producer -> s [K]
        self.row_scale: dict[str, torch.Tensor] = {}  # linear producer -> s [N]
        for src, group in spec.layer_smooth_pairs(tuple(linears)):
            self._add_pair(src, group, quant, linears)
        self._normed: dict[str, torch.Tensor] = {}  # norm -> checkpoint norm of the latest batch
        self.sq_err = dict.fromkeys(self.quantized, 0.0)
        self.sq_ref = dict.fromkeys(self.quantized, 0.0)

    def _add_pair(self, src: str, group: tuple[str, ...], quant: _Shards, linears) -> None:
        if src not in linears:  # a norm: its consumers read the checkpoint's norm
            self.norm_of |= dict.fromkeys(group, src)
            self.norms[src] = _checkpoint_norm(self.layer.get_submodule(src), quant, self.prefix + src)
            return
        if not any(rel in self.quantized for rel in group):
            return  # the quantizer smooths a pair only when a consumer is quantized
        s = _producer_scale(self.layer.get_submodule(group[0]).weight, quant, self.prefix + group[0], self.written)
        self.col_scale |= dict.fromkeys(group, s)
        self.row_scale[src] = s

    @contextmanager
    def attached(self):
        """Within the block, forwards of the layer measure every quantized linear."""
        hooks = [self.layer.get_submodule(n).register_forward_pre_hook(self._norm_hook(n)) for n in self.norms]
        hooks += [self.layer.get_submodule(r).register_forward_hook(self._linear_hook(r)) for r in self.quantized]
        try:
            yield self
        finally:
            for h in hooks:
                h.remove()

    def _norm_hook(self, name: str):
        def hook(_module, args):
            self._normed[name] = self.norms[name](args[0])  # [B, T, K]

        return hook

    def _linear_hook(self, rel: str):
        def hook(_module, args, y_f):  # args[0]: float input [..., K]; y_f: float output [..., N]
            x = args[0]
            if rel in self.norm_of:
                x = self._normed[self.norm_of[rel]]
            elif rel in self.col_scale:
                x = x / self.col_scale[rel]
            y_q = self.sims[rel](x)
            if rel in self.row_scale:
                y_q = y_q * self.row_scale[rel]
            self.sq_err[rel] += float((y_q.double() - y_f.double()).square().sum())
            self.sq_ref[rel] += float(y_f.double().square().sum())

        return hook

    def rows(self) -> list[SensitivityRow]:
        """One row per quantized linear that saw tokens."""
        return [
            SensitivityRow(self.prefix + rel, self.types[rel], (self.sq_err[rel] / self.sq_ref[rel]) ** 0.5)
            for rel in self.quantized
            if self.sq_ref[rel] > 0
        ]


def _sim_linear(quant: _Shards, types: dict, name: str, dtype, layer: nn.Module) -> SimLinear:
    """The written linear `name` as the runtime computes it."""
    t = {s: (quant.get(f"{name}.{s}"), types[f"{name}.{s}"]) for s in _LINEAR_SUFFIXES if f"{name}.{s}" in quant}
    return SimLinear(types[name + ".weight"], t, dtype).to_device(next(layer.parameters()).device)


def _checkpoint_norm(norm: nn.Module, quant: _Shards, name: str) -> nn.Module:
    """A copy of the source norm with the checkpoint's weight (and bias, if smoothing wrote one)."""
    w = norm.weight
    out = copy.deepcopy(norm)
    out.weight = nn.Parameter(quant.get(name + ".weight").to(w.device, w.dtype), requires_grad=False)
    if name + ".bias" in quant:
        return BiasedNorm(out, quant.get(name + ".bias").to(w.device, w.dtype))
    return out


def _producer_scale(w_src: torch.Tensor, quant: _Shards, name: str, types: dict) -> torch.Tensor:
    """s [K] with written weight ~= w_src [N, K] * s (columns), from the written weight of `name`.

    int8: round(w_src[n, k] * s_k / scale_n) = q[n, k] bounds s_k to an interval per row; their intersection
    pins s_k (typically to 1e-4). Where it is empty (rounding not to nearest), and for a FLOAT weight: the
    least-squares ratio per column, rows weighted by 1 / scale^2.
    """
    w = quant.get(name + ".weight").to(w_src.device)
    ref = w_src.double()  # [N, K]
    if types[name + ".weight"] == FLOAT:
        return _lsq_ratio(w.double(), ref, torch.ones_like(ref[:, :1])).to(w_src.dtype)
    scale = quant.get(name + ".weight_scale").to(w_src.device).double()  # [N, 1]
    lsq = _lsq_ratio(w.double() * scale, ref, scale.clamp(min=1e-30).pow(-2))
    q, nz = w.double(), ref != 0
    a = (q - 0.5) * scale / ref.where(nz, 1.0)  # [N, K]: the bounds on s_k from row n
    b = (q + 0.5) * scale / ref.where(nz, 1.0)
    lo = torch.minimum(a, b).where(nz, -torch.inf).amax(dim=0)  # [K]
    hi = torch.maximum(a, b).where(nz, torch.inf).amin(dim=0)
    ok = (lo <= hi * (1 + 1e-6)) & torch.isfinite(lo) & torch.isfinite(hi)
    return torch.where(ok, (lo + hi) / 2, lsq).to(w_src.dtype)


def _lsq_ratio(w: torch.Tensor, ref: torch.Tensor, row_w: torch.Tensor) -> torch.Tensor:
    """Per column k: argmin_s sum_n row_w[n] (w[n, k] - s ref[n, k])^2; 1 for an all-zero column."""
    den = (row_w * ref.square()).sum(dim=0)  # [K]
    s = (row_w * w * ref).sum(dim=0) / den.clamp(min=1e-300)
    return torch.where(den > 0, s, torch.ones_like(s))
