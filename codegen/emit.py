"""IR function -> Python class source. Each op maps to one fragment; calls become submodules, runs of layer calls a loop.

Cache plumbing: every attention op owns one cache slot. A function reaching exactly one slot takes a single cache
object; one reaching several takes a list and hands each callee its share.
"""

from __future__ import annotations

import builtins
import keyword
import re
from dataclasses import dataclass, field

from ..ir import Function, Program, Quant, Value
from ..ir.errors import MlxcError
from .mlx_ops import HELPER_SOURCES, MX_DTYPES, helper_names, implementation

# Names a generated method must not bind locally: the module's imports and helpers (templates/*.j2), the method's
# own plumbing, and Python's builtins (a value called `zip` would break the layer loop). `ROPE_<n>` constants are
# reserved by pattern.
_RESERVED = {
    "self", "cache", "layer", "layer_cache", "mx", "nn", "np", "math", "attention", "dropout", "RoPE",
    "rope_inv_freq", "yarn_attention_factor", "longrope_attention_factor", "STATES", "make_cache", "new_state",
    "KVCache", "RotatingKVCache", "ArrayState", "lstm", "gru", "mingru", "mingru_scan", "mingru_step",
} | set(dir(builtins))
_RESERVED_PATTERN = re.compile(r"ROPE_\d+")
# position helpers (templates/positions.py.j2, attention.py.j2)
_RESERVED |= {"learned_positions", "sinusoidal_positions", "alibi_bias", "queue_layer"}
# the native-kernel helper's names (templates/native.py.j2)
_RESERVED |= {"NATIVE", "qlinear", "qlinear_packed", "qembed", "qembed_packed", "pack_weight", "native_rms_norm",
              "native_rope", "native_attention"}
# the custom-kernel helper's names (templates/kernels.py.j2)
_RESERVED |= {"kernel_attention", "kernel_selective_scan", "kernel_ssd", "_kernel_attention", "_kernel_scan",
              "_kernel_ssd"}
# the selective scan helper's names (templates/selective_scan.py.j2)
_RESERVED |= {"causal_conv1d", "selective_scan", "selective_scan_chunked", "selective_scan_step",
              "selective_scan_reference", "scan_exp", "scan_softplus", "scan_silu", "softplus", "silu", "SELECTIVE_SCAN", "SCAN_BLOCK", "SCAN_CHUNK",
              "NATIVE_SCAN", "native_selective_scan", "_native_scan", "_native_scan_vjp", "_NATIVE_SCANS"}


class CodegenError(MlxcError):
    pass


def class_name(fn_name: str) -> str:
    return "Model" if fn_name == Program.ENTRY else "".join(p.capitalize() for p in fn_name.split("_"))


@dataclass
class EmittedClass:
    name: str
    doc: str
    init: list[str]
    args: str
    body: list[str]
    methods: list[str] = field(default_factory=list)  # more methods' lines, after __call__


@dataclass
class ModuleParts:
    classes: list[EmittedClass] = field(default_factory=list)
    constants: dict[str, str] = field(default_factory=dict)  # module-level constant source -> its name
    helpers: set[str] = field(default_factory=set)  # templates/<name>.py.j2 the module needs
    states: tuple = ()  # the model's states (ir.state.State), one object each in make_cache()


def _expr_list(values) -> str:
    return ", ".join(values)


