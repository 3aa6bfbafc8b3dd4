"""cse: an op identical to an earlier one (same op, operands and attributes) is replaced by the earlier result."""

from __future__ import annotations

from dataclasses import dataclass

from ..ir import Program
from ..ir.printer import format_attr
from .base import Pass, PassReport
from .rewrite import Rewriter

@dataclass(frozen=True)
class CommonSubexpressionElimination(Pass):
    """Lowering and fusion can compute the same value twice (e.g. one reshape per user); keep the first."""

    name = "cse"

    def run(self, program: Program) -> tuple[Program, PassReport]:
        removed = 0
        for fn in program.functions:
            rw = Rewriter(program, fn)
            for section in (fn.derived, fn.ops):
                seen = {}
                for o in list(section):
                    if o.opdef.effects:  # two attention ops (or dropouts) are two events, not one value
                        continue
                    key = (o.op, tuple(id(v) for v in o.operands), tuple((k, format_attr(v)) for k, v in o.attrs.items()))
                    if key in seen:
                        for old, new in zip(o.results, seen[key].results):
                            rw.replace_uses(old, new)
                        section.remove(o)
                        removed += 1
                    else:
                        seen[key] = o
        return program, PassReport(self.name, {"removed": removed})
