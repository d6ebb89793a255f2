"""`slimquant chat`: an interactive terminal chat that streams the model's replies."""

from __future__ import annotations

import argparse

from slimquant.entrypoints import chat_messages
from slimquant.entrypoints.commands.generate import (
    add_engine_args,
    add_sampling_args,
    make_llm,
    sampling_params,
    stream,
)

HELP = "commands: /reset clears the conversation, /exit (or Ctrl-D) quits"


def register(sub: argparse._SubParsersAction) -> None:
    """Add the chat sub-command."""
    p = sub.add_parser(
        "chat",
        help="interactive chat in the terminal",
        description=f"Chat with MODEL using its chat template; replies stream as they are generated.\n{HELP}\n\n"
        "example: slimquant chat SmolLM2-135M-Instruct --temperature 0.7",
    )
    p.add_argument("model", help="model folder (float or ascend-quantized), or 'SmolLM2-135M-Instruct'")
    p.add_argument("--system", help="a system message that starts the conversation")
    add_engine_args(p)
    add_sampling_args(p, max_tokens=512)
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    """Read a message, stream the reply, repeat until /exit or end of input."""
    llm = make_llm(args)
    params = sampling_params(llm, args)
    tokenizer = llm.get_tokenizer()
    start = [{"role": "system", "content": args.system}] if args.system else []
    messages = list(start)
    print(HELP)
    while (line := _read("> ")) is not None:
        if line.strip() in ("/exit", "/quit"):
            break
        if line.strip() == "/reset":
            messages = list(start)
            continue
        messages.append({"role": "user", "content": line})
        prompt = chat_messages.prompt(tokenizer, messages)
        reply = ""
        for piece in stream(llm, prompt, params):
            print(piece, end="", flush=True)
            reply += piece
        print()
        messages.append({"role": "assistant", "content": reply})
    return 0


def _read(prompt: str) -> str | None:
    try:
        return input(prompt)
    except EOFError:
        print()
        return None
