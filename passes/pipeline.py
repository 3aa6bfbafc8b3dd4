"""The pass pipeline on one page: which passes exist, which run by default, and debug dumps between them."""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Callable, Sequence, Union

from ..ir import Program, print_program, verify
from ..ir.errors import MlxcError
from .base import Pass, PassReport
from .cse import CommonSubexpressionElimination
from .dce import DeadCodeElimination
from .fold_shapes import FoldShapes
from .fuse import FuseGateUp, FuseQKV
from .lift import LiftParams
from .lora import LoRA, MergeLoRA
from .quantize import Quantize, StorageTypes
from .select_kernels import SelectKernels

PASSES: dict[str, type[Pass]] = {
    p.name: p
    for p in (DeadCodeElimination, FuseQKV, FuseGateUp, LiftParams, CommonSubexpressionElimination, FoldShapes,
              SelectKernels, Quantize, StorageTypes, LoRA, MergeLoRA)
}

DEFAULT_PIPELINE: tuple[str, ...] = (
    # Phase 1: clean-up of what the frontend lowered
    "dce",
    # Phase 2: fusion (weight concats appear as graph code) ...
    "fuse-qkv",
    "fuse-gate-up",
    # ... then weight-only work moves to load time, and canonical clean-ups
    "lift-params",
    "cse",
    "fold-shapes",
    # Phase 3: target lowering (the target comes from the caller; see mlxc.api.pipeline)
    "select-kernels",
    "dce",
)


PassLike = Union[str, Pass]


def parse_pipeline(text: str | Sequence[PassLike] | None) -> list[PassLike]:
    """Pass names (comma-separated text or a list) and configured Pass objects, checked against the registry."""
    items = [n.strip() for n in text.split(",")] if isinstance(text, str) else list(text or ())
    items = [n for n in items if n]
    for n in items:
        if isinstance(n, str) and n not in PASSES:
            raise MlxcError(f"unknown pass {n!r}; available passes: {', '.join(sorted(PASSES))}")
    return items


def pass_name(p: PassLike) -> str:
    return p if isinstance(p, str) else p.name


def run_pipeline(
    program: Program,
    names: Sequence[PassLike] = DEFAULT_PIPELINE,
    dump_dir: str | Path | None = None,
    stop_after: str | None = None,
    on_report: Callable[[PassReport], None] | None = None,
) -> Program:
    """Run passes in order on a copy, verifying after each; `dump_dir` gets `NN-name.mlxc` per stage."""
    passes = [PASSES[p]() if isinstance(p, str) else p for p in parse_pipeline(names)]
    if stop_after is not None and stop_after not in [p.name for p in passes]:
        listed = ", ".join(p.name for p in passes) or "empty"
        raise MlxcError(f"--after {stop_after}: that pass is not in the pipeline ({listed})")
    program = copy.deepcopy(program)
    if dump_dir is not None:
        dump_dir = Path(dump_dir)
        dump_dir.mkdir(parents=True, exist_ok=True)
        (dump_dir / "00-input.mlxc").write_text(print_program(program))
    for i, p in enumerate(passes, 1):
        name = p.name
        program, report = p.run(program)
        verify(program)
        if on_report is not None:
            on_report(report)
        if dump_dir is not None:
            (dump_dir / f"{i:02d}-{name}.mlxc").write_text(f"// after {report}\n" + print_program(program))
        if name == stop_after:
            break
    return program
