"""The slimquant command: help with examples, one-line errors, bench and eval on a tiny model."""

from __future__ import annotations

import json
import shlex

import pytest
import torch

from slimquant.entrypoints.cli import COMMANDS, main
from slimquant.kernels import native


@pytest.mark.parametrize("command", COMMANDS)
def test_every_command_explains_itself_with_an_example(command, capsys):
    with pytest.raises(SystemExit) as exit_info:
        main([command, "--help"])
    assert exit_info.value.code == 0
    assert "example" in capsys.readouterr().out.lower()


def test_errors_are_one_line(capsys, tmp_path):
    assert main(["eval", str(tmp_path / "missing")]) == 1
    err = capsys.readouterr().err
    assert err.startswith("error: ") and "Traceback" not in err and err.count("\n") == 1


def test_a_model_that_does_not_split_over_the_ranks_is_one_line(tiny_model, capsys):
    """The ranks' model fails to split as rank 0's does: the error is rank 0's ValueError, not a rank failure."""
    model = str(tiny_model("llama"))
    capsys.readouterr()
    assert main(["generate", model, "-tp", "3", "--prompt", "Hi", "--max-tokens", "2"]) == 1
    err = capsys.readouterr().err
    assert err == "error: num_attention_heads = 4 is not divisible by tensor_parallel_size = 3\n", err


def test_a_rank_failure_is_one_line(tiny_model, monkeypatch, capsys):
    from slimquant.entrypoints.commands import generate
    from slimquant.errors import RankFailure

    def fails(*args, **kwargs):
        raise RankFailure("tensor parallel: rank(s) [1] of 2 failed (rank 1 exited with code -9; ...)")

    monkeypatch.setattr(generate, "make_llm", fails)
    assert main(["generate", str(tiny_model("llama")), "--prompt", "Hi"]) == 1
    err = capsys.readouterr().err
    assert err.startswith("error: tensor parallel: rank(s) [1] of 2 failed") and err.count("\n") == 1, err


@pytest.mark.parametrize(
    ("option", "said"),
    [
        (("-tp", "4"), "-tp 4 under torchrun with 2 processes"),
        (("--nnodes", "3"), "--nnodes 3 under torchrun with 2 nodes"),
    ],
)
def test_serve_under_torchrun_refuses_other_sizes(tiny_model, monkeypatch, capsys, option, said):
    """torchrun's group sets -tp and --nnodes: a command that says otherwise is refused before it joins."""
    for name, value in {"WORLD_SIZE": "2", "GROUP_WORLD_SIZE": "2", "GROUP_RANK": "0", "RANK": "0"}.items():
        monkeypatch.setenv(name, value)
    model = str(tiny_model("llama"))
    capsys.readouterr()
    assert main(["serve", model, *option]) == 1
    assert capsys.readouterr().err == f"error: {said}: they must agree\n"


VLLM_ASCEND_SERVE = shlex.split(  # vLLM-Ascend's DeepSeek-V3 W8A8 tutorial's options (one node, no data parallel)
    "--host 127.0.0.1 --port 8004 --seed 1024 --served-model-name deepseek_v3 --max-num-seqs 16 --max-model-len 256 "
    "--max-num-batched-tokens 256 --trust-remote-code --no-enable-prefix-caching --gpu-memory-utilization 0.9 "
    "--data-parallel-size 1 --disable-log-requests --block-size 128 --quantization ascend --additional-config "
    """'{"ascend_scheduler_config": {"enabled": true}, "torchair_graph_config": {"enabled": true}}'"""
)


def test_serve_takes_a_vllm_ascend_command_line(tiny_model, monkeypatch, caplog):
    """A `vllm serve` command line from vLLM-Ascend's tutorial runs unchanged: the engine options it shares with
    slimquant take effect, the others are ignored with one warning naming them."""
    from slimquant.config import EngineConfig
    from slimquant.entrypoints.commands import serve

    made = []

    def capture(args, **engine_args):
        model, kwargs = serve.llm_arguments(args, **engine_args)
        made.append(EngineConfig.from_kwargs(model, **kwargs))
        raise ValueError("captured")

    monkeypatch.setattr(serve, "make_llm", capture)
    assert main(["serve", str(tiny_model("llama")), *VLLM_ASCEND_SERVE]) == 1
    (config,) = made
    assert (config.seed, config.block_size, config.max_num_batched_tokens) == (1024, 128, 256)
    assert not config.enable_prefix_caching and config.enable_chunked_prefill and config.max_num_seqs == 16
    warned = [r.getMessage() for r in caplog.records if "ignoring vLLM argument" in r.getMessage()]
    assert warned == [
        "ignoring vLLM argument(s) that have no effect in slimquant: additional_config, disable_log_requests, "
        "gpu_memory_utilization"
    ]


