"""`slimquant bench`: decode and prefill speed of models side by side, measured in the same run."""

from __future__ import annotations

import argparse
import functools
import gc
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from slimquant.config import CUDA_INT8_GEMMS, ISAS
from slimquant.devices import check_device
from slimquant.entrypoints.commands.generate import add_backend_arg, kernels_of

COLUMNS = ("decode, 1 stream", "prefill", "decode, N streams")


def register(sub: argparse._SubParsersAction) -> None:
    """Add the bench sub-command."""
    p = sub.add_parser(
        "bench",
        help="tokens/s of models side by side (decode 1 stream, prefill, decode N streams)",
        description="Measure each MODEL in this process, one after another: greedy decode of one stream, one "
        "prefill of --prompt-len tokens, and --streams concurrent streams decoding --decode-tokens each. "
        "Ratios are against the first row (the baseline), measured in the same run: transformers on the first "
        "float model given, unless --no-transformers. Then each model's decode speed against the memory-bandwidth "
        "limit (bytes of weights per decode step / read bandwidth measured right after that model's decode).\n\n"
        "example: slimquant bench SmolLM2-135M-Instruct out/w8a8-dynamic out/w8a8",
    )
    p.add_argument("models", nargs="+", help="model folders, or 'SmolLM2-135M-Instruct'; the first is the baseline")
    add_measure_args(p)
    p.set_defaults(func=run)


def add_measure_args(p: argparse.ArgumentParser) -> None:
    """The options of what is measured and how; `slimquant bench` and bench/speed.py share them."""
    p.add_argument(
        "--transformers",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="first row: transformers on the first float (non-ascend) model [on]",
    )
    p.add_argument(
        "--llama-cpp",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="a llama.cpp row when llama-cpp-python is installed: --gguf, or Q8_0 of the built-in SmolLM2 [on]",
    )
    p.add_argument("--gguf", type=Path, help="GGUF file for the llama.cpp row (default: made for SmolLM2 only)")
    p.add_argument("--prompt-len", type=int, default=512, help="prefill length in tokens [%(default)s]")
    p.add_argument("--decode-tokens", type=int, default=128, help="tokens per decode stream [%(default)s]")
    p.add_argument("--streams", type=int, default=16, help="concurrent decode streams [%(default)s]")
    p.add_argument("--dtype", default="auto", help="auto | bfloat16 | float16 | float32")
    p.add_argument("--kv-cache-dtype", default="auto", help="slimquant's KV cache: auto | bfloat16 | float32 | int8")
    p.add_argument("--device", default="cpu", choices=("cpu", "cuda"), help="where every system runs [cpu]")
    p.add_argument("--enforce-eager", action="store_true", help="CUDA: slimquant decodes without CUDA graphs")
    p.add_argument(
        "--cuda-int8-gemm",
        type=functools.partial(_choice_list, choices=CUDA_INT8_GEMMS),
        help="CUDA: the int8 models' GEMM, cublas | triton, or both comma-separated (a row each) [KernelConfig's]",
    )
    p.add_argument(
        "--isa",
        type=functools.partial(_choice_list, choices=ISAS[1:]),
        help="CPU: the int8 models' native build, " + " | ".join(ISAS[1:]) + ", or several comma-separated (a row "
        "each) [KernelConfig's]",
    )
    add_backend_arg(p)


def _choice_list(text: str, choices: tuple[str, ...]) -> list[str]:
    """'cublas,triton' -> ['cublas', 'triton'] (argparse type: ArgumentTypeError names the choices)."""
    picked = [c.strip() for c in text.split(",") if c.strip()]
    if not picked or any(c not in choices for c in picked):
        raise argparse.ArgumentTypeError(f"expected one or more of {', '.join(choices)}, comma-separated")
    return picked


@dataclass
class Row:
    """tokens/s of one system in each column; weight_bytes: bytes of weights one decode step reads, bandwidth:
    the memory read bandwidth (bytes/s) measured right after its single-stream decode."""

    name: str
    speeds: tuple[float, float, float]
    weight_bytes: int | None = None
    bandwidth: float | None = None
    backend: str = ""  # slimquant rows: the backend and what it decided at load (Backend.describe)


