"""The op vocabulary. Each op is declared once: operands, attributes and its type rule.

Attention and rotary embedding stay composite ops: kernel selection decides later how they run. Attention keeps a
KV state per call (declared with `state=`, see `ir/state.py`), and rope takes the position offset as an explicit
input, which is how one function body serves every layer and both prefill and decode.
"""

from __future__ import annotations

from math import prod

from .attrs import Kernel, RopeKind, RopeScaling
from .opdef import AttrDef, Floats, Ints, OpGroup, Shape, Symbol, op, require
from .state import State, StateKind
from .types import DType, Quant, TensorType

# ---------------------------------------------------------------- data and matmul


# Ops with several implementations carry `kernel`: which one runs (chosen by select-kernels; see attrs.Kernel).
KERNEL = AttrDef("kernel", Kernel, Kernel.REFERENCE)


@op("embed", OpGroup.DATA, ("ids", "table"), (KERNEL,), quantized=("table",))
def _embed(ids: TensorType, table: TensorType, kernel: Kernel):
    """Row lookup: `table[ids]`."""
    require(not ids.dtype.is_float, f"ids must be integers, got {ids.dtype.value}")
    require(table.rank == 2, f"table must be [vocab, hidden], got {table}")
    _check_groups(table, kernel)
    return TensorType(table.dtype, ids.shape + (table.shape[1],))


def _check_groups(w: TensorType, kernel: Kernel | None = None) -> None:
    q = w.quant
    if q is not None:
        require(not q.packed or kernel == Kernel.NATIVE,
                f"{w}: the packed layout is read only by the native kernels (kernel = native)")
        require(q.bits in Quant.BITS, f"{q.bits}-bit quantization is not supported")
        require(q.group_size in Quant.GROUP_SIZES or (q.group_size, q.bits) == (16, 8),
                f"group size {q.group_size} is not supported (MLX quantizes in groups of "
                f"{', '.join(map(str, Quant.GROUP_SIZES))}; 16 only with 8-bit codes, GGUF Q6_K's layout)")
        require(w.shape[-1] % q.group_size == 0, f"{w}: last dim is not a multiple of the group size {q.group_size}")


@op("linear", OpGroup.MATMUL, ("x", "weight", "bias?"), (KERNEL,), quantized=("weight",))
def _linear(x: TensorType, weight: TensorType, bias: TensorType | None = None, *, kernel: Kernel):
    """`x @ weight.T + bias`, weight laid out [out_features, in_features] as checkpoints store it."""
    require(weight.rank == 2, f"weight must be [out, in], got {weight}")
    require(x.rank >= 1, f"input must have a feature axis, got {x}")
    require(x.shape[-1] == weight.shape[1], f"input features {x.shape[-1]} do not match weight {weight}")
    require(x.dtype == weight.dtype, f"dtype mismatch: input {x.dtype.value}, weight {weight.dtype.value}")
    _check_groups(weight, kernel)
    if bias is not None:
        require(bias.shape == (weight.shape[0],), f"bias {bias} does not match weight {weight}")
    return x.with_shape(x.shape[:-1] + (weight.shape[0],))


# ---------------------------------------------------------------- normalization


@op("rms_norm", OpGroup.NORM, ("x", "weight"), (AttrDef("eps", float), KERNEL))
def _rms_norm(x: TensorType, weight: TensorType, eps: float, kernel: Kernel):
    """`x / sqrt(mean(x^2) + eps) * weight` over the last axis."""
    require(x.rank >= 1, f"input must have a feature axis, got {x}")
    require(weight.shape == (x.shape[-1],), f"weight {weight} does not match features {x.shape[-1]}")
    return x


@op("layer_norm", OpGroup.NORM, ("x", "weight?", "bias?"), (AttrDef("eps", float),))
def _layer_norm(x: TensorType, weight: TensorType | None = None, bias: TensorType | None = None, *, eps: float):
    """Mean-centred normalization over the last axis, with optional affine weight and bias."""
    require(x.rank >= 1, f"input must have a feature axis, got {x}")
    for t in (weight, bias):
        if t is not None:
            require(t.shape == (x.shape[-1],), f"{t} does not match features {x.shape[-1]}")
    return x


# ---------------------------------------------------------------- elementwise


def _unary(name: str, doc: str) -> None:
    def rule(x: TensorType):
        return x

    rule.__doc__ = doc
    op(name, OpGroup.UNARY, ("x",))(rule)


_unary("silu", "x * sigmoid(x)")
_unary("gelu", "exact (erf) GELU")
_unary("gelu_tanh", "tanh-approximated GELU")
_unary("relu", "max(x, 0)")
_unary("sigmoid", "1 / (1 + exp(-x))")
_unary("tanh", "hyperbolic tangent")
_unary("exp", "e^x (Mamba's A = -exp(A_log), computed once at load)")

ACTIVATIONS = ("silu", "gelu", "gelu_tanh", "relu")  # the unary ops a feed-forward block or an expert may apply


def _broadcast(a: TensorType, b: TensorType) -> TensorType:
    require(a.dtype == b.dtype, f"dtype mismatch: {a.dtype.value} vs {b.dtype.value}")
    shape = []
    for i in range(1, max(a.rank, b.rank) + 1):
        da = a.shape[-i] if i <= a.rank else 1
        db = b.shape[-i] if i <= b.rank else 1
        require(da == db or da == 1 or db == 1, f"shapes {a} and {b} do not broadcast")
        shape.append(db if da == 1 else da)
    return a.with_shape(reversed(shape))


