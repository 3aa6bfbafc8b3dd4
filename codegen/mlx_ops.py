"""Each op's MLX implementation, written once: a source fragment that the code generator writes into a model file
and that the load-time interpreter (`runtime/derive.py`) evaluates. An op's meaning is its declaration in
`ir/ops.py` plus its fragment here; nothing else spells it out again.

A fragment is a function of the operand expressions, the op's attributes and the operand types (so a matmul on a
quantized weight can choose MLX's quantized kernel); it returns one Python expression. Multi-result ops return an
expression giving a sequence. Helpers a fragment calls (`attention`, `moe`, ...) are module-level functions from
`templates/`, named in `helpers`. An op with several implementations (a `kernel` attribute, chosen by
select-kernels) registers one fragment per kernel: `implements("linear", kernel=Kernel.NATIVE)`. A stateful op (one that declares `state=` in `ir/ops.py`) gets the expression of
its state object as one more argument, after its operands. An op that needs a module-level constant (rope's
frequency table) gives its source with `constant`; the emitter names it once per module and passes that name first.
"""

from __future__ import annotations

import ast
import inspect
import textwrap
from dataclasses import dataclass
from typing import Callable, Sequence

from ..ir import DType, Kernel, Quant, TensorType

MX_DTYPES = {
    DType.F32: "mx.float32", DType.F16: "mx.float16", DType.BF16: "mx.bfloat16",
    DType.I32: "mx.int32", DType.I64: "mx.int64", DType.U32: "mx.uint32", DType.BOOL: "mx.bool_",
}

Fragment = Callable[[list[str], dict, Sequence[TensorType]], str]


@dataclass(frozen=True)
class Implementation:
    fragment: Fragment
    helpers: tuple[str, ...] = ()  # templates/<name>.py.j2 the fragment calls
    constant: Callable[[dict], tuple[str, str]] | None = None  # attrs -> (name stem, source) of a module constant


IMPLEMENTATIONS: dict[str, Implementation] = {}  # op -> its reference implementation (plain MLX ops)
VARIANTS: dict[tuple[str, Kernel], Implementation] = {}  # (op, kernel) -> another implementation


def implements(op: str, helpers: tuple[str, ...] = (), constant=None, kernel: Kernel = Kernel.REFERENCE):
    """Register the decorated fragment as `op`'s implementation by `kernel` (default: the reference MLX ops)."""

    def register(fragment: Fragment) -> Fragment:
        table, key = (IMPLEMENTATIONS, op) if kernel == Kernel.REFERENCE else (VARIANTS, (op, kernel))
        if key in table:
            raise ValueError(f"op {op!r} has two {kernel.value} implementations")
        table[key] = Implementation(fragment, helpers, constant)
        return fragment

    return register


HELPER_SOURCES: dict[str, str] = {}  # helpers defined outside templates/ (a plugin's): name -> Python source


def helper(name: str, *parts) -> str:
    """Register a helper that fragments name in `helpers=`, from outside mlxc: its Python source, given as text or
    as functions (and classes) whose source is carried verbatim, so the math has one definition that the generated
    module and the plugin's own tests both run. The source may use `mx`, `nn`, `np` and `math`, like templates/."""
    if name in HELPER_SOURCES:
        raise ValueError(f"helper {name!r} is registered already")
    chunks = [p if isinstance(p, str) else textwrap.dedent(inspect.getsource(p)) for p in parts]
    source = "\n\n\n".join(c.strip("\n") for c in chunks)
    compile(source, f"<helper {name}>", "exec")  # a syntax error shows here, naming the helper
    HELPER_SOURCES[name] = source
    return source


def helper_names(name: str) -> set[str]:
    """The module-level names a registered helper defines (generated code must not rebind them)."""
    tree = ast.parse(HELPER_SOURCES[name])
    out = set()
    for node in tree.body:
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
            out.add(node.name)
        elif isinstance(node, (ast.Assign, ast.AnnAssign)):
            for t in node.targets if isinstance(node, ast.Assign) else [node.target]:
                out.update(n.id for n in ast.walk(t) if isinstance(n, ast.Name))
    return out


def implementation(op: str, attrs: dict) -> Implementation | None:
    """The implementation an op's `kernel` attribute chose (the reference one for ops without the attribute)."""
    kernel = attrs.get("kernel", Kernel.REFERENCE)
    return IMPLEMENTATIONS.get(op) if kernel == Kernel.REFERENCE else VARIANTS.get((op, kernel))


def _list(items) -> str:
    return ", ".join(map(str, items))


