"""`mlxc dump --format html`: one self-contained HTML page to look at a compilation instead of reading it.

The page holds everything as one JSON document and draws it in the browser with inline JavaScript and SVG (no
network, no external files): the pipeline (every pass with its changes and time, the IR after it and a line diff
against the stage before), the generated MLX module, each IR function as a graph (positions from `graph_layout`),
what each op is (attributes, operands, users, state, kernel, the generated lines it became), the parameter table
with totals per dtype and the per-layer table. A repeated layer is one function, so a 32-layer 8B model stays a
page of a few hundred kilobytes.
"""

from __future__ import annotations

import difflib
import json
import re
import tempfile
import time
from dataclasses import dataclass, field
from math import prod
from pathlib import Path
from typing import Any, Callable, Optional

from ..ir import Function, Operation, Program, TensorType, Value
from ..ir.errors import MlxcError
from ..ir.printer import format_attr, format_op
from .graph_layout import layout

TEMPLATES = Path(__file__).parent / "templates"

# Op group -> fill colour; a group added later gets a colour from its name (`_colour`).
GROUP_COLOURS = {
    "data": "#9bd0e8", "matmul": "#ffc866", "norm": "#a8d08d", "unary": "#d7bde2", "binary": "#f9c6d9",
    "shape": "#e0e0e0", "position": "#c6ddfa", "attention": "#f4978e", "scan": "#8fc1b5", "call": "#b7c9f2",
}
KIND_COLOURS = {"input": "#ffffff", "param": "#f3f1e7", "output": "#ffffff"}
DTYPE_BYTES = {"f32": 4, "f16": 2, "bf16": 2, "i32": 4, "i64": 8, "u32": 4, "bool": 1}
CHAR_W, NODE_H = 6.6, 34.0  # the page draws labels in 11px monospace
FAN_OUT = 4  # an input read by more ops than this is drawn once beside each reader (no edges across the graph)


def _colour(group: str) -> str:
    if group in GROUP_COLOURS:
        return GROUP_COLOURS[group]
    hue = sum(map(ord, group)) * 47 % 360
    return f"hsl({hue}, 55%, 78%)"


def nbytes(t: TensorType) -> int:
    """Bytes a parameter takes as stored: elements at their dtype, or quantized codes plus per-group scales and
    biases (in the scales' own dtype where the quantization says so)."""
    n = prod(d for d in t.shape if isinstance(d, int))
    q = t.quant
    if q is None:
        return n * DTYPE_BYTES.get(t.dtype.value, 4)
    scale = q.scale_dtype(t.dtype) if hasattr(q, "scale_dtype") else t.dtype
    return n * q.bits // 8 + 2 * (n // q.group_size) * DTYPE_BYTES.get(scale.value, 4)


def type_label(t: TensorType) -> str:
    """A parameter's storage in one word: `f32`, or `q4g32 (f16 scales)`."""
    if t.quant is None:
        return t.dtype.value
    q = t.quant
    scale = q.scale_dtype(t.dtype) if hasattr(q, "scale_dtype") else t.dtype
    return f"q{q.bits}g{q.group_size}" + (" packed" if getattr(q, "packed", False) else "") + f" ({scale.value} scales)"


# ---------------------------------------------------------------------------------------------------- collection


@dataclass
class Stage:
    name: str  # "input", or the pass
    text: str  # the IR after it
    changes: dict[str, int] = field(default_factory=dict)
    seconds: Optional[float] = None


@dataclass
class Exploration:
    """What the page shows, gathered on the Python side."""

    title: str
    source: str
    options: dict[str, Any]
    program: Program
    stages: list[Stage]
    module: str
    module_error: Optional[str]
    spec: Any  # the ModelSpec, when the source has one
    checkpoint_names: Callable[[str], Optional[str]]
    checkpoint_kind: str  # whose names those are ("GGUF", "Hugging Face", ...)
    notes: list[str] = field(default_factory=list)


