"""lift-params: ops that read only parameters move to the load-time `derive` section (weight transforms)."""

from __future__ import annotations

from dataclasses import dataclass

from ..ir import Program
from .base import Pass, PassReport

@dataclass(frozen=True)
class LiftParams(Pass):
    """Work that depends on weights alone (a fused weight's concat, a LoRA merge) runs once when weights are bound,
    not on every forward; the artifact stores its result."""

    name = "lift-params"

    def run(self, program: Program) -> tuple[Program, PassReport]:
        lifted = 0
        for fn in program.functions:
            weights = {id(p) for p in fn.params} | {id(r) for o in fn.derived for r in o.results}
            body = []
            for o in fn.ops:
                if not o.opdef.effects and o.operands and all(id(v) in weights for v in o.operands):
                    fn.derived.append(o)
                    weights.update(id(r) for r in o.results)
                    lifted += 1
                else:
                    body.append(o)
            fn.ops = body
        return program, PassReport(self.name, {"lifted": lifted})
