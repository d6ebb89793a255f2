"""Peak memory of `slimquant quantize` as the calibration set grows, with its activations held in memory (the
default budget, 4 GiB, which these sizes fit in) and with a small `--activation-memory` (the rest spilled to files).

A random DeepSeek-V3-shaped checkpoint (bench/quant_memory_moe.py: MLA + MoE, one dense and one MoE layer, few
experts so that the activations, not the weights, dominate) is quantized with --num-samples 16, 64, 128 (by
default) x --seq-len 256, each run in a fresh process, peak RSS from /proc (VmHWM). A MoE layer holds five copies of
the calibration hidden states (its input, its output, the experts' float and quantized inputs, their summed
outputs), so the held run's peak grows with the samples; the goal is a spilled run whose peak does not, with the
same output bytes.

    .venv/bin/python bench/quant_memory_calib.py [--samples 16 64 128] [--budget 64MiB] [--hidden 1024]
"""

from __future__ import annotations

import argparse
import hashlib
import shutil
import sys
import tempfile
from pathlib import Path

from quant_memory import quantize_in_child
from quant_memory_moe import write_checkpoint


def digest(folder: Path) -> str:
    """sha256 of the output's files, in name order (the spilled run must write the same bytes)."""
    h = hashlib.sha256()
    for f in sorted(folder.iterdir()):
        h.update(f.name.encode() + f.read_bytes())
    return h.hexdigest()[:12]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--hidden", type=int, default=1024)
    p.add_argument("--experts", type=int, default=16)
    p.add_argument("--vocab", type=int, default=32000)
    p.add_argument("--type", default="w8a8_dynamic")
    p.add_argument("--samples", type=int, nargs="+", default=[16, 64, 128])
    p.add_argument("--seq-len", type=int, default=256)
    p.add_argument("--budget", default="64MiB", help="--activation-memory of the spilled runs [64MiB]")
    p.add_argument("--tmp", default=None, help="parent of the temporary folder [system temp]")
    args = p.parse_args()
    rows = []
    with tempfile.TemporaryDirectory(prefix="quant-mem-calib-", dir=args.tmp) as tmp:
        src = Path(tmp) / "src"
        write_checkpoint(src, args.hidden, 2, args.experts, args.vocab)
        for samples in args.samples:
            args.num_samples = samples
            held, held_s, _ = quantize_in_child(src, Path(tmp) / "held", args)
            spilled, spilled_s, _ = quantize_in_child(
                src, Path(tmp) / "spilled", args, ("--activation-memory", args.budget)
            )
            same = digest(Path(tmp) / "held") == digest(Path(tmp) / "spilled")
            copy = samples * args.seq_len * args.hidden * 4  # one fp32 copy of the hidden states
            rows.append((samples, copy, held, spilled, held_s, spilled_s, same))
            for out in ("held", "spilled"):
                shutil.rmtree(Path(tmp) / out)
            print(f"{samples} samples: {held_s:.0f} s held, {spilled_s:.0f} s spilled", file=sys.stderr, flush=True)
    print_rows(rows, args)


def print_rows(rows, args) -> None:
    gib = 1024**3
    print(f"quantize --type {args.type}, hidden {args.hidden}, {args.experts} routed experts, seq len {args.seq_len}; "
          f"spilled: --activation-memory {args.budget}")  # fmt: skip
    head = ("samples", "hidden copy GiB", "held peak GiB", "spilled peak GiB", "held s", "spilled s", "same bytes")
    print("{:>8} {:>16} {:>14} {:>17} {:>7} {:>10} {:>11}".format(*head))
    for samples, copy, held, spilled, held_s, spilled_s, same in rows:
        cells = (samples, copy / gib, held / gib, spilled / gib, held_s, spilled_s, "yes" if same else "NO")
        print("{:>8} {:>16.2f} {:>14.2f} {:>17.2f} {:>7.0f} {:>10.0f} {:>11}".format(*cells))
    grow_held, grow_spilled = rows[-1][2] - rows[0][2], rows[-1][3] - rows[0][3]
    print(f"peak growth from {rows[0][0]} to {rows[-1][0]} samples: held {grow_held / gib:+.2f} GiB, "
          f"spilled {grow_spilled / gib:+.2f} GiB")  # fmt: skip


if __name__ == "__main__":
    main()