def explore(src, *, stop_after: str | None = None, notify: Callable[[str], None] | None = None,
            on_report=None, **options) -> Exploration:
    """Compile `src` (weights are not read) keeping every stage's IR, generate its module and find its names.
    `options` are `program_for`'s build options (dtype, passes, quantize, group_size, adapter, ...)."""
    from ..api import SourceKind, program_for, resolve
    from ..codegen import generate_module

    source = resolve(src)
    reports = []

    def record(r):
        reports.append(r)
        if on_report is not None:
            on_report(r)

    with tempfile.TemporaryDirectory(prefix="mlxc-explore-") as tmp:
        program = program_for(src, stop_after=stop_after, on_report=record, notify=notify, dump_dir=tmp,
                              **options)
        dumps = sorted(Path(tmp).glob("*.mlxc"))
        texts = [d.read_text() for d in dumps]
    stages: list[Stage] = []
    notes: list[str] = []
    if texts:
        stages.append(Stage("input", texts[0]))
        for r, text in zip(reports, texts[1:]):
            first, _, rest = text.partition("\n")
            stages.append(Stage(r.name, rest if first.startswith("// after ") else text, dict(r.changes),
                                getattr(r, "seconds", None)))
    else:  # an artifact: its program as compiled, and the pipeline its manifest records
        from ..ir import print_program

        stages.append(Stage("artifact", print_program(program)))
    spec, names, kind = _spec_and_names(source, src, notes)
    title = getattr(spec, "name", None) or str(src)
    try:
        module, error = generate_module(program, title=f"{title}: compiled by mlxc."), None
    except MlxcError as e:  # e.g. a pipeline stopped (--after) before the program can run
        module, error = "", str(e)
    if source.kind == SourceKind.ARTIFACT:
        from ..runtime.artifact import read_manifest

        notes.append("compiled artifact: passes run at compile time: " + ", ".join(read_manifest(
            Path(source.location)).passes))
    return Exploration(title, str(src), {k: _plain(v) for k, v in options.items()}, program, stages, module, error,
                       spec, names, kind, notes)


def _plain(v):
    return v if isinstance(v, (str, int, float, bool, type(None))) else [str(x) for x in v] if isinstance(
        v, (list, tuple)) else str(v)


def _spec_and_names(source, src, notes: list[str]):
    """The source's ModelSpec and a function from a stored IR parameter name to its checkpoint tensor name."""
    from ..api import SourceKind, read_source
    from ..frontends.hf import ir_to_hf_name
    from ..frontends.spec import ModelSpec

    if isinstance(src, ModelSpec):
        spec = src
    elif source.kind == SourceKind.ARTIFACT:
        from ..runtime.artifact import read_manifest

        manifest = read_manifest(Path(source.location))
        spec = ModelSpec.model_validate(manifest.spec) if manifest.spec else None
    else:
        front = read_source(source, weights=False)
        spec = front.spec
        if front.notice:
            notes.append(front.notice)
    family = getattr(spec, "family", None)

    def hf(name: str) -> Optional[str]:
        try:
            return ir_to_hf_name(name, family)
        except MlxcError:
            return None

    if source.kind == SourceKind.GGUF:
        from ..frontends import gguf

        ckpt = gguf.read_gguf(Path(source.location))
        stored = {gguf.stored_name(ckpt, ir): n for n in ckpt.tensor_infos if (ir := ckpt.ir_name(n)) is not None}
        return spec, stored.get, "GGUF"
    if source.kind == SourceKind.ARTIFACT:
        return spec, hf, "Hugging Face (as exported)"
    if source.kind in (SourceKind.PRESET, SourceKind.SPEC_FILE, SourceKind.SPEC):
        notes.append("no checkpoint: parameters are named as a Hugging Face checkpoint of this family would name "
                     "them (presets and spec files run with seeded random weights)")
    return spec, hf, "Hugging Face"


# ---------------------------------------------------------------------------------------------- the page's data


def page_data(x: Exploration, engine: str = "auto") -> dict[str, Any]:
    """Everything the page draws, as one JSON-able document."""
    from .. import __version__
    from .codemap import map_module

    program = x.program
    lines = map_module(program, x.module) if x.module else {}
    functions = [_function(program, fn, lines.get(fn.name), engine) for fn in _display_order(program)]
    params, totals = _parameters(program, x.checkpoint_names)
    stored_total = sum(t["parameters"] for t in totals["stored"])
    ops = sum(len(fn.all_ops()) for fn in program.functions)
    docs = {o.op: o.opdef.doc for fn in program.functions for o in fn.all_ops()}
    return {
        "title": x.title,
        "source": x.source,
        "options": x.options,
        "version": __version__,
        "created": time.strftime("%Y-%m-%d %H:%M"),
        "notes": x.notes,
        "summary": {
            "family": getattr(x.spec, "family", None), "functions": len(program.functions), "ops": ops,
            "parameters": stored_total, "stored_bytes": sum(t["bytes"] for t in totals["stored"]),
            "module_lines": len(x.module.splitlines()), "layers": getattr(x.spec, "num_layers", None),
        },
        "stages": _stages(x.stages),
        "module": x.module,
        "module_error": x.module_error,
        "functions": functions,
        "docs": docs,
        "groups": {g: _colour(g) for g in sorted({o.opdef.group.value for fn in program.functions
                                                   for o in fn.all_ops()})},
        "kinds": KIND_COLOURS,
        "checkpoint_kind": x.checkpoint_kind,
        "params": params,
        "totals": totals,
        "layers": _layers(program, x.spec),
    }


