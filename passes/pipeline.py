"""The pass pipeline on one page: which passes exist, the phases of a compile, and debug dumps between passes.

`build_pipeline` assembles the whole list for one compile (storage types, clean-up, fusion, adapters, lifting,
target lowering); `run_pipeline` runs any list, checks the order constraints passes declare, verifies after each
pass and can write every stage as re-parseable IR.
"""

from __future__ import annotations

import copy
import os
import time
from pathlib import Path
from typing import Callable, Mapping, Sequence, Union

from ..ir import Program, Quant, print_program, verify
from ..ir.layout import LayoutRule
from ..ir.errors import MlxcError
from .base import Pass, PassReport
from .checkpoint_layout import CheckpointLayout
from .cse import CommonSubexpressionElimination
from .dce import DeadCodeElimination
from .fold_shapes import FoldShapes
from .fuse import FuseAttention, FuseGateUp, FuseGLU, FuseQKV
from .lift import LiftParams
from .lora import LoRA, LoRAConfig, MergeLoRA
from .quantize import Quantize, StorageTypes
from .select_kernels import SelectKernels

PASSES: dict[str, type[Pass]] = {
    p.name: p
    for p in (DeadCodeElimination, FuseQKV, FuseGateUp, FuseGLU, FuseAttention, LiftParams, CommonSubexpressionElimination, FoldShapes,
              SelectKernels, Quantize, StorageTypes, LoRA, MergeLoRA)
}



def register_pass(cls: type[Pass]) -> type[Pass]:
    """Add a pass from outside mlxc (usable as a class decorator): its `name` must be new, and a pipeline names it
    like a built-in one (`--passes dce,my-pass`); it must construct with no arguments, as every registered pass does."""
    if not (isinstance(cls, type) and issubclass(cls, Pass)) or not cls.name:
        raise MlxcError(f"register_pass takes a Pass subclass with a name, got {cls!r}")
    if cls.name in PASSES:
        raise MlxcError(f"pass {cls.name!r} is registered already")
    PASSES[cls.name] = cls
    return cls


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
    # Phase 3: target lowering (`build_pipeline` configures it for the target, or replaces it with `quantize`)
    "select-kernels",
    "dce",
)

PassLike = Union[str, Pass]


def parse_pipeline(text: str | Sequence[PassLike] | None) -> list[PassLike]:
    """Pass names (comma-separated text or a list) and configured Pass objects, checked against the registry."""
    items = [n.strip() for n in text.split(",")] if isinstance(text, str) else list(text or ())
    items = [n for n in items if not isinstance(n, str) or n]
    for n in items:
        if isinstance(n, str) and n not in PASSES:
            raise MlxcError(f"unknown pass {n!r}; available passes: {', '.join(sorted(PASSES))}")
    return items


def pass_name(p: PassLike) -> str:
    return p if isinstance(p, str) else p.name


