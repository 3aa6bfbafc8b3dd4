"""The verifier: every rule a well-formed program keeps, each failure naming the function and the op."""

from __future__ import annotations

from .errors import TypeRuleError, VerifyError
from .graph import Function, Program, valid_name
from .printer import format_op


def verify(program: Program) -> Program:
    """Check the whole program; returns it so calls can chain. Raises VerifyError on the first broken rule."""
    if program.get(Program.ENTRY) is None:
        raise VerifyError(f"program has no @{Program.ENTRY} function")
    names = [f.name for f in program.functions]
    for n in names:
        if names.count(n) > 1:
            raise VerifyError(f"function @{n} defined twice")
    for fn in program.functions:
        _verify_function(program, fn)
    _check_acyclic_calls(program)
    _check_parameter_types(program)
    return program


def _verify_function(program: Program, fn: Function) -> None:
    where = f"@{fn.name}"
    defined: set[int] = set()
    seen_names: set[str] = set()

    def define(v, what: str) -> None:
        if not valid_name(v.name):
            raise VerifyError(f"{where}: {what} has invalid name %{v.name}")
        if v.name in seen_names:
            raise VerifyError(f"{where}: %{v.name} is defined more than once")
        seen_names.add(v.name)
        defined.add(id(v))

    for v in fn.inputs:
        define(v, "input")
    for p in fn.params:
        define(p, "parameter")
        if not p.type.is_static:
            raise VerifyError(f"{where}: parameter %{p.name} must have a static shape, got {p.type}")
    weights: set[int] = {id(p) for p in fn.params}
    load_time = {id(o) for o in fn.derived}
    for o in fn.all_ops():
        loc = f"{where}: `{_describe(o)}`"
        for v in o.operands:
            if id(v) not in defined:
                raise VerifyError(f"{loc}: operand %{v.name} is used before it is defined")
        if id(o) in load_time:
            if o.opdef.effects:
                raise VerifyError(f"{loc}: {o.op} cannot run at load time (derive)")
            if any(id(v) not in weights for v in o.operands):
                raise VerifyError(f"{loc}: a derive op may only read parameters and other derived values")
            weights.update(id(r) for r in o.results)
        try:
            d = o.opdef
            attrs = d.normalize_attrs(o.attrs)
            expected = d.result_types([v.type for v in o.operands], attrs, program)
        except TypeRuleError as e:
            raise VerifyError(f"{loc}: {e}") from None
        if o.op == "call" and o.attrs["callee"] == fn.name:
            raise VerifyError(f"{loc}: a function may not call itself")
        if len(expected) != len(o.results):
            raise VerifyError(f"{loc}: produces {len(expected)} results, {len(o.results)} declared")
        for r, t in zip(o.results, expected):
            if r.type != t:
                raise VerifyError(f"{loc}: result %{r.name} declared {r.type} but the type rule gives {t}")
            define(r, "result")
    if not fn.outputs:
        raise VerifyError(f"{where}: returns nothing")
    if fn.declared_states is not None:
        implied = program.states(fn)
        if tuple(fn.declared_states) != implied:
            shown = ", ".join(map(str, implied)) or "none"
            raise VerifyError(f"{where}: declares state({', '.join(map(str, fn.declared_states))}) but its ops keep "
                              f"state({shown})")
    for v in fn.outputs:
        if id(v) not in defined:
            raise VerifyError(f"{where}: returns undefined value %{v.name}")


def _describe(o) -> str:
    """The op's text form, or its bare form when it is too malformed to print (unknown op, missing attribute)."""
    try:
        return format_op(o)
    except (TypeRuleError, KeyError, TypeError):
        return repr(o)


def _check_acyclic_calls(program: Program) -> None:
    state: dict[str, int] = {}

    def visit(name: str, path: list[str]) -> None:
        if state.get(name) == 1:
            raise VerifyError("recursive calls: " + " -> ".join("@" + p for p in path + [name]))
        if state.get(name) == 2:
            return
        state[name] = 1
        for o in program[name].ops:
            if o.op == "call":
                visit(o.attrs["callee"], path + [name])
        state[name] = 2

    for fn in program.functions:
        visit(fn.name, [])


def _check_parameter_types(program: Program) -> None:
    """Two calls may share a parameter name only if they agree on its type."""
    types: dict[str, object] = {}
    for prefix, fn in program.call_paths():
        for p in fn.params:
            name = prefix + p.name
            if types.setdefault(name, p.type) != p.type:
                raise VerifyError(f"@{fn.name}: parameter {name} has type {p.type}, elsewhere {types[name]}")
