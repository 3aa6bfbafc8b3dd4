"""select-kernels: choose how each op runs on the target, and say so in the IR (`linear {kernel = native}`).

Ops with several implementations (`linear`, `embed`, `attention`, `selective_scan`, `ssd`; see `ir.attrs.Kernel`)
carry a `kernel` attribute, default `reference` (plain MLX ops). The caller says which implementation family the
target offers (`kernels`: what `mlxc.load(kernels=...)` resolved to, after checking what is installed); this pass
applies it op by op, with the weight layout each kernel needs:

- `native` (the CPU with mlxc's C++ extension): matmuls and lookups on 4- and 8-bit weights keep them quantized
  and run the native kernels (GGUF Q6_K's groups of 16: lookups, and matmuls when packed; unpacked, such a matmul
  weight is dequantized at load); matmuls on float32 weights run the native matrix-vector kernel for a few rows
  (decode) and BLAS for more (half-precision float models keep MLX's ops). With either, rms_norm, rope,
  attention and the fused ops that replace a gated MLP's glue and an attention block's head split, rotation and
  merge (passes/fuse.py: `glu`, `qkv_attention`) run natively too.
  Each quantized weight a matmul reads is repacked once at load (`pack`: 16 rows side by side, ~2x fewer
  instructions per weight for one activation row); a tied embedding's lookups read the same packed copy. Anything
  the kernels do not take (other widths, the experts of a `moe`) is handled as on the reference path.
- `metal` / `cuda` (an Apple GPU / MLX's CUDA back-end) and `emulated` (any machine, for tests): `attention`,
  `selective_scan` and `ssd` run mlxc's custom kernels (kernels/metal: the Metal kernel, its CUDA twin, or the Metal
  source in the kernel emulator); matmuls keep their own choice ("native+emulated" on a CPU with the extension).
- `reference` on the CPU: MLX's CPU backend has no fast quantized matmul (SmolLM2-135M: 8 tok/s prefill with 4-bit
  weights, 294 tok/s in fp32 with OpenBLAS), so each quantized weight a matmul or lookup reads gets a load-time
  `dequantize` and the kernels run in float; unless the user asked for quantized weights (`keep_quantized`, from
  `--quantize`), which then run through MLX's quantized matmul. On GPU targets quantized weights stay quantized.
"""

from __future__ import annotations

from dataclasses import dataclass

from ..ir import DType, Function, Kernel, Operation, Program, Value
from ..ir.errors import MlxcError
from .base import Pass, PassReport
from .fuse import AttentionFromQKV, GatedUnit
from .quantize import derived_name, weight_uses
from .rewrite import apply_patterns

# The ops whose implementation select-kernels chooses, and the operand position of their weight.
CHOOSABLE = {"linear": 1, "embed": 1}
# The ops with custom GPU kernels (kernels/metal: a Metal kernel, its CUDA twin, and the emulator that runs the Metal
# source anywhere); kernels/registry.py lists the kernels behind them, and a test holds the two to each other.
CUSTOM = {"attention": (Kernel.METAL, Kernel.CUDA, Kernel.EMULATED),
          "selective_scan": (Kernel.METAL, Kernel.CUDA, Kernel.EMULATED),
          "ssd": (Kernel.METAL, Kernel.CUDA, Kernel.EMULATED)}
CUSTOM_TARGETS = {Kernel.METAL: "gpu", Kernel.CUDA: "gpu"}  # where each runs (the emulator: anywhere)
NATIVE_BITS, NATIVE_GROUPS, NATIVE_MAX_K = (4, 8), (32, 64, 128), 65536


