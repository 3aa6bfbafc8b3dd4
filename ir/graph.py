"""Program structure: values, operations, functions and the builder that creates them with inferred types."""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Any, Iterator

from .errors import TypeRuleError, VerifyError
from .opdef import OpDef, lookup
from .types import TensorType

NAME_RE = re.compile(r"[A-Za-z_][A-Za-z0-9_.]*|[0-9]+")


@dataclass(eq=False)
class Value:
    """An SSA value: a function input, a parameter (weight) or an op result."""

    name: str
    type: TensorType

    def __repr__(self) -> str:
        return f"%{self.name}: {self.type}"


@dataclass(eq=False)
class Operation:
    op: str
    operands: list[Value]
    attrs: dict[str, Any]
    results: list[Value]

    @property
    def opdef(self) -> OpDef:
        return lookup(self.op)

    @property
    def result(self) -> Value:
        if len(self.results) != 1:
            raise ValueError(f"{self.op} has {len(self.results)} results")
        return self.results[0]

    def __repr__(self) -> str:
        outs = ", ".join(f"%{r.name}" for r in self.results)
        ins = ", ".join(f"%{o.name}" for o in self.operands)
        return f"{outs} = {self.op}({ins})"


@dataclass(eq=False)
class Function:
    """A graph with inputs, named parameters (weights) and outputs. A repeated block is one function, called per layer."""

    name: str
    inputs: list[Value]
    params: list[Value]
    ops: list[Operation]
    outputs: list[Value]
    # Load-time ops on parameters only (e.g. concatenating Q/K/V weights): run once when weights are bound, so the
    # generated code sees their results as parameters. Printed as `derive` lines after the params.
    derived: list[Operation] = field(default_factory=list)
    # The states a text (or JSON) form declared for this function, checked by the verifier against the ones its ops
    # imply (`Program.states`); None for functions built in memory.
    declared_states: tuple | None = None

    def all_ops(self) -> list[Operation]:
        return self.derived + self.ops

    def producers(self) -> dict[Value, Operation]:
        return {r: o for o in self.all_ops() for r in o.results}

    def users(self) -> dict[Value, list[Operation]]:
        out: dict[Value, list[Operation]] = {}
        for o in self.all_ops():
            for v in o.operands:
                out.setdefault(v, []).append(o)
        return out

    def runtime_params(self) -> list[Value]:
        """What the generated code holds: derived values, and checkpoint parameters the body reads directly."""
        used = {id(v) for o in self.ops for v in o.operands}
        derived = [r for o in self.derived for r in o.results if id(r) in used]
        return [p for p in self.params if id(p) in used] + derived

    def param(self, name: str) -> Value:
        for p in self.params:
            if p.name == name:
                return p
        raise KeyError(name)


@dataclass(eq=False)
class Program:
    """Functions by name; `main` is the entry. Parameters of `main` are global, a callee's are prefixed per call."""

    functions: list[Function] = field(default_factory=list)

    ENTRY = "main"
    # An optional input of @main: how many final positions its language-model head computes (0: all of them).
    # Generated code takes it as a keyword argument after the cache, defaulting to 0.
    LOGITS_TO_KEEP = "logits_to_keep"

    def get(self, name: str) -> Function | None:
        for f in self.functions:
            if f.name == name:
                return f
        return None

    def __getitem__(self, name: str) -> Function:
        fn = self.get(name)
        if fn is None:
            raise KeyError(name)
        return fn

    @property
    def main(self) -> Function:
        return self[self.ENTRY]

    def add(self, fn: Function) -> Function:
        if self.get(fn.name) is not None:
            raise VerifyError(f"function @{fn.name} defined twice")
        self.functions.append(fn)
        return fn

    def parameters(self) -> Iterator[tuple[str, Value]]:
        """Every checkpoint weight the program needs, by its global name, in call order."""
        yield from self._parameters(lambda fn: fn.params)

    def runtime_parameters(self) -> Iterator[tuple[str, Value]]:
        """Every weight the generated code holds (after load-time `derive` ops), by global name."""
        yield from self._parameters(Function.runtime_params)

    def call_paths(self) -> Iterator[tuple[str, Function]]:
        """(global prefix, function) for every call path from @main, @main itself first with prefix ''."""
        yield from self._paths(self.main, "")

    def _paths(self, fn: Function, prefix: str):
        yield prefix, fn
        for o in fn.ops:
            if o.op == "call":
                sub = o.attrs["prefix"]
                yield from self._paths(self[o.attrs["callee"]], prefix + (sub + "." if sub else ""))

    def states(self, fn: Function) -> tuple:
        """The states `fn` keeps between calls, in op order: each stateful op's, and each callee's in turn."""
        out: list = []
        for o in fn.ops:
            if o.op == "call":
                callee = self.get(o.attrs["callee"])
                if callee is not None:
                    out += self.states(callee)
            else:
                out += o.opdef.states(o.attrs, [v.type for v in o.operands])
        return tuple(out)

    def _parameters(self, select) -> Iterator[tuple[str, Value]]:
        seen: set[str] = set()
        for prefix, fn in self.call_paths():
            for p in select(fn):
                if prefix + p.name not in seen:
                    seen.add(prefix + p.name)
                    yield prefix + p.name, p

    def __str__(self) -> str:
        from .printer import print_program

        return print_program(self)