def _qargs(expr: str, quant: Quant) -> tuple[str, str, str, str]:
    """The packed codes, scales and biases of a quantized weight expression, and the kernel's keyword arguments."""
    codes, scales, biases = Quant.storage_names(expr)
    return codes, scales, biases, f"group_size={quant.group_size}, bits={quant.bits}"


def _scales_as(scales: str, biases: str, w: TensorType, dtype: DType) -> tuple[str, str]:
    """Scales and biases in `dtype` (MLX's kernels compute in the scales' dtype): cast when stored in another, as
    GGUF's float16 scales under a float32 model are (exact: the cast widens)."""
    if w.quant.scale_dtype(w.dtype) == dtype:
        return scales, biases
    return f"{scales}.astype({MX_DTYPES[dtype]})", f"{biases}.astype({MX_DTYPES[dtype]})"


# ---------------------------------------------------------------------------------------------- data and matmul


def _dequantized(codes: str, scales: str, biases: str, quant: Quant, kw: str) -> str:
    """Dequantization: MLX's `dequantize` (it takes every layout mlxc holds, groups of 16 included)."""
    return f"mx.dequantize({codes}, {scales}, {biases}, {kw})"


@implements("embed")
def _embed(a, k, t):
    q = t[1].quant
    if q is None:
        return f"{a[1]}[{a[0]}]"
    codes, scales, biases, kw = _qargs(a[1], q)
    ids = a[0]
    scales, biases = _scales_as(f"{scales}[{ids}]", f"{biases}[{ids}]", t[1], t[1].dtype)
    return _dequantized(f"{codes}[{ids}]", scales, biases, q, kw)


@implements("linear")
def _linear(a, k, t):
    bias = f" + {a[2]}" if len(a) > 2 else ""
    q = t[1].quant
    if q is None:
        return f"{a[0]} @ {a[1]}.T{bias}"
    codes, scales, biases, kw = _qargs(a[1], q)
    scales, biases = _scales_as(scales, biases, t[1], t[0].dtype)
    if not q.mlx_matmul:  # MLX's quantized matmul would get this layout wrong: the weight dequantized on the fly
        return f"{a[0]} @ {_dequantized(codes, scales, biases, q, kw)}.T{bias}"
    return f"mx.quantized_matmul({a[0]}, {codes}, {scales}, {biases}, transpose=True, {kw}){bias}"


@implements("dequantize")
def _dequantize(a, k, t):
    codes, scales, biases, kw = _qargs(a[0], t[0].quant)
    scales, biases = _scales_as(scales, biases, t[0], t[0].dtype)
    return _dequantized(codes, scales, biases, t[0].quant, kw)


# The native CPU kernels (kernels/native, through the `native` helper, which falls back to MLX's ops when the
# extension is missing). Packed weights pass their row count: the packed arrays are padded to whole 16-row tiles.


@implements("embed", helpers=("native",), kernel=Kernel.NATIVE)
def _embed_native(a, k, t):
    q = t[1].quant
    if q is None:
        return _embed(a, k, t)
    codes, scales, biases, kw = _qargs(a[1], q)
    packed = f"_packed({a[0]}, {codes}, {scales}, {biases}, n={t[1].shape[0]}," if q.packed else \
        f"({a[0]}, {codes}, {scales}, {biases},"
    return f"qembed{packed} {kw}, dtype={MX_DTYPES[t[1].dtype]})"


@implements("linear", helpers=("native",), kernel=Kernel.NATIVE)
def _linear_native(a, k, t):
    q = t[1].quant
    if q is None:
        return f"native_linear({_list(a)})"
    bias = f" + {a[2]}" if len(a) > 2 else ""
    codes, scales, biases, kw = _qargs(a[1], q)
    packed = f"_packed({a[0]}, {codes}, {scales}, {biases}, n={t[1].shape[0]}," if q.packed else \
        f"({a[0]}, {codes}, {scales}, {biases},"
    return f"qlinear{packed} {kw}){bias}"


@implements("pack", helpers=("native",))
def _pack(a, k, t):
    codes, scales, biases, kw = _qargs(a[0], t[0].quant)
    return f"pack_weight({codes}, {scales}, {biases}, {kw})"


# The native versions of the other ops of a decode step (MLX's CPU backend composes them from several ops): the
# helper runs MLX's own op wherever the native one does not apply (other rope scalings, soft-capping, prefill
# attention, a missing extension).


@implements("rms_norm", helpers=("native",), kernel=Kernel.NATIVE)
def _rms_norm_native(a, k, t):
    return f"native_rms_norm({a[0]}, {a[1]}, {k['eps']!r})"


