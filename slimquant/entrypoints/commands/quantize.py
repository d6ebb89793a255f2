"""`slimquant quantize SRC DST`: a float HF folder (bf16/fp16/fp32/FP8-block) or GGUF -> ascend W8A8 format."""

from __future__ import annotations

import argparse

from slimquant.quant import steps

HELP = """Quantize a model to the ascend (ModelSlim) int8 format, one decoder layer at a time.
Defaults: --anti-outlier smoothquant for both types, --alpha 0.5. --alpha auto: per smoothing group
(input_layernorm -> q/k/v, post_attention_layernorm -> gate/up,
up_proj -> down_proj) the alpha of 0, 0.1, ..., 1 (then the best +-0.05) whose quantized outputs, computed as
the runtime does on 512 calibration tokens, are closest to float (summed squared error relative to float's).
--rounding nearest; gptq compensates each weight's rounding error (same format). lm_head always stays float.
What each method costs in perplexity: docs/benchmarks.md, Accuracy (bench/accuracy.py).
--type w8a8 on Llama/Qwen (default recipe, as ModelSlim mixes DeepSeek's MLPs): every linear static W8A8
except mlp.down_proj, which is W8A8_DYNAMIC (its input silu(gate)*up holds massive per-token outliers that one
per-tensor static scale cannot follow); the summary prints this "default mix". --static-all: all static.
DeepSeek V2/V3 and Kimi K2 (ModelSlim's DeepSeek recipe): --type w8a8 makes the MLA linears static W8A8 and
every MLP linear (dense, shared and routed experts) W8A8_DYNAMIC, smoothed with iterative by default;
kv_b_proj, the router and multi-token-prediction layers stay float; FP8 block weights are dequantized.
Qwen3-MoE (ModelSlim's quant_qwen_moe_w8a8.py recipe): --type w8a8 makes attention static W8A8 and every MLP
linear W8A8_DYNAMIC; the router stays float."""
EXAMPLES = """examples:
  slimquant quantize Qwen3-8B out/Qwen3-8B-W8A8 --type w8a8
  slimquant quantize model.gguf out/model-dyn --type w8a8_dynamic --keep-float '*.mlp.down_proj'
  slimquant quantize SRC DST --type w8a8 --mix '*.mlp.*=w8a8_dynamic' --anti-outlier iterative --alpha 0.6
  slimquant quantize SRC DST --type w8a8 --max-loss 1.0 --report   # fallback to float + sensitivity chart"""


