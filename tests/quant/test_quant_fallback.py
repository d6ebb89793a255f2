"""--max-loss: bad values, the search, keep-float units, and the end-to-end wiring on a tiny model."""

from __future__ import annotations

import pytest

from slimquant.convert import quantize
from slimquant.quant import fallback
from slimquant.quant.fallback import keep_units, parse_max_loss, search
from slimquant.quant.sensitivity import SensitivityReport, SensitivityRow
from tests.quant.common import FAST, read_output


@pytest.mark.parametrize("bad", [-1, "-0.5", "abc", "", float("nan"), float("inf"), None, True])
def test_bad_max_loss_is_a_value_error(bad):
    with pytest.raises(ValueError, match="--max-loss"):
        parse_max_loss(bad)


def test_max_loss_values():
    assert parse_max_loss("1.5") == 1.5 and parse_max_loss(0) == 0.0


def test_quantize_rejects_a_bad_max_loss_before_writing(tiny_model, tmp_path):
    with pytest.raises(ValueError, match="--max-loss"):
        quantize(tiny_model("llama"), tmp_path / "out", max_loss=-1, **FAST)
    assert not (tmp_path / "out").exists()


def test_loss_data_without_max_loss_is_a_value_error(tiny_model, tmp_path):
    with pytest.raises(ValueError, match="--loss-data .* give --max-loss too"):
        quantize(tiny_model("llama"), tmp_path / "out", loss_data=tmp_path / "text.txt", **FAST)
    assert not (tmp_path / "out").exists()


def _measure(losses: dict[int, float]):
    calls = []

    def measure(k: int) -> float:
        calls.append(k)
        return losses[k]

    return measure, calls


def test_search_doubles_then_bisects_to_the_smallest_k():
    losses = {k: 10.0 - k for k in range(21)}  # within 1.0 from k = 9
    measure, calls = _measure(losses)
    k, tried = search(20, measure, 1.0, losses[0])
    assert k == 9 and calls == [1, 2, 4, 8, 16, 12, 10, 9]
    assert tried[0] == (0, 10.0) and tried[-1] == (9, 1.0)


def test_search_stops_at_the_bound_and_at_zero():
    measure, calls = _measure({k: 5.0 for k in range(6)})
    assert search(5, measure, 1.0, 5.0)[0] == 5 and calls == [1, 2, 4, 5]
    measure, calls = _measure({})
    assert search(5, measure, 1.0, 0.5) == (0, [(0, 0.5)]) and calls == []


def test_keep_units_group_fused_linears_and_rank_by_their_worst_member():
    config = {"model_type": "llama", "num_hidden_layers": 2}
    errors = {"1.mlp.down_proj": 0.05, "0.self_attn.k_proj": 0.09, "1.mlp.up_proj": 0.07, "0.self_attn.o_proj": 0.01}
    rows = [SensitivityRow(f"model.layers.{n}", "W8A8", e) for n, e in errors.items()]
    units = keep_units(SensitivityReport(rows, 32), config)
    assert units == [
        tuple(f"model.layers.0.self_attn.{p}_proj" for p in "qkv"),
        ("model.layers.1.mlp.gate_proj", "model.layers.1.mlp.up_proj"),
        ("model.layers.1.mlp.down_proj",),
        ("model.layers.0.self_attn.o_proj",),
    ]


def test_loose_max_loss_keeps_nothing_float(tiny_model, tmp_path):
    summary = quantize(tiny_model("llama"), tmp_path / "out", "w8a8", max_loss=50, **FAST)
    desc, _ = read_output(tmp_path / "out")
    assert summary.fallback.met and summary.fallback.kept_float == [] and summary.fallback.tried[0][0] == 0
    assert [k for k, v in desc.items() if k.endswith("_proj.weight") and v == "FLOAT"] == []
    assert "max-loss" in str(summary) and summary.linears["W8A8"] == 12  # down_proj: dynamic by default
    assert summary.fallback.heldout_tokens > 4096 and "(95%)" in str(summary)  # the packaged prose, 8192 tokens
    assert summary.linears["W8A8_DYNAMIC"] == 2
    assert [p.name for p in tmp_path.iterdir()] == ["out"]  # candidates and work folder are gone