@implements("rope", helpers=("rope", "native"), constant=lambda attrs: _rope_table(attrs), kernel=Kernel.NATIVE)
def _rope_native(a, k, t):
    return f"native_rope({a[0]}, {a[1]}, {a[2]})"


@implements("attention", helpers=("attention", "native"), kernel=Kernel.NATIVE)
def _attention_native(a, k, t):
    return f"native_attention({_attention_args(a, k)})"


@implements("glu", helpers=("native",), kernel=Kernel.NATIVE)
def _glu_native(a, k, t):
    return f"native_glu({a[0]}, {k['activation']!r}, {_ACTIVATIONS[k['activation']]})"


@implements("qkv_attention", helpers=("rope", "attention", "native"), constant=lambda attrs: _rope_table(attrs),
            kernel=Kernel.NATIVE)
def _qkv_attention_native(a, k, t):
    return f"native_qkv_attention({_qkv_attention_args(a, k)})"


# ---------------------------------------------------------------------------------------------- normalization


@implements("rms_norm")
def _rms_norm(a, k, t):
    return f"mx.fast.rms_norm({a[0]}, {a[1]}, {k['eps']!r})"


@implements("layer_norm")
def _layer_norm(a, k, t):
    weight = a[1] if len(a) > 1 else "None"
    bias = a[2] if len(a) > 2 else "None"
    return f"mx.fast.layer_norm({a[0]}, {weight}, {bias}, {k['eps']!r})"


# ---------------------------------------------------------------------------------------------- elementwise

for _op, _fn in (("silu", "nn.silu"), ("gelu", "nn.gelu"), ("gelu_tanh", "nn.gelu_approx"), ("relu", "nn.relu"),
                 ("sigmoid", "mx.sigmoid"), ("tanh", "mx.tanh"),
                 ("exp", "mx.exp")):
    implements(_op)(lambda a, k, t, _fn=_fn: f"{_fn}({a[0]})")


@implements("add")
def _add(a, k, t):
    return f"{a[0]} + {a[1]}"


@implements("mul")
def _mul(a, k, t):
    return f"{a[0]} * {a[1]}"


@implements("scale")
def _scale(a, k, t):
    return f"{a[0]} * {k['factor']!r}"


@implements("shift")
def _shift(a, k, t):
    return f"{a[0]} + {k['value']!r}"


@implements("keep_last")
def _keep_last(a, k, t):
    return f"{a[0]}[:, -int({a[1]}):] if {a[1]} else {a[0]}"


@implements("softcap")
def _softcap(a, k, t):
    return f"mx.tanh({a[0]} / {k['cap']!r}) * {k['cap']!r}"


@implements("clip")
def _clip(a, k, t):
    return f"mx.clip({a[0]}, {k['min']!r}, {k['max']!r})"


@implements("cast")
def _cast(a, k, t):
    return f"{a[0]}.astype({MX_DTYPES[k['dtype']]})"


@implements("dropout", helpers=("dropout",))
def _dropout(a, k, t):
    return f"dropout({a[0]}, {k['p']!r}, self.training)"


# ---------------------------------------------------------------------------------------------- shape


@implements("reshape")
def _reshape(a, k, t):
    return f"{a[0]}.reshape({_list(k['shape'])})"


@implements("transpose")
def _transpose(a, k, t):
    return f"{a[0]}.transpose({_list(k['perm'])})"


@implements("split")
def _split(a, k, t):
    cuts, acc = [], 0
    for s in k["sizes"][:-1]:
        acc += s
        cuts.append(acc)
    return f"mx.split({a[0]}, [{_list(cuts)}], axis={k['axis']})"


@implements("concat")
def _concat(a, k, t):
    return f"mx.concatenate([{_list(a)}], axis={k['axis']})"


