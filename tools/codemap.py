"""Which lines of a generated MLX module each IR op became, read back from the module's text.

The code generator writes one class per IR function and, in its `__call__`, one statement per op in op order
(after a preamble binding the cache list and symbolic dims); a run of layer calls becomes one `for` loop. So the
ops and the statements can be walked side by side. Where a statement does not assign the op's result (the emitter
changed in a way this walk does not know), ops are matched by the name they assign instead, and any op still
unmatched simply has no lines: the explorer then says so rather than pointing at a wrong line.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field

from ..codegen.emit import class_name
from ..ir import Function, Program, Quant

_CLASS = re.compile(r"^class (\w+)\(nn\.Module\):")
_PREAMBLE = re.compile(r"^(cache = \[None\] \* \d+ if cache is None else cache|[A-Za-z_]\w* = [A-Za-z_]\w*\.shape\[\d+\])$")
_LOOP = re.compile(r"^for layer(?:, layer_cache)? in (?:zip\()?self\.(\w+)(?:\[(\d+):(\d+)\])?")


@dataclass
class FunctionLines:
    """Line numbers (1-based, in the whole module) for one IR function's class."""

    cls: tuple[int, int] = (0, 0)  # first and last line of the class
    ops: dict[int, list[int]] = field(default_factory=dict)  # index into fn.ops -> lines
    params: dict[str, list[int]] = field(default_factory=dict)  # runtime parameter name -> its declaration lines


def _local_base(name: str) -> str:
    base = re.sub(r"\W", "_", name)
    return "v" + base if base[0].isdigit() else base


def _targets(stmt: str) -> list[str]:
    lhs, eq, _ = stmt.partition(" = ")
    return [t.strip() for t in lhs.split(",")] if eq else []


def _assigns(stmt: str, name: str) -> bool:
    """Whether `stmt` assigns the local the emitter derives from IR value `name` (`h_1`, `h_1_`, `h_11`, ...)."""
    base = _local_base(name)
    return any(t == base or re.fullmatch(re.escape(base) + r"_?\d*", t) for t in _targets(stmt))


def map_module(program: Program, source: str) -> dict[str, FunctionLines]:
    """IR function name -> the lines its class, its ops and its runtime parameters became."""
    lines = source.splitlines()
    classes: dict[str, tuple[int, int]] = {}
    starts = [(i, m.group(1)) for i, text in enumerate(lines) if (m := _CLASS.match(text))]
    for k, (i, name) in enumerate(starts):
        end = starts[k + 1][0] if k + 1 < len(starts) else len(lines)
        while end > i + 1 and (not lines[end - 1].strip() or not lines[end - 1].startswith(" ")):
            end -= 1
        classes[name] = (i, end)
    out: dict[str, FunctionLines] = {}
    for fn in program.functions:
        span = classes.get(class_name(fn.name))
        if span is None:
            continue
        result = FunctionLines(cls=(span[0] + 1, span[1]))
        body = _method(lines, span, "__call__")
        init = _method(lines, span, "__init__")
        result.ops = _match_ops(program, fn, body)
        for p in fn.runtime_params():
            names = Quant.storage_names(p.name) if p.type.quant is not None else (p.name,)
            found = [n for n, text in init if any(text.startswith(f"self.{s} = ") for s in names)]
            if found:
                result.params[p.name] = found
        out[fn.name] = result
    return out


def _method(lines: list[str], span: tuple[int, int], name: str) -> list[tuple[int, str]]:
    """(line number, statement without its 8-space indent) for one method's body; loop bodies keep 4 spaces."""
    i = next((k for k in range(*span) if lines[k].startswith(f"    def {name}(")), None)
    if i is None:
        return []
    body = []
    for k in range(i + 1, span[1]):
        text = lines[k]
        if text.strip() and not text.startswith("        "):
            break
        if text.strip():
            body.append((k + 1, text[8:]))
    return body


def _match_ops(program: Program, fn: Function, body: list[tuple[int, str]]) -> dict[int, list[int]]:
    ops = fn.ops
    out: dict[int, list[int]] = {}
    k = 0
    while k < len(body) and _PREAMBLE.match(body[k][1]):
        k += 1
    i = 0
    while i < len(ops) and k < len(body):
        o = ops[i]
        text = body[k][1]
        nxt = body[k + 1][1] if k + 1 < len(body) else ""
        loop = _LOOP.match(text) or (o.op == "call" and _LOOP.match(nxt))
        if o.op == "call" and loop:
            n = _loop_length(fn, loop)
            taken = [body[k][0]] + ([body[k + 1][0]] if not _LOOP.match(text) else [])
            k += len(taken)
            while k < len(body) and body[k][1].startswith("    "):
                taken.append(body[k][0])
                k += 1
            for j in range(i, min(i + n, len(ops))):
                out[j] = taken
            i += n
            continue
        if len(_targets(text)) != len(o.results) or not _assigns(text, o.results[0].name):
            break  # out of step: fall back to names for the rest
        out[i] = [body[k][0]]
        i += 1
        k += 1
    for j in range(i, len(ops)):
        if j in out or not ops[j].results:
            continue
        hit = [n for n, text in body if _assigns(text, ops[j].results[0].name)]
        if len(hit) == 1:
            out[j] = hit
    return out


def _loop_length(fn: Function, m: re.Match) -> int:
    if m.group(2) is not None:
        return int(m.group(3)) - int(m.group(2))
    attr = m.group(1)
    return sum(1 for o in fn.ops if o.op == "call" and re.fullmatch(re.escape(attr) + r"\.\d+", o.attrs["prefix"]))