def _display_order(program: Program) -> list[Function]:
    """@main first, then callees in the order they are first called."""
    seen: dict[str, Function] = {}
    for _, fn in program.call_paths():
        seen.setdefault(fn.name, fn)
    return list(seen.values()) + [f for f in program.functions if f.name not in seen]


def _stages(stages: list[Stage]) -> list[dict[str, Any]]:
    """Each stage's IR text (or a pointer to the identical one before it) and its line diff against that stage,
    as difflib opcodes [tag, i1, i2, j1, j2] (tags e/r/d/i)."""
    out = []
    for k, s in enumerate(stages):
        d: dict[str, Any] = {"name": s.name, "changes": s.changes, "ms": None if s.seconds is None
                             else round(s.seconds * 1e3, 2)}
        prev = stages[k - 1].text if k else None
        if prev is not None and prev == s.text:
            d["same"] = True
        else:
            d["text"] = s.text
            if prev is not None:
                sm = difflib.SequenceMatcher(None, prev.splitlines(), s.text.splitlines(), autojunk=False)
                d["diff"] = [[t[0], i1, i2, j1, j2] for t, i1, i2, j1, j2 in sm.get_opcodes()]
        out.append(d)
    return out


def _short(text: str, n: int = 46) -> str:
    return text if len(text) <= n else text[: n - 1] + "…"


def _function(program: Program, fn: Function, lines, engine: str) -> dict[str, Any]:
    """One function's graph (nodes with positions, edges as paths) and what each node is."""
    users = fn.users()
    nodes: list[dict[str, Any]] = []
    node_of: dict[int, str] = {}  # id(value) -> node producing it

    def add(nid: str, kind: str, label: str, sub: str, **extra) -> dict[str, Any]:
        d = {"id": nid, "kind": kind, "label": _short(label), "sub": _short(sub), **extra}
        nodes.append(d)
        return d

    for k, v in enumerate(fn.inputs):
        add(f"i{k}", "input", f"%{v.name}", str(v.type), value=[v.name, str(v.type)])
        node_of[id(v)] = f"i{k}"
    held = {id(p) for p in fn.runtime_params()}
    for k, p in enumerate(fn.params):
        add(f"p{k}", "param", p.name, str(p.type), value=[p.name, str(p.type)], bytes=nbytes(p.type),
            held=id(p) in held, lines=(lines.params.get(p.name, []) if lines else []))
        node_of[id(p)] = f"p{k}"
    for k, o in enumerate(fn.derived):
        nid = f"d{k}"
        d = _op(program, fn, o, nid, node_of, users, [])
        d["loadtime"] = True
        r = o.results[0]
        d["held"] = id(r) in held
        d["lines"] = lines.params.get(r.name, []) if lines else []
        nodes.append(d)
        for r in o.results:
            node_of[id(r)] = nid
    for k, o in enumerate(fn.ops):
        nid = f"o{k}"
        nodes.append(_op(program, fn, o, nid, node_of, users, lines.ops.get(k, []) if lines else []))
        for r in o.results:
            node_of[id(r)] = nid
    for k, v in enumerate(fn.outputs):
        add(f"r{k}", "output", f"return %{v.name}", str(v.type), value=[v.name, str(v.type)])
    # users as node ids, now that every node exists
    consumers: dict[str, list[str]] = {}
    edges: list[tuple[str, str]] = []
    edge_types: list[str] = []
    fan = {v: sum(src == v for d in nodes for _, _, src in d.get("operands", [])) for v in node_of.values()}
    copies: list[dict[str, Any]] = []
    for d in nodes:
        for name, typ, src in d.get("operands", []):
            if src is None:
                continue
            consumers.setdefault(src, []).append(d["id"])
            if src[0] == "i" and fan[src] > FAN_OUT:  # e.g. %offset, read by every layer call
                orig = next(n for n in nodes if n["id"] == src)
                copy = {k: v for k, v in orig.items() if k not in ("hidden", "copies")}
                copy.update(id=f"{src}@{d['id']}", copy_of=src)
                copies.append(copy)
                orig["hidden"] = True
                orig.setdefault("copies", []).append(copy["id"])
                src = copy["id"]
            edges.append((src, d["id"]))
            edge_types.append(typ)
    nodes += copies
    for k, v in enumerate(fn.outputs):
        src = node_of[id(v)]
        edges.append((src, f"r{k}"))
        edge_types.append(str(v.type))
        consumers.setdefault(src, []).append(f"r{k}")
    for d in nodes:
        d["users"] = list(dict.fromkeys(consumers.get(d.get("copy_of", d["id"]), [])))
    sizes = [(d["id"], max(60.0, min(360.0, CHAR_W * max(len(d["label"]), len(d["sub"])) + 20)), NODE_H)
             for d in nodes if not d.get("hidden")]
    order = {d["id"]: k for k, d in enumerate(nodes)}  # copies go just before their reader (topological order)
    sizes.sort(key=lambda s: order[s[0].split("@")[1]] - 0.5 if "@" in s[0] else order[s[0]])
    lay = layout(sizes, edges, engine)
    for d in nodes:
        if not d.get("hidden"):
            cx, cy, w, h = lay.nodes[d["id"]]
            d["x"], d["y"], d["w"], d["h"] = round(cx, 1), round(cy, 1), round(w, 1), round(h, 1)
    calls = [(prefix, caller.name) for caller in program.functions for o in caller.ops
             if o.op == "call" and o.attrs["callee"] == fn.name for prefix in [o.attrs["prefix"]]]
    states = [str(s) for s in program.states(fn)]
    ins = ", ".join(f"%{v.name}: {v.type}" for v in fn.inputs)
    outs = ", ".join(str(v.type) for v in fn.outputs)
    return {
        "name": fn.name,
        "signature": f"func @{fn.name}({ins}) -> {outs if len(fn.outputs) == 1 else '(' + outs + ')'}",
        "states": states,
        "calls": calls,
        "lines": list(lines.cls) if lines else None,
        "engine": lay.engine,
        "width": round(lay.width, 1),
        "height": round(lay.height, 1),
        "nodes": nodes,
        "edges": [[a, b, d, t] for (a, b), d, t in zip(edges, lay.edges, edge_types)],
    }


