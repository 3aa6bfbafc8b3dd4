"""quantize: store matmul and embedding weights as affine group-quantized tensors (MLX's 2-8 bit layout).

A weight of a function called from several places (a layer body) gets one type for all calls; when the decision
differs between calls, the weight stays in float and the report counts it as mixed.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, Optional

from ..ir import Function, Program, Quant, Value
from .base import Pass, PassReport

Decide = Callable[[str, Value], Optional[Quant]]


def global_names(program: Program) -> dict[tuple[str, str], list[str]]:
    """(function, parameter) -> the parameter's global names, one per call path from @main."""
    out: dict[tuple[str, str], list[str]] = {}

    def walk(fn: Function, prefix: str) -> None:
        for p in fn.params:
            out.setdefault((fn.name, p.name), []).append(prefix + p.name)
        for o in fn.ops:
            if o.op == "call":
                sub = o.attrs["prefix"]
                walk(program[o.attrs["callee"]], prefix + (sub + "." if sub else ""))

    walk(program.main, "")
    return out


def weight_operands(fn: Function) -> set[int]:
    """ids of the parameters that feed a matmul weight or an embedding table: the ones worth quantizing."""
    return {id(o.operands[1]) for o in fn.ops if o.op in ("linear", "embed")}


@dataclass(frozen=True)
class Quantize(Pass):
    """Weights dominate memory and, on most targets, matmul bandwidth; quantizing them is a type change here and a
    `quantize` call at load time."""

    name = "quantize"
    bits: int = 4
    group_size: int = 64
    embeddings: bool = True
    decide: Decide | None = field(default=None, compare=False)  # per-weight choice (e.g. from a GGUF's tensor types)

    def choose(self, global_name: str, p: Value) -> Quant | None:
        if self.decide is not None:
            return self.decide(global_name, p)
        if not self.embeddings and global_name in ("embed_tokens.weight", "lm_head.weight"):
            return None
        if p.type.rank != 2 or p.type.shape[-1] % self.group_size:
            return None
        return Quant(self.bits, self.group_size)

    def run(self, program: Program) -> tuple[Program, PassReport]:
        report = PassReport(self.name, {"quantized": 0, "kept float": 0, "mixed": 0})
        names = global_names(program)
        for fn in program.functions:
            targets = weight_operands(fn)
            for p in fn.params:
                if id(p) not in targets or p.type.quant is not None:
                    continue
                choices = {self.choose(g, p) for g in names.get((fn.name, p.name), [])}
                if len(choices) > 1:
                    report.changes["mixed"] += 1
                    continue
                q = choices.pop() if choices else None
                if q is None:
                    report.changes["kept float"] += 1
                    continue
                p.type = p.type.with_quant(q)
                report.changes["quantized"] += 1
        return program, report
