"""Reads the text form back into a Program, checking each op against its declaration as it goes."""

from __future__ import annotations

import json
import re
from typing import Any

from .attrs import STRUCT_ATTRS, RopeKind
from .errors import ParseError, TypeRuleError
from .graph import Function, Operation, Program, Value
from .opdef import Symbol, lookup
from .state import State
from .types import DType, Quant, TensorType

_TOKEN = re.compile(
    r"""
    (?P<ws>\s+|//[^\n]*)
  | (?P<value>%[A-Za-z0-9_.]+)
  | (?P<symbol>@[A-Za-z_][A-Za-z0-9_.]*)
  | (?P<struct>\#[A-Za-z_]+<)
  | (?P<arrow>->)
  | (?P<number>-?(?:\d+\.\d*(?:[eE][-+]?\d+)?|\d+[eE][-+]?\d+|\d+|inf(?![A-Za-z0-9_])|nan(?![A-Za-z0-9_])))
  | (?P<string>"(?:[^"\\]|\\.)*")
  | (?P<ident>[A-Za-z_][A-Za-z0-9_]*)
  | (?P<punct>[()\[\]{}<>,=:])
    """,
    re.VERBOSE,
)


class _Tokens:
    def __init__(self, text: str):
        self.text = text
        self.toks: list[tuple[str, str, int]] = []
        pos = 0
        while pos < len(text):
            m = _TOKEN.match(text, pos)
            if m is None:
                raise self._error(pos, f"unexpected character {text[pos]!r}")
            if m.lastgroup != "ws":
                self.toks.append((m.lastgroup, m.group(), pos))
            pos = m.end()
        self.i = 0

    def _error(self, pos: int, msg: str) -> ParseError:
        line = self.text.count("\n", 0, pos) + 1
        col = pos - (self.text.rfind("\n", 0, pos) + 1) + 1
        return ParseError(f"line {line}, column {col}: {msg}")

    def error(self, msg: str, at: int | None = None) -> ParseError:
        """An error at token `at` (default: the next token)."""
        i = self.i if at is None else at
        pos = self.toks[i][2] if i < len(self.toks) else len(self.text)
        return self._error(pos, msg)

    def peek(self) -> tuple[str, str]:
        if self.i >= len(self.toks):
            return ("eof", "")
        kind, text, _ = self.toks[self.i]
        return kind, text

    def next(self) -> tuple[str, str]:
        tok = self.peek()
        if tok[0] == "eof":
            raise self.error("unexpected end of input")
        self.i += 1
        return tok

    def accept(self, text: str) -> bool:
        if self.peek()[1] == text and self.peek()[0] != "string":
            self.i += 1
            return True
        return False

    def expect(self, text: str) -> None:
        if not self.accept(text):
            raise self.error(f"expected {text!r}, found {self.peek()[1] or 'end of input'!r}")

    def expect_kind(self, kind: str) -> str:
        k, t = self.peek()
        if k != kind:
            raise self.error(f"expected a {kind}, found {t or 'end of input'!r}")
        self.i += 1
        return t


def _parse_type(t: _Tokens) -> TensorType:
    name = t.expect_kind("ident")
    try:
        dtype = DType.parse(name)
    except ValueError as e:
        raise t.error(str(e), at=t.i - 1) from None
    t.expect("[")
    dims: list[int | str] = []
    while not t.accept("]"):
        if dims:
            t.expect(",")
        kind, text = t.next()
        if kind == "number" and text.isdigit():
            dims.append(int(text))
        elif kind == "ident":
            dims.append(text)
        else:
            raise t.error(f"bad dimension {text!r}", at=t.i - 1)
    quant = None
    kind, text = t.peek()
    if kind == "ident" and re.fullmatch(Quant.PATTERN, text):
        t.next()
        quant = Quant.parse(text)
    return TensorType(dtype, tuple(dims), quant)


def _parse_attr_value(t: _Tokens) -> Any:
    start = t.i
    kind, text = t.next()
    if kind == "number":
        return float(text) if any(c in text for c in ".ein") else int(text)
    if kind == "string":
        return json.loads(text)
    if kind == "symbol":
        return Symbol(text[1:])
    if kind == "ident":
        return {"true": True, "false": False, "none": None}.get(text, text)
    if text == "[":
        items = []
        while not t.accept("]"):
            if items:
                t.expect(",")
            items.append(_parse_attr_value(t))
        return items
    if kind == "struct":
        tag = text[1:-1]
        cls = STRUCT_ATTRS.get(tag)
        if cls is None:
            raise t.error(f"unknown attribute struct #{tag}", at=start)
        fields: dict[str, Any] = {}
        while not t.accept(">"):
            if fields:
                t.expect(",")
            key = t.expect_kind("ident")
            t.expect("=")
            fields[key] = _parse_attr_value(t)
        return _make_struct(t, cls, fields, start)
    raise t.error(f"bad attribute value {text!r}", at=start)