def _binary(name: str, doc: str) -> None:
    def rule(a: TensorType, b: TensorType):
        return _broadcast(a, b)

    rule.__doc__ = doc
    op(name, OpGroup.BINARY, ("a", "b"))(rule)


_binary("add", "a + b, broadcasting")
_binary("mul", "a * b, broadcasting")


# ---------------------------------------------------------------- shape


def _same_elements(src: tuple, dst: tuple) -> bool:
    """Whether two shapes can hold the same elements: equal symbolic dims (as a multiset) and equal static products."""
    sym = lambda s: sorted(d for d in s if isinstance(d, str))  # noqa: E731
    static = lambda s: prod(d for d in s if isinstance(d, int))  # noqa: E731
    return sym(src) == sym(dst) and static(src) == static(dst)


@op("reshape", OpGroup.SHAPE, ("x",), (AttrDef("shape", Shape),))
def _reshape(x: TensorType, shape: Shape):
    """View with a new shape holding the same elements."""
    require(all(not isinstance(d, int) or d >= 0 for d in shape), f"negative dim in shape {list(shape)}")
    require(_same_elements(x.shape, tuple(shape)), f"cannot reshape {x} to [{', '.join(map(str, shape))}]")
    return x.with_shape(shape)


@op("transpose", OpGroup.SHAPE, ("x",), (AttrDef("perm", Ints),))
def _transpose(x: TensorType, perm: Ints):
    """Permute axes."""
    require(sorted(perm) == list(range(x.rank)), f"perm {list(perm)} is not a permutation of {x.rank} axes")
    return x.with_shape(x.shape[p] for p in perm)


def _axis(axis: int, rank: int) -> int:
    require(-rank <= axis < rank, f"axis {axis} out of range for rank {rank}")
    return axis % rank


@op("split", OpGroup.SHAPE, ("x",), (AttrDef("sizes", Ints), AttrDef("axis", int, -1)))
def _split(x: TensorType, sizes: Ints, axis: int):
    """Consecutive slices of the given sizes along an axis; one result per slice."""
    ax = _axis(axis, x.rank)
    require(all(s >= 0 for s in sizes), f"negative size in {list(sizes)}")
    require(sum(sizes) == x.shape[ax], f"sizes {list(sizes)} do not add up to dim {x.shape[ax]} of {x}")
    return [x.with_shape(x.shape[:ax] + (s,) + x.shape[ax + 1 :]) for s in sizes]


@op("concat", OpGroup.SHAPE, ("*xs",), (AttrDef("axis", int, -1),), quantized=("xs",))
def _concat(*xs: TensorType, axis: int):
    """Join along an axis (static sizes only on that axis). Quantized weights join along rows, groups intact."""
    require(len(xs) > 0, "concat needs at least one operand")
    first = xs[0]
    ax = _axis(axis, first.rank)
    require(len({t.quant for t in xs}) == 1, "cannot concat quantized and float tensors, or different quantizations")
    require(first.quant is None or ax < first.rank - 1, "quantized tensors can only be joined along rows")
    require(first.quant is None or not first.quant.packed, "packed weights cannot be joined; join, then pack")
    for t in xs[1:]:
        require(t.dtype == first.dtype and t.rank == first.rank, f"cannot concat {first} with {t}")
        same = all(t.shape[i] == first.shape[i] for i in range(first.rank) if i != ax)
        require(same, f"cannot concat {first} with {t} along axis {axis}")
    require(all(isinstance(t.shape[ax], int) for t in xs), "concat axis must be static")
    return first.with_shape(first.shape[:ax] + (sum(t.shape[ax] for t in xs),) + first.shape[ax + 1 :])


@op("stack", OpGroup.SHAPE, ("*xs",), (AttrDef("axis", int, 0),))
def _stack(*xs: TensorType, axis: int):
    """Join equal-shaped tensors along a new axis (e.g. one checkpoint tensor per expert into one [E, ...] weight)."""
    require(len(xs) > 0, "stack needs at least one operand")
    first = xs[0]
    for t in xs[1:]:
        require(t == first, f"cannot stack {first} with {t}")
    ax = _axis(axis, first.rank + 1)
    return first.with_shape(first.shape[:ax] + (len(xs),) + first.shape[ax:])


@op("deinterleave_rows", OpGroup.SHAPE, ("x",), (AttrDef("groups", int),), quantized=("x",))
def _deinterleave_rows(x: TensorType, groups: int):
    """Reorder rows: within each of `groups` equal row groups, rows (0, h, 1, h+1, ...) go back to (0, 1, ..., 2h-1).
    Undoes llama.cpp's rotary row order for Q and K; whole rows move, so quantized rows keep their groups."""
    require(x.rank in (1, 2), f"deinterleave_rows expects a matrix or a vector, got {x}")
    rows = x.shape[0]
    require(x.quant is None or not x.quant.packed, f"{x}: packed rows cannot be reordered; reorder, then pack")
    require(groups > 0 and isinstance(rows, int) and rows % (2 * groups) == 0,
            f"{rows} rows do not split into {groups} groups of pairs")
    return x


