"""Property-based tests of the IR: random valid programs round-trip through text and JSON, and broken ones fail.

Programs are built with FunctionBuilder from random chains of ops over random symbolic and static dims, with random
attribute values (floats such as 1e-05, negative axes, rope scaling structs with random fields).
"""

from __future__ import annotations

import copy
from dataclasses import dataclass, field

import pytest
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st

from mlxc.ir import (
    DType,
    FunctionBuilder,
    Program,
    RopeKind,
    RopeScaling,
    TensorType,
    Value,
    VerifyError,
    from_json,
    parse_program,
    print_program,
    to_json,
    verify,
)

SETTINGS = settings(
    max_examples=60,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.filter_too_much, HealthCheck.data_too_large],
)

FLOAT_DTYPES = [DType.F32, DType.F16, DType.BF16]
SYMBOLS = ["B", "T", "S", "N", "batch", "seq_len", "L_1", "info"]
STATIC = [1, 2, 3, 4, 6, 8, 12, 16]
FEATURES = [4, 8, 12, 16, 32]
NAME_HINTS = [None, None, None, "h", "x", "q", "attn.out", "mlp_up", "0", "layers.0.y"]

nice_floats = st.sampled_from([1e-05, 1e-06, 0.1, 1.0, 0.5, 2.0, 10000.0, 500000.0, 1e-12, 0.3535533905932738, 1e16])
floats = st.one_of(
    nice_floats,
    st.floats(allow_nan=False, allow_infinity=False, width=64),
    st.floats(min_value=1e-9, max_value=1e7),
)
optional_floats = st.one_of(st.none(), floats)