def run(args: argparse.Namespace) -> int:
    """Measure and print the table."""
    from slimquant import zoo

    paths = [str(zoo.resolve_model(m)) for m in args.models]
    check_device(args.device)
    print(machine_line(args.device))
    print_table(measure(paths, args, transformers=args.transformers), args)
    return 0


def machine_line(device: str = "cpu") -> str:
    """CPU model, threads, the ISA extensions that matter here and which native kernels run (or the GPU)."""
    import platform

    import torch

    if device == "cuda":
        props = torch.cuda.get_device_properties(0)
        return f"{props.name}, {props.multi_processor_count} SMs, torch {torch.__version__}, CUDA {torch.version.cuda}"

    from slimquant.kernels import native
    from slimquant.kernels.cpu import cpu_flags, cpu_model

    wanted = ("avx2", "avx512f", "avx512_vnni", "avx512_bf16", "amx_int8", "amx_bf16")
    flags = " ".join(f for f in wanted if f in cpu_flags()) or "none of avx2/avx512/amx"
    kernels = native.load().isa if native.available() else "unavailable"
    return (
        f"{cpu_model() or platform.machine()}, {torch.get_num_threads()} threads, torch {torch.__version__}; "
        f"CPU flags: {flags}; native kernels: {kernels}"
    )


def measure(paths: list[str], args: argparse.Namespace, transformers: bool) -> list[Row]:
    """One row per model (slimquant), after transformers on the first float model if asked."""
    if min(args.prompt_len, args.decode_tokens, args.streams) < 1:
        raise ValueError("--prompt-len, --decode-tokens and --streams must be at least 1")
    from slimquant.format.checkpoint import is_modelslim_dir

    rows = []
    float_dirs = [p for p in paths if not is_modelslim_dir(Path(p))]
    if transformers and float_dirs:
        rows.append(_bench_transformers(float_dirs[0], args))
    elif transformers:
        print("no float model among MODEL...: transformers cannot run the ascend format, so it has no row")
    gguf = _llama_cpp_gguf(args, float_dirs) if args.llama_cpp and args.device == "cpu" else None
    if gguf is not None:
        rows.append(_bench_llama_cpp(gguf, args))
    for p in paths:
        for variant in _int8_variants(args) if is_modelslim_dir(Path(p)) else [{}]:
            rows.append(_bench_slimquant(p, args, variant))
            gc.collect()  # free one engine (weights, KV cache) before the next
    return rows


def _int8_variants(args: argparse.Namespace) -> list[dict[str, str]]:
    """The kernel settings of an int8 model's rows: one per --cuda-int8-gemm and --isa (each pair where both)."""
    gemms = [{"cuda_int8_gemm": g} for g in args.cuda_int8_gemm or []] or [{}]
    isas = [{"isa": i} for i in args.isa or []] or [{}]
    return [g | i for g in gemms for i in isas]


def _tokens_per_s(n_tokens: int, fn: Callable[[], object]) -> float:
    return n_tokens / _seconds(fn)