def _make_struct(t: _Tokens, cls: type, fields: dict[str, Any], at: int | None = None) -> Any:
    for k, v in fields.items():
        if isinstance(v, int) and not isinstance(v, bool) and isinstance(getattr(cls(), k, None), float):
            fields[k] = float(v)
    try:
        if "kind" in fields:
            fields["kind"] = RopeKind(fields["kind"])
        return cls(**fields)
    except (TypeError, ValueError) as e:
        raise t.error(f"bad #{cls.__name__}: {e}", at=at) from None


class _FunctionParser:
    def __init__(self, t: _Tokens, program: Program):
        self.t, self.program = t, program
        self.scope: dict[str, Value] = {}

    def define(self, name: str, type: TensorType, at: int | None = None) -> Value:
        if name in self.scope:
            raise self.t.error(f"%{name} defined twice", at=at)
        v = Value(name, type)
        self.scope[name] = v
        return v

    def use(self, ref: str) -> Value:
        try:
            return self.scope[ref[1:]]
        except KeyError:
            raise self.t.error(f"use of undefined value {ref}", at=self.t.i - 1) from None

    def parse(self) -> Function:
        t = self.t
        t.expect("func")
        name = t.expect_kind("symbol")[1:]
        t.expect("(")
        inputs = []
        while not t.accept(")"):
            if inputs:
                t.expect(",")
            at = t.i
            vname = t.expect_kind("value")[1:]
            t.expect(":")
            inputs.append(self.define(vname, _parse_type(t), at))
        t.expect("->")
        if t.accept("("):
            out_types = [_parse_type(t)]
            while t.accept(","):
                out_types.append(_parse_type(t))
            t.expect(")")
        else:
            out_types = [_parse_type(t)]
        declared = self.parse_states() if t.accept("state") else None
        t.expect("{")
        params, ops = [], []
        while t.accept("param"):
            at = t.i
            pname = t.expect_kind("value")[1:]
            t.expect(":")
            params.append(self.define(pname, _parse_type(t), at))
        derived = []
        while t.accept("derive"):
            derived.append(self.parse_op())
        while not t.accept("return"):
            ops.append(self.parse_op())
        ret_at = t.i - 1
        outputs = [self.use(t.expect_kind("value"))]
        while t.accept(","):
            outputs.append(self.use(t.expect_kind("value")))
        t.expect("}")
        if [v.type for v in outputs] != out_types:
            raise t.error(
                f"@{name} returns {[str(v.type) for v in outputs]} but declares {[str(x) for x in out_types]}", at=ret_at
            )
        return Function(name, inputs, params, ops, outputs, derived, declared)

    def parse_states(self) -> tuple[State, ...]:
        """`state(kv, kv(window=7), ssm)` after the return type."""
        t = self.t
        t.expect("(")
        states = []
        while not t.accept(")"):
            if states:
                t.expect(",")
            at = t.i
            text = t.expect_kind("ident")
            if t.accept("("):
                key = t.expect_kind("ident")
                t.expect("=")
                text += f"({key}={t.expect_kind('number')})"
                t.expect(")")
            try:
                states.append(State.parse(text))
            except ValueError as e:
                raise t.error(str(e), at=at) from None
        return tuple(states)

    def parse_op(self) -> Operation:
        t = self.t
        name_at = [t.i]
        names = [t.expect_kind("value")[1:]]
        while t.accept(","):
            name_at.append(t.i)
            names.append(t.expect_kind("value")[1:])
        t.expect("=")
        op_at = t.i
        opname = t.expect_kind("ident")
        try:
            d = lookup(opname)
        except TypeRuleError as e:
            raise t.error(str(e), at=op_at) from None
        t.expect("(")
        operands = []
        while not t.accept(")"):
            if operands:
                t.expect(",")
            operands.append(self.use(t.expect_kind("value")))
        raw: dict[str, Any] = {}
        if t.accept("{"):
            while not t.accept("}"):
                if raw:
                    t.expect(",")
                key = t.expect_kind("ident")
                t.expect("=")
                raw[key] = _parse_attr_value(t)
        t.expect(":")
        types = [_parse_type(t)]
        while t.accept(","):
            types.append(_parse_type(t))
        if len(types) != len(names):
            raise t.error(f"{opname} defines {len(names)} values but lists {len(types)} types", at=op_at)
        try:
            d.check_arity(len(operands))
            attrs = d.normalize_attrs(raw)
        except TypeRuleError as e:
            raise t.error(f"{opname}: {e}", at=op_at) from None
        results = [self.define(n, ty, at) for n, ty, at in zip(names, types, name_at)]
        return Operation(opname, operands, attrs, results)


def parse_program(text: str) -> Program:
    """Parse IR text. Structure and attributes are checked here; run `verify` for the type rules."""
    t = _Tokens(text)
    program = Program()
    while t.peek()[0] != "eof":
        fn = _FunctionParser(t, program).parse()
        if program.get(fn.name) is not None:
            raise t.error(f"function @{fn.name} defined twice")
        program.add(fn)
    return program
