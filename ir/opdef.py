"""How an op is declared: operands, typed attributes and a type rule, once.

The printer, the parser, the builder and the verifier all read these declarations, so adding an op is one
decorated function in `ops.py` and nothing else in `ir/`.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass
from typing import Any, Callable

from .attrs import STRUCT_TAGS
from .errors import TypeRuleError
from .types import DType, TensorType


class OpGroup(str, enum.Enum):
    """Families of ops, so one rewrite or one codegen rule can cover a whole group."""

    DATA = "data"  # embedding lookups
    MATMUL = "matmul"
    NORM = "norm"
    UNARY = "unary"  # elementwise, one input
    BINARY = "binary"  # elementwise, two inputs, broadcasting
    SHAPE = "shape"  # reshape/transpose/split/concat: no arithmetic
    POSITION = "position"  # rotary embeddings at explicit positions
    ATTENTION = "attention"  # reads and extends the call's KV cache
    FUSED = "fused"  # one kernel for what several ops of the other groups spell out (made by fusion passes)
    SCAN = "scan"  # recurrences over time that carry a state between calls (RNN cells, selective scans)
    CALL = "call"
    COLLECTIVE = "collective"  # communication between ranks (`mx.distributed`): a tensor- or pipeline-parallel share


class Symbol(str):
    """A reference to a function by name, printed `@name`."""


class Shape(tuple):
    """An attribute holding a shape whose dims may be symbolic (`[B, T, 9, 64]`)."""


class Ints(tuple):
    """An attribute holding a list of plain integers (`[0, 2, 1, 3]`)."""


class Floats(tuple):
    """An attribute holding a list of numbers (`[0.5, 0.25]`: ALiBi's per-head slopes)."""


REQUIRED = object()


@dataclass(frozen=True)
class AttrDef:
    name: str
    kind: type  # int, float, bool, str, Symbol, Shape, Ints, Floats, an Enum, or a struct from attrs.STRUCT_ATTRS
    default: Any = REQUIRED
    optional: bool = False  # None is a legal value

    def coerce(self, value: Any) -> Any:
        """The canonical Python value for this attribute, or TypeRuleError naming what is wrong."""
        if value is None:
            if self.optional:
                return None
            raise TypeRuleError(f"attribute {self.name!r} may not be none")
        k = self.kind
        if k is bool:
            if isinstance(value, bool):
                return value
        elif k is int:
            if isinstance(value, int) and not isinstance(value, bool):
                return value
        elif k is float:
            if isinstance(value, (int, float)) and not isinstance(value, bool):
                return float(value)
        elif k is str or k is Symbol:
            if isinstance(value, str):
                return k(value)
        elif k is Shape:
            if isinstance(value, (list, tuple)) and all(_is_dim(d) for d in value):
                return Shape(value)
        elif k is Ints:
            if isinstance(value, (list, tuple)) and all(isinstance(d, int) and not isinstance(d, bool) for d in value):
                return Ints(value)
        elif k is Floats:
            if isinstance(value, (list, tuple)) and all(isinstance(d, (int, float)) and not isinstance(d, bool)
                                                        for d in value):
                return Floats(float(d) for d in value)
        elif k is DType:
            if isinstance(value, (str, DType)):
                return DType.parse(value) if isinstance(value, str) else value
        elif isinstance(k, type) and issubclass(k, enum.Enum):
            try:
                return k(value.value if isinstance(value, enum.Enum) else value)
            except ValueError:
                pass
        elif k in STRUCT_TAGS:
            if isinstance(value, k):
                return value
        raise TypeRuleError(f"attribute {self.name!r} expects {_kind_name(k)}, got {value!r}")


def _is_dim(d: Any) -> bool:
    return (isinstance(d, int) and not isinstance(d, bool)) or (isinstance(d, str) and d.isidentifier())


def _kind_name(k: type) -> str:
    names = {Shape: "a shape", Ints: "a list of ints", Floats: "a list of numbers", Symbol: "a function symbol"}
    return names.get(k, k.__name__)


@dataclass(frozen=True)
class OpDef:
    """One op's declaration. `operands` names positional inputs; `x?` is optional (trailing), `*xs` variadic."""

    name: str
    group: OpGroup
    operands: tuple[str, ...]
    attrs: tuple[AttrDef, ...]
    infer: Callable[..., Any]
    doc: str
    needs_program: bool = False  # the type rule also receives `program=` (calls look up their callee)
    quantized_operands: tuple[str, ...] = ()  # operands that may hold a quantized weight
    # Reads or changes something besides its operands (per-layer state, randomness): never merged with a twin by
    # CSE, never dropped by DCE, never run at load time.
    effects: bool = False
    # The states the op keeps between calls, from its attributes and operand types (see `ir.state`); a stateful op
    # has effects.
    state: Callable[..., tuple] | None = None

    def states(self, attrs: dict[str, Any], operand_types: list[TensorType]) -> tuple:
        return tuple(self.state(attrs, *operand_types)) if self.state is not None else ()

    def operand_names(self, n: int) -> list[str]:
        """The declared name of each of n operands (a variadic name repeats)."""
        names = [o.strip("*?") for o in self.operands]
        if self.variadic:
            return names[:-1] + [names[-1]] * (n - len(names) + 1)
        return names[:n]

    @property
    def variadic(self) -> bool:
        return any(o.startswith("*") for o in self.operands)

    def check_arity(self, n: int) -> None:
        if self.variadic:
            fixed = sum(1 for o in self.operands if not o.startswith("*"))
            if n < fixed:
                raise TypeRuleError(f"{self.name} takes at least {fixed} operands, got {n}")
            return
        required = sum(1 for o in self.operands if not o.endswith("?"))
        if not required <= n <= len(self.operands):
            want = str(required) if required == len(self.operands) else f"{required} to {len(self.operands)}"
            raise TypeRuleError(f"{self.name} takes {want} operands, got {n}")

    def normalize_attrs(self, given: dict[str, Any]) -> dict[str, Any]:
        """Fill defaults and coerce types; unknown or missing attributes are errors."""
        known = {a.name for a in self.attrs}
        unknown = sorted(set(given) - known)
        if unknown:
            raise TypeRuleError(f"{self.name} has no attribute {unknown[0]!r} (it has: {sorted(known) or 'none'})")
        out = {}
        for a in self.attrs:
            if a.name in given:
                out[a.name] = a.coerce(given[a.name])
            elif a.default is not REQUIRED:
                out[a.name] = a.default
            else:
                raise TypeRuleError(f"{self.name} needs attribute {a.name!r}")
        return out

    def result_types(self, operand_types: list[TensorType], attrs: dict[str, Any], program=None) -> list[TensorType]:
        self.check_arity(len(operand_types))
        for name, t in zip(self.operand_names(len(operand_types)), operand_types):
            if t.quant is not None and name not in self.quantized_operands:
                raise TypeRuleError(f"{self.name} cannot take the quantized operand {name} ({t})")
        kwargs = dict(attrs)
        if self.needs_program:
            kwargs["program"] = program
        out = self.infer(*operand_types, **kwargs)
        return list(out) if isinstance(out, (list, tuple)) else [out]


OPS: dict[str, OpDef] = {}


def op(name: str, group: OpGroup, operands: tuple[str, ...], attrs: tuple[AttrDef, ...] = (), needs_program=False,
       quantized: tuple[str, ...] = (), effects: bool = False, state: Callable[..., tuple] | None = None):
    """Declare an op; the decorated function is its type rule (operand types, attrs) -> result type(s). `state`
    gives the states the op keeps between calls (attrs, *operand types) -> tuple of `ir.state.State`."""

    def register(rule: Callable[..., Any]) -> Callable[..., Any]:
        if name in OPS:
            raise ValueError(f"op {name!r} declared twice")
        OPS[name] = OpDef(name, group, operands, attrs, rule, (rule.__doc__ or "").strip(), needs_program, quantized,
                          effects or state is not None, state)
        return rule

    return register


def lookup(name: str) -> OpDef:
    try:
        return OPS[name]
    except KeyError:
        raise TypeRuleError(f"unknown op {name!r}") from None


def require(cond: bool, message: str) -> None:
    if not cond:
        raise TypeRuleError(message)
