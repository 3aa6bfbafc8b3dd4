"""dce: drop ops whose results nothing uses (body and load-time), then unused parameters and functions. An op with
effects (one that keeps per-layer state, draws randomness or calls a function) stays even when nothing reads its
results: dropping it would skip a state update."""

from __future__ import annotations

from dataclasses import dataclass

from ..ir import Program
from .base import Pass, PassReport


@dataclass(frozen=True)
class DeadCodeElimination(Pass):
    """Frontends and fusions can leave values nobody reads; removing them also drops their weights from the artifact."""

    name = "dce"

    def run(self, program: Program) -> tuple[Program, PassReport]:
        report = PassReport(self.name, {"ops": 0, "params": 0, "functions": 0})
        for fn in program.functions:
            live = {id(v) for v in fn.outputs}
            for section in ("ops", "derived"):  # body first: it decides which load-time values are needed
                kept = []
                for o in reversed(getattr(fn, section)):
                    if any(id(r) in live for r in o.results) or o.opdef.effects:
                        kept.append(o)
                        live.update(id(v) for v in o.operands)
                    else:
                        report.changes["ops"] += 1
                setattr(fn, section, kept[::-1])
            params = [p for p in fn.params if id(p) in live]
            report.changes["params"] += len(fn.params) - len(params)
            fn.params = params
        called = {Program.ENTRY}
        frontier = [Program.ENTRY]
        while frontier:
            for o in program[frontier.pop()].ops:
                if o.op == "call" and o.attrs["callee"] not in called:
                    called.add(o.attrs["callee"])
                    frontier.append(o.attrs["callee"])
        report.changes["functions"] = sum(f.name not in called for f in program.functions)
        program.functions = [f for f in program.functions if f.name in called]
        return program, report
