"""Errors of user input that name the argument (or request field) at fault; the server reports it as `param`."""

from __future__ import annotations


class ParamError(ValueError):
    """A bad value of one named argument: ValueError, with the argument's name in `param`."""

    def __init__(self, param: str, message: str):
        super().__init__(message)
        self.param = param
