"""fold-shapes: static shape arithmetic folded away (reshape of reshape, transpose of transpose, identities), in the
body and among load-time ops, where a checkpoint's split and a fusion's concat of the same pieces cancel out."""

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
class ConcatOfSplit:
    """concat(split(x)) of all the pieces, in order, along the same axis -> x (a checkpoint's fused `qkv_proj` that
    fusion puts back together)."""

    def match_and_rewrite(self, op: Operation, rw: Rewriter) -> bool:
        if op.op != "concat":
            return False
        split = _producer(rw, op.operands[0])
        if split is None or split.op != "split" or [id(v) for v in op.operands] != [id(r) for r in split.results]:
            return False
        rank = op.result.type.rank
        if op.attrs["axis"] % rank != split.attrs["axis"] % rank or op.result.type != split.operands[0].type:
            return False
        rw.replace_uses(op.result, split.operands[0])
        rw.erase(op)
        return True


@dataclass(frozen=True)
class FoldShift:
    """shift(shift(x, a), b) -> shift(x, a + b); shift(x, 0) -> x (a norm stored as 1 + w and read as 1 + w)."""

    def match_and_rewrite(self, op: Operation, rw: Rewriter) -> bool:
        if op.op != "shift":
            return False
        if op.attrs["value"] == 0.0:
            rw.replace_uses(op.result, op.operands[0])
            rw.erase(op)
            return True
        inner = _producer(rw, op.operands[0])
        if inner is None or inner.op != "shift" or len(rw.users(inner.result)) != 1:
            return False
        op.attrs["value"] = inner.attrs["value"] + op.attrs["value"]
        op.operands = [inner.operands[0]]
        rw.erase(inner)
        return True


@dataclass(frozen=True)
class FoldShapes(Pass):
    """Fewer view ops per layer means fewer MLX calls per decode step."""

    name = "fold-shapes"

    def run(self, program: Program) -> tuple[Program, PassReport]:
        patterns = [DropIdentity(), ComposeChain(), ConcatOfSplit(), FoldShift()]
        return program, PassReport(self.name, {"folded": apply_patterns(program, patterns, derived=True)})
