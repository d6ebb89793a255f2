"""Engine configuration: dataclasses that carry every setting, validated with ValueError.

The SLIMQUANT_* environment variables are read here and nowhere else: each is the documented default of one field
(ENVIRONMENT lists them), read when a config is made at an entry point, so a setting can always be passed instead.
"""

from __future__ import annotations

import dataclasses
import logging
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from slimquant.devices import check_device, rank_device
from slimquant.distributed.cpu_binding import check_spec
from slimquant.format.dtypes import DTYPE_NAMES, names_of

logger = logging.getLogger(__name__)

KV_CACHE_DTYPES = ("auto", *names_of("bfloat16", "float32"), "int8")  # see loader.kv_cache_dtype
QUANTIZATIONS = (None, "ascend")
BACKENDS = ("auto", "cpu-native", "cuda-triton", "torch-reference")
ISAS = ("auto", "avx2", "avx512vnni", "amx")
# int8 GEMM of the cuda-triton backend: cuBLASLt (torch._int_mm) + a dequantize kernel, or one Triton kernel
CUDA_INT8_GEMMS = ("cublas", "triton")
DEFAULT_KV_CACHE_BYTES = 2 << 30  # upper bound when kv_cache_memory_bytes is not given

# vLLM engine arguments that have no meaning here: accepted with a one-line warning.
VLLM_IGNORED = frozenset(
    {
        "gpu_memory_utilization",
        "swap_space",
        "cpu_offload_gb",
        "disable_log_stats",
        "disable_custom_all_reduce",
        "max_seq_len_to_capture",
        "tokenizer_mode",
        "revision",
        "tokenizer_revision",
        "code_revision",
        "download_dir",
        "load_format",
        "compilation_config",
        "disable_async_output_proc",
        "max_logprobs",
        "task",
        "hf_token",
        "worker_cls",
        "num_scheduler_steps",
        "allowed_local_media_path",
        "additional_config",  # vLLM-Ascend's switches (its schedulers, torchair graphs)
        "disable_log_requests",  # the server's (vllm serve)
        "enable_log_requests",
        "uvicorn_log_level",
    }
)
# vLLM parallelism arguments: accepted when 1 (the only supported value).
# How tensor-parallel row-parallel linears reduce: "exact" sums int32 products (after agreeing on each token's
# absmax) and dequantizes once, as one process does; "vllm-ascend" does what vLLM-Ascend does on NPUs: each rank
# quantizes its own part of the input, dequantizes its product (quant_bias and the float bias on rank 0 only), and
# the ranks sum the float outputs.
TENSOR_PARALLEL_ORDERS = ("exact", "vllm-ascend")
VLLM_SINGLE_DEVICE = ("pipeline_parallel_size", "data_parallel_size")


# variable -> (what it sets, its default): the only place the environment is read.
ENVIRONMENT = {
    "SLIMQUANT_BACKEND": ("KernelConfig.backend", "auto"),
    "SLIMQUANT_NATIVE": ("0: KernelConfig.backend torch-reference on the CPU (older name)", "1"),
    "SLIMQUANT_ISA": ("KernelConfig.isa", "auto"),
    "SLIMQUANT_GREEDY_SCREEN": ("KernelConfig.greedy_screen", "1"),
    "SLIMQUANT_CUDA_INT8_GEMM": ("KernelConfig.cuda_int8_gemm", "cublas"),
    "SLIMQUANT_HUGEPAGES": ("KernelConfig.hugepages", "1"),
    "SLIMQUANT_CACHE": ("KernelConfig.cache_dir; the demo's models (zoo.py)", "~/.cache/slimquant"),
    "SLIMQUANT_API_KEY": ("slimquant serve --api-key", ""),
    "VLLM_CPU_OMP_THREADS_BIND": ("EngineConfig.cpu_threads_bind: each tensor-parallel rank's cores", "auto"),
    "WORLD_SIZE": ("torchrun's: slimquant serve joins its group (-tp = its size; rank 0 serves)", ""),
    "LOCAL_RANK": ("torchrun's: EngineConfig.local_rank, a tensor-parallel rank's GPU (cuda:LOCAL_RANK)", ""),
    "GROUP_WORLD_SIZE": ("torchrun's: under slimquant serve, EngineConfig.nnodes", "1"),
    "GROUP_RANK": ("torchrun's: under slimquant serve, EngineConfig.node_rank", "0"),
    "MASTER_ADDR": ("torchrun's: under slimquant serve, EngineConfig.master_addr (the nodes beat there)", ""),
    "MASTER_PORT": ("torchrun's: under slimquant serve, EngineConfig.master_port", ""),
}


