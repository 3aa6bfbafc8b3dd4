"""select-kernels: choose how each op runs on the target, and say so in the IR (`linear {kernel = native}`).

Ops with several implementations (`linear`, `embed`; see `ir.attrs.Kernel`) carry a `kernel` attribute, default
`reference` (plain MLX ops). The caller says which implementation family the target offers (`kernels`: what
`mlxc.load(kernels=...)` resolved to, after checking what is installed); this pass applies it op by op, with the
weight layout each kernel needs:

- `native` (the CPU with mlxc's C++ extension): matmuls and lookups on 4- and 8-bit weights keep them quantized
  and run the native kernels. Each quantized weight a matmul reads is repacked once at load (`pack`: 16 rows side by
  side, ~2x fewer instructions per weight for one activation row); a tied embedding's lookups read the same packed
  copy. Anything the kernels do not take (other widths, the experts of a `moe`) is handled as on the reference path.
- `reference` on the CPU: MLX's CPU backend has no fast quantized matmul (SmolLM2-135M: 8 tok/s prefill with 4-bit
  weights, 294 tok/s in fp32 with OpenBLAS), so each quantized weight a matmul or lookup reads gets a load-time
  `dequantize` and the kernels run in float; unless the user asked for quantized weights (`keep_quantized`, from
  `--quantize`), which then run through MLX's quantized matmul. On GPU targets quantized weights stay quantized.
"""

from __future__ import annotations

from dataclasses import dataclass

from ..ir import Function, Kernel, Operation, Program, Value
from ..ir.errors import MlxcError
from .base import Pass, PassReport
from .quantize import derived_name, weight_uses

# The ops whose implementation select-kernels chooses, and the operand position of their weight.
CHOOSABLE = {"linear": 1, "embed": 1}
NATIVE_BITS, NATIVE_GROUPS, NATIVE_MAX_K = (4, 8), (32, 64, 128), 65536


@dataclass(frozen=True)
class SelectKernels(Pass):
    """A kernel choice is an attribute plus a weight layout: float weights mean dense BLAS matmuls, quantized ones
    MLX's qmm or the native kernels, packed ones only the native kernels."""

    name = "select-kernels"
    target: str = "cpu"
    kernels: str = "reference"  # the implementation family chosen for this target: "reference" or "native"
    pack: bool = True  # native: repack the weights matmuls read (off: the kernels read MLX's layout; needed for x-grads)
    keep_quantized: bool = False  # reference: quantized weights stay quantized (the user asked for them)

    def run(self, program: Program) -> tuple[Program, PassReport]:
        kernel = Kernel(self.kernels)
        if kernel not in (Kernel.REFERENCE, Kernel.NATIVE):
            raise MlxcError(f"select-kernels: no op has a {kernel.value!r} implementation yet")
        if kernel == Kernel.NATIVE and self.target != "cpu":
            raise MlxcError(f"select-kernels: the native kernels run on the CPU, not on target {self.target!r}")
        report = PassReport(self.name, {"native": 0, "packed": 0, "dequantized at load": 0})
        for fn in program.functions:
            native = [(o, w) for o, w in weight_uses(fn) if kernel == Kernel.NATIVE and self._native_fits(o, w)]
            for o, _ in native:
                o.attrs["kernel"] = Kernel.NATIVE
                report.changes["native"] += 1
            if self.pack:
                report.changes["packed"] += self._pack(fn, native)
            if self.target == "cpu" and not self.keep_quantized:
                chosen = {id(o) for o, _ in native}
                rest = [(o, w) for o, w in weight_uses(fn) if id(o) not in chosen]
                report.changes["dequantized at load"] += self._dequantize(fn, rest)
        return program, report

    @staticmethod
    def _native_fits(o: Operation, w: Value) -> bool:
        q = w.type.quant
        return (o.op in CHOOSABLE and q is not None and q.bits in NATIVE_BITS and q.group_size in NATIVE_GROUPS
                and w.type.rank == 2 and isinstance(w.type.shape[1], int) and w.type.shape[1] <= NATIVE_MAX_K)

    @staticmethod
    def _pack(fn: Function, native: list[tuple[Operation, Value]]) -> int:
        """One packed copy per weight a native matmul reads, which all its native readers then use (a tied
        embedding's lookup too); a weight only looked up stays in MLX's layout (its rows are read one by one)."""
        packed = 0
        for w in dict.fromkeys(w for o, w in native if o.op == "linear"):
            q = w.type.quant
            if q.packed or q.scale_dtype(w.type.dtype).value not in ("f32", "f16"):
                continue
            p = Operation("pack", [w], {}, [Value(derived_name(fn, w.name, "p"), w.type.with_quant(
                q.with_layout(packed=True)))])
            fn.derived.append(p)
            for o, v in native:
                if v is w:
                    _set_weight(o, p.result)
            packed += 1
        return packed

    @staticmethod
    def _dequantize(fn: Function, uses: list[tuple[Operation, Value]]) -> int:
        made: dict[int, Value] = {}
        for o, w in uses:
            if w.type.quant is None:
                continue
            if id(w) not in made:
                d = Operation("dequantize", [w], {}, [Value(derived_name(fn, w.name, "f"), w.type.with_quant(None))])
                fn.derived.append(d)
                made[id(w)] = d.result
            o.operands = [made[id(w)] if v is w else v for v in o.operands]
        return len(made)


def _set_weight(o: Operation, w: Value) -> None:
    i = CHOOSABLE[o.op]
    o.operands = o.operands[:i] + [w] + o.operands[i + 1:]