def test_pipeline_or_data_parallel_is_refused_in_one_line(tiny_model, capsys):
    model = str(tiny_model("llama"))
    capsys.readouterr()
    assert main(["generate", model, "--prompt", "Hi", "-dp", "2"]) == 1
    assert capsys.readouterr().err == (
        "error: data_parallel_size must be 1: slimquant splits a model by tensor (and expert) parallelism only\n"
    )


def test_bench_prints_one_row_per_system(tiny_model, capsys):
    path = str(tiny_model("llama"))
    args = ["bench", path, path, "--prompt-len", "8", "--decode-tokens", "4", "--streams", "2"]
    assert main([*args, "--no-transformers"]) == 0
    out = capsys.readouterr().out
    rows = [line for line in out.splitlines() if line.startswith("slimquant ")]
    assert len(rows) == 2 and "( 1.00x)" in rows[0]
    assert "memory-bandwidth limit of single-stream decode" in out
    assert out.count("of weights per decode step at") == 2 and out.count("GB/s -> limit") == 2


def test_bench_baseline_is_transformers_on_the_float_model(tiny_model, tmp_path, capsys):
    src = tiny_model("llama")
    main(["quantize", str(src), str(tmp_path / "q"), "--type", "w8a8_dynamic", "--num-samples", "2", "--no-progress"])
    capsys.readouterr()
    args = ["--prompt-len", "8", "--decode-tokens", "4", "--streams", "2"]
    assert main(["bench", str(tmp_path / "q"), str(src), *args]) == 0
    lines = capsys.readouterr().out.splitlines()
    first = lines.index(next(line for line in lines if line.startswith("system"))) + 1
    assert lines[first].startswith("transformers float32") and "( 1.00x)" in lines[first]
    assert lines[first + 1].startswith("slimquant q ") and lines[first + 2].startswith("slimquant ")


def test_bench_rows_per_int8_gemm(tiny_model, tmp_path, capsys):
    """--cuda-int8-gemm cublas,triton: a row per GEMM for each int8 model (KernelConfig.cuda_int8_gemm), one for a
    float model; a GEMM not in the list is a usage error naming the choices."""
    src = tiny_model("llama")
    main(["quantize", str(src), str(tmp_path / "q"), "--type", "w8a8_dynamic", "--num-samples", "2", "--no-progress"])
    args = ["--prompt-len", "8", "--decode-tokens", "4", "--streams", "2", "--no-transformers"]
    capsys.readouterr()
    assert main(["bench", str(src), str(tmp_path / "q"), *args, "--cuda-int8-gemm", "cublas,triton"]) == 0
    rows = [line.split("  ")[0] for line in capsys.readouterr().out.splitlines() if line.startswith("slimquant ")]
    assert rows[:3] == [f"slimquant {src.name}", "slimquant q (cublas)", "slimquant q (triton)"]
    with pytest.raises(SystemExit) as exit_info:
        main(["bench", str(src), "--cuda-int8-gemm", "cublas,cutlass"])
    assert exit_info.value.code == 2 and "expected one or more of cublas, triton" in capsys.readouterr().err


@pytest.mark.skipif(not native.available(), reason="native kernels unavailable (no AVX2 or compiler)")
def test_bench_rows_per_native_build(tiny_model, tmp_path, capsys):
    """--isa: a row per native build for each int8 model, each named and run by that build; a build not in the
    list is a usage error naming the choices."""
    src = tiny_model("llama")
    main(["quantize", str(src), str(tmp_path / "q"), "--type", "w8a8_dynamic", "--num-samples", "2", "--no-progress"])
    args = ["--prompt-len", "8", "--decode-tokens", "4", "--streams", "2", "--no-transformers"]
    capsys.readouterr()
    isas = native.isas_here()
    assert main(["bench", str(tmp_path / "q"), *args, "--backend", "cpu-native", "--isa", ",".join(isas)]) == 0
    out = capsys.readouterr().out.splitlines()
    rows = [line.split("  ")[0] for line in out if line.startswith("slimquant ")]
    assert rows[: len(isas)] == [f"slimquant q ({isa})" for isa in isas]
    start = out.index("backends:") + 1
    backends = out[start : start + len(isas)]  # "  slimquant q (isa): cpu-native (... build) ..."
    for isa, line in zip(isas, backends, strict=True):
        assert line.startswith(f"  slimquant q ({isa}): ") and f"({native.ISA_NAMES[isa]} build)" in line
    with pytest.raises(SystemExit) as exit_info:
        main(["bench", str(src), "--isa", "avx512"])
    assert exit_info.value.code == 2 and "expected one or more of avx2, avx512vnni, amx" in capsys.readouterr().err