def env_setting(name: str) -> str:
    """The value of one SLIMQUANT_* variable, or its documented default (ENVIRONMENT)."""
    return os.environ.get(name) or ENVIRONMENT[name][1]


def cache_root() -> Path:
    """$SLIMQUANT_CACHE, default ~/.cache/slimquant: built kernels and the demo's converted models."""
    return Path(env_setting("SLIMQUANT_CACHE")).expanduser()


def _env_int(name: str) -> int | None:
    value = env_setting(name)
    return int(value) if value else None


def _env_flag(name: str) -> bool:
    return env_setting(name) != "0"


def _env_backend() -> str:
    return "torch-reference" if env_setting("SLIMQUANT_NATIVE") == "0" else env_setting("SLIMQUANT_BACKEND")


@dataclass(frozen=True)
class KernelConfig:
    """Which kernels run a model and how; picked once when the model loads (slimquant/backends). Each field
    defaults to its SLIMQUANT_* variable (ENVIRONMENT), read when the config is made."""

    backend: str = field(default_factory=_env_backend)  # auto: cpu-native on a CPU, cuda-triton on a GPU
    isa: str = field(default_factory=lambda: env_setting("SLIMQUANT_ISA"))  # the native build (auto: the CPU's best)
    greedy_screen: bool = field(default_factory=lambda: _env_flag("SLIMQUANT_GREEDY_SCREEN"))  # int8 head screen
    cuda_int8_gemm: str = field(default_factory=lambda: env_setting("SLIMQUANT_CUDA_INT8_GEMM"))  # CUDA_INT8_GEMMS
    hugepages: bool = field(default_factory=lambda: _env_flag("SLIMQUANT_HUGEPAGES"))  # weights in huge pages
    cache_dir: Path = field(default_factory=lambda: cache_root() / "kernels")  # built native libraries

    def __post_init__(self) -> None:
        _check(self.backend in BACKENDS, "backend", self.backend, f"one of {BACKENDS}")
        _check(self.isa in ISAS, "isa", self.isa, f"one of {ISAS}")
        _check(
            self.cuda_int8_gemm in CUDA_INT8_GEMMS, "cuda_int8_gemm", self.cuda_int8_gemm, f"one of {CUDA_INT8_GEMMS}"
        )
        object.__setattr__(self, "cache_dir", Path(self.cache_dir).expanduser())

    @classmethod
    def of(cls, value: KernelConfig | dict | None) -> KernelConfig:
        """A KernelConfig from itself, a dict of its fields (LLM(kernels={...})), or None (the defaults)."""
        if isinstance(value, KernelConfig):
            return value
        if value is not None and not isinstance(value, dict):
            raise ValueError(f"kernels must be a KernelConfig or a dict of its fields, got {value!r}")
        unknown = sorted(set(value or {}) - {f.name for f in dataclasses.fields(cls)})
        if unknown:
            raise ValueError(f"unknown kernel setting(s) {unknown}; known: {[f.name for f in dataclasses.fields(cls)]}")
        return cls(**(value or {}))