def test_zero_max_loss_keeps_the_most_sensitive_linears_float(tiny_model, tmp_path, monkeypatch):
    ranked = []  # the real ranking; the search (tested above) gets only its top unit, to stay quick

    def top_unit(*args):
        ranked.extend(keep_units(*args))
        return ranked[:1]

    monkeypatch.setattr(fallback, "keep_units", top_unit)
    summary = quantize(tiny_model("llama"), tmp_path / "out", "w8a8", max_loss=0, report=True, rotate=False, **FAST)
    result = summary.fallback
    assert len(ranked) == 8 and result.kept_float == list(ranked[0])  # the most sensitive unit
    assert [k for k, _ in result.tried] == [0, 1] and result.tried[0][1] > 0
    report = SensitivityReport.load(tmp_path / "out")  # of the final checkpoint: kept linears are not in it
    assert len(report.rows) == 14 - len(result.kept_float) and not {r.name for r in report.rows} & set(ranked[0])
    desc, _ = read_output(tmp_path / "out")
    assert all(desc[n + ".weight"] == "FLOAT" for n in result.kept_float)
    assert summary.linears["FLOAT"] == 1 + len(result.kept_float)  # + lm_head
    assert [p.name for p in tmp_path.iterdir()] == ["out"]


def test_the_loss_comes_with_its_paired_interval(tiny_model, tmp_path):
    """The summary's loss on --loss-data has the 95% interval that evaluate() gives the written checkpoint against
    the source on that text (its paragraphs joined)."""
    import json

    from slimquant import zoo
    from slimquant.evaluation import evaluate

    paragraphs = [p for p in zoo.EVAL_TEXT.read_text().split("\n\n") if len(p) > 400][:12]
    (tmp_path / "loss.json").write_text(json.dumps(paragraphs))
    src = tiny_model("llama")
    summary = quantize(src, tmp_path / "out", "w8a8", max_loss=50, loss_data=tmp_path / "loss.json", **FAST)
    base, quant = evaluate([str(src), str(tmp_path / "out")], "\n\n".join(paragraphs), 512, max_tokens=8192,
                           progress=False)  # fmt: skip
    low, high = summary.fallback.interval
    assert quant.windows >= 3 and (low, high) == pytest.approx([100 * c for c in quant.change_interval], abs=1e-3)
    assert low < summary.fallback.loss < high and f"[{low:+.2f}, {high:+.2f}] (95%)" in str(summary)
    assert summary.fallback.loss == pytest.approx(100 * (quant.perplexity / base.perplexity - 1), abs=1e-3)


def test_a_one_window_loss_says_it_has_no_interval():
    from slimquant.quant.summary import FallbackResult

    (_, line), *_ = FallbackResult(1.0, 0.4, True, heldout_tokens=200).rows()
    assert "held-out loss +0.400% (one window: no interval; a longer --loss-data gives one) on 200" in line
    (_, line), *_ = FallbackResult(1.0, 0.4, True, heldout_tokens=2000, interval=(-0.1, 0.9)).rows()
    assert "held-out loss +0.400% [-0.10, +0.90] (95%) on 2000 tokens" in line


def test_units_rank_by_what_their_role_buys_then_by_sensitivity():
    """Roles ordered by the loss with every unit of the role float (lowest first); a role's units keep their
    sensitivity order, whatever their sensitivity against other roles' units."""
    from slimquant.quant.fallback import rank_by_role, role_of

    qkv = tuple(f"model.layers.{{}}.self_attn.{p}_proj" for p in "qkv")
    units = [tuple(n.format(1) for n in qkv), ("model.layers.0.mlp.down_proj",), tuple(n.format(0) for n in qkv),
             ("model.layers.1.mlp.down_proj",)]  # fmt: skip
    assert role_of(units[1]) == ("mlp.down_proj",) and role_of(units[0]) == role_of(units[2])
    loss = {role_of(units[0]): 1.1, ("mlp.down_proj",): 0.3}
    assert rank_by_role(units, loss) == [units[1], units[3], units[0], units[2]]


def test_roles_are_measured_before_the_search(tiny_model, tmp_path, monkeypatch, capsys):
    """With units of two roles, each role is quantized float in every layer once and scored, then the search runs
    over the units in role order; no probe folder is left behind."""
    picked = []

    def two_roles(*args):
        units = keep_units(*args)
        picked.extend([next(u for u in units if len(u) == 3), next(u for u in units if u[0].endswith("o_proj"))])
        return list(picked)

    monkeypatch.setattr(fallback, "keep_units", two_roles)
    summary = quantize(tiny_model("llama"), tmp_path / "out", "w8a8_dynamic", max_loss=0, **(FAST | {"progress": True}))
    lines = [line for line in capsys.readouterr().err.splitlines() if line.startswith("max-loss:")]
    assert [line.split(" float")[0] for line in lines[1:3]] == ["max-loss: every q_proj/k_proj/v_proj",
                                                                 "max-loss: every o_proj"]  # fmt: skip
    assert len(summary.fallback.tried) >= 2 and set(summary.fallback.kept_float) <= {n for u in picked for n in u}
    assert [p.name for p in tmp_path.iterdir()] == ["out"]