class _Emitter:
    def __init__(self, program: Program, parts: ModuleParts):
        self.program, self.parts = program, parts
        self.slots: dict[str, int] = {}

    def slot_count(self, fn: Function) -> int:
        """How many state objects a call of `fn` takes: one per stateful op it (and its callees) runs."""
        if fn.name not in self.slots:
            self.slots[fn.name] = len(self.program.states(fn))
        return self.slots[fn.name]

    def constant(self, source: tuple[str, str]) -> str:
        """A module-level constant's name, made once per distinct source (`ROPE_0 = RoPE(...)`)."""
        stem, src = source
        if src not in self.parts.constants:
            self.parts.constants[src] = f"{stem}_{sum(n.startswith(stem + '_') for n in self.parts.constants.values())}"
        return self.parts.constants[src]

    def emit(self, fn: Function) -> EmittedClass:
        names: dict[Value, str] = {}
        taken = set(_RESERVED) | self._symbolic_dims(fn) | self._plugin_names(fn)

        def local(v: Value) -> str:
            base = re.sub(r"\W", "_", v.name)
            if base[0].isdigit():
                base = "v" + base
            if keyword.iskeyword(base) or base in taken or _RESERVED_PATTERN.fullmatch(base):
                base += "_"
            name, i = base, 1
            while name in taken:
                name, i = f"{base}{i}", i + 1
            taken.add(name)
            names[v] = name
            return name

        for p in fn.runtime_params():
            path = p.name.split(".")
            if not all(s.isidentifier() and not keyword.iskeyword(s) for s in path):
                raise CodegenError(f"@{fn.name}: parameter name {p.name!r} is not a Python attribute path")
            names[p] = "self." + p.name
        inputs = [local(v) for v in fn.inputs]

        slots = self.slot_count(fn)
        # @main always takes a list of states (one per stateful op, however many); a callee reaching exactly one
        # takes that state object itself
        as_list = slots > 1 or (slots == 1 and fn.name == Program.ENTRY)
        init = self._declare_params(fn)
        body: list[str] = []
        if as_list:
            body.append(f"cache = [None] * {slots} if cache is None else cache")
        dims = self._symbolic_dims(fn)
        for d in sorted(dims):
            src = next(((v, i) for v in fn.inputs for i, x in enumerate(v.type.shape) if x == d), None)
            if src is None:
                raise CodegenError(f"@{fn.name}: symbolic dim {d} does not appear in any input shape")
            body.append(f"{d} = {names[src[0]]}.shape[{src[1]}]")

        slot = 0
        ops = fn.ops
        i = 0
        children = self._children(fn)
        while i < len(ops):
            o = ops[i]
            run = self._layer_run(fn, i) if o.op == "call" else None
            if run:
                attr, calls = run
                x_in = names[calls[0].operands[0]]
                extra = "".join(f", {names[v]}" for v in calls[0].operands[1:])  # the same for every layer
                out = local(calls[-1].result)
                per = self.slot_count(self.program[calls[0].attrs["callee"]])
                first = int(calls[0].attrs["prefix"].rsplit(".", 1)[1])
                layers = f"self.{attr}" if (first, len(calls)) == (0, self._list_len(fn, attr)) else \
                    f"self.{attr}[{first}:{first + len(calls)}]"
                if out != x_in:
                    body.append(f"{out} = {x_in}")
                call = self._queued(fn, f"layer({out}{extra}, layer_cache)" if per else f"layer({out}{extra})")
                if per:
                    body.append(f"for layer, layer_cache in zip({layers}, cache[{slot}:{slot + len(calls)}]):")
                    slot += len(calls)
                else:
                    body.append(f"for layer in {layers}:")
                body.append(f"    {out} = {call}")
                i += len(calls)
                continue
            args = [names[v] for v in o.operands]
            if o.op == "call":
                callee = self.program[o.attrs["callee"]]
                n = self.slot_count(callee)
                if n:
                    args.append(self._slot_expr(as_list, slot, n))
                    slot += n
                expr = f"{self._call_target(o.attrs['prefix'])}({_expr_list(args)})"
                if o.attrs["prefix"].startswith("layers."):  # a layer outside a loop
                    expr = self._queued(fn, expr)
            else:
                impl = implementation(o.op, o.attrs)
                if impl is None:
                    kernel = o.attrs.get("kernel")
                    how = f"{kernel.value} implementation" if kernel is not None else "MLX implementation"
                    raise CodegenError(f"@{fn.name}: no {how} for op {o.op!r}")
                self.parts.helpers.update(impl.helpers)
                if impl.constant is not None:
                    args.insert(0, self.constant(impl.constant(o.attrs)))
                n = len(o.opdef.states(o.attrs, [v.type for v in o.operands]))
                if n:
                    args.append(self._slot_expr(as_list, slot, n))
                    slot += n
                expr = impl.fragment(args, o.attrs, [v.type for v in o.operands])
                if len(o.results) > 1:
                    body.append(f"{_expr_list(local(r) for r in o.results)} = {expr}")
                    i += 1
                    continue
            body.append(f"{local(o.result)} = {expr}")
            i += 1
        body.append("return " + _expr_list(names[v] for v in fn.outputs))

        cache_arg = ", cache=None" if slots else ""
        states = self.program.states(fn)
        doc = f"IR function @{fn.name}" + (f"; state: {', '.join(map(str, states))}" if states else "")
        methods = []
        if fn.name == Program.ENTRY and states:
            methods = ["def make_cache(self, max_kv_size=None):",
                       '    """One state object per stateful op, in call order (see STATES)."""',
                       "    return make_cache(max_kv_size)"]
        keep = [names[v] for v in fn.inputs if fn.name == Program.ENTRY and v.name == Program.LOGITS_TO_KEEP]
        positional = [x for x in inputs if x not in keep]
        signature = _expr_list(positional) + cache_arg + "".join(f", {x}=0" for x in keep)
        return EmittedClass(class_name(fn.name), doc, init + children, signature, body, methods)

    def _queued(self, fn: Function, layer_call: str) -> str:
        """A layer's call in @main, through `queue_layer`: a decode step reaches MLX layer by layer
        (templates/queue.py.j2); elsewhere the call as it is."""
        if fn.name != Program.ENTRY:
            return layer_call
        self.parts.helpers.add("queue")
        return f"queue_layer({layer_call})"

    @staticmethod
    def _plugin_names(fn: Function) -> set[str]:
        """Names the helpers registered from outside mlxc define, for the ops of `fn` that use them."""
        used = {h for o in fn.ops if o.op != "call" and (impl := implementation(o.op, o.attrs)) is not None
                for h in impl.helpers if h in HELPER_SOURCES}
        return {n for h in used for n in helper_names(h)}

    @staticmethod
    def _slot_expr(as_list: bool, start: int, n: int) -> str:
        if not as_list:
            return "cache"
        return f"cache[{start}]" if n == 1 else f"cache[{start}:{start + n}]"

    _LIST_ITEM = re.compile(r"([A-Za-z_]\w*)\.(\d+)")

    def _children(self, fn: Function) -> list[str]:
        """Submodule declarations: one attribute per identifier prefix, one list per `name.<i>` family of prefixes
        (which must number its members 0..n-1)."""
        lines, lists = [], {}
        for o in fn.ops:
            if o.op != "call":
                continue
            prefix, cls = o.attrs["prefix"], class_name(o.attrs["callee"])
            m = self._LIST_ITEM.fullmatch(prefix)
            if m:
                lists.setdefault(m.group(1), {})[int(m.group(2))] = cls
            elif prefix.isidentifier() and not keyword.iskeyword(prefix):
                lines.append(f"self.{prefix} = {cls}()")
            else:
                raise CodegenError(f"@{fn.name}: call prefix {prefix!r} must be an identifier or `name.<index>`")
        for attr, members in lists.items():
            if sorted(members) != list(range(len(members))):
                raise CodegenError(f"@{fn.name}: calls `{attr}.<i>` must number 0..{len(members) - 1}, "
                                   f"got {sorted(members)}")
            kinds = [members[k] for k in range(len(members))]
            if len(set(kinds)) == 1:
                lines.append(f"self.{attr} = [{kinds[0]}() for _ in range({len(kinds)})]")
            else:
                lines.append(f"self.{attr} = [{', '.join(k + '()' for k in kinds)}]")
        return lines

    def _list_len(self, fn: Function, attr: str) -> int:
        return sum(1 for o in fn.ops if o.op == "call" and (m := self._LIST_ITEM.fullmatch(o.attrs["prefix"]))
                   and m.group(1) == attr)

    def _call_target(self, prefix: str) -> str:
        m = self._LIST_ITEM.fullmatch(prefix)
        return f"self.{m.group(1)}[{m.group(2)}]" if m else f"self.{prefix}"

    def _layer_run(self, fn: Function, i: int):
        """Consecutive calls `name.k, name.k+1, ...`, each feeding its result to the next as first input and passing
        the same other inputs, with no other reader of the states in between: emitted as a loop over the submodule
        list. (A state something else reads, e.g. one a function returns, needs its own name: the run ends there.)"""
        ops = fn.ops
        m = self._LIST_ITEM.fullmatch(ops[i].attrs["prefix"])
        if not m:
            return None
        users = fn.users()
        attr, start, calls = m.group(1), int(m.group(2)), []
        prev = None
        for o in ops[i:]:
            if o.op != "call" or o.attrs["prefix"] != f"{attr}.{start + len(calls)}":
                break
            callee = self.program[o.attrs["callee"]]
            if len(o.results) != 1 or (prev is not None and o.operands[0] is not prev):
                break
            if calls and [id(v) for v in o.operands[1:]] != [id(v) for v in calls[0].operands[1:]]:
                break
            if self.slot_count(callee) > 1:
                break
            calls.append(o)
            prev = o.result
            if len(users.get(prev, [])) > 1 or any(v is prev for v in fn.outputs):
                break  # this state is read elsewhere too: the next call starts a new statement
        return (attr, calls) if len(calls) > 1 else None

    @staticmethod
    def _symbolic_dims(fn: Function) -> set[str]:
        """Symbols the body needs as Python ints (reshape targets); bound from input shapes at the top."""
        return {d for o in fn.ops if o.op == "reshape" for d in o.attrs["shape"] if isinstance(d, str)}

    def _declare_params(self, fn: Function) -> list[str]:
        lines, made = [], set()
        for p in fn.runtime_params():
            path = p.name.split(".")
            for depth in range(1, len(path)):
                node = ".".join(path[:depth])
                if node not in made:
                    made.add(node)
                    lines.append(f"self.{node} = nn.Module()")
            q = p.type.quant
            if q is None:
                lines.append(f"self.{p.name} = {_zeros(p.type.shape, MX_DTYPES[p.type.dtype])}")
                continue
            # packed codes (uint32) plus per-group scales and biases, as mx.quantize returns them; or the native
            # kernels' layout (`pack`): uint8 codes and scales per tile of 16 rows
            *lead, cols = p.type.shape
            codes, scales, biases = Quant.storage_names(p.name)
            groups = (*lead, cols // q.group_size)
            scale_type = MX_DTYPES[q.scale_dtype(p.type.dtype)]
            if q.packed:
                tiles = -(-lead[0] // 16)
                lines.append(f"self.{codes} = {_zeros((tiles, cols // 32 * 64 * q.bits), 'mx.uint8')}")
                groups = (tiles, cols // q.group_size * 16)
            else:
                lines.append(f"self.{codes} = {_zeros((*lead, cols * q.bits // 32), 'mx.uint32')}")
            lines.append(f"self.{scales} = {_zeros(groups, scale_type)}")
            lines.append(f"self.{biases} = {_zeros(groups, scale_type)}")
        return lines


def _zeros(shape, dtype: str) -> str:
    dims = ", ".join(map(str, shape)) + ("," if len(shape) == 1 else "")
    return f"mx.zeros(({dims}), dtype={dtype})"


def emit_program(program: Program) -> ModuleParts:
    parts = ModuleParts()
    em = _Emitter(program, parts)
    for fn in program.functions:
        parts.classes.append(em.emit(fn))
    parts.states = program.states(program.main)
    if parts.states:
        parts.helpers.add("state")
    return parts