class FunctionBuilder:
    """Creates a function op by op; each op's result types come from its declared type rule."""

    def __init__(self, name: str, program: Program | None = None):
        self.name = name
        self.program = program
        self._inputs: list[Value] = []
        self._params: list[Value] = []
        self._ops: list[Operation] = []
        self._derived: list[Operation] = []
        self._names: set[str] = set()
        self._counter = 0

    def _fresh(self, hint: str | None) -> str:
        if hint is not None and hint.isdigit() and hint in self._names:
            hint = None  # `0_1` is not a valid name: a taken number gives way to the next free one
        if hint is None:
            while str(self._counter) in self._names:
                self._counter += 1
            hint = str(self._counter)
        name, n = hint, 1
        while name in self._names:
            name, n = f"{hint}_{n}", n + 1
        self._names.add(name)
        return name

    def input(self, name: str, type: TensorType) -> Value:
        v = Value(self._fresh(name), type)
        self._inputs.append(v)
        return v

    def param(self, name: str, type: TensorType) -> Value:
        if name in self._names:
            raise VerifyError(f"@{self.name}: parameter %{name} declared twice")
        v = Value(self._fresh(name), type)
        self._params.append(v)
        return v

    def op(self, opname: str, *operands: Value | None, name: str | list[str] | None = None, **attrs: Any):
        """Append an op; returns its result (or a tuple of results). Trailing `None` operands are omitted."""
        ops = list(operands)
        while ops and ops[-1] is None:
            ops.pop()
        try:
            d = lookup(opname)
            norm = d.normalize_attrs(attrs)
            types = d.result_types([v.type for v in ops], norm, self.program)
        except TypeRuleError as e:
            raise VerifyError(f"@{self.name}: {opname}({', '.join('%' + v.name for v in ops)}): {e}") from None
        hints = name if isinstance(name, list) else [name] * len(types)
        if len(types) > 1 and not isinstance(name, list):
            hints = [f"{name}_{i}" if name and not name.isdigit() else None for i in range(len(types))]
        results = [Value(self._fresh(h), t) for h, t in zip(hints, types)]
        self._ops.append(Operation(opname, ops, norm, results))
        return results[0] if len(results) == 1 else tuple(results)

    def derive(self, opname: str, *operands: Value | None, name: str | list[str] | None = None, **attrs: Any):
        """Like `op`, but a load-time op on parameters (see Function.derived)."""
        body = self._ops
        self._ops = self._derived
        try:
            return self.op(opname, *operands, name=name, **attrs)
        finally:
            self._ops = body

    def build(self, *outputs: Value) -> Function:
        fn = Function(self.name, self._inputs, self._params, self._ops, list(outputs), self._derived)
        if self.program is not None:
            self.program.add(fn)
        return fn


def valid_name(name: str) -> bool:
    return NAME_RE.fullmatch(name) is not None
