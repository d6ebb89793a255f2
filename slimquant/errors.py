"""Errors that the CLI and the server report as one clear line: user input that names the argument (or request field)
at fault, which the server reports as `param`, and a tensor-parallel rank's failure."""

from __future__ import annotations


class ParamError(ValueError):
    """A bad value of one named argument: ValueError, with the argument's name in `param`."""

    def __init__(self, param: str, message: str):
        super().__init__(message)
        self.param = param


class RankFailure(RuntimeError):
    """A tensor-parallel rank died or failed: the engine cannot go on (every rank has been stopped)."""