@op("scale", OpGroup.UNARY, ("x",), (AttrDef("factor", float),))
def _scale(x: TensorType, factor: float):
    """x * factor, a constant known at compile time (e.g. LoRA's alpha / r)."""
    return x


@op("shift", OpGroup.UNARY, ("x",), (AttrDef("value", float),))
def _shift(x: TensorType, value: float):
    """x + value, a constant known at compile time (e.g. Gemma's norm weights stored as w - 1)."""
    return x


@op("softcap", OpGroup.UNARY, ("x",), (AttrDef("cap", float),))
def _softcap(x: TensorType, cap: float):
    """cap * tanh(x / cap): squashes logits smoothly into (-cap, cap) (Gemma 2's logit soft-capping)."""
    require(cap > 0, f"soft-cap must be positive, got {cap}")
    return x


@op("dropout", OpGroup.UNARY, ("x",), (AttrDef("p", float),), effects=True)
def _dropout(x: TensorType, p: float):
    """Zero each element with probability p and rescale the rest, in training mode only; identity in inference."""
    require(0.0 <= p < 1.0, f"dropout probability must be in [0, 1), got {p}")
    return x


@op("clip", OpGroup.UNARY, ("x",), (AttrDef("min", float), AttrDef("max", float)))
def _clip(x: TensorType, min: float, max: float):
    """x clamped to [min, max] (OLMoE's `clip_qkv` on queries, keys and values)."""
    require(min <= max, f"clip needs min <= max, got [{min}, {max}]")
    return x


@op("cast", OpGroup.UNARY, ("x",), (AttrDef("dtype", DType),))
def _cast(x: TensorType, dtype: DType):
    """Convert element type."""
    return x.with_dtype(dtype)


# ---------------------------------------------------------------- weight storage (load-time `derive` ops)


@op("quantize", OpGroup.UNARY, ("x",), (AttrDef("bits", int), AttrDef("group_size", int)))
def _quantize(x: TensorType, bits: int, group_size: int):
    """Affine group quantization of a weight (MLX's `quantize`): codes, scales and biases per group of a row."""
    out = x.with_quant(Quant(bits, group_size))
    _check_groups(out)
    return out


@op("dequantize", OpGroup.UNARY, ("x",), quantized=("x",))
def _dequantize(x: TensorType):
    """Back to float (the tensor's dtype), once, at load."""
    require(x.quant is not None and not x.quant.packed, f"dequantize expects a quantized tensor (not packed), got {x}")
    return x.with_quant(None)


@op("pack", OpGroup.UNARY, ("x",), quantized=("x",))
def _pack(x: TensorType):
    """A 4- or 8-bit weight [out, in] in the native CPU kernels' layout, 16 rows side by side (codes, scales and
    biases moved, not recomputed: exact), once, at load: what `linear` and `embed` with `kernel = native` read
    fastest, and one copy serves a tied embedding and LM head."""
    q = x.quant
    require(q is not None and not q.packed and x.rank == 2, f"pack expects an unpacked quantized matrix, got {x}")
    require(q.bits in (4, 8), f"only 4- and 8-bit weights pack, got {q.bits}-bit")
    require(q.scale_dtype(x.dtype) in (DType.F32, DType.F16),
            f"packed scales are float32 or float16, got {q.scale_dtype(x.dtype).value}")
    return x.with_quant(q.with_layout(packed=True))


# ---------------------------------------------------------------- position and attention


@op(
    "rope",
    OpGroup.POSITION,
    ("x", "offset"),
    (
        AttrDef("dims", int),
        AttrDef("base", float),
        AttrDef("scaling", RopeScaling, RopeScaling()),
        AttrDef("traditional", bool, False),
        KERNEL,
    ),
)
def _rope(x: TensorType, offset: TensorType, dims: int, base: float, scaling: RopeScaling, traditional: bool,
          kernel: Kernel):
    """Rotary embedding of x [B, heads, T, head_dim] at positions offset, offset + 1, ..., on the first `dims`
    features. The offset (a scalar: where this call's tokens start) is an explicit input."""
    require(x.rank == 4, f"rope expects [B, heads, T, head_dim], got {x}")
    require(offset.rank == 0 and not offset.dtype.is_float, f"rope offset must be an integer scalar, got {offset}")
    require(0 < dims <= x.shape[-1] and dims % 2 == 0, f"rope dims {dims} invalid for head_dim {x.shape[-1]}")
    if scaling.kind == RopeKind.LONGROPE:  # one divisor per rotary frequency, for both context lengths
        for name in ("short_factor", "long_factor"):
            factors = getattr(scaling, name)
            require(factors is not None and len(factors) == dims // 2,
                    f"longrope {name} needs {dims // 2} entries (one per frequency of {dims} rotated features), "
                    f"got {0 if factors is None else len(factors)}")
    return x


@op("learned_positions", OpGroup.POSITION, ("ids", "table", "offset"))
def _learned_positions(ids: TensorType, table: TensorType, offset: TensorType):
    """Learned absolute positions: rows offset .. offset + T - 1 of `table` [max_positions, hidden] for a call's
    ids [B, T], as [T, hidden] (added to the token embeddings, broadcasting over the batch). A position past the
    table is an error at run time, not a silent wrap."""
    require(ids.rank == 2 and not ids.dtype.is_float, f"ids must be integers [B, T], got {ids}")
    require(table.rank == 2 and table.quant is None, f"table must be a float [max_positions, hidden], got {table}")
    require(offset.rank == 0 and not offset.dtype.is_float, f"offset must be an integer scalar, got {offset}")
    return TensorType(table.dtype, (ids.shape[1], table.shape[1]))


