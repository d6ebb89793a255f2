"""`slimquant generate`: complete prompts offline; a single prompt streams its tokens as they come."""

from __future__ import annotations

import argparse
import itertools
import sys
from collections.abc import Iterator
from typing import Any

_request_ids = itertools.count()


def register(sub: argparse._SubParsersAction) -> None:
    """Add the generate sub-command."""
    p = sub.add_parser(
        "generate",
        help="complete prompts offline",
        description="Complete each --prompt with MODEL (float or ascend-quantized).\n\n"
        'example: slimquant generate out/qwen-w8a8 --prompt "The capital of France is" --max-tokens 32',
    )
    p.add_argument("model", help="model folder (float or ascend-quantized), or 'SmolLM2-135M-Instruct'")
    p.add_argument("--prompt", action="append", required=True, help="a prompt (repeat for several)")
    add_engine_args(p)
    add_sampling_args(p, max_tokens=64)
    p.set_defaults(func=run)


def add_engine_args(p: argparse.ArgumentParser) -> None:
    """Model-loading and engine options shared by generate, chat and serve."""
    from slimquant.config import TENSOR_PARALLEL_ORDERS

    p.add_argument("--quantization", choices=["ascend"], help="expect an ascend (ModelSlim) checkpoint")
    p.add_argument("--dtype", default="auto", help="auto | bfloat16 | float16 | float32")
    p.add_argument(
        "--kv-cache-dtype",
        default="auto",
        help="auto (the model's dtype; int8 for a checkpoint with int8 KV-cache scales) | bfloat16 | float32 | int8",
    )
    p.add_argument("--device", default="cpu", help="cpu | cuda")
    p.add_argument("--enforce-eager", action="store_true", help="CUDA: decode op by op, without CUDA graphs")
    p.add_argument("--max-model-len", type=int, help="context length (default: the model's)")
    p.add_argument("--trust-remote-code", action="store_true", help="allow the model folder's own code")
    p.add_argument(
        "-tp", "--tensor-parallel-size", type=int, default=1, help="run the model split over this many processes"
    )
    p.add_argument(
        "--enable-expert-parallel", action="store_true", help="MoE models under -tp: whole experts per process"
    )
    p.add_argument(
        "--tensor-parallel-order", choices=TENSOR_PARALLEL_ORDERS, default="exact",
        help="how -tp sums row-parallel layers: exact (one process's numbers) or vllm-ascend (each rank's float part)",
    )  # fmt: skip
    p.add_argument(
        "--execute-model-timeout", type=float, default=300.0,
        help="-tp: seconds a step waits for a rank that does not answer (hung, or its machine gone) before it fails "
        "(default 300, as vLLM's VLLM_EXECUTE_MODEL_TIMEOUT_SECONDS)",
    )  # fmt: skip
    p.add_argument("--tokenizer", help="tokenizer folder (default: the model's)")
    p.add_argument("--block-size", type=int, default=16, help="tokens per KV-cache block (default 16)")
    p.add_argument("--max-num-batched-tokens", type=int, help="tokens one step runs at most (default: the engine's)")
    for name, what in (("prefix-caching", "reuse the KV cache of shared prompt prefixes"), ("chunked-prefill",
                       "split long prompts over steps, beside the decodes")):  # fmt: skip
        p.add_argument(f"--enable-{name}", action=argparse.BooleanOptionalAction, default=True, help=f"{what} (on)")
    add_backend_arg(p)
    _add_vllm_args(p)


def _add_vllm_args(p: argparse.ArgumentParser) -> None:
    """vLLM's engine options that mean nothing here (config.VLLM_IGNORED), so that a vLLM command line runs: each
    is accepted with or without a value and ignored with a warning; -pp / -dp only as 1."""
    from slimquant.config import VLLM_IGNORED

    group = p.add_argument_group(
        "vLLM options",
        "vLLM's other engine options (--gpu-memory-utilization, --additional-config, ...) are accepted and ignored "
        "with a warning; --pipeline-parallel-size and --data-parallel-size only as 1",
    )
    for name in sorted(VLLM_IGNORED):
        group.add_argument(f"--{name.replace('_', '-')}", nargs="?", const=True, help=argparse.SUPPRESS)
    group.add_argument("-pp", "--pipeline-parallel-size", type=int, default=1, help=argparse.SUPPRESS)
    group.add_argument("-dp", "--data-parallel-size", type=int, default=1, help=argparse.SUPPRESS)