@implements("deinterleave_rows")
def _deinterleave_rows(a, k, t):
    rows, rest = t[0].shape[0], list(t[0].shape[1:])
    inner = _list([k["groups"], rows // k["groups"] // 2, 2] + rest)
    return f"{a[0]}.reshape({inner}).swapaxes(1, 2).reshape({_list([rows] + rest)})"


@implements("stack")
def _stack(a, k, t):
    return f"mx.stack([{_list(a)}], axis={k['axis']})"


# ---------------------------------------------------------------------------------------------- position and attention


def _rope_table(attrs) -> tuple[str, str]:
    """The RoPE object (frequencies fixed at construction) a rope op calls: one per distinct configuration."""
    scaling = dict(attrs["scaling"].non_default_items())
    args = [f"dims={attrs['dims']}", f"base={attrs['base']!r}"]
    if scaling["kind"].value != "default":
        args.append(f'kind="{scaling["kind"].value}"')
    if attrs["traditional"]:
        args.append("traditional=True")
    args += [f"{k}={v!r}" for k, v in scaling.items() if k != "kind"]
    return "ROPE", f"RoPE({', '.join(args)})"


@implements("rope", helpers=("rope",), constant=_rope_table)
def _rope(a, k, t):
    return f"{a[0]}({a[1]}, {a[2]})"


def _attention_args(a, k) -> str:
    extra = "".join(f", {name}={k[name]!r}" for name in ("window", "softcap") if k[name] is not None)
    return f"{_list(a)}, scale={k['scale']!r}{extra}"


@implements("attention", helpers=("attention",))
def _attention(a, k, t):
    alibi = "" if k.get("alibi") is None else f", alibi={tuple(k['alibi'])!r}"  # custom kernels take no alibi
    return f"attention({_attention_args(a, k)}{alibi})"


def _qkv_attention_args(a, k) -> str:
    heads = f"heads={k['heads']}, kv_heads={k['kv_heads']}, head_dim={k['head_dim']}"
    return f"{_list(a)}, {heads}, scale={k['scale']!r}" + "".join(
        f", {name}={k[name]!r}" for name in ("window", "softcap") if k[name] is not None)


@implements("qkv_attention", helpers=("rope", "attention"), constant=_rope_table)
def _qkv_attention(a, k, t):
    return f"qkv_attention({_qkv_attention_args(a, k)})"


@implements("glu")
def _glu(a, k, t):
    n = t[0].shape[-1] // 2
    return f"{_ACTIVATIONS[k['activation']]}({a[0]}[..., :{n}]) * {a[0]}[..., {n}:]"


@implements("learned_positions", helpers=("positions",))
def _learned_positions(a, k, t):
    return f"learned_positions({a[1]}, {a[2]}, {a[0]}.shape[1])"


@implements("sinusoidal_positions", helpers=("positions",))
def _sinusoidal_positions(a, k, t):
    return f"sinusoidal_positions({a[1]}, {a[0]}.shape[1], {k['dims']}, {k['base']!r}, {MX_DTYPES[k['dtype']]})"


# ---------------------------------------------------------------------------------------------- state-space blocks


@implements("causal_conv1d", helpers=("conv",))
def _causal_conv1d(a, k, t):
    bias = a[2] if len(a) == 4 else "None"
    return f"causal_conv1d({a[0]}, {a[1]}, {bias}, {a[-1]})"


@implements("rms_norm_gated", helpers=("norm_gated",))
def _rms_norm_gated(a, k, t):
    return f"rms_norm_gated({_list(a)}, {k['eps']!r}, {k['groups']})"


def _ssd_args(a, k) -> str:
    bias = a[6] if len(a) == 8 else "None"
    top = "math.inf" if k["dt_max"] is None else repr(k["dt_max"])
    limit = "" if k["dt_min"] == 0 and k["dt_max"] is None else f", dt_limit=({k['dt_min']!r}, {top})"
    return f"{_list(a[:6])}, {bias}, {a[-1]}, chunk_size={k['chunk_size']}{limit}"


@implements("ssd", helpers=("ssd",))
def _ssd(a, k, t):
    return f"ssd({_ssd_args(a, k)})"


@implements("lstm", helpers=("recurrent",))
def _lstm(a, k, t):
    bias = a[2] if len(a) == 4 else "None"
    return f"lstm({a[0]}, {a[1]}, {bias}, {a[-1]})"


@implements("gru", helpers=("recurrent",))
def _gru(a, k, t):
    bias = a[2] if len(a) == 4 else "None"
    return f"gru({a[0]}, {a[1]}, {bias}, {a[-1]})"


@implements("mingru", helpers=("recurrent",))
def _mingru(a, k, t):
    return f"mingru({a[0]}, {a[1]}, {a[2]})"


def _selective_scan_args(a) -> str:
    z = a[7] if len(a) == 9 else "None"
    return f"{_list(a[:7])}, {z}, {a[-1]}"


@implements("selective_scan", helpers=("selective_scan",))
def _selective_scan(a, k, t):
    return f"selective_scan({_selective_scan_args(a)})"


@implements("selective_scan", helpers=("selective_scan",), kernel=Kernel.NATIVE)
def _selective_scan_native(a, k, t):  # the helper runs the native kernel (kernels/native), or the MLX scan without it
    return f"selective_scan({_selective_scan_args(a)}, native=True)"


# mlxc's custom kernels (kernels/metal) for attention and the scans: the Metal kernel, its CUDA twin, or the Metal
# source in the kernel emulator, by the op's `kernel`; the helper (templates/kernels.py.j2) falls back to the
# reference helper when the module runs without mlxc, so that one comes too.
for _kernel in (Kernel.METAL, Kernel.CUDA, Kernel.EMULATED):
    _impl = f'impl="{_kernel.value}"'
    implements("attention", helpers=("attention", "kernels"), kernel=_kernel)(
        lambda a, k, t, _impl=_impl: f"kernel_attention({_attention_args(a, k)}, {_impl})")
    implements("selective_scan", helpers=("selective_scan", "kernels"), kernel=_kernel)(
        lambda a, k, t, _impl=_impl: f"kernel_selective_scan({_selective_scan_args(a)}, {_impl})")
    implements("ssd", helpers=("ssd", "kernels"), kernel=_kernel)(
        lambda a, k, t, _impl=_impl: f"kernel_ssd({_ssd_args(a, k)}, {_impl})")


# ---------------------------------------------------------------------------------------------- mixtures and heads


@implements("moe", helpers=("moe",))
def _moe(a, k, t):
    experts = []
    for expr, typ in zip(a[2:], t[2:]):  # a quantized expert weight travels as its storage arrays and layout
        if typ.quant is None:
            experts.append(expr)
        else:
            codes, scales, biases, _ = _qargs(expr, typ.quant)
            experts.append(f"({codes}, {scales}, {biases}, {typ.quant.group_size}, {typ.quant.bits})")
    mixing = ", weights_in_float32=True" if k["weights_in_float32"] else ""
    if k.get("first_expert") is not None:  # expert parallelism: this rank's experts start there
        mixing += f", first_expert={k['first_expert']}"
    return (f"moe({_list(a[:2] + experts)}, top_k={k['top_k']}, normalize={k['normalize']}, "
            f"activation={_ACTIVATIONS[k['activation']]}{mixing})")


_ACTIVATIONS = {"silu": "nn.silu", "gelu": "nn.gelu", "gelu_tanh": "nn.gelu_approx", "relu": "nn.relu"}


@implements("pool", helpers=("pool",))
def _pool(a, k, t):
    return f"pool({a[0]}, {a[1]}, {k['mode']!r}, {k['pad_token_id']!r})"



# ---------------------------------------------------------------------------------------------- ranks (shard)
# Collectives run on MLX's global group (the one `mx.distributed.init` made); helpers in templates/distributed.py.j2.


@implements("slice")
def _slice(a, k, t):
    if t[0].quant is not None:  # a quantized share is read from the checkpoint by the loader, never computed
        raise ValueError(f"a quantized weight ({t[0]}) can be sliced only where it is read from the checkpoint")
    index = [":"] * (k["axis"] % t[0].rank) + [f"{k['start']}:{k['stop']}"]
    return f"{a[0]}[{', '.join(index)}]"


@implements("embed_range", helpers=("distributed",))
def _embed_range(a, k, t):
    q = t[1].quant
    table = a[1]
    if q is not None:
        codes, scales, biases, _ = _qargs(a[1], q)
        table = f"({codes}, {scales}, {biases}, {q.group_size}, {q.bits})"
        return f"embed_range({a[0]}, {table}, {k['first']}, {MX_DTYPES[t[1].dtype]})"  # scales may be narrower
    return f"embed_range({a[0]}, {table}, {k['first']})"


@implements("all_sum")
def _all_sum(a, k, t):
    return f"mx.distributed.all_sum({a[0]})"


@implements("all_gather", helpers=("distributed",))
def _all_gather(a, k, t):
    return f"all_gather_axis({a[0]}, [{_list(k['sizes'])}], axis={k['axis']})"


@implements("broadcast", helpers=("distributed",))
def _broadcast(a, k, t):
    return f"broadcast_from({a[0]}, {k['root']})"


@implements("send")
def _send(a, k, t):
    return f"mx.distributed.send({a[0]}, {k['dst']})"


@implements("recv")
def _recv(a, k, t):
    ref = t[0].shape
    dims = [f"{a[0]}.shape[{ref.index(d)}]" if isinstance(d, str) else str(d) for d in k["shape"]]
    return f"mx.distributed.recv(({_list(dims)},), {MX_DTYPES[k['dtype']]}, {k['src']})"
