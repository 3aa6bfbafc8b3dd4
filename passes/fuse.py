"""fuse-qkv and fuse-gate-up: parallel projections of one input become one matmul and a split.

Both are the same rewrite with different roles: linears whose weights are `<role>.weight` of the same function and
read the same input become `split(linear(x, concat(W...)), sizes)`. The weight concat is ordinary graph code here;
`lift-params` moves it to load time, so the artifact stores the fused weight once.
"""

from __future__ import annotations

from dataclasses import dataclass

from ..ir import Operation, Program
from .base import Pass, PassReport
from .rewrite import Rewriter, apply_patterns


def _role(op: Operation) -> str | None:
    """`q_proj` for a linear whose weight is the value `q_proj.weight`."""
    if op.op != "linear":
        return None
    parts = op.operands[1].name.rsplit(".", 1)
    return parts[0] if len(parts) == 2 and parts[1] == "weight" else None


@dataclass(frozen=True)
class CombineParallelLinears:
    roles: tuple[str, ...]  # e.g. ("q_proj", "k_proj", "v_proj"), in output order
    fused: str  # the fused projection's name, e.g. "qkv_proj"

    def match_and_rewrite(self, op: Operation, rw: Rewriter) -> bool:
        if _role(op) != self.roles[0]:
            return False
        x = op.operands[0]
        found = {}
        for o in rw.fn.ops:
            if o.op == "linear" and o.operands[0] is x and _role(o) in self.roles:
                found.setdefault(_role(o), o)
        if len(found) != len(self.roles):
            return False
        group = [found[r] for r in self.roles]
        weights = [o.operands[1] for o in group]
        if len({(w.type.dtype, w.type.quant, w.type.shape[1]) for w in weights}) != 1:
            return False  # back off: the weights cannot be stacked into one matrix
        with_bias = [len(o.operands) == 3 for o in group]
        if any(with_bias) and not all(with_bias):
            return False
        first = min(group, key=rw.fn.ops.index)
        later = {id(r) for o in rw.fn.ops[rw.fn.ops.index(first):] for r in o.results}
        if any(id(v) in later for o in group for v in o.operands[1:]):
            return False  # back off: a weight or bias is computed in the body after the first projection
        w = rw.insert_before(first, "concat", *weights, axis=0, name=f"{self.fused}.weight")
        b = rw.insert_before(first, "concat", *[o.operands[2] for o in group], axis=0,
                             name=f"{self.fused}.bias") if all(with_bias) else None
        y = rw.insert_before(first, "linear", x, w, b, name=self.fused.removesuffix("_proj"))
        sizes = [wt.type.shape[0] for wt in weights]
        parts = rw.insert_before(first, "split", y, sizes=sizes, axis=-1, name=[o.result.name + "_" for o in group])
        for o, part in zip(group, parts):
            rw.replace_uses(o.result, part)
            rw.erase(o)
        return True


@dataclass(frozen=True)
class FuseQKV(Pass):
    """One matmul instead of three per attention layer: fewer ops per decode step, one larger GEMM in prefill."""

    name = "fuse-qkv"

    def run(self, program: Program) -> tuple[Program, PassReport]:
        n = apply_patterns(program, [CombineParallelLinears(("q_proj", "k_proj", "v_proj"), "qkv_proj")])
        return program, PassReport(self.name, {"fused": n})


@dataclass(frozen=True)
class FuseGateUp(Pass):
    """Gate and up projections of a gated MLP read the same input: one matmul, then split before the activation."""

    name = "fuse-gate-up"

    def run(self, program: Program) -> tuple[Program, PassReport]:
        n = apply_patterns(program, [CombineParallelLinears(("gate_proj", "up_proj"), "gate_up_proj")])
        return program, PassReport(self.name, {"fused": n})
