"""Build a CausalLM from a Hugging Face or ascend (ModelSlim) folder and load its tensors lazily (mmap)."""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from functools import partial
from pathlib import Path

import torch
from torch import nn

from slimquant.backends.base import Backend
from slimquant.backends.select import select_backend
from slimquant.config import KernelConfig
from slimquant.distributed.tensor_parallel import SINGLE, TensorParallel
from slimquant.format.checkpoint import DESCRIPTION_FILE, is_modelslim_dir
from slimquant.format.dtypes import CANONICAL, float_dtype
from slimquant.format.safetensors_io import Part, SafetensorsFolder
from slimquant.format.validation import FLOAT_TENSOR
from slimquant.kernels.cpu import has_native_half
from slimquant.layers.attention import Attention
from slimquant.layers.quant_config import AscendQuantConfig, QuantConfig
from slimquant.models.registry import model_class

logger = logging.getLogger(__name__)

QUANTIZATIONS = (None, "ascend")


@dataclass
class LoadedModel:
    """A model ready to run, with the config and settings it was built from."""

    model: nn.Module
    hf_config: object  # transformers.PretrainedConfig
    dtype: torch.dtype
    quantized: bool  # True if loaded from an ascend checkpoint
    backend: Backend  # which kernels run it (slimquant/backends), picked at load
    bytes_read: int = 0  # checkpoint bytes this process read (a tensor-parallel rank: about its share)


def load_model(
    path: str,
    *,
    dtype: str | torch.dtype = "auto",
    device: str = "cpu",
    quantization: str | None = None,
    trust_remote_code: bool = False,
    kernels: KernelConfig | None = None,
    enforce_eager: bool = False,
    tp: TensorParallel = SINGLE,
) -> LoadedModel:
    """Load the model in folder `path`; ascend checkpoints are detected by their quant_model_description.json.
    kernels picks the backend (default: KernelConfig(), the fastest that runs here); enforce_eager: no CUDA graphs;
    tp: this process's tensor-parallel group (it loads its part of the model)."""
    _check_folder(path)
    quantized = _use_ascend(path, quantization)
    config = _read_config(path, trust_remote_code)
    if not quantized:
        _check_float(path, config)
    backend = select_backend(device, kernels or KernelConfig(), enforce_eager, tp)
    torch_dtype = resolve_dtype(dtype, config, device, quantized, native=backend.name == "cpu-native")
    model_dtype = resolve_dtype(dtype, config)  # vLLM-Ascend's: dtype= where given, else the checkpoint's
    quant_config = AscendQuantConfig.from_folder(path, model_dtype) if quantized else QuantConfig()
    model = _build(path, config, quant_config, torch_dtype, device, tp)
    backend.bind(model)
    tensors = SafetensorsFolder(path)
    load_weights(model, tensors)
    for module in model.modules():
        if hasattr(module, "process_weights_after_loading"):
            module.process_weights_after_loading()
    backend.prepare(model)
    logger.info("backend: %s", backend.describe())
    return LoadedModel(model.eval(), config, torch_dtype, quantized, backend, tensors.bytes_read)


# config.json sizes that must be positive integers where present (a negative one makes no tensor)
_SIZES = ("hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads", "num_key_value_heads",
          "vocab_size", "head_dim", "moe_intermediate_size", "n_routed_experts", "num_experts_per_tok",
          "kv_lora_rank", "q_lora_rank", "qk_nope_head_dim", "qk_rope_head_dim", "v_head_dim")  # fmt: skip


def _build(
    path: str, config, quant_config: QuantConfig, torch_dtype: torch.dtype, device: str, tp: TensorParallel
) -> nn.Module:
    """The empty model of config; ValueError naming config.json when its sizes cannot make one."""
    bad = {k: v for k in _SIZES if (v := getattr(config, k, None)) is not None and not _positive_int(v)}
    if bad:
        raise ValueError(f"{path}/config.json: these sizes must be positive integers: {bad}")
    try:
        with torch.device(device):
            return model_class(config)(config, quant_config, torch_dtype, tp)
    except (RuntimeError, TypeError, ZeroDivisionError) as e:  # sizes that do not fit together
        raise ValueError(f"{path}/config.json does not describe a model that can be built: {e}") from e


