"""Routed experts streamed a group at a time (quant/expert_stream.py): the folder is the same bytes whatever the
group size (one expert at a time, a few, all at once), and no more experts than a group's budget allows are ever
in memory together."""

from __future__ import annotations

from pathlib import Path

import pytest

from slimquant import quantize
from slimquant.quant import expert_stream

KW = dict(num_samples=8, seq_len=32, progress=False)


def files(folder: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(folder.iterdir())}


@pytest.mark.parametrize(
    "arch,quant_type,options",
    [
        ("deepseek_v3", "w8a8_dynamic", {}),
        ("deepseek_v3", "w8a8", {}),  # static MLA, iterative smoothing
        ("deepseek_v2", "w8a8", {"rounding": "gptq"}),  # a Hessian per expert linear
        ("qwen3_moe", "w8a8", {}),  # no shared experts, a dense layer first
    ],
)
def test_the_group_size_changes_no_byte(tiny_model, tmp_path, arch, quant_type, options):
    src = tiny_model(arch, num_hidden_layers=3)
    outs = {}
    for memory in (1, 3 * 3 * 64 * 32 * 4, "1GiB"):  # one expert, three (3 linears of 64 x 32 in fp32), all
        outs[memory] = files(
            quantize(src, tmp_path / str(memory), quant_type, expert_memory=memory, **KW, **options).output
        )
    first, *others = outs.values()
    assert all(o == first for o in others)


def test_at_most_a_group_of_experts_is_in_memory(tiny_model, tmp_path, monkeypatch):
    """Experts loaded and not yet released, counted as the layer goes: never more than the budget's group."""
    src = tiny_model("deepseek_v3", num_hidden_layers=3)
    loaded, peak = set(), [0]
    real_load, real_release = expert_stream.StreamedExperts.load, expert_stream.StreamedExperts.release

    def load(self, e, state):
        loaded.add(e)
        peak[0] = max(peak[0], len(loaded))
        return real_load(self, e, state)

    def release(self, experts):
        loaded.difference_update(experts)
        return real_release(self, experts)

    monkeypatch.setattr(expert_stream.StreamedExperts, "load", load)
    monkeypatch.setattr(expert_stream.StreamedExperts, "release", release)
    expert_bytes = 3 * 64 * 32 * 4  # gate, up [32, 64] and down [64, 32] in fp32
    quantize(src, tmp_path / "out", "w8a8_dynamic", expert_memory=2 * expert_bytes, **KW)
    assert peak[0] == 2 and not loaded


def test_a_bad_budget_is_a_value_error(tiny_model, tmp_path):
    with pytest.raises(ValueError, match="expert memory must be positive"):
        quantize(tiny_model("deepseek_v3", num_hidden_layers=3), tmp_path / "out", expert_memory=0, **KW)


@pytest.mark.parametrize("spill", [False, True])
@pytest.mark.parametrize("group", [1, 3, 8])
def test_streamed_sums_equal_the_whole_layers_bit_for_bit(group, spill, tmp_path):
    """StreamedExperts.run over groups, summing into the outputs, gives PerExpert.forward's tensor exactly (same
    tokens per expert, same order of addition); recording and replay hand the layer what it would compute, also
    with what it records and sums held in files."""
    import torch
    from transformers import DeepseekV3Config
    from transformers.models.deepseek_v3.modeling_deepseek_v3 import DeepseekV3MLP

    from slimquant.quant.activations import Activations, Spill
    from slimquant.quant.moe import PerExpert

    torch.manual_seed(0)
    config = DeepseekV3Config(hidden_size=64, moe_intermediate_size=32)
    whole = PerExpert([DeepseekV3MLP(config, intermediate_size=32) for _ in range(8)]).eval()
    hidden = torch.randn(40, 64) * 3  # [T, H]
    index = torch.stack([torch.randperm(8)[:4] for _ in range(40)])  # [T, k]: 4, so that the order of sums shows
    weights = torch.rand(40, 4)
    want = whole(hidden, index, weights)
    budget = Spill(tmp_path, budget=1) if spill else Spill()
    meta = PerExpert([DeepseekV3MLP(config, intermediate_size=32).to("meta") for _ in range(8)])
    streamed = expert_stream.StreamedExperts(meta, lambda: Activations(budget))
    assert torch.equal(streamed(hidden, index, weights), torch.zeros_like(hidden))  # recording
    batches = streamed.take_recorded()
    outputs = Activations.of([torch.zeros_like(hidden)], budget)
    assert batches.spilled == outputs.spilled == int(spill)
    for experts in streamed.groups(1, budget=group):
        for e in experts:
            streamed.load(e, whole[e].state_dict())
        streamed.run(experts, batches, outputs)
        streamed.release(experts)
    assert torch.equal(outputs[0], want)
    streamed.replay = outputs
    assert torch.equal(streamed(hidden, index, weights), want)
    streamed.end_replay()
    batches.release()
    assert streamed.replay is None and len(outputs) == 0 and list(tmp_path.iterdir()) == [] and budget.held == 0
