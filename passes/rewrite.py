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
        """A new op placed just before `anchor`; returns its result (or tuple of results)."""
        ops = [v for v in operands if v is not None]
        d = lookup(opname)
        try:
            norm = d.normalize_attrs(attrs)
            types = d.result_types([v.type for v in ops], norm, self.program)
        except TypeRuleError as e:
            raise VerifyError(f"@{self.fn.name}: rewrite built an invalid {opname}: {e}") from None
        hints = name if isinstance(name, list) else [name] * len(types)
        results = [Value(self.fresh(h), t) for h, t in zip(hints, types)]
        op = Operation(opname, ops, norm, results)
        self.fn.ops.insert(self.fn.ops.index(anchor), op)
        return results[0] if len(results) == 1 else tuple(results)

    def replace_uses(self, old: Value, new: Value) -> None:
        for o in self.fn.all_ops():
            o.operands = [new if v is old else v for v in o.operands]
        self.fn.outputs = [new if v is old else v for v in self.fn.outputs]

    def erase(self, op: Operation) -> None:
        self.fn.ops.remove(op)

    def users(self, v: Value) -> list[Operation]:
        return [o for o in self.fn.all_ops() if any(x is v for x in o.operands)]


class RewritePattern(Protocol):
    def match_and_rewrite(self, op: Operation, rewriter: Rewriter) -> bool:
        """Rewrite at `op` and return True, or leave everything untouched and return False."""


def apply_patterns(program: Program, patterns: Iterable[RewritePattern], max_rounds: int = 20) -> int:
    """Apply patterns greedily to every body op until a fixed point; returns how many rewrites fired."""
    patterns = list(patterns)
    fired = 0
    for fn in program.functions:
        rewriter = Rewriter(program, fn)
        for _ in range(max_rounds):
            changed = False
            for op in list(fn.ops):
                if op not in fn.ops:
                    continue
                for p in patterns:
                    if p.match_and_rewrite(op, rewriter):
                        fired += 1
                        changed = True
                        break
            if not changed:
                break
    return fired