def _bench_slimquant(path: str, args: argparse.Namespace, variant: dict[str, str]) -> Row:
    """variant: KernelConfig fields of this row (named after the model)."""
    from slimquant import LLM, SamplingParams

    max_len = args.prompt_len + args.decode_tokens + 16
    llm = LLM(
        model=path,
        dtype=args.dtype,
        kv_cache_dtype=args.kv_cache_dtype,
        max_model_len=max_len,
        max_num_seqs=max(args.streams, 1),
        max_num_batched_tokens=max(args.prompt_len, 512),
        enable_prefix_caching=False,
        device=args.device,
        enforce_eager=args.enforce_eager,
        kernels=kernels_of(args) | variant,
    )
    prompt = list(range(100, 100 + args.prompt_len))
    decode = SamplingParams(temperature=0, max_tokens=args.decode_tokens, ignore_eos=True)
    one = SamplingParams(temperature=0, max_tokens=1, ignore_eos=True)

    def gen(prompts, params):
        return llm.generate(prompts, params, use_tqdm=False)

    streams = [[1, 2, 3 + i] for i in range(args.streams)]
    warm = SamplingParams(max_tokens=4, ignore_eos=True)
    # warm-up: every shape (and CUDA graph) timed, and the greedy head's screen (built on the first greedy step
    # whose hidden states are fp32: a short prompt's, for a bf16 model)
    gen([[1, 2, 3]], warm), gen([[1, 2, 3]], one), gen([prompt], one), gen(streams, warm)
    d1 = _tokens_per_s(args.decode_tokens, lambda: gen([[1, 2, 3]], decode))
    bandwidth = read_bandwidth(args.device)  # the machine's bandwidth moves: read it next to the decode it limits
    pf = _tokens_per_s(args.prompt_len, lambda: gen([prompt], one))
    dn = _tokens_per_s(args.decode_tokens * args.streams, lambda: gen(streams, decode))
    runner = llm.llm_engine.runner
    weight_bytes = decode_weight_bytes(runner.model, runner.sampler.head)
    name = f"slimquant {_short(path)}" + (f" ({', '.join(variant.values())})" if variant else "")
    return Row(name, (d1, pf, dn), weight_bytes, bandwidth, runner.backend.describe())


def decode_weight_bytes(model, head) -> int:
    """Bytes of weights one greedy decode step of one stream reads: every parameter, but of the embedding table one
    row (unless tied), of a MoE layer's routed experts the top-k its token is routed to, and of the LM head what the
    backend's head reads for an argmax (cpu-native: its int8 screen)."""
    from slimquant.layers.moe import SparseMoE  # torch: not at the CLI's start

    embed = model.model.embed_tokens.weight
    total = sum(_nbytes(p) for p in model.parameters())
    total -= sum(_unrouted_bytes(m) for m in model.modules() if isinstance(m, SparseMoE))
    if model.lm_head is not None:
        total -= _nbytes(embed)
    screen = head.argmax_bytes()
    return total if screen is None else total - _nbytes(model.float_head_weight()) + screen


def _unrouted_bytes(moe) -> int:
    """Bytes of a MoE layer's (SparseMoE) routed experts that one token does not read (all but its top-k)."""
    experts = sum(_nbytes(p) for p in moe.experts.parameters())  # this rank's
    return experts - experts * moe.gate.top_k // moe.gate.num_experts


def _nbytes(t) -> int:
    return t.numel() * t.element_size()