@op("keep_last", OpGroup.SHAPE, ("x", "n"))
def _keep_last(x: TensorType, n: TensorType):
    """The last n positions of x [B, T, ...] (all T when n is 0): what a language-model head needs when only the
    next token's logits are wanted, as in generation's prompt step (transformers' `logits_to_keep`). The kept length
    is a run-time value, so it gets its own symbol, L."""
    require(x.rank >= 2, f"x must be [B, T, ...], got {x}")
    require(n.rank == 0 and not n.dtype.is_float, f"n must be an integer scalar, got {n}")
    return x.with_shape((x.shape[0], "L") + x.shape[2:])


@op("sinusoidal_positions", OpGroup.POSITION, ("ids", "offset"),
    (AttrDef("dims", int), AttrDef("dtype", DType), AttrDef("base", float, 10000.0)))
def _sinusoidal_positions(ids: TensorType, offset: TensorType, dims: int, dtype: DType, base: float):
    """The fixed sinusoidal positions of "Attention Is All You Need" for positions p = offset .. offset + T - 1 of
    ids [B, T], as [T, dims] in `dtype`: feature 2i is sin(p / base^(2i / dims)) and 2i + 1 its cos, computed in
    float32."""
    require(ids.rank == 2 and not ids.dtype.is_float, f"ids must be integers [B, T], got {ids}")
    require(offset.rank == 0 and not offset.dtype.is_float, f"offset must be an integer scalar, got {offset}")
    require(dims > 0 and dims % 2 == 0, f"sinusoidal positions need an even, positive width, got {dims}")
    require(dtype.is_float and base > 0, f"sinusoidal positions need a float dtype and a positive base")
    return TensorType(dtype, (ids.shape[1], dims))


@op(
    "attention",
    OpGroup.ATTENTION,
    ("q", "k", "v"),
    (AttrDef("scale", float), AttrDef("window", int, None, optional=True),
     AttrDef("softcap", float, None, optional=True), KERNEL, AttrDef("alibi", Floats, None, optional=True)),
    state=lambda attrs, *types: (State(StateKind.KV, attrs["window"]),),
)
def _attention(q: TensorType, k: TensorType, v: TensorType, scale: float, window: int | None,
               softcap: float | None, kernel: Kernel, alibi: Floats | None):
    """Causal softmax attention of q [B, Hq, T, D] over the keys and values its KV state holds followed by k, v
    [B, Hkv, T, D], which it then appends to that state.

    `window` limits each query to the last `window` positions (itself included), as sliding-window models do;
    `softcap` squashes the scaled scores with cap * tanh(s / cap) before the softmax (Gemma 2). `alibi` holds one
    slope per query head: the scaled scores get slope * (key position - query position) added, ALiBi's linear
    penalty by distance (BLOOM, MPT); the softmax ignores a per-query constant, so this is also their bias measured
    from the first key (BLOOM) or from the last (MPT), and it needs no positions but the keys' order in the cache.
    """
    require(softcap is None or softcap > 0, f"softcap must be positive, got {softcap}")
    require(q.rank == k.rank == v.rank == 4, "attention expects [B, heads, T, head_dim] operands")
    require(k.shape == v.shape[:3] + (k.shape[3],), f"k {k} and v {v} disagree")
    require(q.shape[3] == k.shape[3], f"q {q} and k {k} head dims differ")
    hq, hkv = q.shape[1], k.shape[1]
    if isinstance(hq, int) and isinstance(hkv, int):
        require(hq % hkv == 0, f"{hq} query heads are not a multiple of {hkv} kv heads")
    require(window is None or window > 0, f"window must be positive, got {window}")
    require(alibi is None or not isinstance(hq, int) or len(alibi) == hq,
            f"alibi needs one slope per query head ({hq}), got {0 if alibi is None else len(alibi)}")
    return q.with_shape(q.shape[:3] + (v.shape[3],))


# ---------------------------------------------------------------- fused ops (made by passes/fuse.py)
# Each equals a short sequence of the ops above, written once as its reference fragment in codegen/mlx_ops.py; they
# exist so that a target with a kernel for the whole sequence (the native CPU kernels) runs one op instead of many.