def _positive_int(v) -> bool:
    return isinstance(v, int) and not isinstance(v, bool) and v > 0


def _read_config(path: str, trust_remote_code: bool):
    """transformers' config of the folder; ValueError (not transformers' own errors) when config.json is broken."""
    from transformers import AutoConfig

    try:
        return AutoConfig.from_pretrained(path, trust_remote_code=trust_remote_code)
    except Exception as e:  # noqa: BLE001 - transformers raises many kinds for a field of the wrong type
        raise ValueError(f"{path}/config.json cannot be read as a model config: {e}") from e


def _check_float(path: str, config) -> None:
    """A folder loaded as a float model holds float weights: ValueError for another quantization's release (its
    weights would load without their scales)."""
    if (qc := getattr(config, "quantization_config", None)) is None:
        return
    method = qc.get("quant_method") if isinstance(qc, dict) else getattr(qc, "quant_method", None)
    raise ValueError(
        f"{path} is a {method!r}-quantized release (config.json's quantization_config), which slimquant does not "
        f"run: convert it with `slimquant quantize {path} OUT --type w8a8_dynamic` (it reads FP8 releases and "
        "compressed-tensors' 8-bit and packed int4 ones) and run OUT, or start from the model's bf16 release"
    )


def _check_folder(path: str) -> None:
    """A model is a local folder with a config.json (nothing is fetched from a model hub)."""
    folder = Path(path)
    if not folder.is_dir():
        raise ValueError(
            f"model folder {path!r} not found: slimquant loads local folders only (download the model first, "
            "e.g. `huggingface-cli download <repo> --local-dir <folder>`)"
        )
    if not (folder / "config.json").is_file():
        raise ValueError(f"{path!r} has no config.json: pass the folder that holds the model's config and weights")


def _use_ascend(path: str, quantization: str | None) -> bool:
    """Whether to load as an ascend checkpoint; ValueError for unknown or impossible requests."""
    if quantization not in QUANTIZATIONS:
        raise ValueError(f"quantization must be None or 'ascend', got {quantization!r}")
    has_description = is_modelslim_dir(path)
    if not has_description and any(Path(path).glob("quant_model_weight*.safetensors")):
        raise ValueError(
            f"{path} holds quantized weights (quant_model_weight*.safetensors) but no {DESCRIPTION_FILE}, which "
            "says how each tensor was quantized: copy it from where the checkpoint was made, or quantize again"
        )
    if quantization == "ascend" and not has_description:
        raise ValueError(
            f"quantization='ascend' but {path} has no {DESCRIPTION_FILE}: it is a float checkpoint. "
            "Quantize it first (`slimquant quantize SRC DST`) or drop quantization='ascend'."
        )
    if has_description and quantization is None:
        logger.info(
            "%s holds %s: loading it as an ascend-quantized checkpoint (quantization='ascend')", path, DESCRIPTION_FILE
        )
    return has_description


def resolve_dtype(
    dtype: str | torch.dtype, config, device: str | None = None, quantized: bool = False, native: bool = False
) -> torch.dtype:
    """'auto' -> the config's dtype; float32 if absent, or on a CPU that runs it faster (see _cpu_auto_dtype;
    native: the cpu-native backend runs the model)."""
    if dtype == "auto":
        named = getattr(config, "dtype", None) or getattr(config, "torch_dtype", None) or torch.float32
        if (resolved := float_dtype(named)) is None:
            raise ValueError(f"config.json has dtype {named!r}; pass dtype= one of {list(CANONICAL)}")
        return _cpu_auto_dtype(resolved, device, quantized and native)
    if (resolved := float_dtype(dtype)) is None:
        raise ValueError(f"dtype must be 'auto', one of {list(CANONICAL)} or the torch dtype, got {dtype!r}")
    return resolved


