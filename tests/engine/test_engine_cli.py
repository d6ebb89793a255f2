"""`slimquant generate` and `slimquant chat` on a tiny model."""

from __future__ import annotations

import argparse

from slimquant.entrypoints.commands import chat, generate


def run(module, argv: list[str]) -> int:
    parser = argparse.ArgumentParser()
    module.register(parser.add_subparsers())
    args = parser.parse_args(argv)
    return args.func(args)


def test_generate_streams_one_prompt(llama_path, llm, capsys):
    argv = ["generate", str(llama_path), "--prompt", "Hello", "--max-tokens", "5", "--temperature", "0"]
    assert run(generate, argv) == 0
    expected = llm.generate("Hello", generate_params(5), use_tqdm=False)[0].outputs[0].text
    assert capsys.readouterr().out == "Hello" + expected + "\n"


def test_generate_several_prompts(llama_path, capsys):
    argv = ["generate", str(llama_path), "--prompt", "a", "--prompt", "b", "--max-tokens", "2", "--seed", "1"]
    assert run(generate, argv) == 0
    lines = capsys.readouterr().out.splitlines()
    assert len(lines) == 2 and lines[0].startswith("'a' -> ")


def test_engine_options_reach_the_llm(llama_path, monkeypatch):
    monkeypatch.setattr("slimquant.LLM", lambda model, **kwargs: kwargs)  # make_llm imports it from slimquant
    parser = argparse.ArgumentParser()
    generate.register(parser.add_subparsers())
    args = parser.parse_args(["generate", str(llama_path), "--prompt", "a", "--kv-cache-dtype", "bfloat16"])
    assert generate.make_llm(args)["kv_cache_dtype"] == "bfloat16"


def test_chat_streams_replies_until_exit(llama_path, monkeypatch, capsys):
    inputs = iter(["Hello", "/reset", "Again", "/exit"])
    monkeypatch.setattr("builtins.input", lambda _: next(inputs))
    assert run(chat, ["chat", str(llama_path), "--max-tokens", "3", "--temperature", "0", "--system", "Be nice"]) == 0
    out = capsys.readouterr().out
    assert out.startswith(chat.HELP) and len(out.splitlines()) == 3


def generate_params(n):
    from slimquant import SamplingParams

    return SamplingParams(max_tokens=n, temperature=0)
