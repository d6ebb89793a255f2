"""The commands the README documents start on this install: `--help` of every script and sub-command, as a
user's shell runs them (subprocesses), and every file the docs cite exists."""

from __future__ import annotations

import argparse
import os
import re
import runpy
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from unittest import mock

import pytest

from slimquant.entrypoints.cli import COMMANDS

REPO = Path(__file__).resolve().parents[1]
BENCH_SCRIPTS = sorted(p.name for p in (REPO / "bench").glob("*.py") if not p.name.startswith("_"))  # _: helpers
SLIMQUANT = Path(sys.executable).with_name("slimquant")  # the console script pip installed beside python
DOCS = [REPO / "README.md", *sorted((REPO / "docs").glob("*.md"))]
# Files that cite others: the docs, and the code's docstrings and comments.
CITING = DOCS + sorted(p for d in ("slimquant", "tests", "bench", "scripts") for p in (REPO / d).rglob("*.[ps][yh]"))
# A repository path (bench/speed.py) or a bare document name (README.md), not part of a longer path.
CITED = re.compile(r"(?<![\w./~-])(?:(?:bench|scripts|docs|tests|slimquant|requirements|\.ci)/[\w./-]*\w|[\w-]+\.md)\b")


COMMAND_LINES = {f"bench/{s}": [sys.executable, f"bench/{s}"] for s in BENCH_SCRIPTS}
COMMAND_LINES["slimquant"] = [str(SLIMQUANT)]
COMMAND_LINES |= {f"slimquant {c}": [str(SLIMQUANT), c] for c in COMMANDS}


def _help(argv: list[str]) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": ""}
    return subprocess.run([*argv, "--help"], cwd=REPO, env=env, capture_output=True, text=True, timeout=300)


@pytest.fixture(scope="module")
def helps() -> dict[str, subprocess.CompletedProcess]:
    """{command line: its --help run}, two at a time (each one imports torch)."""
    with ThreadPoolExecutor(2) as pool:
        return dict(zip(COMMAND_LINES, pool.map(_help, COMMAND_LINES.values()), strict=True))


@pytest.mark.parametrize("line", COMMAND_LINES)
def test_help_starts(helps, line):
    run = helps[line]
    assert run.returncode == 0, f"`{line} --help` failed:\n{run.stderr[-2000:]}"
    assert run.stdout.startswith("usage:"), run.stdout[:200]


def test_speed_script_takes_every_bench_option(helps):
    """bench/speed.py builds its options with `slimquant bench`'s function, so the two cannot drift apart."""
    from slimquant.entrypoints.cli import build_parser

    bench_options = {a.dest for a in _subparser(build_parser(), "bench")._actions} - {"help", "models"}
    speed = helps["bench/speed.py"].stdout
    missing = [d for d in bench_options if "--" + d.replace("_", "-") not in speed]
    assert not missing, f"bench/speed.py lacks {missing}"


def _subparser(parser, name: str):
    (sub,) = [a for a in parser._actions if a.__class__.__name__ == "_SubParsersAction"]
    return sub.choices[name]


def test_only_files_in_the_repository_are_cited():
    from slimquant.quant.sensitivity import REPORT_FILES  # files the quantizer writes, not documents

    cited = {(f, c) for f in CITING for c in set(CITED.findall(f.read_text()))}
    missing = sorted(
        f"{f.relative_to(REPO)}: {c}" for f, c in cited if c not in REPORT_FILES and not (REPO / c).exists()
    )
    assert not missing, "cited files that are not in the repository:\n" + "\n".join(missing)


def test_gpu_check_gives_its_scripts_only_options_they_take(tmp_path, monkeypatch, capsys):
    """Every command scripts/gpu_check.sh runs (recorded by a stand-in python3) parses with its bench script's own
    options, and the tests it names exist: a lent GPU's few minutes are not lost to an option renamed since."""
    calls = _gpu_check_calls(tmp_path)
    scripts = [argv for argv in calls if argv[0].startswith("bench/")]
    assert {argv[0] for argv in scripts} == {
        "bench/speed.py",
        "bench/cuda_linear.py",
        "bench/cuda_attention.py",
        "bench/cuda_moe.py",
    }
    monkeypatch.setattr(sys, "path", list(sys.path))  # the scripts put the repository first
    for argv in scripts:
        assert _parses(argv), (
            f"gpu_check.sh runs `{' '.join(argv)}`, which its parser refuses:\n{capsys.readouterr().err}"
        )
    (tests,) = [argv for argv in calls if argv[:2] == ["-m", "pytest"]]
    named = [a for a in tests if a.startswith("tests/")]
    assert named and all((REPO / a).exists() for a in named), named


def _gpu_check_calls(tmp_path: Path) -> list[list[str]]:
    """The argument lists of every python3 that `bash scripts/gpu_check.sh --sweep` starts (each written to a file
    of its own: the script runs two at once, whose lines would interleave in one file)."""
    bin_dir, log = tmp_path / "bin", tmp_path / "calls"
    bin_dir.mkdir()
    log.mkdir()
    (bin_dir / "python3").write_text(f'#!/usr/bin/env bash\nprintf "%s\\n" "$@" > "$(mktemp "{log}/call.XXXXXX")"\n')
    (bin_dir / "python3").chmod(0o755)
    env = {**os.environ, "PATH": f"{bin_dir}:{os.environ['PATH']}", "OUT": str(tmp_path / "out")}
    run = subprocess.run(
        ["bash", "scripts/gpu_check.sh", "--sweep"], cwd=REPO, env=env, capture_output=True, text=True, timeout=120
    )
    assert run.returncode == 0, run.stdout[-2000:] + run.stderr[-2000:]
    return [call.read_text().splitlines() for call in sorted(log.iterdir())]


class _Parsed(Exception):
    """Raised by a parse_args that succeeded, before the script goes on to use a GPU."""


def _parses(argv: list[str]) -> bool:
    """Whether bench script argv[0] accepts the options argv[1:] (only its argument parser runs)."""
    real = argparse.ArgumentParser.parse_args

    def parse_only(self, args=None, namespace=None):
        real(self, args, namespace)
        raise _Parsed

    with mock.patch.object(argparse.ArgumentParser, "parse_args", parse_only), mock.patch.object(sys, "argv", argv):
        try:
            runpy.run_path(str(REPO / argv[0]), run_name="__main__")
        except _Parsed:
            return True
        except SystemExit:
            return False
    raise AssertionError(f"{argv[0]} never parsed its arguments")
