"""select-kernels: choose how each op runs on the target, here: quantized or float matmuls.

MLX's CPU backend has no fast quantized matmul (measured on SmolLM2-135M: 8 tok/s prefill with 4-bit weights,
323 tok/s in fp32 with OpenBLAS), so on the CPU quantized weights are dequantized once at load and run as float
matmuls. On GPU targets quantized weights stay quantized.
"""

from __future__ import annotations

from dataclasses import dataclass

from ..ir import Program
from .base import Pass, PassReport


@dataclass(frozen=True)
class SelectKernels(Pass):
    """A kernel choice is a type choice: a float weight type makes the loader dequantize the checkpoint's blocks."""

    name = "select-kernels"
    target: str = "cpu"

    def run(self, program: Program) -> tuple[Program, PassReport]:
        report = PassReport(self.name, {"dequantized at load": 0})
        if self.target != "cpu":
            return program, report
        for fn in program.functions:
            for p in fn.params:
                if p.type.quant is not None:
                    p.type = p.type.with_quant(None)
                    report.changes["dequantized at load"] += 1
        return program, report