def test_bench_rejects_bad_sizes(tiny_model, capsys):
    assert main(["bench", str(tiny_model("llama")), "--streams", "0"]) == 1
    assert "--streams" in capsys.readouterr().err


def test_bench_passes_the_kv_cache_dtype(tiny_model, capsys):
    assert main(["bench", str(tiny_model("llama")), "--no-transformers", "--kv-cache-dtype", "fp8"]) == 1
    assert "kv_cache_dtype='fp8' is not supported" in capsys.readouterr().err


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the error where no GPU is seen")
def test_bench_on_cuda_without_a_gpu_says_so(tiny_model, capsys):
    assert main(["bench", str(tiny_model("llama")), "--device", "cuda"]) == 1
    assert "torch sees no CUDA GPU" in capsys.readouterr().err


def test_eval_json(tiny_model, tmp_path, capsys):
    corpus = tmp_path / "c.txt"
    corpus.write_text("The quick brown fox jumps over the lazy dog. " * 20)
    path = str(tiny_model("qwen2"))
    assert main(["eval", path, path, "--corpus", str(corpus), "--context", "32", "--json"]) == 0
    results = json.loads(capsys.readouterr().out)
    assert len(results) == 2 and results[0]["perplexity"] == results[1]["perplexity"]
    assert results[1]["top1_agreement"] == 1.0


def test_eval_sensitivity_names_its_perturbation(tiny_model, tmp_path, capsys):
    corpus = tmp_path / "c.txt"
    corpus.write_text("The quick brown fox jumps over the lazy dog. " * 20)
    path = str(tiny_model("qwen2"))
    args = ["eval", path, "--corpus", str(corpus), "--context", "32", "--sensitivity", "--perturbation", "1e-4"]
    assert main(args) == 0
    assert "every norm weight moves by 0.0001" in capsys.readouterr().out
    assert main([*args[:-1], "0.5"]) == 1
    assert "relative change of the norm weights in (0, 0.01], got 0.5" in capsys.readouterr().err


def test_bench_says_why_there_is_no_llama_cpp_row(tiny_model, monkeypatch, capsys):
    monkeypatch.setattr("slimquant.entrypoints.commands.llama_cpp_row.installed", lambda: False)
    args = ["--prompt-len", "4", "--decode-tokens", "2", "--streams", "1", "--no-transformers"]
    assert main(["bench", str(tiny_model("llama")), *args]) == 0
    assert "no llama.cpp row: llama-cpp-python is not installed" in capsys.readouterr().out


def test_llama_cpp_row_batches_streams_like_single_runs():
    pytest.importorskip("llama_cpp")
    from slimquant.entrypoints.commands import llama_cpp_row

    runner = llama_cpp_row.LlamaCppRunner(llama_cpp_row.default_gguf(), streams=2, max_len=32, batch=16, threads=1)
    try:
        alone = [runner.decode([p], 5)[0] for p in ([1, 2, 3], [4, 5, 6, 7])]
        together = runner.decode([[1, 2, 3], [4, 5, 6, 7]], 5)
    finally:
        runner.close()
    assert together == alone and len(set(map(tuple, alone))) == 2  # each stream its own sequence


def test_building_the_command_line_imports_no_torch():
    """`slimquant --help` and every sub-command's parser load in a fraction of a second: no torch at import."""
    import subprocess
    import sys

    code = "import sys; from slimquant.entrypoints.cli import build_parser as b; b(); print('torch' in sys.modules)"
    run = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert run.returncode == 0, run.stderr
    assert run.stdout.strip() == "False"


def test_quantize_takes_the_built_in_model_by_name(tiny_model, tmp_path, monkeypatch, capsys):
    """SRC 'SmolLM2-135M-Instruct' (as bench / eval / generate take it) is the built-in model's folder; the mix
    takes W8A16, which the summary counts."""
    monkeypatch.setattr("slimquant.zoo.default_model_dir", lambda: tiny_model("llama"))
    args = ["--type", "w8a8_dynamic", "--mix", "*.mlp.down_proj=w8a16", "--num-samples", "2", "--no-progress"]
    assert main(["quantize", "SmolLM2-135M-Instruct", str(tmp_path / "q"), *args]) == 0
    assert "2 W8A16" in capsys.readouterr().out
    assert (
        json.loads((tmp_path / "q" / "quant_model_description.json").read_text())["model_quant_type"] == "W8A8_DYNAMIC"
    )
