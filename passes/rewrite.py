"""Pattern rewriting: a pattern matches at an op and edits through a Rewriter; a greedy driver applies a pattern
list until nothing fires. Passes built on this say *what* to rewrite, not how to walk the graph."""

from __future__ import annotations

from typing import Any, Iterable, Protocol

from ..ir import Function, Operation, Program, Value, lookup
from ..ir.errors import TypeRuleError, VerifyError


class Rewriter:
    """Every edit of one function goes through here: new ops get inferred types and unique names."""

    def __init__(self, program: Program, fn: Function):
        self.program, self.fn = program, fn
        self.names = {v.name for v in fn.inputs + fn.params} | {r.name for o in fn.all_ops() for r in o.results}

    def fresh(self, hint: str) -> str:
        name, i = hint, 1
        while name in self.names:
            name, i = f"{hint}_{i}", i + 1
        self.names.add(name)
        return name

    def insert_before(self, anchor: Operation, opname: str, *operands: Value | None, name: str | list[str],
                      **attrs: Any):
        """A new op placed just before `anchor`, in the section (body or derive) that holds it; returns its result
        (or tuple of results)."""
        if anchor in self.fn.derived:
            return self.derive(self.fn.derived.index(anchor), opname, *operands, name=name, **attrs)
        return self.insert_at(self.fn.ops.index(anchor), opname, *operands, name=name, **attrs)

    def insert_at(self, index: int, opname: str, *operands: Value | None, name: str | list[str], **attrs: Any):
        """A new body op at position `index`; returns its result (or tuple of results)."""
        op = self.make(opname, operands, name, attrs)
        self.fn.ops.insert(index, op)
        return op.results[0] if len(op.results) == 1 else tuple(op.results)

    def derive(self, index: int, opname: str, *operands: Value | None, name: str | list[str], **attrs: Any):
        """A new load-time op at position `index` of the derive section; returns its result."""
        op = self.make(opname, operands, name, attrs)
        self.fn.derived.insert(index, op)
        return op.results[0] if len(op.results) == 1 else tuple(op.results)

    def make(self, opname: str, operands, name, attrs) -> Operation:
        """A new op (not yet placed) with its results' types inferred and fresh names."""
        ops = [v for v in operands if v is not None]
        d = lookup(opname)
        try:
            norm = d.normalize_attrs(attrs)
            types = d.result_types([v.type for v in ops], norm, self.program)
        except TypeRuleError as e:
            raise VerifyError(f"@{self.fn.name}: rewrite built an invalid {opname}: {e}") from None
        hints = name if isinstance(name, list) else [name] * len(types)
        return Operation(opname, ops, norm, [Value(self.fresh(h), t) for h, t in zip(hints, types)])

    def replace_uses(self, old: Value, new: Value) -> None:
        for o in self.fn.all_ops():
            o.operands = [new if v is old else v for v in o.operands]
        self.fn.outputs = [new if v is old else v for v in self.fn.outputs]

    def erase(self, op: Operation) -> None:
        """Remove `op` (its results must have no readers left); their names become free again."""
        (self.fn.derived if op in self.fn.derived else self.fn.ops).remove(op)
        self.names.difference_update(r.name for r in op.results)

    def users(self, v: Value) -> list[Operation]:
        return [o for o in self.fn.all_ops() if any(x is v for x in o.operands)]


def refresh_types(program: Program, fn: Function) -> None:
    """Re-infer every op's result types in order, after parameter types changed (e.g. a checkpoint stores a weight
    quantized, and the load-time ops reading it now carry quantized rows)."""
    for o in fn.all_ops():
        try:
            types = o.opdef.result_types([v.type for v in o.operands], o.attrs, program)
        except TypeRuleError as e:
            raise VerifyError(f"@{fn.name}: {o.op} cannot take the new operand types: {e}") from None
        for r, t in zip(o.results, types):
            r.type = t


class RewritePattern(Protocol):
    def match_and_rewrite(self, op: Operation, rewriter: Rewriter) -> bool:
        """Rewrite at `op` and return True, or leave everything untouched and return False."""


def apply_patterns(program: Program, patterns: Iterable[RewritePattern], max_rounds: int = 20,
                   derived: bool = False) -> int:
    """Apply patterns greedily to every body op (and load-time op with `derived`) until a fixed point; returns how
    many rewrites fired."""
    patterns = list(patterns)
    fired = 0
    for fn in program.functions:
        rewriter = Rewriter(program, fn)
        for _ in range(max_rounds):
            changed = False
            for op in list(fn.all_ops() if derived else fn.ops):
                if op not in fn.ops and op not in fn.derived:
                    continue
                for p in patterns:
                    if p.match_and_rewrite(op, rewriter):
                        fired += 1
                        changed = True
                        break
            if not changed:
                break
    return fired
