"""Argument types the benches share (a module, not a bench: the leading underscore keeps it out of their list)."""

from __future__ import annotations

import argparse


def comma_ints(text: str) -> list[int]:
    """'1,16,2048' -> [1, 16, 2048] (argparse type: a bad list is refused before any work)."""
    parts = text.split(",")
    if not all(v.strip().isdigit() and int(v) > 0 for v in parts):
        raise argparse.ArgumentTypeError(f"expected positive integers, comma-separated, not {text!r}")
    return [int(v) for v in parts]
