"""checkpoint-layout: parameters as the checkpoint stores them, with load-time ops that give the body its view.

A frontend describes its checkpoint's layout (`ir.layout`): Phi-3 stores q/k/v as one `qkv_proj`, Mixtral one tensor
per expert, llama.cpp Q/K rows in its rotary order and Gemma norms as 1 + w. This pass, first in the pipeline,
makes those tensors the parameters and derives the values the lowered body reads, under their role names. Fusion
may later concatenate what was split here; `fold-shapes` cancels such pairs.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from ..ir import Function, Operation, Program, Value
from ..ir.errors import MlxcError
from ..ir.layout import DeinterleaveRows, LayoutRule, ShiftParam, SplitParam, StackParams
from .base import Pass, PassReport
from .rewrite import Rewriter


def _params(fn: Function) -> dict[str, Value]:
    return {p.name: p for p in fn.params}


@dataclass(frozen=True)
class CheckpointLayout(Pass):
    """Phase 0: every later pass sees the checkpoint's real tensors and the transforms from them as graph code."""

    name = "checkpoint-layout"
    rules: tuple[LayoutRule, ...] = field(default=(), compare=False)

    def run(self, program: Program) -> tuple[Program, PassReport]:
        report = PassReport(self.name, {"rules applied": 0})
        for fn in program.functions:
            rw = Rewriter(program, fn)
            for rule in self.rules:
                if self._apply(fn, rw, rule):
                    report.changes["rules applied"] += 1
        return program, report

    def _apply(self, fn: Function, rw: Rewriter, rule: LayoutRule) -> bool:
        params = _params(fn)
        if isinstance(rule, SplitParam):
            parts = [params.get(n) for n in rule.parts]
            if not all(parts):
                return False
            first = parts[0].type
            ax = rule.axis % first.rank
            size = sum(p.type.shape[ax] for p in parts)
            stored = self._replace(fn, parts, rule.stored, first.with_shape(first.shape[:ax] + (size,) + first.shape[ax + 1:]))
            sizes = [p.type.shape[ax] for p in parts]
            if rule.groups > 1:
                self._split_groups(fn, rw, stored, parts, ax, rule.groups)
                return True
            self._derive(fn, rw, "split", [stored], parts, sizes=sizes, axis=rule.axis)
            return True
        if isinstance(rule, StackParams):
            target = params.get(rule.param)
            if target is None:
                return False
            n = target.type.shape[0]
            item = target.type.with_shape(target.type.shape[1:])
            pieces = [Value(rule.parts.format(i), item) for i in range(n)]
            self._swap_in(fn, [target], pieces)
            self._derive(fn, rw, "stack", pieces, [target], axis=0)
            return True
        if isinstance(rule, (DeinterleaveRows, ShiftParam)):
            target = params.get(rule.param)
            if target is None:
                return False
            stored = self._replace(fn, [target], rule.stored, target.type)
            if isinstance(rule, DeinterleaveRows):
                self._derive(fn, rw, "deinterleave_rows", [stored], [target], groups=rule.groups)
            else:
                self._derive(fn, rw, "shift", [stored], [target], value=-rule.offset)
            return True
        raise MlxcError(f"unknown checkpoint layout rule {rule!r}")

    def _split_groups(self, fn: Function, rw: Rewriter, stored: Value, parts: list[Value], ax: int, g: int) -> None:
        """Per-group interleaved parts: reshape to [.., g, rows / g, ..], split each group's rows, reshape back."""
        sizes = [p.type.shape[ax] for p in parts]
        if any(s % g for s in sizes):
            raise MlxcError(f"@{fn.name}: {stored.name} does not split into {g} groups of "
                            f"{', '.join(p.name for p in parts)}")
        shape = stored.type.shape
        grouped = Value(f"{stored.name}.grouped",
                        stored.type.with_shape(shape[:ax] + (g, sum(sizes) // g) + shape[ax + 1:]))
        pieces = [Value(f"{p.name}.grouped", p.type.with_shape(shape[:ax] + (g, s // g) + shape[ax + 1:]))
                  for p, s in zip(parts, sizes)]
        for piece, part in reversed(list(zip(pieces, parts))):  # each derive goes first: add them last to first
            self._derive(fn, rw, "reshape", [piece], [part], shape=list(part.type.shape))
        self._derive(fn, rw, "split", [grouped], pieces, sizes=[s // g for s in sizes], axis=ax + 1)
        self._derive(fn, rw, "reshape", [stored], [grouped], shape=list(grouped.type.shape))

    @staticmethod
    def _swap_in(fn: Function, old: list[Value], new: list[Value]) -> None:
        """`new` checkpoint parameters take the place of the `old` ones in the parameter list."""
        at = fn.params.index(old[0])
        kept = [p for p in fn.params if all(p is not o for o in old)]
        taken = {p.name for p in kept}
        clash = next((v.name for v in new if v.name in taken), None)
        if clash is not None:
            raise MlxcError(f"@{fn.name}: checkpoint layout names a tensor {clash} the program already has")
        fn.params = kept[:at] + new + kept[at:]

    def _replace(self, fn: Function, old: list[Value], name: str, type) -> Value:
        stored = Value(name, type)
        self._swap_in(fn, old, [stored])
        return stored

    @staticmethod
    def _derive(fn: Function, rw: Rewriter, opname: str, operands: list[Value], results: list[Value], **attrs):
        """A load-time op computing `results` (the former parameters, same values and names) from `operands`."""
        probe = rw.make(opname, operands, [r.name + "_" for r in results], attrs)  # types and canonical attributes
        for r, t in zip(results, [v.type for v in probe.results]):
            if r.type != t:
                raise MlxcError(f"@{fn.name}: checkpoint layout {opname} gives {t} for {r.name}, expected {r.type}")
        fn.derived.insert(0, Operation(opname, operands, probe.attrs, results))