def rope_scalings(dims: int):
    """RopeScalings for `dims` rotated features: longrope carries one short and one long factor per frequency."""
    factors = st.lists(floats, min_size=dims // 2, max_size=dims // 2)
    return st.sampled_from(list(RopeKind)).flatmap(lambda kind: _rope_scalings(
        kind, factors if kind == RopeKind.LONGROPE else st.none()))


def _rope_scalings(kind, factors):
    return st.builds(
        RopeScaling,
        kind=st.just(kind),
        short_factor=factors,
        long_factor=factors,
        factor=st.one_of(st.just(1.0), floats),
        low_freq_factor=st.one_of(st.just(1.0), floats),
        high_freq_factor=st.one_of(st.just(4.0), floats),
        original_max_position_embeddings=st.one_of(st.just(0), st.integers(0, 1 << 20)),
        beta_fast=st.one_of(st.just(32.0), floats),
        beta_slow=st.one_of(st.just(1.0), floats),
        attention_factor=optional_floats,
        mscale=optional_floats,
        mscale_all_dim=optional_floats,
        truncate=st.booleans(),
    )


@dataclass
class _Gen:
    """State of one random function under construction."""

    draw: object
    b: FunctionBuilder
    pool: list[Value] = field(default_factory=list)
    nparams: int = 0
    offset: Value | None = None  # the function's position offset input, once a rope needs it

    def pick(self) -> Value:
        return self.draw(st.sampled_from(self.pool))

    def name(self):
        return self.draw(st.sampled_from(NAME_HINTS))

    def param(self, shape, dtype) -> Value:
        self.nparams += 1
        return self.b.param(f"p{self.nparams}.weight", TensorType(dtype, tuple(shape)))

    def axis(self, ax: int, rank: int) -> int:
        """Write an axis as given or as its negative alias."""
        return self.draw(st.sampled_from([ax, ax - rank]))

    def add(self, out):
        self.pool.extend(out if isinstance(out, tuple) else [out])


def _static_last(x: Value) -> bool:
    return x.type.rank >= 1 and isinstance(x.type.shape[-1], int)


def _op_linear(g: _Gen):
    x = g.pick()
    if not _static_last(x):
        return
    out = g.draw(st.sampled_from(FEATURES))
    w = g.param((out, x.type.shape[-1]), x.type.dtype)
    bias = g.param((out,), x.type.dtype) if g.draw(st.booleans()) else None
    g.add(g.b.op("linear", x, w, bias, name=g.name()))


def _op_norm(g: _Gen):
    x = g.pick()
    if not _static_last(x):
        return
    eps = g.draw(floats)
    d = x.type.shape[-1]
    if g.draw(st.booleans()):
        g.add(g.b.op("rms_norm", x, g.param((d,), x.type.dtype), eps=eps, name=g.name()))
    else:
        n = g.draw(st.integers(0, 2))
        affine = [g.param((d,), x.type.dtype) for _ in range(n)]
        g.add(g.b.op("layer_norm", x, *affine, eps=eps, name=g.name()))


def _op_unary(g: _Gen):
    x = g.pick()
    g.add(g.b.op(g.draw(st.sampled_from(["silu", "gelu", "gelu_tanh", "relu"])), x, name=g.name()))


def _op_binary(g: _Gen):
    x = g.pick()
    same = [v for v in g.pool if v.type == x.type]
    choices = ["self", "pool"] + (["param"] if _static_last(x) else [])
    how = g.draw(st.sampled_from(choices))
    if how == "self":
        y = x
    elif how == "pool":
        y = g.draw(st.sampled_from(same))
    else:
        y = g.param((x.type.shape[-1],), x.type.dtype)
    a, b = (x, y) if g.draw(st.booleans()) else (y, x)
    g.add(g.b.op(g.draw(st.sampled_from(["add", "mul"])), a, b, name=g.name()))


def _op_reshape(g: _Gen):
    x = g.pick()
    s = x.type.shape
    options = []
    if _static_last(x):
        d = s[-1]
        options += [s[:-1] + (a, d // a) for a in range(2, d) if d % a == 0]
        options.append(s + (1,))
    if len(s) >= 2 and isinstance(s[-1], int) and isinstance(s[-2], int):
        options.append(s[:-2] + (s[-2] * s[-1],))
    if len(s) >= 2:
        options.append(tuple(reversed(s)))  # same elements: a reshape, not a transpose
    if not options:
        return
    shape = g.draw(st.sampled_from(options))
    g.add(g.b.op("reshape", x, shape=list(shape), name=g.name()))


def _op_heads(g: _Gen):
    """[b, t, H] -> [b, heads, t, H/heads]: the reshape and transpose every attention layer does."""
    ok = [v for v in g.pool if v.type.rank == 3 and isinstance(v.type.shape[-1], int)]
    if not ok:
        return
    x = g.draw(st.sampled_from(ok))
    s = x.type.shape
    heads = g.draw(st.sampled_from([h for h in (1, 2, 4) if s[-1] % h == 0 and (s[-1] // h) % 2 == 0] or [0]))
    if not heads:
        return
    r = g.b.op("reshape", x, shape=[s[0], s[1], heads, s[2] // heads], name=g.name())
    g.add(r)
    g.add(g.b.op("transpose", r, perm=[0, 2, 1, 3], name=g.name()))


def _op_transpose(g: _Gen):
    x = g.pick()
    perm = g.draw(st.permutations(list(range(x.type.rank))))
    g.add(g.b.op("transpose", x, perm=list(perm), name=g.name()))


def _op_split(g: _Gen):
    x = g.pick()
    axes = [i for i, d in enumerate(x.type.shape) if isinstance(d, int) and d >= 2]
    if not axes:
        return
    ax = g.draw(st.sampled_from(axes))
    d = x.type.shape[ax]
    cuts = sorted(g.draw(st.sets(st.integers(1, d - 1), min_size=1, max_size=min(3, d - 1))))
    sizes = [b - a for a, b in zip([0] + cuts, cuts + [d])]
    kwargs = {} if ax == x.type.rank - 1 and g.draw(st.booleans()) else {"axis": g.axis(ax, x.type.rank)}
    g.add(g.b.op("split", x, sizes=sizes, name=g.name(), **kwargs))


def _op_concat(g: _Gen):
    x = g.pick()
    axes = [i for i, d in enumerate(x.type.shape) if isinstance(d, int)]
    if not axes:
        return
    ax = g.draw(st.sampled_from(axes))
    others = [
        v
        for v in g.pool
        if v.type.dtype == x.type.dtype
        and v.type.rank == x.type.rank
        and isinstance(v.type.shape[ax], int)
        and all(v.type.shape[i] == x.type.shape[i] for i in range(x.type.rank) if i != ax)
    ]
    parts = [x] + g.draw(st.lists(st.sampled_from(others), min_size=1, max_size=3))
    g.add(g.b.op("concat", *parts, axis=g.axis(ax, x.type.rank), name=g.name()))


def _rank4(g: _Gen, ok) -> Value | None:
    """A pool value that `ok` accepts, preferring rank-4 [b, heads, t, d] ones; makes one from [b, t, H] if need be."""
    found = [v for v in g.pool if ok(v)]
    if not found:
        _op_heads(g)
        found = [v for v in g.pool if ok(v)]
    return g.draw(st.sampled_from(found)) if found else None


def _op_rope(g: _Gen):
    x = _rank4(g, lambda v: v.type.rank == 4 and isinstance(v.type.shape[-1], int) and v.type.shape[-1] >= 2)
    if x is None:
        return
    s = x.type.shape
    dims = g.draw(st.sampled_from([d for d in range(2, s[-1] + 1, 2)]))
    attrs = {"dims": dims, "base": g.draw(floats)}
    if g.draw(st.booleans()):
        attrs["scaling"] = g.draw(rope_scalings(dims))
    if g.draw(st.booleans()):
        attrs["traditional"] = g.draw(st.booleans())
    if g.offset is None:  # the position offset: one scalar input of the function, shared by every rope
        g.offset = g.b.input("offset", TensorType(DType.I32, ()))
    g.add(g.b.op("rope", x, g.offset, name=g.name(), **attrs))


def _op_attention(g: _Gen):
    q = _rank4(g, lambda v: v.type.rank == 4)
    if q is None:
        return
    s = q.type.shape

    def fits(k: Value) -> bool:
        t = k.type.shape
        if len(t) != 4 or k.type.dtype != q.type.dtype or (t[0], t[2], t[3]) != (s[0], s[2], s[3]):
            return False
        return not (isinstance(s[1], int) and isinstance(t[1], int)) or s[1] % t[1] == 0

    k = g.draw(st.sampled_from([v for v in g.pool if fits(v)]))
    v = g.draw(st.sampled_from([v for v in g.pool if v.type.shape[:3] == k.type.shape[:3] and fits(v)]))
    window = g.draw(st.one_of(st.none(), st.integers(1, 1 << 17)))
    g.add(g.b.op("attention", q, k, v, scale=g.draw(floats), window=window, name=g.name()))


def _op_cast(g: _Gen):
    x = g.pick()
    g.add(g.b.op("cast", x, dtype=g.draw(st.sampled_from(FLOAT_DTYPES)), name=g.name()))


def _op_embed(g: _Gen):
    x = g.pick()
    if x.type.rank < 2 or not _static_last(x):
        return
    ids = g.b.input("ids", TensorType(DType.I32, x.type.shape[:-1]))
    table = g.param((g.draw(st.sampled_from([16, 100])), x.type.shape[-1]), x.type.dtype)
    g.add(g.b.op("embed", ids, table, name=g.name()))


OP_GENERATORS = [
    _op_linear, _op_norm, _op_unary, _op_binary, _op_reshape, _op_heads, _op_transpose, _op_split, _op_concat,
    _op_rope, _op_attention, _op_cast, _op_embed,
]  # fmt: skip


@st.composite
def programs(draw) -> Program:
    """A random valid program: either one function @main, or a body function called from @main per layer."""
    program = Program()
    wrapped = draw(st.booleans())
    b = FunctionBuilder("layer" if wrapped else "main", program)
    g = _Gen(draw, b)
    dims = [draw(st.one_of(st.sampled_from(SYMBOLS), st.sampled_from(STATIC))) for _ in range(2)]
    for i in range(draw(st.integers(1, 2))):
        shape = tuple(dims) + (draw(st.sampled_from(FEATURES)),)
        g.add(b.input(draw(st.sampled_from(["x", "h", "hidden_states", str(i)])), TensorType(draw(st.sampled_from(FLOAT_DTYPES)), shape)))
    ninputs = len(g.pool)
    for _ in range(draw(st.integers(1, 12))):
        draw(st.sampled_from(OP_GENERATORS))(g)
    if len(g.pool) == ninputs:  # every drawn op was inapplicable: make sure there is at least one
        g.add(b.op("relu", g.pick()))
    outputs = [g.pool[-1]]
    if draw(st.booleans()):
        outputs.append(g.pick())
    body = b.build(*outputs)
    if wrapped:
        m = FunctionBuilder("main", program)
        args = [m.input(v.name, v.type) for v in body.inputs]
        prefixes = draw(st.lists(st.sampled_from(["", "layers.0", "layers.1", "model.layers.11"]), min_size=1, max_size=3))
        results = []
        for p in prefixes:
            r = m.op("call", *args, callee="layer", prefix=p)
            results.extend(r if isinstance(r, tuple) else [r])
        m.build(*results[-len(body.outputs) :], *(results[:1] if draw(st.booleans()) else []))
    return program


# ------------------------------------------------------------------------------------------------ round trips


@SETTINGS
@given(programs())
def test_random_programs_verify_and_round_trip_as_text(program):
    verify(program)
    text = print_program(program)
    again = parse_program(text)
    verify(again)
    assert print_program(again) == text


@SETTINGS
@given(programs())
def test_random_programs_round_trip_as_json(program):
    text = print_program(program)
    doc = to_json(program)
    back = from_json(doc)
    verify(back)
    assert print_program(back) == text
    assert to_json(back) == doc
    assert to_json(parse_program(text)) == doc


@SETTINGS
@given(rope_scalings(8))
def test_rope_scaling_struct_round_trips(scaling):
    b = FunctionBuilder("main", Program())
    x = b.input("x", TensorType(DType.F32, ("B", 2, "T", 8)))
    offset = b.input("offset", TensorType(DType.I32, ()))
    b.build(b.op("rope", x, offset, dims=8, base=10000.0, scaling=scaling))
    text = print_program(b.program)
    again = parse_program(text)
    assert again.main.ops[0].attrs["scaling"] == scaling
    assert print_program(again) == text


@SETTINGS
@given(st.floats(allow_nan=False), st.integers(-(1 << 40), 1 << 40))
def test_scalar_attribute_values_round_trip(eps, axis_hint):
    b = FunctionBuilder("main", Program())
    x = b.input("x", TensorType(DType.F32, ("T", 8)))
    y = b.op("rms_norm", x, b.param("w", TensorType(DType.F32, (8,))), eps=eps)
    z = b.op("concat", y, x, axis=-1 if axis_hint % 2 else 1)
    b.build(z)
    text = print_program(b.program)
    again = parse_program(text)
    assert again.main.ops[0].attrs["eps"] == eps
    assert print_program(again) == text


# ------------------------------------------------------------------------------------------------ mutations


@SETTINGS
@given(programs(), st.data())
def test_changing_a_result_type_is_caught(program, data):
    fn = data.draw(st.sampled_from([f for f in program.functions if f.ops]))
    o = data.draw(st.sampled_from(fn.ops))
    r = data.draw(st.sampled_from(o.results))
    how = data.draw(st.sampled_from(["dtype", "rank", "dim"]))
    t = r.type
    if how == "dtype":
        new = t.with_dtype(data.draw(st.sampled_from([d for d in DType if d != t.dtype])))
    elif how == "rank":
        new = t.with_shape(t.shape + (1,))
    else:
        assume(t.rank > 0)
        i = data.draw(st.integers(0, t.rank - 1))
        new = t.with_shape(t.shape[:i] + ((t.shape[i] + 1) if isinstance(t.shape[i], int) else "Z",) + t.shape[i + 1 :])
    r.type = new
    with pytest.raises(VerifyError) as info:
        verify(program)
    msg = str(info.value)
    assert f"@{fn.name}" in msg and f"= {o.op}(" in msg and f"%{r.name}" in msg


@SETTINGS
@given(programs(), st.data())
def test_dropping_a_used_op_is_caught(program, data):
    candidates = []
    for fn in program.functions:
        used = {id(v) for o in fn.ops for v in o.operands} | {id(v) for v in fn.outputs}
        candidates += [(fn, i) for i, o in enumerate(fn.ops) if any(id(r) in used for r in o.results)]
    fn, i = data.draw(st.sampled_from(candidates))
    dropped = fn.ops.pop(i)
    with pytest.raises(VerifyError) as info:
        verify(program)
    msg = str(info.value)
    assert f"@{fn.name}" in msg
    assert any(f"%{r.name} " in msg + " " for r in dropped.results), msg


@SETTINGS
@given(programs(), st.data())
def test_swapping_linear_operands_is_caught(program, data):
    linears = [(fn, o) for fn in program.functions for o in fn.ops if o.op == "linear"]
    assume(linears)
    fn, o = data.draw(st.sampled_from(linears))
    x, w = o.operands[0], o.operands[1]
    # linear(w, x) type-checks only in the degenerate case of a 2-d input with as many rows as the weight.
    assume(not (x.type.rank == 2 and x.type.shape[0] == w.type.shape[0]))
    o.operands[0], o.operands[1] = w, x
    with pytest.raises(VerifyError) as info:
        verify(program)
    msg = str(info.value)
    assert f"@{fn.name}" in msg and "linear(" in msg and f"%{x.name}" in msg


def test_mutations_leave_copies_alone():
    """Sanity check of the mutation approach: a deep copy verifies after its original is broken."""
    b = FunctionBuilder("main", Program())
    x = b.input("x", TensorType(DType.F32, ("B", 8)))
    b.build(b.op("relu", x))
    clone = copy.deepcopy(b.program)
    b.program.main.ops[0].results[0].type = TensorType(DType.F16, ("B", 8))
    with pytest.raises(VerifyError):
        verify(b.program)
    verify(clone)
