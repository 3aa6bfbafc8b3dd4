"""select-kernels: choose how each op runs on the target, here: quantized or float matmuls.

MLX's CPU backend has no fast quantized matmul (measured on SmolLM2-135M: 8 tok/s prefill with 4-bit weights,
294 tok/s in fp32 with OpenBLAS), so on the CPU each quantized weight a matmul or lookup reads gets a load-time
`dequantize` and the kernels run in float. On GPU targets quantized weights stay quantized.
"""

from __future__ import annotations

from dataclasses import dataclass

from ..ir import Operation, Program, Value
from .base import Pass, PassReport
from .quantize import derived_name, redirect, weight_uses


@dataclass(frozen=True)
class SelectKernels(Pass):
    """A kernel choice is a type choice: a float weight means dense BLAS matmuls, a quantized one MLX's qmm."""

    name = "select-kernels"
    target: str = "cpu"

    def run(self, program: Program) -> tuple[Program, PassReport]:
        report = PassReport(self.name, {"dequantized at load": 0})
        if self.target != "cpu":
            return program, report
        for fn in program.functions:
            done: set[int] = set()
            for _, w in weight_uses(fn):
                if w.type.quant is None or id(w) in done:
                    continue
                done.add(id(w))
                d = Operation("dequantize", [w], {}, [Value(derived_name(fn, w.name, "f"), w.type.with_quant(None))])
                fn.derived.append(d)
                redirect(fn, w, d.result)
                report.changes["dequantized at load"] += 1
        return program, report
