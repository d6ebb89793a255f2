"""GatedMLP: the SwiGLU MLP of Llama-family layers, DeepSeek's dense layers and its shared experts."""

from __future__ import annotations

import torch
from torch import nn

from slimquant.backends.torch_ops import TORCH_OPS, TorchOps
from slimquant.distributed.tensor_parallel import SINGLE, TensorParallel
from slimquant.kernels.int8_input import InputQuant, Int8Rows
from slimquant.layers.linear import Linear
from slimquant.layers.quant_config import QuantConfig


class GatedMLP(nn.Module):
    """down_proj(silu(gate_proj x) * up_proj x), gate and up fused; under tensor parallel gate_up is
    column-parallel and down row-parallel."""

    ops: TorchOps = TORCH_OPS  # the backend's ops (Backend.bind)

    def __init__(
        self,
        hidden: int,
        inter: int,
        quant_config: QuantConfig,
        prefix: str,
        dtype: torch.dtype,
        bias: bool = False,
        tp: TensorParallel = SINGLE,
    ):
        super().__init__()
        common = dict(quant_config=quant_config, dtype=dtype, bias=bias, tp=tp)
        self.gate_up_proj = Linear(
            hidden, [inter, inter], prefix=f"{prefix}.gate_up_proj", shards=["gate_proj", "up_proj"],
            parallel="column", **common,
        )  # fmt: skip
        self.down_proj = Linear(inter, [hidden], prefix=f"{prefix}.down_proj", parallel="row", **common)

    @property
    def input_quant(self) -> InputQuant | None:
        """gate_up_proj's input quantization (PreNormDecoderLayer)."""
        return self.gate_up_proj.input_quant

    def forward(self, x: torch.Tensor | Int8Rows) -> torch.Tensor:
        # [T, H] -> [T, 2I] -> [T, I] (quantized for down_proj where the ops fuse it) -> [T, H]
        return self.down_proj(self.ops.silu_and_mul_quant(self.gate_up_proj(x), self.down_proj.input_quant))


def check_activation(config) -> None:
    """ValueError unless config's hidden_act is silu (the only one the MLPs run)."""
    if config.hidden_act != "silu":
        raise ValueError(f"hidden_act {config.hidden_act!r} is not supported; only 'silu'")


def dense_mlp(config, quant_config: QuantConfig, prefix: str, dtype: torch.dtype, tp: TensorParallel) -> GatedMLP:
    """A decoder layer's dense MLP as config describes it (intermediate_size, mlp_bias, silu)."""
    check_activation(config)
    mlp_bias, h, i = bool(getattr(config, "mlp_bias", False)), config.hidden_size, config.intermediate_size
    return GatedMLP(h, i, quant_config, prefix, dtype, mlp_bias, tp)
