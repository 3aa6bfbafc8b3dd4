"""The pass pipeline on one page: which passes exist, which run by default, and debug dumps between them."""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Callable, Sequence

from ..ir import Program, print_program, verify
from ..ir.errors import MlxcError
from .base import Pass, PassReport
from .dce import DeadCodeElimination

PASSES: dict[str, type[Pass]] = {p.name: p for p in (DeadCodeElimination,)}

# Phase 1: clean-up. (Fusion and kernel selection phases join here as they land.)
DEFAULT_PIPELINE: tuple[str, ...] = ("dce",)


def parse_pipeline(text: str | Sequence[str] | None) -> list[str]:
    names = [n.strip() for n in text.split(",")] if isinstance(text, str) else list(text or ())
    names = [n for n in names if n]
    for n in names:
        if n not in PASSES:
            raise MlxcError(f"unknown pass {n!r}; available passes: {', '.join(sorted(PASSES))}")
    return names


def run_pipeline(
    program: Program,
    names: Sequence[str] = DEFAULT_PIPELINE,
    dump_dir: str | Path | None = None,
    stop_after: str | None = None,
    on_report: Callable[[PassReport], None] | None = None,
) -> Program:
    """Run passes in order on a copy, verifying after each; `dump_dir` gets `NN-name.mlxc` per stage."""
    names = parse_pipeline(names)
    if stop_after is not None and stop_after not in names:
        raise MlxcError(f"--after {stop_after}: that pass is not in the pipeline ({', '.join(names) or 'empty'})")
    program = copy.deepcopy(program)
    if dump_dir is not None:
        dump_dir = Path(dump_dir)
        dump_dir.mkdir(parents=True, exist_ok=True)
        (dump_dir / "00-input.mlxc").write_text(print_program(program))
    for i, name in enumerate(names, 1):
        program, report = PASSES[name]().run(program)
        verify(program)
        if on_report is not None:
            on_report(report)
        if dump_dir is not None:
            (dump_dir / f"{i:02d}-{name}.mlxc").write_text(f"// after {report}\n" + print_program(program))
        if name == stop_after:
            break
    return program
