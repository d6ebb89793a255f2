"""Where tensor-parallel ranks run on GPUs: one GPU per rank on each machine (cuda:LOCAL_RANK, as vLLM places them),
refused up front where a machine lacks its ranks' GPUs; step inputs reach each rank's own device. The GPU count is
faked here (CI has no GPU); tests/gpu runs the ranks on real ones."""

from __future__ import annotations

import pytest
import torch

from slimquant.config import EngineConfig
from slimquant.devices import rank_device
from slimquant.layers.context import ForwardContext


@pytest.fixture
def gpus(monkeypatch):
    """fake(n): torch sees n CUDA GPUs."""

    def fake(n: int) -> None:
        monkeypatch.setattr(torch.cuda, "is_available", lambda: n > 0)
        monkeypatch.setattr(torch.cuda, "device_count", lambda: n)

    return fake


def test_each_local_rank_gets_its_own_gpu(gpus):
    gpus(2)
    assert [rank_device("cuda", r, 2) for r in (0, 1)] == ["cuda:0", "cuda:1"]
    assert rank_device("cpu", 1, 2) == "cpu"
    assert rank_device("cuda:1", 0, 1) == "cuda:1"  # one process: the GPU it names
    with pytest.raises(ValueError, match=r"local rank 2 needs cuda:2, but torch sees 2 CUDA GPU\(s\)"):
        rank_device("cuda", 2, 4)
    with pytest.raises(ValueError, match="pass device 'cuda'; each rank runs on its own GPU"):
        rank_device("cuda:1", 0, 2)


def test_engine_config_places_ranks_by_machine(gpus, monkeypatch):
    gpus(2)
    monkeypatch.delenv("LOCAL_RANK", raising=False)
    with pytest.raises(ValueError, match="run at most 2 ranks per machine"):
        EngineConfig(model="m", device="cuda", tensor_parallel_size=4)  # 4 ranks on one machine of 2 GPUs
    nodes = EngineConfig(model="m", device="cuda", tensor_parallel_size=4, nnodes=2, node_rank=1, master_port=29500)
    assert [nodes.rank_device(r) for r in range(4)] == ["cuda:0", "cuda:1", "cuda:0", "cuda:1"]
    monkeypatch.setenv("LOCAL_RANK", "1")  # torchrun's: it knows where this process runs
    assert EngineConfig(model="m", device="cuda", tensor_parallel_size=4).rank_device(3) == "cuda:1"
    assert EngineConfig(model="m", tensor_parallel_size=4).rank_device(3) == "cpu"
    with pytest.raises(ValueError, match="local_rank"):
        EngineConfig(model="m", tensor_parallel_size=2, local_rank=-1)


def test_a_step_context_moves_to_a_rank_device():
    ctx = ForwardContext([2, 1], [5, 1], torch.tensor([3, 4, 9]), torch.tensor([[0, 1], [2, -1]]), 4)
    assert ctx.to(torch.device("cpu")) is ctx
    moved = ctx.to(torch.device("meta"))  # any other device: every tensor goes, the host lists stay
    assert moved.slot_mapping.is_meta and moved.block_tables.is_meta and moved.device_context_lens is None
    assert (moved.query_lens, moved.context_lens, moved.block_size) == ([2, 1], [5, 1], 4)
    assert ctx.slot_mapping.device.type == "cpu"