def add_backend_arg(p: argparse.ArgumentParser) -> None:
    """--backend: which kernels run the model (KernelConfig.backend; default $SLIMQUANT_BACKEND, else auto)."""
    from slimquant.config import BACKENDS

    p.add_argument(
        "--backend", choices=BACKENDS, help="kernels: auto (the fastest that runs here) | " + " | ".join(BACKENDS[1:])
    )


def kernels_of(args: argparse.Namespace) -> dict:
    """LLM(kernels=...) for --backend: only what the user set, the rest from KernelConfig's defaults."""
    return {"backend": args.backend} if getattr(args, "backend", None) else {}


def add_sampling_args(p: argparse.ArgumentParser, max_tokens: int) -> None:
    """Sampling options shared by generate and chat."""
    p.add_argument("--max-tokens", type=int, default=max_tokens, help=f"tokens to generate at most ({max_tokens})")
    p.add_argument("--temperature", type=float, help="0 = greedy (default: the model's, else 1.0)")
    p.add_argument("--top-p", type=float, help="nucleus sampling threshold")
    p.add_argument("--top-k", type=int, help="sample among the k most likely tokens (0 = off)")
    p.add_argument("--seed", type=int, help="seed for reproducible sampling")


def make_llm(args: argparse.Namespace, **engine_kwargs):
    """The LLM the engine options describe (plus any other LLM() keyword arguments)."""
    from slimquant import LLM

    model, kwargs = llm_arguments(args, **engine_kwargs)
    return LLM(model, **kwargs)


def llm_arguments(args: argparse.Namespace, **engine_kwargs) -> tuple[str, dict]:
    """(model folder, LLM() keyword arguments) of the engine options."""
    from slimquant import zoo
    from slimquant.config import VLLM_IGNORED

    return str(zoo.resolve_model(args.model)), dict(
        quantization=args.quantization,
        dtype=args.dtype,
        kv_cache_dtype=args.kv_cache_dtype,
        device=args.device,
        enforce_eager=args.enforce_eager,
        kernels=kernels_of(args),
        max_model_len=args.max_model_len,
        trust_remote_code=args.trust_remote_code,
        tensor_parallel_size=args.tensor_parallel_size,
        enable_expert_parallel=args.enable_expert_parallel,
        tensor_parallel_order=args.tensor_parallel_order,
        execute_model_timeout=args.execute_model_timeout,
        tokenizer=args.tokenizer,
        block_size=args.block_size,
        max_num_batched_tokens=args.max_num_batched_tokens,
        enable_prefix_caching=args.enable_prefix_caching,
        enable_chunked_prefill=args.enable_chunked_prefill,
        pipeline_parallel_size=args.pipeline_parallel_size,
        data_parallel_size=args.data_parallel_size,
        **{name: value for name in VLLM_IGNORED if (value := getattr(args, name)) is not None},
        **engine_kwargs,
    )


def sampling_params(llm, args: argparse.Namespace, **extra: Any):
    """The model's default SamplingParams overridden by the options given on the command line."""
    import dataclasses

    given = {k: getattr(args, k) for k in ("max_tokens", "temperature", "top_p", "top_k", "seed")}
    return dataclasses.replace(
        llm.get_default_sampling_params(), **{k: v for k, v in given.items() if v is not None}, **extra
    )


def stream(llm, prompt: Any, params) -> Iterator[str]:
    """Run one prompt and yield its text as it is generated (aborted if the consumer stops early)."""
    import dataclasses

    from slimquant.sampling_params import RequestOutputKind

    engine, request_id = llm.llm_engine, f"cli-{next(_request_ids)}"
    engine.add_request(request_id, prompt, dataclasses.replace(params, output_kind=RequestOutputKind.DELTA))
    try:
        while engine.has_unfinished_requests():
            for out in engine.step():
                if out.request_id == request_id and out.outputs:
                    yield out.outputs[0].text
    finally:
        engine.abort_request(request_id)


def run(args: argparse.Namespace) -> int:
    """Generate and print."""
    llm = make_llm(args)
    params = sampling_params(llm, args)
    if len(args.prompt) == 1:
        print(args.prompt[0], end="", flush=True)
        for piece in stream(llm, args.prompt[0], params):
            print(piece, end="", flush=True)
        print()
        return 0
    for out in llm.generate(args.prompt, params, use_tqdm=sys.stderr.isatty()):
        print(f"{out.prompt!r} -> {out.outputs[0].text!r}")
    return 0