@op("glu", OpGroup.FUSED, ("x",), (AttrDef("activation", str), KERNEL))
def _glu(x: TensorType, activation: str, kernel: Kernel):
    """A gated linear unit over the last axis: act(x[..., :n]) * x[..., n:] for x [..., 2n], the gated MLP after
    fuse-gate-up (SwiGLU with silu, GeGLU with gelu_tanh)."""
    require(activation in ACTIVATIONS, f"glu activation must be one of {', '.join(ACTIVATIONS)}, got {activation!r}")
    require(x.rank >= 1 and isinstance(x.shape[-1], int) and x.shape[-1] % 2 == 0,
            f"glu needs an even, static last axis, got {x}")
    return x.with_shape(x.shape[:-1] + (x.shape[-1] // 2,))


@op(
    "qkv_attention",
    OpGroup.FUSED,
    ("qkv", "offset"),
    (AttrDef("heads", int), AttrDef("kv_heads", int), AttrDef("head_dim", int), AttrDef("scale", float),
     AttrDef("window", int, None, optional=True), AttrDef("softcap", float, None, optional=True),
     AttrDef("dims", int), AttrDef("base", float), AttrDef("scaling", RopeScaling, RopeScaling()),
     AttrDef("traditional", bool, False), KERNEL),
    state=lambda attrs, *types: (State(StateKind.KV, attrs["window"]),),
)
def _qkv_attention(qkv: TensorType, offset: TensorType, heads: int, kv_heads: int, head_dim: int, scale: float,
                   window: int | None, softcap: float | None, dims: int, base: float, scaling: RopeScaling,
                   traditional: bool, kernel: Kernel):
    """Self-attention from a fused QKV projection's output qkv [B, T, (heads + 2 kv_heads) head_dim]: the query,
    key and value heads split off (in that order), queries and keys rotated as `rope` with these attributes does at
    `offset`, `attention` with `scale`, `window` and `softcap` over the KV state, and the heads merged back into
    [B, T, heads head_dim]. One op for the dozen a decode step otherwise runs between two projections."""
    require(qkv.rank == 3, f"qkv_attention expects [B, T, features], got {qkv}")
    require(offset.rank == 0 and not offset.dtype.is_float, f"qkv_attention offset must be an integer scalar, got {offset}")
    require(heads > 0 and kv_heads > 0 and heads % kv_heads == 0,
            f"{heads} query heads are not a positive multiple of {kv_heads} kv heads")
    require(qkv.shape[2] == (heads + 2 * kv_heads) * head_dim,
            f"qkv {qkv} does not hold {heads} query and 2 x {kv_heads} key/value heads of {head_dim}")
    require(0 < dims <= head_dim and dims % 2 == 0, f"rope dims {dims} invalid for head_dim {head_dim}")
    require(scaling.kind not in (RopeKind.LONGROPE,), "qkv_attention does not take LongRoPE (its rope op does)")
    require(window is None or window > 0, f"window must be positive, got {window}")
    require(softcap is None or softcap > 0, f"softcap must be positive, got {softcap}")
    return qkv.with_shape(qkv.shape[:2] + (heads * head_dim,))


# ---------------------------------------------------------------- state-space and recurrent building blocks


@op("causal_conv1d", OpGroup.MATMUL, ("x", "weight", "bias?"),
    state=lambda attrs, *types: (State(StateKind.CONV),))
def _causal_conv1d(x: TensorType, weight: TensorType, bias: TensorType | None = None):
    """Depthwise causal convolution over time: out[t, c] = sum_k weight[c, 0, k] * x[t - K + 1 + k, c] + bias[c],
    x [B, T, C], weight [C, 1, K] (a depthwise Conv1d's layout). Its state holds the last K - 1 inputs, so a call
    continues where the previous one stopped (zeros before the first)."""
    require(x.rank == 3, f"causal_conv1d expects x [B, T, C], got {x}")
    require(weight.rank == 3 and weight.shape[0] == x.shape[2] and weight.shape[1] == 1,
            f"causal_conv1d weight must be [{x.shape[2]}, 1, K], got {weight}")
    require(x.dtype == weight.dtype, f"dtype mismatch: input {x.dtype.value}, weight {weight.dtype.value}")
    if bias is not None:
        require(bias.shape == (x.shape[2],), f"bias {bias} does not match {x.shape[2]} channels")
    return x


def _recurrent_state(attrs, *types):
    return (State(StateKind.RECURRENT),)


def _cell(name: str, gates: TensorType, weight: TensorType, bias: TensorType | None, n: int) -> TensorType:
    """The shared type rule of LSTM and GRU: gates [B, T, n*H] from the input, weight_hh [n*H, H], bias_hh [n*H]."""
    require(gates.rank == 3, f"{name} expects the input's gates [B, T, {n}*H], got {gates}")
    require(weight.rank == 2 and isinstance(weight.shape[1], int) and weight.shape[0] == n * weight.shape[1],
            f"{name} weight_hh must be [{n}*H, H], got {weight}")
    require(gates.shape[2] == weight.shape[0], f"{name} gates {gates} do not match weight_hh {weight}")
    require(gates.dtype == weight.dtype, f"dtype mismatch: gates {gates.dtype.value}, weight {weight.dtype.value}")
    if bias is not None:
        require(bias.shape == (weight.shape[0],), f"{name} bias_hh {bias} does not match weight_hh {weight}")
    return gates.with_shape(gates.shape[:2] + (weight.shape[1],))


@op("lstm", OpGroup.SCAN, ("gates", "weight_hh", "bias_hh?"), state=_recurrent_state)
def _lstm(gates: TensorType, weight_hh: TensorType, bias_hh: TensorType | None = None):
    """An LSTM layer's recurrence, torch's equations and gate order (i, f, g, o): gates = x @ weight_ih.T + bias_ih
    [B, T, 4H] is the input's share, computed for every step at once by a `linear` (so it can be fused, quantized
    or adapted); each step adds h @ weight_hh.T + bias_hh. Returns every step's h [B, T, H]; its state keeps the
    last (h, c), so a call continues where the previous one stopped (zeros before the first)."""
    return _cell("lstm", gates, weight_hh, bias_hh, 4)


@op("gru", OpGroup.SCAN, ("gates", "weight_hh", "bias_hh?"), state=_recurrent_state)
def _gru(gates: TensorType, weight_hh: TensorType, bias_hh: TensorType | None = None):
    """A GRU layer's recurrence, torch's equations and gate order (r, z, n): gates = x @ weight_ih.T + bias_ih
    [B, T, 3H]; n = tanh(gates_n + r * (h @ W_hn.T + b_hn)), h' = (1 - z) * n + z * h. Returns every step's h
    [B, T, H]; its state keeps the last h."""
    return _cell("gru", gates, weight_hh, bias_hh, 3)


@op("mingru", OpGroup.SCAN, ("gate", "candidate"), state=_recurrent_state)
def _mingru(gate: TensorType, candidate: TensorType):
    """minGRU ("Were RNNs All We Needed?", Feng et al. 2024): z = sigmoid(gate), h~ = g(candidate) with g(x) = x + 0.5
    for x >= 0 and sigmoid(x) below, h_t = (1 - z) * h_{t-1} + z * h~, all [B, T, H]. The gates read only the input,
    so a prefill is a parallel scan (the paper's log-space one) and a decode step the sequential form; the state
    keeps the last h."""
    require(gate.rank == 3, f"mingru expects [B, T, H] operands, got {gate}")
    require(gate == candidate, f"mingru gate {gate} and candidate {candidate} disagree")
    return gate


@op("rms_norm_gated", OpGroup.NORM, ("x", "gate", "weight"), (AttrDef("eps", float), AttrDef("groups", int, 1)))
def _rms_norm_gated(x: TensorType, gate: TensorType, weight: TensorType, eps: float, groups: int):
    """Mamba-2's gated RMSNorm (transformers' MambaRMSNormGated): in float32, h = x * silu(gate), normalized over
    each of `groups` equal slices of the last axis, rounded to x's dtype, times weight."""
    require(x.rank >= 1 and gate == x, f"rms_norm_gated expects x and gate of one type, got {x} and {gate}")
    require(weight.shape == (x.shape[-1],), f"weight {weight} does not match features {x.shape[-1]}")
    c = x.shape[-1]
    require(groups > 0 and (not isinstance(c, int) or c % groups == 0),
            f"{c} features do not split into {groups} groups")
    return x


@op("ssd", OpGroup.SCAN, ("x", "dt", "A", "B", "C", "D", "dt_bias?"),
    (AttrDef("chunk_size", int), AttrDef("dt_min", float, 0.0), AttrDef("dt_max", float, None, optional=True),
     KERNEL),
    state=lambda attrs, *types: (State(StateKind.SSM),))
def _ssd(x: TensorType, dt: TensorType, A: TensorType, B: TensorType, C: TensorType, D: TensorType,
         dt_bias: TensorType | None = None, *, chunk_size: int, dt_min: float, dt_max: float | None,
         kernel: Kernel):
    """Mamba-2's state-space duality scan, per head h with a scalar A[h] and its group g of B and C (heads share
    them, H / G per group), every intermediate in float32:

        dt_t = softplus(dt_t + dt_bias),  S_t = exp(A dt_t) S_{t-1} + dt_t x_t B_t^T,  y_t = S_t C_t + D x_t

    x [B, T, H, P], dt [B, T, H], A, D, dt_bias [H], B, C [B, T, G, N]; y is x's type. Its SSM state keeps S
    [B, H, P, N], so a call continues where the previous one stopped. A prefill runs in chunks of `chunk_size`
    (quadratic inside a chunk, recurrent across) with dt clamped to [dt_min, dt_max]; one token after a state
    steps the recurrence without the clamp, as transformers does."""
    require(x.rank == 4 and dt.rank == 3 and B.rank == 4 and C.rank == 4,
            f"ssd expects x [B, T, H, P], dt [B, T, H], B and C [B, T, G, N]; got {x}, {dt}, {B}, {C}")
    h, g = x.shape[2], B.shape[2]
    require(dt.shape == x.shape[:3], f"dt {dt} does not match x {x}")
    require(B == C and B.shape[:2] == x.shape[:2], f"B {B} and C {C} must match each other and x {x}")
    require(x.dtype == dt.dtype == B.dtype, f"x, dt, B and C must share a dtype, got {x}, {dt}, {B}")
    for name, t in (("A", A), ("D", D), ("dt_bias", dt_bias)):
        if t is not None:
            require(t.shape == (h,) and t.dtype.is_float, f"{name} must be a float [{h}] (one per head), got {t}")
    if isinstance(h, int) and isinstance(g, int):
        require(g > 0 and h % g == 0, f"{h} heads do not split into {g} groups of B and C")
    require(chunk_size > 0, f"chunk_size must be positive, got {chunk_size}")
    require(dt_min >= 0 and (dt_max is None or dt_max > dt_min), f"bad dt limit [{dt_min}, {dt_max}]")
    return x


@op("selective_scan", OpGroup.SCAN, ("u", "delta", "A", "B", "C", "D", "dt_bias", "z?"), (KERNEL,),
    state=lambda attrs, *types: (State(StateKind.SSM),))
def _selective_scan(u: TensorType, delta: TensorType, A: TensorType, B: TensorType, C: TensorType, D: TensorType,
                    dt_bias: TensorType, z: TensorType | None = None, *, kernel: Kernel):
    """Mamba's selective scan, per channel d and state n, every intermediate in float32:

        dt_t = softplus(delta_t + dt_bias),  h_t = exp(dt_t A) h_{t-1} + dt_t u_t B_t,  y_t = h_t . C_t + D u_t

    then y * silu(z) when z is given. u, delta, z [B, T, Dm]; A (negative) [Dm, N]; B, C [B, T, N]; D, dt_bias
    [Dm]; y is u's type. Its SSM state keeps h [B, Dm, N], so a call continues where the previous one stopped
    (zeros before the first): a prefill runs chunked, one token a single step."""
    require(u.rank == 3 and A.rank == 2, f"selective_scan expects u [B, T, Dm] and A [Dm, N], got {u} and {A}")
    dm, n = u.shape[2], A.shape[1]
    require(delta == u and (z is None or z == u), f"delta {delta} and z {z} must match u {u}")
    require(A.shape[0] == dm and A.dtype.is_float, f"A must be a float [{dm}, N], got {A}")
    for name, t in (("B", B), ("C", C)):
        require(t.rank == 3 and t.shape == u.shape[:2] + (n,) and t.dtype == u.dtype,
                f"{name} must be {u.dtype.value}[{u.shape[0]}, {u.shape[1]}, {n}] (A has {n} states), got {t}")
    for name, t in (("D", D), ("dt_bias", dt_bias)):
        require(t.shape == (dm,) and t.dtype.is_float, f"{name} must be a float [{dm}] (one per channel), got {t}")
    return u


# ---------------------------------------------------------------- mixtures of experts and task heads


@op("moe", OpGroup.MATMUL, ("x", "router_logits", "gate", "up", "down"),
    (AttrDef("top_k", int), AttrDef("normalize", bool, False), AttrDef("activation", str, "silu"),
     AttrDef("weights_in_float32", bool, False), AttrDef("first_expert", int, None, optional=True)),
    quantized=("gate", "up", "down"))
def _moe(x: TensorType, router_logits: TensorType, gate: TensorType, up: TensorType, down: TensorType, top_k: int,
         normalize: bool, activation: str, weights_in_float32: bool, first_expert: int | None):
    """A mixture of gated experts: each token goes to its `top_k` experts by softmax(router_logits) (computed in
    float32; renormalized over the chosen ones when `normalize`), and their outputs `down(act(gate x) * up x)`
    are summed with those weights. gate/up are [E, I, H], down [E, H, I], each may be quantized. Only chosen
    experts run. The weights scale the outputs in float32 when `weights_in_float32` (Mixtral), else in the
    compute dtype (Qwen-MoE, OLMoE). With `first_expert` (expert parallelism) the weights hold experts
    first_expert .. first_expert + E - 1 of the router's: tokens are routed over all of them, only these run, and
    the other ranks' shares add up to the whole mixture."""
    require(activation in ACTIVATIONS, f"unknown activation {activation!r}; expected one of {list(ACTIVATIONS)}")
    require(gate.rank == up.rank == down.rank == 3, "expert weights must be [experts, out, in]")
    for w in (gate, up, down):
        _check_groups(w)
        require(w.quant is None or w.quant.mlx_matmul,
                f"{w}: experts run MLX's quantized matmul, which has no groups of {w.quant and w.quant.group_size}")
    e, i, h = gate.shape
    require(up.shape == gate.shape, f"up {up} and gate {gate} disagree")
    require(down.shape == (e, h, i), f"down {down} does not match gate {gate}")
    require(x.shape[-1] == h, f"input features {x.shape[-1]} do not match experts {gate}")
    routed = e if first_expert is None else router_logits.shape[-1]
    require(router_logits.shape == x.shape[:-1] + (routed,), f"router logits {router_logits} do not match {e} experts")
    require(first_expert is None or (isinstance(routed, int) and 0 <= first_expert and first_expert + e <= routed),
            f"experts {first_expert}..{(first_expert or 0) + e - 1} are not among the router's {routed}")
    require(0 < top_k <= routed, f"top_k {top_k} must be in 1..{routed}")
    require(x.dtype == gate.dtype == up.dtype == down.dtype, "expert weights and input must share a dtype")
    return x


POOLING = ("last", "first", "mean")


@op("pool", OpGroup.DATA, ("x", "ids"),
    (AttrDef("mode", str, "last"), AttrDef("pad_token_id", int, None, optional=True)))
def _pool(x: TensorType, ids: TensorType, mode: str, pad_token_id: int | None):
    """One vector per sequence from x [B, T, C]: the last (or first) non-padding position, or the mean over the
    non-padding positions; padding is `ids == pad_token_id` (none when it is unset)."""
    require(mode in POOLING, f"unknown pooling {mode!r}; expected one of {list(POOLING)}")
    require(x.rank == 3 and ids.rank == 2 and x.shape[:2] == ids.shape, f"pool expects x [B, T, C] and ids [B, T], "
                                                                          f"got {x} and {ids}")
    require(not ids.dtype.is_float, f"ids must be integers, got {ids.dtype.value}")
    return x.with_shape((x.shape[0], x.shape[2]))


# ---------------------------------------------------------------- calls


@op("call", OpGroup.CALL, ("*args",), (AttrDef("callee", Symbol), AttrDef("prefix", str, "")), needs_program=True,
    effects=True)
def _call(*args: TensorType, callee: Symbol, prefix: str, program):
    """Run another function; its parameters are this program's parameters named `prefix.` + the callee's name."""
    fn = program.get(callee) if program is not None else None
    require(fn is not None, f"call to unknown function @{callee}")
    want = [v.type for v in fn.inputs]
    require(len(args) == len(want), f"@{callee} takes {len(want)} inputs, got {len(args)}")
    for i, (got, exp) in enumerate(zip(args, want)):
        require(got == exp, f"input {i} of @{callee} is {exp}, got {got}")
    return [v.type for v in fn.outputs]


# ---------------------------------------------------------------- tensor and pipeline parallelism (passes/shard.py)


@op("slice", OpGroup.SHAPE, ("x",), (AttrDef("axis", int), AttrDef("start", int), AttrDef("stop", int)),
    quantized=("x",))
def _slice_rule(x: TensorType, axis: int, start: int, stop: int):
    """Entries start .. stop - 1 along a static axis: a rank's share of a weight, at load time, so the loader reads
    only those rows or columns of the checkpoint tensor. A quantized weight splits by rows, or by columns on group
    boundaries."""
    ax = _axis(axis, x.rank)
    n = x.shape[ax]
    require(isinstance(n, int) and 0 <= start < stop <= n, f"slice [{start}:{stop}] is out of range for dim {ax} of {x}")
    q = x.quant
    if q is not None:
        require(not q.packed, f"{x}: packed weights cannot be sliced; slice, then pack")
        require(ax < x.rank - 1 or (start % q.group_size == 0 and stop % q.group_size == 0),
                f"columns [{start}:{stop}] of {x} cut through its quantization groups of {q.group_size}")
    return x.with_shape(x.shape[:ax] + (stop - start,) + x.shape[ax + 1:])


@op("embed_range", OpGroup.DATA, ("ids", "table"), (AttrDef("first", int),), quantized=("table",))
def _embed_range_rule(ids: TensorType, table: TensorType, first: int):
    """A vocabulary-parallel lookup: `table` holds rows first .. first + n - 1 of the embeddings; those ids get their
    row and the others zeros, so an `all_sum` over the ranks' shares gives `embed` exactly."""
    require(not ids.dtype.is_float, f"ids must be integers, got {ids.dtype.value}")
    require(table.rank == 2, f"table must be [rows, hidden], got {table}")
    require(first >= 0, f"first row must be >= 0, got {first}")
    _check_groups(table)
    return TensorType(table.dtype, ids.shape + (table.shape[1],))


@op("all_sum", OpGroup.COLLECTIVE, ("x",), effects=True)
def _all_sum_rule(x: TensorType):
    """The elementwise sum of x over all ranks, on every rank (the partial products of a row-parallel matmul)."""
    require(x.quant is None, f"all_sum takes a float or integer tensor, got {x}")
    return x


@op("all_gather", OpGroup.COLLECTIVE, ("x",), (AttrDef("sizes", Ints), AttrDef("axis", int, -1)), effects=True)
def _all_gather_rule(x: TensorType, sizes: Ints, axis: int):
    """Every rank's x joined along `axis` in rank order, on every rank; rank i holds `sizes[i]` entries of that axis
    (uneven shares are padded to the largest for the transfer)."""
    ax = _axis(axis, x.rank)
    require(len(sizes) > 0 and all(s > 0 for s in sizes), f"sizes must be positive, got {list(sizes)}")
    require(x.shape[ax] in sizes, f"{x}: dim {ax} is none of the ranks' sizes {list(sizes)}")
    return x.with_shape(x.shape[:ax] + (sum(sizes),) + x.shape[ax + 1:])


@op("broadcast", OpGroup.COLLECTIVE, ("x",), (AttrDef("root", int),), effects=True)
def _broadcast_rule(x: TensorType, root: int):
    """Rank `root`'s x, on every rank; each rank passes a tensor of the same type (a pipeline's last hidden state)."""
    require(root >= 0, f"root must be a rank, got {root}")
    return x


@op("send", OpGroup.COLLECTIVE, ("x",), (AttrDef("dst", int),), effects=True)
def _send_rule(x: TensorType, dst: int):
    """Send x to rank `dst` and return it: computing the result makes the transfer. MLX's ring backend sends only
    to a neighbour (rank +- 1 mod the group size)."""
    require(dst >= 0, f"dst must be a rank, got {dst}")
    return x


@op("recv", OpGroup.COLLECTIVE, ("ref",), (AttrDef("src", int), AttrDef("shape", Shape), AttrDef("dtype", DType)),
    effects=True)
def _recv_rule(ref: TensorType, src: int, shape: Shape, dtype: DType):
    """A tensor of `shape` and `dtype` sent by rank `src`; its symbolic dims are read from `ref` (the call's ids, for
    the batch and sequence)."""
    require(src >= 0, f"src must be a rank, got {src}")
    missing = [d for d in shape if isinstance(d, str) and d not in ref.shape]
    require(not missing, f"recv shape dim {missing[0] if missing else ''} is not a dim of {ref}")
    return TensorType(dtype, tuple(shape))
