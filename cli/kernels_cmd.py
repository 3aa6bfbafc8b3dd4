"""List custom kernels and which one each target would use."""

from __future__ import annotations

from ..ir.errors import MlxcError

HELP = "list custom kernels and which one each target would use"


def add_parser(p) -> None:
    pass


def run(args) -> int:
    raise MlxcError("no custom kernels are available yet: every op runs through MLX's built-in ops on all targets")