def build_pipeline(passes: Sequence[PassLike] | None = None, *, target: str = "cpu", quantize: int | None = None,
                   group_size: int | None = None, storage: Mapping[str, Quant] | None = None,
                   layout: Sequence[LayoutRule] = (), lora: LoRAConfig | None = None,
                   merge_lora: bool = False, kernels: str = "reference", pack: bool = True) -> list[Pass]:
    """Every pass of one compile, configured, in order.

    Phase 0 makes the checkpoint's tensors the parameters (`layout`: fused, per-expert or reordered tensors, with
    load-time ops giving the body its view) and types them as the checkpoint stores them (`storage`: global name ->
    quantization), so every later decision sees the weights as they are. Phases 1-2 are `passes` (default: DEFAULT_PIPELINE). Adapters (`lora`,
    then `merge-lora`) go in after fusion and before the first pass that lifts or re-types weights. Phase 3 is the
    target's kernel selection (`kernels`: the implementation family the caller chose for this target, e.g. "native"
    on a CPU with mlxc's extension; `pack`: whether the native kernels get their packed weight layout), preceded by
    `quantize` when the user asks for quantized weights: then quantized weights stay quantized on every target (MLX's
    quantized matmul, or the native kernels), and weights stored quantized stay as stored.
    """
    if quantize is not None and quantize not in Quant.BITS:
        raise MlxcError(f"cannot quantize to {quantize} bits; choose one of {', '.join(map(str, Quant.BITS))}")
    if group_size is not None:
        if quantize is None:
            raise MlxcError("--group-size (group_size=) only applies with --quantize")
        if group_size not in Quant.GROUP_SIZES:
            raise MlxcError(f"group size must be one of {', '.join(map(str, Quant.GROUP_SIZES))}, got {group_size}")
    if merge_lora and lora is None:
        raise MlxcError("--merge-lora (merge_lora=) needs an adapter (--adapter DIR) or a LoRA configuration")
    items = [PASSES[p]() if isinstance(p, str) else p
             for p in parse_pipeline(DEFAULT_PIPELINE if passes is None else passes)]
    select = SelectKernels(target=target, kernels=kernels, pack=pack, keep_quantized=quantize is not None)
    items = [select if p.name == SelectKernels.name else p for p in items]
    if quantize is not None:
        q = Quantize(bits=quantize, group_size=group_size or 64)
        at = next((i for i, p in enumerate(items) if p.name == SelectKernels.name), None)
        items = items + [q] if at is None else items[:at] + [q] + items[at:]
    if lora is not None:
        # re-quantizing a merged weight only pays where quantized kernels run; on the CPU's reference path it would
        # be dequantized
        requantize = target != "cpu" or "native" in kernels.split("+")
        adapters: list[Pass] = [LoRA(lora)] + ([MergeLoRA(requantize=requantize)] if merge_lora else [])
        # after fusion, before weight work is lifted to load time (merging is weight work too)
        at = next((i for i, p in enumerate(items) if p.name in ("lift-params",) + LoRA.runs_before), len(items))
        items = items[:at] + adapters + items[at:]
    if storage:
        items = [StorageTypes(quant=dict(storage))] + items
    if layout:
        items = [CheckpointLayout(rules=tuple(layout))] + items
    return items


def check_order(passes: Sequence[Pass]) -> None:
    """Each pass's declared order constraint: the passes it must run before."""
    names = [p.name for p in passes]
    for i, p in enumerate(passes):
        early = [n for n in names[:i] if n in p.runs_before]
        if early:
            raise MlxcError(f"pass {p.name} must run before {early[0]} (it {p.order_reason}); reorder --passes")


def describe(passes: Sequence[Pass]) -> list[str]:
    """Each pass as its name with its non-default settings (`quantize{bits=4, group_size=32}`), for manifests."""
    return [p.describe() for p in passes]


def run_pipeline(
    program: Program,
    names: Sequence[PassLike] = DEFAULT_PIPELINE,
    dump_dir: str | Path | None = None,
    stop_after: str | None = None,
    on_report: Callable[[PassReport], None] | None = None,
) -> Program:
    """Run passes in order on a copy, verifying after each; `dump_dir` gets `NN-name.mlxc` per stage."""
    passes = [PASSES[p]() if isinstance(p, str) else p for p in parse_pipeline(names)]
    check_order(passes)
    if stop_after is not None and stop_after not in [p.name for p in passes]:
        if stop_after not in PASSES:
            raise MlxcError(f"--after {stop_after}: unknown pass; available passes: {', '.join(sorted(PASSES))}")
        listed = ", ".join(p.name for p in passes) or "empty"
        raise MlxcError(f"--after {stop_after}: that pass is not in the pipeline ({listed})")
    program = copy.deepcopy(program)
    if dump_dir is not None:
        dump_dir = Path(dump_dir)
        if dump_dir.exists() and not dump_dir.is_dir():
            raise MlxcError(f"--dump-dir {dump_dir} exists and is not a directory")
        dump_dir.mkdir(parents=True, exist_ok=True)
        _dump(dump_dir / "00-input.mlxc", print_program(program))
    for i, p in enumerate(passes, 1):
        start = time.perf_counter()
        program, report = p.run(program)
        verify(program)
        report.seconds = time.perf_counter() - start
        if on_report is not None:
            on_report(report)
        if dump_dir is not None:
            _dump(dump_dir / f"{i:02d}-{p.name}.mlxc", f"// after {report}\n" + print_program(program))
        if p.name == stop_after:
            break
    return program


def _dump(path: Path, text: str) -> None:
    """One stage's IR, written whole or not at all: a temporary sibling renamed into place (passes import only
    `ir`, so this is not `mlxc.files`)."""
    tmp = path.with_name(f".{path.name}.mlxc-{os.getpid()}-dump")
    try:
        tmp.write_text(text, encoding="utf-8")
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