def read_bandwidth(device: str = "cpu", gib: float = 0.5, repeats: int = 5) -> float:
    """Memory read bandwidth in bytes/s now (best of a few sums over a buffer far larger than the caches)."""
    import torch

    buf = torch.ones(int(gib * 2**30) // 4, device=device)
    buf.sum()  # touch every page first
    best = min(_seconds(buf.sum) for _ in range(repeats))
    return buf.numel() * 4 / best


def _seconds(fn: Callable[[], object]) -> float:
    """Wall time of fn(), GPU work included."""
    _sync()
    start = time.perf_counter()
    fn()
    _sync()
    return time.perf_counter() - start


def _sync() -> None:
    import torch

    if torch.cuda.is_available():
        torch.cuda.synchronize()


def _bench_transformers(path: str, args: argparse.Namespace) -> Row:
    import torch
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(path, dtype="auto").to(args.device).eval()
    n = args.decode_tokens

    def ids(rows: list[list[int]]) -> torch.Tensor:
        return torch.tensor(rows, device=args.device)

    def generate(prompt: torch.Tensor, new: int) -> None:
        model.generate(prompt, max_new_tokens=new, min_new_tokens=new, do_sample=False, pad_token_id=0)

    with torch.inference_mode():
        batch = ids([[1, 2, 3 + i] for i in range(args.streams)])
        prompt = ids([list(range(100, 100 + args.prompt_len))])
        generate(ids([[1, 2, 3]]), 2), model(prompt), generate(batch, 2)  # warm-up: every shape timed
        d1 = _tokens_per_s(n, lambda: generate(ids([[1, 2, 3]]), n))
        pf = _tokens_per_s(args.prompt_len, lambda: model(prompt))
        dn = _tokens_per_s(n * args.streams, lambda: generate(batch, n))
    return Row(f"transformers {model.dtype} {_short(path)}".replace("torch.", ""), (d1, pf, dn))


def _llama_cpp_gguf(args: argparse.Namespace, float_dirs: list[str]) -> Path | None:
    """The GGUF for the llama.cpp row, or None (with the reason printed) where there is no row."""
    from slimquant import zoo
    from slimquant.entrypoints.commands import llama_cpp_row

    if not llama_cpp_row.installed():
        print("no llama.cpp row: llama-cpp-python is not installed (pip install llama-cpp-python to add one)")
        return None
    if args.gguf is not None:
        if not args.gguf.is_file():
            raise ValueError(f"--gguf {args.gguf}: no such file")
        return args.gguf
    if float_dirs and Path(float_dirs[0]).resolve() == zoo.default_model_path().resolve():
        return llama_cpp_row.default_gguf()
    print("no llama.cpp row: pass --gguf FILE (a GGUF of the first model) to add one")
    return None


def _bench_llama_cpp(gguf: Path, args: argparse.Namespace) -> Row:
    import torch

    from slimquant.entrypoints.commands import llama_cpp_row

    n, streams = args.decode_tokens, args.streams
    max_len, batch = args.prompt_len + n + 16, max(args.prompt_len, streams)
    runner = llama_cpp_row.LlamaCppRunner(gguf, streams, max_len, batch, torch.get_num_threads())
    try:
        runner.decode([[1, 2, 3]], 4)  # warm-up
        d1 = _tokens_per_s(n, lambda: runner.decode([[1, 2, 3]], n))
        pf = _tokens_per_s(args.prompt_len, lambda: runner.prefill(list(range(100, 100 + args.prompt_len))))
        dn = _tokens_per_s(n * streams, lambda: runner.decode([[1, 2, 3 + i] for i in range(streams)], n))
    finally:
        runner.close()
    return Row(f"llama.cpp {_short(str(gguf))}", (d1, pf, dn))


def _short(path: str) -> str:
    return path.rstrip("/").rsplit("/", 1)[-1]


def print_table(rows: list[Row], args: argparse.Namespace) -> None:
    """The side-by-side table, each slimquant row's backend, then its decode speed against the memory-bandwidth
    limit."""
    _print(rows, args)
    print("\nbackends:")
    for r in rows:
        if r.backend:
            print(f"  {r.name}: {r.backend}")
    print("\nmemory-bandwidth limit of single-stream decode (read bandwidth measured right after that decode):")
    for r in rows:
        if r.weight_bytes and r.bandwidth:
            limit = r.bandwidth / r.weight_bytes
            print(
                f"  {r.name}: {r.weight_bytes / 1e6:.0f} MB of weights per decode step at {r.bandwidth / 1e9:.1f} "
                f"GB/s -> limit {limit:.0f} tokens/s; decode 1 stream reached {r.speeds[0] / limit:.0%} of it"
            )


def _print(rows: list[Row], args: argparse.Namespace) -> None:
    heads = (
        f"decode 1 x {args.decode_tokens}",
        f"prefill {args.prompt_len}",
        f"decode {args.streams} x {args.decode_tokens}",
    )
    width = max(52, *(len(r.name) + 2 for r in rows))
    print("\ntokens/s (x = ratio to the first row, same run)")
    print(f"{'system':<{width}}" + "".join(f"{h:>24}" for h in heads))
    base = rows[0].speeds
    for r in rows:
        cells = "".join(f"{s:>14.1f} ({s / b:>5.2f}x)" for s, b in zip(r.speeds, base, strict=True))
        print(f"{r.name:<{width}}{cells}")
