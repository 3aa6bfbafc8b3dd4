"""The text form: typed SSA, one op per line, attributes in declaration order, defaults left out.

`parser.parse_program(print_program(p))` rebuilds `p`, and printing that again gives the same text.
"""

from __future__ import annotations

import enum
import json
from typing import Any

from .attrs import STRUCT_TAGS
from .graph import Function, Operation, Program
from .opdef import REQUIRED, AttrDef, Symbol


def format_attr(value: Any) -> str:
    if value is None:
        return "none"
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, Symbol):
        return f"@{value}"
    if isinstance(value, enum.Enum):
        return str(value.value)
    if isinstance(value, str):
        return json.dumps(value)
    if isinstance(value, float):
        return repr(value)
    if isinstance(value, int):
        return str(value)
    if isinstance(value, (tuple, list)):
        return "[" + ", ".join(format_attr(v) if not isinstance(v, str) else v for v in value) + "]"
    tag = STRUCT_TAGS.get(type(value))
    if tag is not None:
        body = ", ".join(f"{k} = {format_attr(v)}" for k, v in value.non_default_items())
        return f"#{tag}<{body}>"
    raise TypeError(f"cannot print attribute value {value!r}")


def format_op(o: Operation) -> str:
    outs = ", ".join(f"%{r.name}" for r in o.results)
    ins = ", ".join(f"%{v.name}" for v in o.operands)
    shown = [(a.name, o.attrs[a.name]) for a in o.opdef.attrs if not _is_default(a, o.attrs[a.name])]
    attrs = " {" + ", ".join(f"{k} = {format_attr(v)}" for k, v in shown) + "}" if shown else ""
    types = ", ".join(str(r.type) for r in o.results)
    return f"{outs} = {o.op}({ins}){attrs} : {types}"


def _is_default(a: AttrDef, value: Any) -> bool:
    return a.default is not REQUIRED and a.default == value and type(a.default) is type(value)


def _signature(fn: Function, program: Program | None) -> str:
    ins = ", ".join(f"%{v.name}: {v.type}" for v in fn.inputs)
    outs = [str(v.type) for v in fn.outputs]
    ret = outs[0] if len(outs) == 1 else "(" + ", ".join(outs) + ")"
    states = program.states(fn) if program is not None else ()
    kept = f" state({', '.join(map(str, states))})" if states else ""
    return f"func @{fn.name}({ins}) -> {ret}{kept}"


def print_function(fn: Function, program: Program | None = None) -> str:
    """A function's text; given its program, the signature also lists the states it keeps (`state(kv, ...)`)."""
    lines = [_signature(fn, program) + " {"]
    lines += [f"  param %{p.name}: {p.type}" for p in fn.params]
    lines += ["  derive " + format_op(o) for o in fn.derived]
    lines += ["  " + format_op(o) for o in fn.ops]
    lines.append("  return " + ", ".join(f"%{v.name}" for v in fn.outputs))
    lines.append("}")
    return "\n".join(lines)


def print_program(program: Program) -> str:
    return "\n\n".join(print_function(f, program) for f in program.functions) + "\n"