@dataclass
class EngineConfig:
    """Everything the engine needs; max_model_len is resolved from the model config when None."""

    model: str
    tokenizer: str | None = None
    dtype: str = "auto"
    kv_cache_dtype: str = "auto"
    quantization: str | None = None
    max_model_len: int | None = None
    trust_remote_code: bool = False
    seed: int = 0
    max_num_seqs: int = 256
    max_num_batched_tokens: int | None = None
    kv_cache_memory_bytes: int | None = None
    num_kv_blocks: int | None = None
    block_size: int = 16
    device: str = "cpu"
    enforce_eager: bool = False  # CUDA: run decode steps op by op instead of as CUDA graph replays
    enable_prefix_caching: bool = True
    enable_chunked_prefill: bool = True
    kernels: KernelConfig | dict | None = None  # KernelConfig, or a dict of its fields; None: the defaults
    tensor_parallel_size: int = 1  # > 1: the model split over this many processes (started here, or torchrun's)
    enable_expert_parallel: bool = False  # MoE layers: whole experts per rank instead of a part of every expert
    # row-parallel linears: "exact" (one process's bits) or "vllm-ascend" (its float all-reduce of each rank's part)
    tensor_parallel_order: str = "exact"
    # each local rank's cores: "auto" (contiguous groups), "0-3|4-7", or "all" (no binding); vLLM's
    # VLLM_CPU_OMP_THREADS_BIND (distributed/cpu_binding.py)
    cpu_threads_bind: str = field(default_factory=lambda: env_setting("VLLM_CPU_OMP_THREADS_BIND"))
    nnodes: int = 1  # machines the ranks are spread over (tensor_parallel_size / nnodes ranks on each)
    node_rank: int = 0  # this machine's index; 0 serves, the others run --headless
    master_addr: str = "127.0.0.1"  # node 0's address, where the ranks meet
    master_port: int | None = None  # its port (needed with nnodes > 1; else a free one)
    join_timeout: float = 600.0  # seconds the ranks wait for each other to meet there (torchrun's join_timeout)
    # seconds a step waits for a rank that does not answer (hung, or its machine gone without closing its
    # connections) before it fails; an idle rank waits for the next step as long as it takes. vLLM's
    # VLLM_EXECUTE_MODEL_TIMEOUT_SECONDS
    execute_model_timeout: float = 300.0
    # nnodes > 1: seconds without a heartbeat after which node 0 counts another node lost, or another node node 0
    # (its machine down or cut off, or its processes stopped): every rank then stops within seconds, whatever
    # execute_model_timeout is. TorchElastic's rendezvous gives a node about as long (3 keep-alives 5 s apart)
    node_timeout: float = 15.0
    # this process's index among its machine's ranks (torchrun's LOCAL_RANK); None: the rank modulo ranks_per_node
    local_rank: int | None = field(default_factory=lambda: _env_int("LOCAL_RANK"))
    # "mp": this process is rank 0 and drives the others (started here, or torchrun's); "external_launcher": every
    # rank of torchrun's group runs its own engine; None: external_launcher under torchrun, else mp (as vLLM)
    distributed_executor_backend: str | None = None

    def __post_init__(self) -> None:
        self.kernels = KernelConfig.of(self.kernels)
        self.model = str(self.model)
        if self.tokenizer is not None:
            self.tokenizer = str(self.tokenizer)
        _check(self.dtype in DTYPE_NAMES, "dtype", self.dtype, f"one of {DTYPE_NAMES}")
        if str(self.kv_cache_dtype).startswith("fp8"):
            raise ValueError(
                f"kv_cache_dtype={self.kv_cache_dtype!r} is not supported: slimquant caches keys and values in "
                "'auto' (the model's dtype, or int8 for a checkpoint with int8 KV-cache scales), 'bfloat16', "
                "'float32' or 'int8'"
            )
        kv_dtype = self.kv_cache_dtype
        _check(kv_dtype in KV_CACHE_DTYPES, "kv_cache_dtype", kv_dtype, f"one of {KV_CACHE_DTYPES}")
        _check(self.quantization in QUANTIZATIONS, "quantization", self.quantization, f"one of {QUANTIZATIONS}")
        for name in ("max_num_seqs", "block_size", "tensor_parallel_size", "nnodes"):
            _check_positive(name, getattr(self, name))
        for name in ("max_model_len", "max_num_batched_tokens", "kv_cache_memory_bytes", "num_kv_blocks"):
            if getattr(self, name) is not None:
                _check_positive(name, getattr(self, name))
        _check(isinstance(self.seed, int), "seed", self.seed, "an int")
        order, orders = self.tensor_parallel_order, TENSOR_PARALLEL_ORDERS
        _check(order in orders, "tensor_parallel_order", order, f"one of {orders}")
        self._check_nodes()
        check_spec(self.cpu_threads_bind, self.ranks_per_node)
        executor, executors = self.distributed_executor_backend, (None, "mp", "external_launcher")
        _check(executor in executors, "distributed_executor_backend", executor, f"one of {executors}")
        check_device(self.device)
        if self.local_rank is not None:
            _check(self.local_rank >= 0, "local_rank", self.local_rank, "a rank's index on its machine (>= 0)")
        self.rank_device(self.ranks_per_node - 1)  # this machine's last rank has its GPU (torchrun: this rank)

    def rank_device(self, rank: int) -> str:
        """Where tensor-parallel rank rank runs (devices.rank_device): cuda:LOCAL_RANK on a GPU."""
        local = self.local_rank if self.local_rank is not None else rank % self.ranks_per_node
        return rank_device(self.device, local, self.tensor_parallel_size)

    @property
    def ranks_per_node(self) -> int:
        """Tensor-parallel ranks on each machine."""
        return self.tensor_parallel_size // self.nnodes

    def _check_nodes(self) -> None:
        tp, n = self.tensor_parallel_size, self.nnodes
        for name in ("join_timeout", "execute_model_timeout", "node_timeout"):
            wait = getattr(self, name)
            ok = isinstance(wait, int | float) and not isinstance(wait, bool) and wait > 0
            _check(ok, name, wait, "a positive number of seconds")
        _check(tp % n == 0, "nnodes", n, f"a divisor of tensor_parallel_size={tp} (the same ranks on every node)")
        _check(0 <= self.node_rank < n, "node_rank", self.node_rank, f"in [0, nnodes={n})")
        if n > 1 and self.master_port is None:
            raise ValueError("nnodes > 1 needs master_port (--master-port): the port on node 0 where the ranks meet")

    @classmethod
    def from_kwargs(cls, model: str, **kwargs: Any) -> EngineConfig:
        """Build from LLM(...) keyword arguments: warn on vLLM-only ones, TypeError on unknown ones."""
        fields = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(k for k in kwargs if k not in fields and k not in VLLM_IGNORED and k not in VLLM_SINGLE_DEVICE)
        if unknown:
            raise TypeError(f"LLM() got unexpected keyword argument(s): {', '.join(unknown)}")
        for name in VLLM_SINGLE_DEVICE:
            if kwargs.pop(name, 1) not in (1, None):
                raise ValueError(f"{name} must be 1: slimquant splits a model by tensor (and expert) parallelism only")
        ignored = sorted(k for k in kwargs if k in VLLM_IGNORED)
        if ignored:
            logger.warning("ignoring vLLM argument(s) that have no effect in slimquant: %s", ", ".join(ignored))
        return cls(model=model, **{k: v for k, v in kwargs.items() if k in fields})

    def resolve(self, model_max_len: int | None) -> None:
        """Fill max_model_len / max_num_batched_tokens from the model's limit and check they agree."""
        if self.max_model_len is None:
            self.max_model_len = model_max_len or 2048
        elif model_max_len is not None and self.max_model_len > model_max_len:
            raise ValueError(
                f"max_model_len={self.max_model_len} exceeds the model's maximum context of {model_max_len}"
            )
        if self.max_num_batched_tokens is None:
            default = 8192 if self.enable_chunked_prefill else max(8192, self.max_model_len)
            self.max_num_batched_tokens = default
        if not self.enable_chunked_prefill and self.max_num_batched_tokens < self.max_model_len:
            raise ValueError(
                f"max_num_batched_tokens ({self.max_num_batched_tokens}) is smaller than max_model_len "
                f"({self.max_model_len}) without chunked prefill; raise it or enable_chunked_prefill=True"
            )


def _check(ok: bool, name: str, value: Any, expected: str) -> None:
    if not ok:
        raise ValueError(f"{name} must be {expected}, got {value!r}")


def _check_positive(name: str, value: Any) -> None:
    _check(isinstance(value, int) and not isinstance(value, bool) and value > 0, name, value, "a positive int")
