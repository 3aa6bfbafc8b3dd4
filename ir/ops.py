"""The op vocabulary. Each op is declared once: operands, attributes and its type rule.

Attention and rotary embedding stay composite ops: kernel selection decides later how they run. Attention keeps a
KV state per call (declared with `state=`, see `ir/state.py`), and rope takes the position offset as an explicit
input, which is how one function body serves every layer and both prefill and decode.
"""

from __future__ import annotations

from math import prod

from .attrs import RopeKind, RopeScaling
from .opdef import AttrDef, Ints, OpGroup, Shape, Symbol, op, require
from .state import State, StateKind
from .types import DType, Quant, TensorType

# ---------------------------------------------------------------- data and matmul


@op("embed", OpGroup.DATA, ("ids", "table"), quantized=("table",))
def _embed(ids: TensorType, table: TensorType):
    """Row lookup: `table[ids]`."""
    require(not ids.dtype.is_float, f"ids must be integers, got {ids.dtype.value}")
    require(table.rank == 2, f"table must be [vocab, hidden], got {table}")
    _check_groups(table)
    return TensorType(table.dtype, ids.shape + (table.shape[1],))


def _check_groups(w: TensorType) -> None:
    q = w.quant
    if q is not None:
        require(q.bits in Quant.BITS, f"{q.bits}-bit quantization is not supported")
        require(q.group_size in Quant.GROUP_SIZES,
                f"group size {q.group_size} is not supported (MLX quantizes in groups of "
                f"{', '.join(map(str, Quant.GROUP_SIZES))})")
        require(w.shape[-1] % q.group_size == 0, f"{w}: last dim is not a multiple of the group size {q.group_size}")


@op("linear", OpGroup.MATMUL, ("x", "weight", "bias?"), quantized=("weight",))
def _linear(x: TensorType, weight: TensorType, bias: TensorType | None = None):
    """`x @ weight.T + bias`, weight laid out [out_features, in_features] as checkpoints store it."""
    require(weight.rank == 2, f"weight must be [out, in], got {weight}")
    require(x.rank >= 1, f"input must have a feature axis, got {x}")
    require(x.shape[-1] == weight.shape[1], f"input features {x.shape[-1]} do not match weight {weight}")
    require(x.dtype == weight.dtype, f"dtype mismatch: input {x.dtype.value}, weight {weight.dtype.value}")
    _check_groups(weight)
    if bias is not None:
        require(bias.shape == (weight.shape[0],), f"bias {bias} does not match weight {weight}")
    return x.with_shape(x.shape[:-1] + (weight.shape[0],))


# ---------------------------------------------------------------- normalization


@op("rms_norm", OpGroup.NORM, ("x", "weight"), (AttrDef("eps", float),))
def _rms_norm(x: TensorType, weight: TensorType, eps: float):
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
    """Back to float (scales' dtype), once, at load."""
    require(x.quant is not None, f"dequantize expects a quantized tensor, got {x}")
    return x.with_quant(None)


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
    ),
)
def _rope(x: TensorType, offset: TensorType, dims: int, base: float, scaling: RopeScaling, traditional: bool):
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


@op(
    "attention",
    OpGroup.ATTENTION,
    ("q", "k", "v"),
    (AttrDef("scale", float), AttrDef("window", int, None, optional=True),
     AttrDef("softcap", float, None, optional=True)),
    state=lambda attrs, *types: (State(StateKind.KV, attrs["window"]),),
)
def _attention(q: TensorType, k: TensorType, v: TensorType, scale: float, window: int | None,
               softcap: float | None):
    """Causal softmax attention of q [B, Hq, T, D] over the keys and values its KV state holds followed by k, v
    [B, Hkv, T, D], which it then appends to that state.

    `window` limits each query to the last `window` positions (itself included), as sliding-window models do;
    `softcap` squashes the scaled scores with cap * tanh(s / cap) before the softmax (Gemma 2).
    """
    require(softcap is None or softcap > 0, f"softcap must be positive, got {softcap}")
    require(q.rank == k.rank == v.rank == 4, "attention expects [B, heads, T, head_dim] operands")
    require(k.shape == v.shape[:3] + (k.shape[3],), f"k {k} and v {v} disagree")
    require(q.shape[3] == k.shape[3], f"q {q} and k {k} head dims differ")
    hq, hkv = q.shape[1], k.shape[1]
    if isinstance(hq, int) and isinstance(hkv, int):
        require(hq % hkv == 0, f"{hq} query heads are not a multiple of {hkv} kv heads")
    require(window is None or window > 0, f"window must be positive, got {window}")
    return q.with_shape(q.shape[:3] + (v.shape[3],))


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
    (AttrDef("chunk_size", int), AttrDef("dt_min", float, 0.0), AttrDef("dt_max", float, None, optional=True)),
    state=lambda attrs, *types: (State(StateKind.SSM),))
def _ssd(x: TensorType, dt: TensorType, A: TensorType, B: TensorType, C: TensorType, D: TensorType,
         dt_bias: TensorType | None = None, *, chunk_size: int, dt_min: float, dt_max: float | None):
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


# ---------------------------------------------------------------- mixtures of experts and task heads


@op("moe", OpGroup.MATMUL, ("x", "router_logits", "gate", "up", "down"),
    (AttrDef("top_k", int), AttrDef("normalize", bool, False), AttrDef("activation", str, "silu"),
     AttrDef("weights_in_float32", bool, False)),
    quantized=("gate", "up", "down"))
def _moe(x: TensorType, router_logits: TensorType, gate: TensorType, up: TensorType, down: TensorType, top_k: int,
         normalize: bool, activation: str, weights_in_float32: bool):
    """A mixture of gated experts: each token goes to its `top_k` experts by softmax(router_logits) (computed in
    float32; renormalized over the chosen ones when `normalize`), and their outputs `down(act(gate x) * up x)`
    are summed with those weights. gate/up are [E, I, H], down [E, H, I], each may be quantized. Only chosen
    experts run. The weights scale the outputs in float32 when `weights_in_float32` (Mixtral), else in the
    compute dtype (Qwen-MoE, OLMoE)."""
    require(activation in ACTIVATIONS, f"unknown activation {activation!r}; expected one of {list(ACTIVATIONS)}")
    require(gate.rank == up.rank == down.rank == 3, "expert weights must be [experts, out, in]")
    for w in (gate, up, down):
        _check_groups(w)
    e, i, h = gate.shape
    require(up.shape == gate.shape, f"up {up} and gate {gate} disagree")
    require(down.shape == (e, h, i), f"down {down} does not match gate {gate}")
    require(x.shape[-1] == h, f"input features {x.shape[-1]} do not match experts {gate}")
    require(router_logits.shape == x.shape[:-1] + (e,), f"router logits {router_logits} do not match {e} experts")
    require(0 < top_k <= e, f"top_k {top_k} must be in 1..{e}")
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
