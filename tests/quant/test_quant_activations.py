"""Calibration activations in bounded memory (quant/activations.py): a store keeps the budget it shares with the
run's other stores, gives back exactly the batches it took, in memory or from files, and a quantize run that spills
every batch writes the same bytes as one that holds them all, and resumes from its checkpoints as well."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from slimquant import quantize
from slimquant.quant.activations import Activations, Spill

KW = dict(num_samples=8, seq_len=32, progress=False)


def batches(n: int, shape=(2, 3, 4)) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    return [torch.randn(*shape, generator=g) for _ in range(n)]


def test_a_store_keeps_its_budget_and_gives_back_its_batches(tmp_path):
    data = batches(5)  # 96 bytes each
    spill = Spill(tmp_path / "spill", budget=200)
    store = Activations.of(data, spill)
    assert spill.held == 192 and store.spilled == 3  # two fit, three go to files
    other = Activations.of(data[:1], spill)  # the budget is shared: this one spills too
    assert other.spilled == 1 and spill.held == 192
    assert all(torch.equal(a, b) for a, b in zip(store, data, strict=True)) and len(store) == 5
    store[4] = data[4] * 2  # a spilled batch replaced in its file
    store[0] = data[0] * 3  # an in-memory one replaced
    assert torch.equal(store[4], data[4] * 2) and torch.equal(store[0], data[0] * 3) and spill.held == 192
    assert torch.equal(store.tensor(), torch.cat([data[0] * 3, *data[1:4], data[4] * 2]))
    store.release()
    other.release()
    assert spill.held == 0 and list((tmp_path / "spill").iterdir()) == []


def test_tuples_round_trip_and_map_keeps_the_order(tmp_path):
    rows = [(t, torch.arange(6).reshape(3, 2) + i, t.sum(-1)) for i, t in enumerate(batches(3, (3, 4)))]
    store = Activations.of(rows, Spill(tmp_path / "spill", budget=1))  # every batch in a file
    assert store.spilled == 3
    for got, want in zip(store, rows, strict=True):
        assert isinstance(got, tuple) and all(torch.equal(a, b) for a, b in zip(got, want, strict=True))
        assert got[1].dtype == torch.int64
    doubled = store.map(lambda b, batch: batch[0] * 2 + b)
    assert all(torch.equal(doubled[b], rows[b][0] * 2 + b) for b in range(3))


def test_a_saved_store_loads_without_copying_into_memory(tmp_path):
    data = batches(4)
    spill = Spill(tmp_path / "spill", budget=100)  # one batch in memory, three in files
    Activations.of(data, spill).save(tmp_path / "ckpt")
    loaded = Activations.load(tmp_path / "ckpt", spill)
    assert loaded.spilled == 4 and spill.held == 96  # the loaded store holds nothing in memory
    assert torch.equal(loaded.tensor(), torch.cat(data))
    loaded[1] = data[1] + 1  # a checkpoint's file is never written: the batch moves into the store's own
    assert torch.equal(loaded[1], data[1] + 1)
    assert torch.equal(Activations.load(tmp_path / "ckpt", Spill()).tensor(), torch.cat(data))
    loaded.release()
    assert len(list((tmp_path / "ckpt").iterdir())) == 4  # the checkpoint's files stay


@pytest.mark.parametrize("quant_type", ["w8a8_dynamic", "w8a8"])
def test_quantize_with_every_activation_spilled_writes_the_same_bytes(tiny_model, tmp_path, monkeypatch, quant_type):
    src = tiny_model("deepseek_v3", num_hidden_layers=3)  # a dense layer, then MoE layers (recorded expert inputs)
    quantize(src, tmp_path / "memory", quant_type, **KW)
    spilled = []
    real = Spill.new_file
    monkeypatch.setattr(Spill, "new_file", lambda self: spilled.append(1) or real(self))
    quantize(src, tmp_path / "disk", quant_type, activation_memory=1, **KW)
    batches, moe_layers = 8 // 4, 2  # 8 samples, batch size 4
    # embeddings and each layer's output; each MoE layer's expert inputs (float, quantized) and routed outputs
    assert len(spilled) == batches * (1 + 3) + moe_layers * batches * 3
    assert files(tmp_path / "disk") == files(tmp_path / "memory")
    assert not (tmp_path / ".disk.partial").exists()  # the spill folder went with the staging folder


def test_a_run_that_ran_out_of_memory_resumes_with_a_smaller_budget(tiny_model, tmp_path, monkeypatch):
    from slimquant.quant import layer_quant, pipeline

    src = tiny_model("deepseek_v3", num_hidden_layers=3)
    quantize(src, tmp_path / "whole", "w8a8_dynamic", **KW)
    real, calls = layer_quant.quantize_layer, [0]

    def out_of_memory_at_layer_2(*args, **kw):
        calls[0] += 1
        if calls[0] == 3:
            raise MemoryError("out of memory")
        return real(*args, **kw)

    with monkeypatch.context() as m:
        m.setattr(pipeline, "quantize_layer", out_of_memory_at_layer_2)
        with pytest.raises(MemoryError):
            quantize(src, tmp_path / "out", "w8a8_dynamic", activation_memory=1, **KW)
    partial = tmp_path / ".out.partial"
    assert (partial / "resume-hidden-2").is_dir() and not (partial / "activations").exists()
    summary = quantize(src, tmp_path / "out", "w8a8_dynamic", resume=True, activation_memory="1KB", **KW)
    assert summary.resumed_layers == 2
    assert files(tmp_path / "out") == files(tmp_path / "whole")


def test_activation_memory_must_be_a_size(tiny_model, tmp_path):
    with pytest.raises(ValueError, match="activation memory must be positive"):
        quantize(tiny_model("llama"), tmp_path / "out", activation_memory=0, **KW)


def files(folder: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(folder.iterdir())}
