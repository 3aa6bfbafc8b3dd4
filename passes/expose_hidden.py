"""expose-hidden: @main also returns its hidden states (embedding output, each layer call's output, final norm).

A numerics debugger (`mlxc diff`) needs the intermediates of the model that actually runs (fused, quantized, lifted:
whatever the pipeline made of it), not of a re-implementation. Adding them as outputs of @main leaves every op as the
pipeline left it, so the generated code computes exactly what the normal module computes and hands more of it back.
Run it after the pipeline; it adds no ops and drops none.
"""

from __future__ import annotations

from dataclasses import dataclass

from ..ir import Function, Program, Value
from .base import Pass, PassReport

EMBEDDINGS, NORM = "embeddings", "norm"
_NORMS = ("rms_norm", "layer_norm")


def capture_points(main: Function) -> list[tuple[str, Value]]:
    """(label, value) of each hidden state @main computes, in order: `embeddings` (the table lookup, times the
    embedding multiplier when there is one: Gemma's scale is part of its embedding module), one entry per call
    (labelled with its prefix, e.g. `layers.3`) and `norm` (the last normalization after the last call)."""
    points: list[tuple[str, Value]] = []
    embeds = [o for o in main.ops if o.op == "embed"]
    if embeds:
        value = embeds[0].result
        scaled = [o for o in main.ops if o.op == "scale" and o.operands[0] is value]
        points.append((EMBEDDINGS, scaled[0].result if scaled else value))
    calls = [o for o in main.ops if o.op == "call"]
    points += [(o.attrs["prefix"], o.results[0]) for o in calls]
    after = main.ops.index(calls[-1]) if calls else -1
    norms = [o for o in main.ops[after + 1:] if o.op in _NORMS]
    if norms:
        points.append((NORM, norms[-1].result))
    return points


@dataclass(frozen=True)
class ExposeHidden(Pass):
    """@main returns its original outputs followed by the values `capture_points` names, in that order."""

    name = "expose-hidden"

    def run(self, program: Program) -> tuple[Program, PassReport]:
        main = program.main
        points = capture_points(main)
        main.outputs = list(main.outputs) + [v for _, v in points]
        return program, PassReport(self.name, {"exposed": len(points)})