def register(subparsers) -> None:
    """Add the `quantize` parser."""
    p = subparsers.add_parser(
        "quantize",
        help="quantize a model to W8A8 / W8A8_DYNAMIC",
        description=HELP,
        epilog=EXAMPLES,
    )
    p.add_argument(
        "src", metavar="SRC", help="Hugging Face model folder (safetensors), a .gguf file, or SmolLM2-135M-Instruct"
    )
    p.add_argument("dst", metavar="DST", help="output folder (must not exist unless --overwrite)")
    p.add_argument("--type", dest="quant_type", default="w8a8", help="w8a8 (static) or w8a8_dynamic [w8a8]")
    p.add_argument(
        "--anti-outlier",
        choices=tuple(steps.SMOOTHERS),
        help="smoothing folded into norms: smoothquant, iterative (with shift, ModelSlim m4) or none "
        "[smoothquant; for DeepSeek/Kimi iterative if any linear is w8a8, else none]",
    )
    p.add_argument(
        "--alpha",
        default="0.5",
        help="smoothing strength in [0, 1], or 'auto': searched per smoothing group on calibration data [0.5]",
    )
    p.add_argument(
        "--rounding",
        choices=tuple(steps.ROUNDERS),
        default="nearest",
        help="weight rounding: nearest, or gptq (error compensated with calibration Hessians, same format) [nearest]",
    )
    p.add_argument("--calib-data", help="calibration text: .txt, .json list of strings, .jsonl with 'text' [built-in]")
    p.add_argument("--num-samples", type=int, default=16, help="calibration sequences [16]")
    p.add_argument("--seq-len", type=int, default=256, help="tokens per calibration sequence [256]")
    p.add_argument(
        "--keep-float", action="append", default=[], metavar="GLOB", help="keep matching linears float (repeatable)"
    )
    p.add_argument(
        "--mix",
        action="append",
        default=[],
        metavar="GLOB=TYPE",
        help="per-layer type: w8a8, w8a8_dynamic, w8a16 (weight-only) or float, e.g. '*.mlp.*=w8a8_dynamic' "
        "(repeatable, first match wins, else --type)",
    )
    p.add_argument("--device", default="cpu", choices=("cpu", "cuda"), help="where calibration runs [cpu]")
    p.add_argument("--shard-size", default="4GiB", help="cap per output shard, e.g. 500MB, 4GiB [4GiB]")
    p.add_argument(
        "--expert-memory",
        default="1GiB",
        metavar="SIZE",
        help="MoE layers: routed experts are calibrated and quantized a group at a time, this much of their float "
        "weights (in the calibration dtype) in memory at once [1GiB]",
    )
    p.add_argument(
        "--activation-memory",
        default="4GiB",
        metavar="SIZE",
        help="calibration hidden states (and a MoE layer's recorded expert inputs) held in memory; the rest goes to "
        "files in the staging folder beside DST [4GiB]",
    )
    p.add_argument(
        "--quant-mtp",
        action="store_true",
        help="DeepSeek-V3 / R1: also quantize the multi-token-prediction layer (ModelSlim's --quant_mtp mix: "
        "config.json gets mtp_quantize) for vLLM-Ascend's MTP speculative decoding; float by default",
    )
    p.add_argument(
        "--trust-remote-code",
        action="store_true",
        help="let SRC's own tokenizer code run (Kimi-K2's tokenization_kimi.py); it is copied to DST either way",
    )
    p.add_argument("--batch-size", type=int, default=4, help="calibration sequences per forward [4]")
    p.add_argument("--overwrite", action="store_true", help="replace DST if it exists")
    p.add_argument(
        "--resume",
        action="store_true",
        help="go on from the last finished layer of an interrupted run into DST (same SRC and options); the "
        "result is byte-identical to an uninterrupted run",
    )
    p.add_argument(
        "--report",
        action="store_true",
        help="also write DST/sensitivity.md, .json, .png: each quantized linear's relative output error",
    )
    p.add_argument(
        "--max-loss",
        metavar="P",
        help="keep the most sensitive linears float, fewest first, until perplexity on held-out text (--loss-data) "
        "is within +P%% of float, e.g. 1.0 (re-quantizes several times)",
    )
    p.add_argument(
        "--loss-data",
        metavar="FILE",
        help="the text --max-loss measures on (.txt, .json or .jsonl, as --calib-data; at most 8192 tokens), not "
        "used to calibrate; default: packaged Pride and Prejudice chapters",
    )
    p.add_argument(
        "--static-all",
        action="store_true",
        help="--type w8a8: make every quantized linear static; by default Llama/Qwen mlp.down_proj is "
        "w8a8_dynamic (its per-token outliers defeat one static scale)",
    )
    p.add_argument(
        "--kv-cache",
        choices=("float", "int8"),
        default="float",
        help="int8: also calibrate per-channel int8 KV-cache scales (ModelSlim's C8; keys after RoPE), which "
        "the engine and vLLM-Ascend then run as an int8 cache [float]",
    )
    p.add_argument(
        "--rotate",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="Llama / Qwen: fold the norms and Hadamard rotations of the residual stream and of each head's values "
        "into the weights first (QuaRot / SpinQuant's R1 + R2: the same float model, an ordinary checkpoint, "
        "outlier channels spread out) [on for --type w8a8, off for w8a8_dynamic]",
    )
    p.add_argument("--no-progress", action="store_true", help="hide the progress bar")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    """Quantize and print the summary."""
    from slimquant import zoo
    from slimquant.convert import quantize

    summary = quantize(
        zoo.builtin_or_path(args.src),
        args.dst,
        args.quant_type,
        anti_outlier=args.anti_outlier,
        alpha=args.alpha,
        rounding=args.rounding,
        calib_data=args.calib_data,
        num_samples=args.num_samples,
        seq_len=args.seq_len,
        keep_float=args.keep_float,
        mix=args.mix,
        device=args.device,
        shard_size=args.shard_size,
        expert_memory=args.expert_memory,
        activation_memory=args.activation_memory,
        trust_remote_code=args.trust_remote_code,
        quant_mtp=args.quant_mtp,
        overwrite=args.overwrite,
        resume=args.resume,
        batch_size=args.batch_size,
        progress=not args.no_progress,
        report=args.report,
        max_loss=args.max_loss,
        loss_data=args.loss_data,
        static_all=args.static_all,
        kv_cache=args.kv_cache,
        rotate=args.rotate,
    )
    print(summary)
    return 0
