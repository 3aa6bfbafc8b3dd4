"""JSON and DOT forms of a program. JSON round-trips; DOT (through networkx) is for looking at."""

from __future__ import annotations

import enum
import json
import shutil
import subprocess
from typing import TYPE_CHECKING, Any

from .attrs import STRUCT_TAGS
from .errors import MlxcError, ParseError, TypeRuleError
from .graph import Function, Operation, Program, Value
from .opdef import lookup
from .parser import _Tokens, _parse_type
from .printer import format_op
from .state import State

if TYPE_CHECKING:
    import networkx


def _type_from_text(text: str):
    return _parse_type(_Tokens(text))


def _json_attr(value: Any) -> Any:
    """An attribute as a plain JSON value: numbers, booleans, strings (enums by value, symbols by name), lists, and
    structs as objects of their non-default fields. The op declaration gives it back its kind when read."""
    if value is None or isinstance(value, (bool, int, float)):
        return value
    if isinstance(value, enum.Enum):
        return value.value
    if isinstance(value, str):
        return str(value)
    if isinstance(value, (tuple, list)):
        return [_json_attr(v) for v in value]
    if type(value) in STRUCT_TAGS:
        return {k: _json_attr(v) for k, v in value.non_default_items()}
    raise TypeError(f"cannot write attribute value {value!r} as JSON")


def _struct_from_json(d, name: str, value: Any) -> Any:
    """A struct attribute written as a JSON object becomes the struct again; everything else the op's declaration
    coerces itself."""
    kind = next((a.kind for a in d.attrs if a.name == name), None)
    if isinstance(value, dict) and kind in STRUCT_TAGS:
        try:
            return kind(**value)
        except (TypeError, ValueError) as e:
            raise ParseError(f"malformed IR JSON: {d.name} attribute {name!r}: bad {kind.__name__} {value}: {e}") from None
    return value


def to_json(program: Program) -> str:
    """The program as JSON; attributes are typed JSON values (see `_json_attr`)."""

    def op_dict(o: Operation) -> dict[str, Any]:
        return {
            "op": o.op,
            "operands": [v.name for v in o.operands],
            "attrs": {k: _json_attr(v) for k, v in o.attrs.items()},
            "results": [{"name": r.name, "type": str(r.type)} for r in o.results],
        }

    def fn_dict(fn: Function) -> dict[str, Any]:
        return {
            "name": fn.name,
            "inputs": [{"name": v.name, "type": str(v.type)} for v in fn.inputs],
            "params": [{"name": v.name, "type": str(v.type)} for v in fn.params],
            "derived": [op_dict(o) for o in fn.derived],
            "ops": [op_dict(o) for o in fn.ops],
            "outputs": [v.name for v in fn.outputs],
            "state": [str(st) for st in program.states(fn)],
        }

    return json.dumps({"format": "mlxc-ir", "version": 2, "functions": [fn_dict(f) for f in program.functions]}, indent=1)


def from_json(text: str) -> Program:
    try:
        data = json.loads(text)
        if data.get("format") != "mlxc-ir":
            raise ParseError("not an mlxc IR JSON document (missing \"format\": \"mlxc-ir\")")
        program = Program()
        for f in data["functions"]:
            scope: dict[str, Value] = {}

            def define(d: dict[str, str]) -> Value:
                v = Value(d["name"], _type_from_text(d["type"]))
                scope[v.name] = v
                return v

            inputs = [define(d) for d in f["inputs"]]
            params = [define(d) for d in f["params"]]
            def read_op(o: dict[str, Any]) -> Operation:
                operands = [scope[n] for n in o["operands"]]
                d = lookup(o["op"])
                attrs = d.normalize_attrs({k: _struct_from_json(d, k, v) for k, v in o["attrs"].items()})
                return Operation(o["op"], operands, attrs, [define(r) for r in o["results"]])

            derived = [read_op(o) for o in f.get("derived", [])]
            ops = [read_op(o) for o in f["ops"]]
            declared = tuple(State.parse(x) for x in f["state"]) if "state" in f else None
            program.add(Function(f["name"], inputs, params, ops, [scope[n] for n in f["outputs"]], derived, declared))
        return program
    except MlxcError:
        raise
    except TypeRuleError as e:
        raise ParseError(f"malformed IR JSON: {e}") from None
    except (KeyError, TypeError, ValueError, AttributeError) as e:
        raise ParseError(f"malformed IR JSON: {type(e).__name__}: {e}") from None
    except RecursionError:
        raise ParseError("malformed IR JSON: nested too deep") from None


def to_graph(fn: Function) -> networkx.DiGraph:
    """Dataflow graph of one function: a node per input, parameter and op, an edge per use."""
    import networkx  # only the DOT/graph exports need it, not every `import mlxc`

    g = networkx.DiGraph(name=fn.name)
    producer: dict[Value, str] = {}
    for v in fn.inputs:
        g.add_node(f"in:{v.name}", label=f"%{v.name}\\n{v.type}", shape="ellipse", kind="input")
        producer[v] = f"in:{v.name}"
    for v in fn.params:
        g.add_node(f"param:{v.name}", label=f"{v.name}\\n{v.type}", shape="note", kind="param")
        producer[v] = f"param:{v.name}"
    for i, o in enumerate(fn.all_ops()):
        node = f"op{i}"
        g.add_node(node, label=_op_label(o), shape="box", kind="op", group=o.opdef.group.value)
        for v in o.operands:
            g.add_edge(producer[v], node, label=str(v.type))
        for r in o.results:
            producer[r] = node
    for i, v in enumerate(fn.outputs):
        g.add_node(f"out{i}", label=f"return %{v.name}", shape="ellipse", kind="output")
        g.add_edge(producer[v], f"out{i}", label=str(v.type))
    return g


def _op_label(o: Operation) -> str:
    return format_op(o).split(" : ")[0].replace('"', "'")


def to_dot(program: Program) -> str:
    """One DOT cluster per function."""
    lines = ["digraph program {", "  rankdir=TB; node [fontname=monospace fontsize=10];"]
    for fi, fn in enumerate(program.functions):
        g = to_graph(fn)
        lines.append(f'  subgraph cluster_{fi} {{ label="@{fn.name}";')
        for n, data in g.nodes(data=True):
            lines.append(f'    "{fi}:{n}" [label="{data["label"]}" shape={data["shape"]}];')
        for a, b in g.edges():
            lines.append(f'    "{fi}:{a}" -> "{fi}:{b}";')
        lines.append("  }")
    lines.append("}")
    return "\n".join(lines) + "\n"


def to_svg(program: Program) -> str:
    if shutil.which("dot") is None:
        raise MlxcError("SVG output needs Graphviz's `dot` on PATH (apt-get install graphviz); use --format dot instead")
    return subprocess.run(["dot", "-Tsvg"], input=to_dot(program), capture_output=True, text=True, check=True).stdout
