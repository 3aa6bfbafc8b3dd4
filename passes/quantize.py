"""Weight storage passes: `storage-types` (parameters typed as the checkpoint stores them) and `quantize` (store
matmul, embedding and expert weights as affine group-quantized tensors, MLX's 2-8 bit layout)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Mapping

from ..ir import Function, Operation, Program, Quant, Value
from .base import Pass, PassReport
from .rewrite import refresh_types


def global_names(program: Program) -> dict[tuple[str, str], list[str]]:
    """(function, parameter) -> the parameter's global names, one per call path from @main."""
    out: dict[tuple[str, str], list[str]] = {}
    for prefix, fn in program.call_paths():
        for p in fn.params:
            out.setdefault((fn.name, p.name), []).append(prefix + p.name)
    return out


# op -> the operand positions of its weights: matmul weights, embedding tables, a mixture's stacked experts
WEIGHT_OPERANDS: Mapping[str, tuple[int, ...]] = {"linear": (1,), "embed": (1,), "moe": (2, 3, 4)}


def weight_uses(fn: Function) -> list[tuple[Operation, Value]]:
    """(op, weight) for each matmul weight, embedding table and expert weight in the body: the values worth
    quantizing."""
    return [(o, o.operands[i]) for o in fn.ops for i in WEIGHT_OPERANDS.get(o.op, ())]


def redirect(fn: Function, old: Value, new: Value) -> None:
    for o in fn.ops:
        o.operands = [new if v is old else v for v in o.operands]


def derived_name(fn: Function, name: str, tag: str) -> str:
    """`qkv_proj.weight` -> `qkv_proj_q.weight`: a new module path, so its storage arrays get their own names."""
    taken = {v.name for v in fn.inputs + fn.params} | {r.name for o in fn.all_ops() for r in o.results}
    stem, dot, leaf = name.rpartition(".")
    for i in range(1000):
        suffix = tag if i == 0 else f"{tag}{i}"
        candidate = f"{stem}_{suffix}.{leaf}" if dot else f"{name}_{suffix}"
        if candidate not in taken:
            return candidate
    raise RuntimeError("no free name")


@dataclass(frozen=True)
class StorageTypes(Pass):
    """A checkpoint that stores weights quantized (GGUF Q4_1, ...) is described as such, before any other pass, so
    that every later decision sees the weights as they really are. A layer weight stored differently in different
    layers stays float (the loader dequantizes it) and is counted as mixed."""

    name = "storage-types"
    quant: Mapping[str, Quant] = field(default_factory=dict, compare=False)  # global parameter name -> storage

    def run(self, program: Program) -> tuple[Program, PassReport]:
        report = PassReport(self.name, {"quantized": 0, "mixed": 0})
        names = global_names(program)
        for fn in program.functions:
            for p in fn.params:
                choices = {self.quant.get(g) for g in names.get((fn.name, p.name), [])}
                if len(choices) > 1:
                    report.changes["mixed"] += 1
                elif choices and (q := choices.pop()) is not None:
                    p.type = p.type.with_quant(q)
                    report.changes["quantized"] += 1
            refresh_types(program, fn)
        return program, report


@dataclass(frozen=True)
class Quantize(Pass):
    """Weights dominate memory and, on GPU targets, matmul bandwidth. Quantizing is a load-time `quantize` op on each
    float weight a matmul or lookup reads (after fusion, the fused weight), so the artifact stores the codes.

    A mixture's router stays float: its top-k choice is discontinuous in its weights, so rounding them re-routes
    tokens near a tie to other experts (a jump in the output, measured several times the rounding error of the
    experts themselves), and it is a tiny matrix [experts, hidden]."""

    name = "quantize"
    bits: int = 4
    group_size: int = 64
    embeddings: bool = True

    def run(self, program: Program) -> tuple[Program, PassReport]:
        report = PassReport(self.name, {"quantized": 0, "kept float": 0})
        for fn in program.functions:
            done: dict[int, Value] = {}
            routers = _router_weights(fn)
            for op, w in weight_uses(fn):
                if w.type.quant is not None or id(w) in done:
                    continue
                is_embedding = w.name.startswith(("embed_tokens", "lm_head"))
                rank = 3 if op.op == "moe" else 2  # experts: [E, out, in], quantized per expert row
                if w.type.rank != rank or w.type.shape[-1] % self.group_size or (is_embedding and not self.embeddings) \
                        or id(w) in routers:
                    report.changes["kept float"] += 1
                    continue
                q = Operation("quantize", [w], {"bits": self.bits, "group_size": self.group_size},
                              [Value(derived_name(fn, w.name, "q"), w.type.with_quant(Quant(self.bits, self.group_size)))])
                fn.derived.append(q)
                redirect(fn, w, q.result)
                done[id(w)] = q.result
                report.changes["quantized"] += 1
        return program, report


def _router_weights(fn: Function) -> set[int]:
    """The weights of the linears that compute a mixture's router logits."""
    producer = fn.producers()
    linears = [producer.get(o.operands[1]) for o in fn.ops if o.op == "moe"]
    return {id(lin.operands[1]) for lin in linears if lin is not None and lin.op == "linear"}
