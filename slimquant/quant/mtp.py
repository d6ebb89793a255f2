"""DeepSeek-V3's multi-token-prediction (MTP) layers, quantized as ModelSlim's `--quant_mtp mix` does (--quant-mtp).

An MTP layer (model.layers.{num_hidden_layers + d - 1}) predicts token i + d + 1 from the main model's hidden state
at i and the embedding of token i + d: eh_proj([enorm(embed(t[i + d])); hnorm(h[i])]) is the input of a decoder
layer like the others. ModelSlim quantizes that decoder layer with the model's recipe (static MLA under w8a8,
dynamic experts) but without smoothing, keeps eh_proj, enorm, hnorm, embed_tokens and shared_head float, and
marks config.json with mtp_quantize = w8a8_dynamic, the value vLLM-Ascend (v0.13 to v0.23) looks for.
"""

from __future__ import annotations

import torch

from slimquant.format.architectures import EMBED_PREFIX, layer_index, layer_prefix

CONFIG_FIELDS = {"mtp_quantize": "w8a8_dynamic"}
INPUT_TENSORS = ("enorm.weight", "hnorm.weight", "eh_proj.weight")  # what builds the layer's input


def mtp_layers(keys: list[str], num_layers: int) -> list[int]:
    """Indices of the checkpoint's layers past num_hidden_layers, in order."""
    return sorted({i for k in keys if (i := layer_index(k)) is not None and i >= num_layers})


def check_mtp(keys: list[str], num_layers: int) -> list[int]:
    """The MTP layers to quantize; ValueError where the checkpoint has none or lacks their input tensors."""
    layers = mtp_layers(keys, num_layers)
    if not layers:
        raise ValueError(
            f"--quant-mtp: the checkpoint has no layers past num_hidden_layers={num_layers} (DeepSeek-V3's MTP "
            "layer is model.layers.61); drop --quant-mtp"
        )
    have = set(keys)
    missing = [layer_prefix(i) + t for i in layers for t in INPUT_TENSORS if layer_prefix(i) + t not in have]
    if missing:
        raise ValueError(f"--quant-mtp: MTP layer tensor {missing[0]!r} is missing; the checkpoint is incomplete")
    return layers


@torch.no_grad()
def mtp_input(ckpt, i: int, num_layers: int, ids: torch.Tensor, hidden: torch.Tensor, eps: float) -> torch.Tensor:
    """The input [S, T - 1, H] of MTP layer i from the calibration ids [S, T] and the hidden states [S, T, H] the
    layer before it gave (the main model's last layer, or the previous MTP layer's)."""
    p, depth = layer_prefix(i), i - num_layers + 1
    embed_name = p + "embed_tokens.weight" if p + "embed_tokens.weight" in ckpt else EMBED_PREFIX + "weight"
    device, dtype = hidden.device, hidden.dtype

    def get(name: str) -> torch.Tensor:
        return ckpt.get(name).to(device, dtype)

    tokens = torch.nn.functional.embedding(ids[:, depth:].to(device), get(embed_name))  # [S, T - d, H]
    h = hidden[:, -tokens.shape[1] - 1 : -1]  # [S, T - d, H]: position i beside token i + d
    joined = torch.cat(
        [_rms_norm(tokens, get(p + "enorm.weight"), eps), _rms_norm(h, get(p + "hnorm.weight"), eps)], -1
    )
    return joined @ get(p + "eh_proj.weight").T  # [S, T - d, H]


def _rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps) * weight
