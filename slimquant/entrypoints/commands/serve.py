"""`slimquant serve`: the OpenAI-compatible HTTP server, like `vllm serve`."""

from __future__ import annotations

import argparse
import logging
from pathlib import Path

from slimquant.config import env_setting
from slimquant.entrypoints.commands.generate import add_engine_args, llm_arguments, make_llm
from slimquant.entrypoints.openai.tool_calls import PARSERS

log = logging.getLogger(__name__)


def register(sub: argparse._SubParsersAction) -> None:
    """Add the serve sub-command."""
    p = sub.add_parser(
        "serve",
        help="OpenAI-compatible server (/v1/completions, /v1/chat/completions, ...)",
        description="Serve MODEL over HTTP with the OpenAI API; one engine batches all requests.\n\n"
        "example: slimquant serve out/qwen-w8a8 --quantization ascend --port 8000\n"
        "         curl localhost:8000/v1/chat/completions -H 'Content-Type: application/json' \\\n"
        '              -d \'{"messages": [{"role": "user", "content": "Hi"}]}\'',
    )
    p.add_argument("model", help="model folder (float or ascend-quantized), or 'SmolLM2-135M-Instruct'")
    p.add_argument("--host", default="127.0.0.1", help="address to bind (default 127.0.0.1)")
    p.add_argument("--port", type=int, default=8000, help="port (default 8000)")
    p.add_argument("--served-model-name", help="the name clients use in 'model' (default: the folder name)")
    p.add_argument(
        "--api-key",
        default=env_setting("SLIMQUANT_API_KEY") or None,
        help="require 'Authorization: Bearer KEY' on /v1 routes (or set SLIMQUANT_API_KEY)",
    )
    add_engine_args(p)
    p.add_argument("--max-num-seqs", type=int, help="sequences batched together at most")
    p.add_argument("--seed", type=int, default=0, help="the engine's seed: of requests without their own (default 0)")
    p.add_argument("--max-n", type=int, default=16, help="largest 'n' a request may ask for (default 16)")
    p.add_argument("--chat-template", help="a Jinja chat template file that replaces the tokenizer's")
    p.add_argument(
        "--enable-auto-tool-choice", action="store_true", help='let chat requests use tool_choice "auto" (as vLLM)'
    )
    p.add_argument("--tool-call-parser", choices=PARSERS, help="how tool calls are read from the model's text")
    p.add_argument("--kv-cache-memory-bytes", type=int, help="KV-cache size in bytes (default: the engine's choice)")
    nodes = p.add_argument_group("several machines (-tp N split over --nnodes; node 0 serves)")
    nodes.add_argument("--nnodes", type=int, default=1, help="machines the ranks run on (default 1)")
    nodes.add_argument("--node-rank", type=int, default=0, help="this machine's index (0: the one that serves)")
    nodes.add_argument("--master-addr", default="127.0.0.1", help="node 0's address, reachable from every node")
    nodes.add_argument("--master-port", type=int, help="a free port on node 0 where the ranks meet")
    nodes.add_argument("--headless", action="store_true", help="run this node's ranks only, no HTTP (nodes > 0)")
    nodes.add_argument(
        "--join-timeout", type=float, default=600.0, help="seconds the ranks wait for each other to meet (default 600)"
    )
    nodes.add_argument(
        "--node-timeout", type=float, default=15.0,
        help="seconds without a heartbeat after which a node counts as lost and every rank stops (default 15)",
    )  # fmt: skip
    p.add_argument(
        "--max-request-bytes",
        type=int,
        default=8 << 20,
        help="refuse request bodies larger than this with 413 (default 8 MiB)",
    )
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    """Load the model and serve until Ctrl-C."""
    import uvicorn

    from slimquant.entrypoints.openai.server import make_server_app

    template = _read_template(args.chat_template)
    if args.enable_auto_tool_choice and not args.tool_call_parser:
        raise ValueError(f"--enable-auto-tool-choice needs --tool-call-parser (one of {', '.join(PARSERS)})")
    engine_args = {"max_num_seqs": args.max_num_seqs, "kv_cache_memory_bytes": args.kv_cache_memory_bytes}
    engine_args = {k: v for k, v in engine_args.items() if v is not None} | {"seed": args.seed}
    rank = _join_torchrun(args) if env_setting("WORLD_SIZE") else None  # under torchrun: rank 0 serves
    engine_args |= _node_args(args)
    if rank is not None and rank > 0:  # torchrun's: it runs the steps
        from slimquant.config import EngineConfig
        from slimquant.distributed.workers import run_follower

        args.exit_at_once = True  # it may beat to node 0 (NodeBeat)
        model, kwargs = llm_arguments(args, **engine_args)
        run_follower(EngineConfig.from_kwargs(model, **kwargs))
        return 0
    if rank == 0:
        engine_args["distributed_executor_backend"] = "mp"
    elif args.headless:
        from slimquant.config import EngineConfig
        from slimquant.distributed.workers import run_headless

        args.exit_at_once = True  # it beats to node 0 (NodeBeat)
        model, kwargs = llm_arguments(args, **engine_args)
        return run_headless(EngineConfig.from_kwargs(model, **kwargs))
    if args.node_rank != 0:
        raise ValueError("--node-rank > 0 runs ranks only: add --headless (node 0 serves)")
    llm = make_llm(args, **engine_args)
    name = args.served_model_name or Path(args.model).name
    if args.max_request_bytes < 1:
        raise ValueError(f"--max-request-bytes must be positive, got {args.max_request_bytes}")
    tools = args.tool_call_parser if args.enable_auto_tool_choice else None
    limits = dict(max_n=args.max_n, max_request_bytes=args.max_request_bytes, tool_parser=tools)
    failures: list[Exception] = []
    server: uvicorn.Server | None = None

    def on_fatal(error: Exception) -> None:  # a tensor-parallel rank died: answer no more, exit non-zero
        failures.append(error)
        if server is not None:
            server.should_exit = True

    app, engine = make_server_app(llm, name, api_key=args.api_key, chat_template=template, on_fatal=on_fatal, **limits)
    server = uvicorn.Server(uvicorn.Config(app, host=args.host, port=args.port, log_level="warning"))
    log.info("serving %s as '%s' on http://%s:%d/v1", args.model, name, args.host, args.port)
    try:
        server.run()
    finally:
        engine.shutdown()
        llm.llm_engine.shutdown()
    if failures:
        log.error("stopped: %s", failures[0])
        return 1
    return 0