def _op(program: Program, fn: Function, o: Operation, nid: str, node_of: dict[int, str],
        users: dict[Value, list[Operation]], lines: list[int]) -> dict[str, Any]:
    d = o.opdef
    group = d.group.value
    if o.op == "call":
        label = f"call @{o.attrs['callee']}"
        callee = program.get(o.attrs["callee"])
        states = [str(s) for s in program.states(callee)] if callee is not None else []
    else:
        label = o.op
        states = [str(s) for s in d.states(o.attrs, [v.type for v in o.operands])]
    results = ", ".join(f"%{r.name}" for r in o.results)
    sub = f"{results}: {o.results[0].type}" if len(o.results) == 1 else results
    attrs = [[a.name, format_attr(o.attrs[a.name]), a.default is not _required() and a.default == o.attrs[a.name]]
             for a in d.attrs if a.name in o.attrs]
    kernel = o.attrs.get("kernel")
    operand_names = d.operand_names(len(o.operands))
    return {
        "id": nid, "kind": "op", "op": o.op, "group": group, "label": _short(label), "sub": _short(sub),
        "text": format_op(o),
        "attrs": attrs,
        "operands": [[f"{role} %{v.name}", str(v.type), node_of.get(id(v))]
                     for role, v in zip(operand_names, o.operands)],
        "results": [[r.name, str(r.type)] for r in o.results],
        "states": states,
        "kernel": None if kernel is None else format_attr(kernel),
        "effects": d.effects,
        "callee": o.attrs.get("callee") and str(o.attrs["callee"]),
        "prefix": o.attrs.get("prefix") if o.op == "call" else None,
        "lines": lines,
    }


def _required():
    from ..ir.opdef import REQUIRED

    return REQUIRED