def kv_cache_dtype(setting: str, dtype: str | torch.dtype, loaded: LoadedModel, device: str) -> torch.dtype:
    """The KV cache's dtype for the engine's kv_cache_dtype setting. 'auto' is int8 for a checkpoint with int8
    (C8) KV-cache scales, as in vLLM-Ascend; else the model's dtype, as in vLLM: the activations' dtype, except
    where dtype='auto' widened a bf16 checkpoint's activations to fp32 on the CPU (int8 kernels, or no native
    bf16): the cache stays bf16 there, half the bytes for the kernels to read."""
    scales = has_kv_cache_scales(loaded.model)
    if setting == "int8" and not scales:
        raise ValueError(
            "kv_cache_dtype='int8' needs the checkpoint's int8 KV-cache scales, and this model has none: quantize it "
            "with `slimquant quantize --kv-cache int8` (or use a ModelSlim checkpoint with kv_cache_type C8)"
        )
    if setting == "int8" or (setting == "auto" and scales):
        return torch.int8
    if setting != "auto":
        return resolve_dtype(setting, loaded.hf_config)
    widened = dtype == "auto" and str(device).startswith("cpu") and loaded.dtype == torch.float32
    if widened and resolve_dtype("auto", loaded.hf_config) == torch.bfloat16:
        return torch.bfloat16
    return loaded.dtype


def has_kv_cache_scales(model: nn.Module) -> bool:
    """Whether the model's attention layers carry int8 KV-cache scales (a C8 checkpoint)."""
    return any(isinstance(m, Attention) and m.kv_quant is not None for m in model.modules())


def _cpu_auto_dtype(dtype: torch.dtype, device: str | None, native_int8: bool) -> torch.dtype:
    """float32 on a CPU where it is faster: int8 checkpoints on the native kernels (they take fp32 activations
    and fuse the layer's other ops only in fp32), or bf16/fp16 only emulated (~10x slower)."""
    if device is None or not str(device).startswith("cpu") or dtype == torch.float32:
        return dtype
    if native_int8:
        logger.info("int8 checkpoint on CPU: dtype='auto' runs activations in float32 (the native kernels' dtype)")
    elif has_native_half():
        return dtype
    else:
        logger.info("this CPU has no native %s: dtype='auto' runs in float32 (pass dtype= to override)", dtype)
    return torch.float32


def load_weights(model: nn.Module, tensors: SafetensorsFolder) -> None:
    """Fill every parameter from the checkpoint (extra tensors are ignored); ValueError naming missing ones."""
    missing = []
    for name, load, optional, part in weight_entries(model):
        if name in tensors:
            load(tensors.get(name, part))
        elif not optional:
            missing.append(name)
    if missing:
        raise ValueError(
            f"{len(missing)} tensors are missing from {tensors.path}: {missing[:5]}"
            f"{' ...' if len(missing) > 5 else ''}. Likely causes: config.json does not match the weights "
            "(architecture, layer count, tie_word_embeddings), the tensor names carry another prefix, "
            "or shard files are missing."
        )


def weight_entries(model: nn.Module) -> Iterator[tuple[str, Callable[[torch.Tensor], None], bool, Part | None]]:
    """(checkpoint name, loader, optional, the part of it to read or None) for every parameter; modules with
    checkpoint_entries() name their own (Linear: its shards, quant tensors and a tensor-parallel rank's part)."""
    for module_name, module in model.named_modules():
        if hasattr(module, "checkpoint_entries"):
            assert module.prefix == module_name, f"layer prefix {module.prefix} built at {module_name}"
            for name, load, optional, *part in module.checkpoint_entries():
                yield name, load, optional, part[0] if part else None
            continue
        for param_name, param in module.named_parameters(recurse=False):
            name = f"{module_name}.{param_name}"
            yield name, partial(_copy_into, name, param), getattr(param, "optional", False), None


def _copy_into(name: str, param: nn.Parameter, tensor: torch.Tensor) -> None:
    if param.is_floating_point():
        FLOAT_TENSOR.check(name, tensor)
    if tensor.shape != param.shape:
        raise ValueError(
            f"{name}: checkpoint shape {tuple(tensor.shape)} != model shape {tuple(param.shape)}; "
            "the checkpoint does not match config.json"
        )
    param.data.copy_(tensor)
