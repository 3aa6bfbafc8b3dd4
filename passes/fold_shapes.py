"""fold-shapes: static shape arithmetic folded away (reshape of reshape, transpose of transpose, identities)."""

from __future__ import annotations

from dataclasses import dataclass

from ..ir import Operation, Program
from .base import Pass, PassReport
from .rewrite import Rewriter, apply_patterns


def _producer(rw: Rewriter, v):
    return next((o for o in rw.fn.all_ops() if any(r is v for r in o.results)), None)


@dataclass(frozen=True)
class DropIdentity:
    """reshape to the same type, or transpose by the identity permutation: the result is the operand."""

    def match_and_rewrite(self, op: Operation, rw: Rewriter) -> bool:
        same = (op.op == "reshape" and op.result.type == op.operands[0].type) or (
            op.op == "transpose" and list(op.attrs["perm"]) == list(range(len(op.attrs["perm"]))))
        if not same:
            return False
        rw.replace_uses(op.result, op.operands[0])
        rw.erase(op)
        return True


@dataclass(frozen=True)
class ComposeChain:
    """reshape(reshape(x)) -> reshape(x); transpose(transpose(x, p), q) -> transpose(x, p[q])."""

    def match_and_rewrite(self, op: Operation, rw: Rewriter) -> bool:
        if op.op not in ("reshape", "transpose"):
            return False
        inner = _producer(rw, op.operands[0])
        if inner is None or inner.op != op.op or inner not in rw.fn.ops:
            return False
        if op.op == "reshape":
            new = rw.insert_before(op, "reshape", inner.operands[0], shape=op.attrs["shape"], name=op.result.name)
        else:
            perm = [inner.attrs["perm"][i] for i in op.attrs["perm"]]
            new = rw.insert_before(op, "transpose", inner.operands[0], perm=perm, name=op.result.name)
        rw.replace_uses(op.result, new)
        rw.erase(op)
        if not rw.users(inner.result):
            rw.erase(inner)
        return True


@dataclass(frozen=True)
class FoldShapes(Pass):
    """Fewer view ops per layer means fewer MLX calls per decode step."""

    name = "fold-shapes"

    def run(self, program: Program) -> tuple[Program, PassReport]:
        return program, PassReport(self.name, {"folded": apply_patterns(program, [DropIdentity(), ComposeChain()])})