def _parameters(program: Program, checkpoint_name) -> tuple[list[list[Any]], dict[str, Any]]:
    """One row per global value the weights go through: every stored (checkpoint) parameter and every load-time
    result, as [IR name, checkpoint name, shape, type, elements, bytes, origin, held at run time, function, node
    id]; and
    totals per type of what is stored and of what the module holds."""
    runtime = {name for name, _ in program.runtime_parameters()}
    rows: list[list[Any]] = []
    seen: set[str] = set()
    for prefix, fn in program.call_paths():
        index = {id(p): k for k, p in enumerate(fn.params)}
        for p in fn.params:
            name = prefix + p.name
            if name in seen:
                continue
            seen.add(name)
            rows.append([name, checkpoint_name(name), _shape(p.type), type_label(p.type), _elements(p.type),
                         nbytes(p.type), "stored", name in runtime, fn.name, f"p{index[id(p)]}"])
        for k, o in enumerate(fn.derived):
            how = f"{o.op}({', '.join(v.name for v in o.operands)})"
            for r in o.results:
                name = prefix + r.name
                if name in seen:
                    continue
                seen.add(name)
                rows.append([name, None, _shape(r.type), type_label(r.type), _elements(r.type), nbytes(r.type),
                             "derived: " + how, name in runtime, fn.name, f"d{k}"])
    totals: dict[str, Any] = {"stored": [], "runtime": []}
    for key, pick in (("stored", lambda r: r[6] == "stored"), ("runtime", lambda r: r[7])):
        by: dict[str, dict[str, Any]] = {}
        for r in rows:
            if pick(r):
                t = by.setdefault(r[3], {"type": r[3], "tensors": 0, "parameters": 0, "bytes": 0})
                t["tensors"] += 1
                t["parameters"] += r[4]
                t["bytes"] += r[5]
        totals[key] = sorted(by.values(), key=lambda t: -t["bytes"])
    return rows, totals


def _shape(t: TensorType) -> str:
    return "×".join(str(d) for d in t.shape)


def _elements(t: TensorType) -> int:
    return prod(d for d in t.shape if isinstance(d, int))


def _layers(program: Program, spec) -> list[dict[str, Any]]:
    """Per decoder layer: its kind (attention: sliding or global; mamba; recurrent), FFN kind, the function it
    calls, its states and its parameters (counted from the program, as `mlxc inspect` counts them)."""
    per: dict[int, int] = {}
    for name, p in program.parameters():
        m = re.match(r"layers\.(\d+)\.", name)
        if m:
            per[int(m.group(1))] = per.get(int(m.group(1)), 0) + prod(p.type.shape)
    callee = {int(m.group(1)): o.attrs["callee"] for o in program.main.ops if o.op == "call"
              and (m := re.fullmatch(r"layers\.(\d+)", o.attrs["prefix"]))}
    n = spec.num_layers if spec is not None else len(callee)
    out = []
    for i in range(n):
        row: dict[str, Any] = {"index": i, "function": callee.get(i), "parameters": per.get(i, 0)}
        fn = program.get(callee[i]) if i in callee else None
        row["states"] = [str(s) for s in program.states(fn)] if fn is not None else []
        row.update(_layer_kind(spec, i) if spec is not None else {"kind": "?", "detail": "", "ffn": "?"})
        out.append(row)
    return out


def _layer_kind(spec, i: int) -> dict[str, str]:
    c = spec.layer(i)
    block = getattr(getattr(c, "block", None), "value", "attention")
    a = getattr(c, "attention", None)
    if block == "attention" and a is not None:
        heads = "MHA" if a.num_kv_heads == a.num_heads else "MQA" if a.num_kv_heads == 1 else "GQA"
        kind = "sliding" if a.window else "global"
        detail = f"{heads} {a.num_heads}/{a.num_kv_heads} heads" + (f", window {a.window:,}" if a.window else "")
    elif block.startswith("mamba"):
        kind, detail = "mamba", block
    else:
        kind, detail = "recurrent", block
    f = c.ffn
    if f is None:
        ffn = "none"
    elif f.moe is not None:
        m = f.moe
        ffn = f"MoE {m.num_experts} experts top-{m.top_k} × {m.intermediate_size} {f.activation.value}"
        if m.shared_expert_intermediate_size:
            ffn += f" + shared {m.shared_expert_intermediate_size}"
    else:
        ffn = f"{f.kind.value} {f.activation.value} {f.intermediate_size}" + (" +bias" if f.bias else "")
    return {"kind": kind, "detail": detail, "ffn": ffn}


# --------------------------------------------------------------------------------------------------- rendering


def render_html(x: Exploration, engine: str = "auto") -> str:
    """The self-contained page: the template with its CSS, JavaScript and the data inlined."""
    data = json.dumps(page_data(x, engine), separators=(",", ":"), ensure_ascii=False)
    data = data.replace("</", "<\\/").replace("<!--", "<\\!--")  # nothing in the data can close the script
    parts = {"CSS": (TEMPLATES / "explorer.css").read_text(), "JS": (TEMPLATES / "explorer.js").read_text(),
             "DATA": data, "TITLE": _escape(f"{x.title} · mlxc explorer")}
    # one pass over the template: inserted text is never scanned for markers again
    return re.sub(r"/\*(CSS|JS|DATA|TITLE)\*/", lambda m: parts[m[1]], (TEMPLATES / "explorer.html").read_text())


def _escape(text: str) -> str:
    return text.replace("&", "&amp;").replace("<", "&lt;").replace(">", "&gt;")