@dataclass(frozen=True)
class SelectKernels(Pass):
    """A kernel choice is an attribute plus a weight layout: float weights mean dense BLAS matmuls, quantized ones
    MLX's qmm or the native kernels, packed ones only the native kernels."""

    name = "select-kernels"
    target: str = "cpu"
    # the implementation family chosen for this target: "reference", "native" (matmuls and lookups), "metal" /
    # "cuda" / "emulated" (the ops in CUSTOM), or a matmul family and a custom one joined by "+" ("native+emulated")
    kernels: str = "reference"
    pack: bool = True  # native: repack the weights matmuls read (off: the kernels read MLX's layout; needed for x-grads)
    keep_quantized: bool = False  # reference: quantized weights stay quantized (the user asked for them)

    def run(self, program: Program) -> tuple[Program, PassReport]:
        kernel, custom = self._families()
        report = PassReport(self.name, {"native": 0, "packed": 0, "dequantized at load": 0})
        if custom != Kernel.REFERENCE:
            report.changes[custom.value] = 0
        if kernel == Kernel.NATIVE and custom not in CUSTOM["selective_scan"]:
            report.changes["native scan"] = _native_scans(program)
        for fn in program.functions:
            for o in fn.ops:
                # the attention kernels have no ALiBi: such an op keeps the reference ops
                if custom in CUSTOM.get(o.op, ()) and o.attrs.get("alibi") is None:
                    o.attrs["kernel"] = custom
                    report.changes[custom.value] += 1
            native = [(o, w) for o, w in weight_uses(fn)
                      if kernel == Kernel.NATIVE and self._native_fits(o, w, self.pack)]
            for o, _ in native:
                o.attrs["kernel"] = Kernel.NATIVE
                report.changes["native"] += 1
            if self.pack:
                report.changes["packed"] += self._pack(fn, native)
            if self.target == "cpu" and not self.keep_quantized:
                chosen = {id(o) for o, _ in native}
                rest = [(o, w) for o, w in weight_uses(fn) if id(o) not in chosen]
                report.changes["dequantized at load"] += self._dequantize(fn, rest)
        if report.changes["native"]:  # MLX's CPU backend composes these from many small ops
            report.changes["native (norm, rope, attention)"] = _native_layers(program)
            # the kernels also take the glue between projections whole: a third of the ops per decode step
            fusions = [GatedUnit(Kernel.NATIVE), AttentionFromQKV()]
            report.changes["fused (glu, qkv_attention)"] = apply_patterns(program, fusions)
        return program, report

    def _families(self) -> tuple[Kernel, Kernel]:
        """(matmul and lookup kernel, custom-op kernel) from `kernels`, or an error naming what cannot apply."""
        try:
            parts = [Kernel(p) for p in self.kernels.split("+")]
        except ValueError:
            raise MlxcError(f"select-kernels: unknown kernels {self.kernels!r}; expected "
                            f"{', '.join(k.value for k in Kernel)}, or two joined by '+'") from None
        matmul = [k for k in parts if k in (Kernel.REFERENCE, Kernel.NATIVE)]
        custom = [k for k in parts if k not in matmul]
        if len(matmul) > 1 or len(custom) > 1:
            raise MlxcError(f"select-kernels: kernels {self.kernels!r} names two choices for the same ops")
        kernel, op_kernel = (matmul or [Kernel.REFERENCE])[0], (custom or [Kernel.REFERENCE])[0]
        if kernel == Kernel.NATIVE and self.target != "cpu":
            raise MlxcError(f"select-kernels: the native kernels run on the CPU, not on target {self.target!r}")
        where = CUSTOM_TARGETS.get(op_kernel)
        if where is not None and self.target != where:
            raise MlxcError(f"select-kernels: the {op_kernel.value} kernels run on a GPU, not on target "
                            f"{self.target!r}; kernels='emulated' runs the Metal kernels' source on any machine")
        return kernel, op_kernel

    @staticmethod
    def _native_fits(o: Operation, w: Value, pack: bool = True) -> bool:
        q = w.type.quant
        if q is None:  # float32 weights: matmuls only (a lookup reads one row; MLX's indexing is all it needs);
            # half-precision models keep MLX's ops, whose roundings are transformers'
            return o.op == "linear" and w.type.rank == 2 and w.type.dtype == DType.F32
        if q.group_size == 16:  # GGUF Q6_K (8-bit codes): the lookups, and matmuls on the packed layout only
            return q.bits == 8 and (o.op == "embed" or pack or q.packed) and w.type.rank == 2 \
                and isinstance(w.type.shape[1], int) and w.type.shape[1] <= NATIVE_MAX_K
        return (o.op in CHOOSABLE and q.bits in NATIVE_BITS and q.group_size in NATIVE_GROUPS
                and w.type.rank == 2 and isinstance(w.type.shape[1], int) and w.type.shape[1] <= NATIVE_MAX_K)

    @staticmethod
    def _pack(fn: Function, native: list[tuple[Operation, Value]]) -> int:
        """One packed copy per weight a native matmul reads, which all its native readers then use (a tied
        embedding's lookup too); a weight only looked up stays in MLX's layout (its rows are read one by one)."""
        packed = 0
        for w in dict.fromkeys(w for o, w in native if o.op == "linear"):
            q = w.type.quant
            if q is None or q.packed or q.scale_dtype(w.type.dtype).value not in ("f32", "f16"):
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


# Ops of a decode step that the native kernels also run (MLX's CPU backend composes them from several ops), in a
# program whose matmuls are native; their helpers fall back to MLX's op where the native one does not apply.
NATIVE_LAYER_OPS = ("rms_norm", "rope", "attention")


def _native_layers(program: Program) -> int:
    count = 0
    for fn in program.functions:
        for o in fn.ops:
            if o.op in NATIVE_LAYER_OPS and o.attrs.get("kernel", Kernel.REFERENCE) == Kernel.REFERENCE \
                    and o.attrs.get("alibi") is None:  # the native attention has no ALiBi bias
                o.attrs["kernel"] = Kernel.NATIVE
                count += 1
    return count


def _native_scans(program: Program) -> int:
    """Mamba's selective scans run the native kernel (kernels/native/src/scan.cpp: the recurrence in float32, 16
    channels per vector; MLX's CPU backend runs the chunked scan's exps one element at a time), whatever the weights'
    format; its helper runs the MLX scan where the extension lacks it."""
    count = 0
    for fn in program.functions:
        for o in fn.ops:
            if o.op == "selective_scan" and o.attrs.get("kernel", Kernel.REFERENCE) == Kernel.REFERENCE:
                o.attrs["kernel"] = Kernel.NATIVE
                count += 1
    return count


def _set_weight(o: Operation, w: Value) -> None:
    i = CHOOSABLE[o.op]
    o.operands = o.operands[:i] + [w] + o.operands[i + 1:]