def _join_torchrun(args: argparse.Namespace) -> int:
    """Join the group torchrun describes (RANK, WORLD_SIZE, MASTER_ADDR, MASTER_PORT); -tp becomes its size, and
    --nnodes, --node-rank, --master-addr and --master-port its nodes and its agent's store (where the nodes beat).
    Returns this process's rank."""
    import torch.distributed as dist

    world, nodes = int(env_setting("WORLD_SIZE")), int(env_setting("GROUP_WORLD_SIZE"))
    if args.tensor_parallel_size not in (1, world):
        raise ValueError(f"-tp {args.tensor_parallel_size} under torchrun with {world} processes: they must agree")
    if args.nnodes not in (1, nodes):
        raise ValueError(f"--nnodes {args.nnodes} under torchrun with {nodes} nodes: they must agree")
    args.tensor_parallel_size, args.nnodes, args.node_rank = world, nodes, int(env_setting("GROUP_RANK"))
    port = env_setting("MASTER_PORT")  # torchrun sets both; EngineConfig says what is missing where it is not
    args.master_addr, args.master_port = env_setting("MASTER_ADDR") or args.master_addr, int(port) if port else None
    dist.init_process_group("gloo")
    return dist.get_rank()


def _node_args(args: argparse.Namespace) -> dict:
    """EngineConfig's node settings from the options."""
    return dict(
        nnodes=args.nnodes,
        node_rank=args.node_rank,
        master_addr=args.master_addr,
        master_port=args.master_port,
        join_timeout=args.join_timeout,
        node_timeout=args.node_timeout,
    )


def _read_template(path: str | None) -> str | None:
    if path is None:
        return None
    file = Path(path)
    if not file.is_file():
        raise ValueError(f"chat template file not found: {path}")
    return file.read_text()
