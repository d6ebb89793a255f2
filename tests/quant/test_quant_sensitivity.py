"""Per-linear sensitivity report: equals a straightforward computation, skips float linears, files load."""

from __future__ import annotations

import pytest
import torch

from slimquant.format import primitives as P
from slimquant.format.safetensors_io import SafetensorsFolder
from slimquant.quant.calibration import load_texts, load_tokenizer, token_batches
from slimquant.quant.sensitivity import REPORT_FILES, SensitivityReport, _producer_scale, measure_sensitivity
from tests.quant.common import FAST, read_output


def _float_inputs(src, layer: int) -> dict[str, torch.Tensor]:
    """Inputs of input_layernorm and o_proj, output of q_proj, of one layer of the float model on the calibration."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(src, dtype=torch.float32).eval()
    ids = token_batches(load_tokenizer(src), load_texts(None), FAST["num_samples"], FAST["seq_len"])  # [S, T]
    seen, block = {}, model.model.layers[layer]
    block.input_layernorm.register_forward_pre_hook(lambda _m, a: seen.setdefault("h", a[0]))
    block.self_attn.o_proj.register_forward_pre_hook(lambda _m, a: seen.setdefault("o_in", a[0]))
    block.self_attn.q_proj.register_forward_hook(lambda _m, _a, y: seen.setdefault("q_out", y))
    with torch.no_grad():
        model(ids)
    return seen | {"o_w": block.self_attn.o_proj.weight.detach(), "eps": block.input_layernorm.variance_epsilon}


def _rel(y_q: torch.Tensor, y_f: torch.Tensor) -> float:
    return float((y_q.double() - y_f.double()).norm() / y_f.double().norm())


def _static(x: torch.Tensor, t: dict, name: str) -> torch.Tensor:
    return P.static_linear(
        x, t[f"{name}.weight"], t[f"{name}.quant_bias"], t[f"{name}.deq_scale"], t[f"{name}.input_scale"],
        t[f"{name}.input_offset"],
    )  # fmt: skip


def test_sensitivity_equals_a_straightforward_computation(quantized):
    src, dst, _ = quantized("llama", "w8a8", rotate=False)  # smoothquant: q/k/v read a smoothed input_layernorm
    report = {r.name: r for r in measure_sensitivity(src, dst, num_samples=2, seq_len=16).rows}
    _, t = read_output(dst)
    f = _float_inputs(src, layer=1)
    pre = "model.layers.1."
    o_q = _static(f["o_in"], t, pre + "self_attn.o_proj")
    assert report[pre + "self_attn.o_proj"].rel_error == pytest.approx(_rel(o_q, f["o_in"] @ f["o_w"].T), rel=1e-3)
    h = f["h"]  # [S, T, H]: RMSNorm with the checkpoint's (smoothed) weight is what q_proj reads at runtime
    x = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + f["eps"]) * t[pre + "input_layernorm.weight"]
    q_q = _static(x, t, pre + "self_attn.q_proj")
    assert report[pre + "self_attn.q_proj"].rel_error == pytest.approx(_rel(q_q, f["q_out"]), rel=1e-3)
    assert report[pre + "self_attn.q_proj"].type == "W8A8"
    assert 0 < report[pre + "self_attn.q_proj"].rel_error < 0.2


def test_float_linears_are_not_listed(quantized):
    src, dst, _ = quantized("llama", "w8a8_dynamic", keep_float="*.mlp.down_proj")
    rows = measure_sensitivity(src, dst, num_samples=2, seq_len=16).rows
    assert len(rows) == 12 and not any("down_proj" in r.name for r in rows)
    assert {r.type for r in rows} == {"W8A8_DYNAMIC"} and all(r.rel_error > 0 for r in rows)


def test_producer_scale_is_recovered_from_the_written_weight(tmp_path):
    from safetensors.torch import save_file

    torch.manual_seed(0)
    w, s = torch.randn(256, 64), torch.rand(64) * 4 + 0.1  # down_proj [N, K], smoothing scale [K]
    w_q, w_s = P.quantize_weight(w * s)
    save_file({"d.weight": w_q, "d.weight_scale": w_s, "f.weight": w * s}, str(tmp_path / "x.safetensors"))
    est = _producer_scale(w, SafetensorsFolder(tmp_path), "d", {"d.weight": "W8A8"})
    assert (est / s - 1).abs().max() < 1e-2 and (est / s - 1).abs().mean() < 1e-3
    est = _producer_scale(w, SafetensorsFolder(tmp_path), "f", {"f.weight": "FLOAT"})
    assert torch.allclose(est, s, rtol=1e-5)


def test_quantize_writes_a_report_that_loads_and_leaves_the_model_loadable(quantized):
    from slimquant.models.loader import load_model

    _, dst, summary = quantized("llama", "w8a8", report=True)
    assert [f for f in REPORT_FILES if not (dst / f).is_file()] == []
    assert summary.report == dst / "sensitivity.md" and "sensitivity report" in str(summary)
    report = SensitivityReport.load(dst)
    assert len(report.rows) == 14 and report.tokens == FAST["num_samples"] * FAST["seq_len"]
    assert SensitivityReport.from_json(report.to_json()) == report
    top = report.ranked()[0]
    assert f"| 1 | {top.name} | W8A8 |" in (dst / "sensitivity.md").read_text()
    assert (dst / "sensitivity.png").read_bytes()[:4] == b"\x89PNG"
    lm = load_model(str(dst))
    assert lm.quantized
