"""Load-time (`derive`) ops: each op the load-time interpreter runs, against numpy written from the op's meaning.

A derive op runs once when weights are bound (fused-weight concats, quantize/dequantize, LoRA merges, anything
lift-params moves out of the body), and an artifact stores its result, so a wrong result here is a wrong model that
no codegen test sees. The references are plain numpy (float64 where the op is arithmetic) and, for quantization,
`tests/affine_ref.py` (MLX's affine format in numpy, itself checked bit for bit against `mx.quantize` in
tests/test_quantize.py).
"""

from __future__ import annotations

import math
import re

import mlx.core as mx
import numpy as np
import pytest

import mlxc
from mlxc.ir import OPS, Quant, parse_program, verify
from mlxc.passes import run_pipeline
from mlxc.runtime.derive import run_derived
from mlxc.runtime.weights import QuantizedTensor


import affine_ref as ref  # noqa: E402  (tests/ is on sys.path: conftest.py)

RNG = np.random.default_rng(0)
MX = {"f32": mx.float32, "f16": mx.float16, "bf16": mx.bfloat16, "i32": mx.int32}


def _np(x) -> np.ndarray:
    return np.array(x.astype(mx.float32)) if x.dtype in (mx.float16, mx.bfloat16) else np.array(x)


def derive(params: dict[str, tuple[str, object]], *lines: str) -> dict[str, object]:
    """Run `derive` lines on parameters through the load-time interpreter (`run_derived`, as binding weights does).

    `params` maps a name to (IR type, value: a numpy array or a QuantizedTensor). Returns every derived value by
    name: numpy float32 arrays (ints stay ints), or QuantizedTensors. The body reads each derived value so that it is
    a runtime parameter, the way a compiled model's body reads its fused or quantized weights.
    """
    head = "func @main(%unused_input: f32[1]) -> f32[1] {\n"
    head += "".join(f"  param %{n}: {t}\n" for n, (t, _) in params.items())
    head += "".join(f"  derive {line}\n" for line in lines)
    body = []
    for i, op in enumerate(parse_program(head + "  return %unused_input\n}\n").main.derived):
        for r in op.results:
            if r.type.quant is not None:
                body.append(f"  %u{i}_{r.name} = dequantize(%{r.name}) : {r.type.with_quant(None)}\n")
            else:
                body.append(f"  %u{i}_{r.name} = relu(%{r.name}) : {r.type}\n")
    program = verify(parse_program(head + "".join(body) + "  return %unused_input\n}\n"))
    given = {}
    for name, (t, value) in params.items():
        if isinstance(value, QuantizedTensor):
            given[name] = value
        else:
            given[name] = mx.array(np.asarray(value)).astype(MX[t.split("[")[0]])
    out = run_derived(program, given)
    return {n: v if isinstance(v, QuantizedTensor) else _np(v) for n, v in out.items()}


def _rand(*shape, scale=1.0) -> np.ndarray:
    return (RNG.standard_normal(shape) * scale).astype(np.float32)


def _close(ours: np.ndarray, want: np.ndarray, rtol=1e-5, atol=1e-6) -> None:
    assert ours.shape == want.shape, (ours.shape, want.shape)
    np.testing.assert_allclose(ours, want, rtol=rtol, atol=atol)


# Every op lift-params may move to load time (an op without effects) has a numpy reference test below; an op added
# to the IR without one fails here (and its test below fails if the interpreter cannot run it).
TESTED = {"concat", "split", "transpose", "reshape", "quantize", "dequantize", "linear", "rms_norm", "layer_norm",
          "silu", "gelu", "gelu_tanh", "relu", "scale", "add", "mul", "cast", "embed",
          "sigmoid", "tanh", "shift", "softcap", "stack", "moe", "pool", "deinterleave_rows", "rope", "clip",
          "exp", "rms_norm_gated", "pack", "slice", "embed_range",
          "learned_positions", "sinusoidal_positions", "glu", "keep_last"}


def needs_op(name: str):
    """For ops newer than some checkouts: tested where they exist as load-time (effect-free) ops."""
    return pytest.mark.skipif(name not in OPS or OPS[name].effects, reason=f"this IR has no load-time {name} op")


def test_every_liftable_op_has_a_reference_test_here():
    pure = {name for name, d in OPS.items() if not d.effects}
    assert pure - TESTED == set(), f"pure ops without a numpy reference test in this file: {sorted(pure - TESTED)}"
    assert {"attention", "call", "dropout"} <= {name for name, d in OPS.items() if d.effects}


# ------------------------------------------------------------------------------------------------ data movement


def test_concat():
    a, b, c = _rand(2, 6), _rand(3, 6), _rand(1, 6)
    out = derive({"a": ("f32[2, 6]", a), "b": ("f32[3, 6]", b), "c": ("f32[1, 6]", c)},
                 "%rows = concat(%a, %b, %c) {axis = 0} : f32[6, 6]")
    np.testing.assert_array_equal(out["rows"], np.concatenate([a, b, c], axis=0))
    d, e = _rand(4, 2), _rand(4, 5)
    out = derive({"d": ("f32[4, 2]", d), "e": ("f32[4, 5]", e)},
                 "%cols = concat(%d, %e) : f32[4, 7]",  # default axis -1
                 "%cols1 = concat(%e, %d) {axis = 1} : f32[4, 7]")
    np.testing.assert_array_equal(out["cols"], np.concatenate([d, e], axis=1))
    np.testing.assert_array_equal(out["cols1"], np.concatenate([e, d], axis=1))


def test_concat_bf16_keeps_values():
    a, b = ref.bf16_round(_rand(2, 4)), ref.bf16_round(_rand(3, 4))
    out = derive({"a": ("bf16[2, 4]", a), "b": ("bf16[3, 4]", b)}, "%ab = concat(%a, %b) {axis = 0} : bf16[5, 4]")
    np.testing.assert_array_equal(out["ab"], np.concatenate([a, b]))


def test_split():
    x = _rand(10, 4)
    out = derive({"x": ("f32[10, 4]", x)},
                 "%p, %q, %r = split(%x) {sizes = [3, 5, 2], axis = 0} : f32[3, 4], f32[5, 4], f32[2, 4]")
    for name, want in zip("pqr", np.split(x, [3, 8], axis=0)):
        np.testing.assert_array_equal(out[name], want)
    y = _rand(3, 9)
    out = derive({"y": ("f32[3, 9]", y)}, "%s, %t = split(%y) {sizes = [2, 7]} : f32[3, 2], f32[3, 7]")
    np.testing.assert_array_equal(out["s"], y[:, :2])
    np.testing.assert_array_equal(out["t"], y[:, 2:])


def test_transpose_and_reshape():
    x = _rand(2, 3, 4)
    out = derive({"x": ("f32[2, 3, 4]", x)},
                 "%t = transpose(%x) {perm = [2, 0, 1]} : f32[4, 2, 3]",
                 "%r = reshape(%x) {shape = [6, 4]} : f32[6, 4]",
                 # a reshape of a transposed value reads it in its new (row-major) order, not the original memory
                 "%tr = reshape(%t) {shape = [4, 6]} : f32[4, 6]",
                 "%w = transpose(%r) {perm = [1, 0]} : f32[4, 6]")
    np.testing.assert_array_equal(out["t"], np.transpose(x, (2, 0, 1)))
    np.testing.assert_array_equal(out["r"], x.reshape(6, 4))
    np.testing.assert_array_equal(out["tr"], np.transpose(x, (2, 0, 1)).reshape(4, 6))
    np.testing.assert_array_equal(out["w"], x.reshape(6, 4).T)


def test_embed():
    table = _rand(7, 3)
    ids = np.array([4, 0, 6, 4, 1], dtype=np.int32)
    out = derive({"ids": ("i32[5]", ids), "table": ("f32[7, 3]", table)},
                 "%rows = embed(%ids, %table) : f32[5, 3]")
    np.testing.assert_array_equal(out["rows"], table[ids])


@needs_op("embed_range")
def test_embed_range():
    """A vocabulary-parallel share: rows 3..5 of the table; other ids look up zeros."""
    table = _rand(3, 4)
    ids = np.array([2, 3, 5, 9, 4, 0], dtype=np.int32)
    out = derive({"ids": ("i32[6]", ids), "table": ("f32[3, 4]", table)},
                 "%rows = embed_range(%ids, %table) {first = 3} : f32[6, 4]")
    want = np.zeros((6, 4), np.float32)
    for i, t in enumerate(ids):
        if 3 <= t < 6:
            want[i] = table[t - 3]
    np.testing.assert_array_equal(out["rows"], want)


@needs_op("learned_positions")
def test_learned_positions():
    table = _rand(10, 4)
    out = derive({"ids": ("i32[2, 3]", np.zeros((2, 3), np.int32)), "table": ("f32[10, 4]", table),
                  "offset": ("i32[]", np.array(6, np.int32))},
                 "%pos = learned_positions(%ids, %table, %offset) : f32[3, 4]")
    np.testing.assert_array_equal(out["pos"], table[6:9])


@needs_op("keep_last")
def test_keep_last():
    """The last n positions along axis 1; n = 0 keeps them all."""
    x = _rand(2, 5, 3)
    for n, want in ((2, x[:, 3:]), (0, x), (7, x)):
        out = derive({"x": ("f32[2, 5, 3]", x), "n": ("i32[]", np.array(n, np.int32))},
                     "%kept = keep_last(%x, %n) : f32[2, L, 3]")
        np.testing.assert_array_equal(out["kept"], want)


@needs_op("sinusoidal_positions")
def test_sinusoidal_positions():
    """Feature 2i is sin(p / 10000^(2i / d)), 2i + 1 its cos, for positions offset .. offset + T - 1."""
    out = derive({"ids": ("i32[1, 4]", np.zeros((1, 4), np.int32)), "offset": ("i32[]", np.array(5, np.int32))},
                 "%pos = sinusoidal_positions(%ids, %offset) {dims = 6, dtype = f32} : f32[4, 6]")
    p = np.arange(5, 9, dtype=np.float64)[:, None]
    i = np.arange(3, dtype=np.float64)[None]
    want = np.zeros((4, 6))
    want[:, 0::2], want[:, 1::2] = np.sin(p / 10000 ** (2 * i / 6)), np.cos(p / 10000 ** (2 * i / 6))
    _close(out["pos"], want.astype(np.float32), rtol=1e-5, atol=1e-6)


@needs_op("slice")
def test_slice():
    w = _rand(6, 8)
    out = derive({"w": ("f32[6, 8]", w)},
                 "%rows = slice(%w) {axis = 0, start = 2, stop = 5} : f32[3, 8]",
                 "%cols = slice(%w) {axis = -1, start = 4, stop = 8} : f32[6, 4]")
    np.testing.assert_array_equal(out["rows"], w[2:5])
    np.testing.assert_array_equal(out["cols"], w[:, 4:8])


# ------------------------------------------------------------------------------------------------ quantization


@pytest.mark.parametrize("dtype", ["f32", "f16", "bf16"])
@pytest.mark.parametrize("bits,group", [(4, 32), (8, 64), (2, 128), (3, 32), (5, 64), (6, 32)])
def test_quantize_matches_numpy_affine_quantization(bits, group, dtype):
    """The codes, scales and biases the quantize op produces are the numpy reference's, bit for bit, in the weight's
    dtype. Fails on the wrong group size or width, grouping along rows instead of the last axis, or scales kept in
    float32 for a half-precision weight."""
    name = {"f32": "float32", "f16": "float16", "bf16": "bfloat16"}[dtype]
    w = ref.round_to(_rand(6, 256, scale=0.2), name)
    out = derive({"w": (f"{dtype}[6, 256]", w)},
                 f"%wq = quantize(%w) {{bits = {bits}, group_size = {group}}} : {dtype}[6, 256] q{bits}g{group}")
    q = out["wq"]
    assert isinstance(q, QuantizedTensor) and q.quant.bits == bits and q.quant.group_size == group
    codes, scales, biases = ref.affine_quantize(w, group, bits, name)
    assert q.codes.dtype == mx.uint32 and q.scales.dtype == MX[dtype] and q.biases.dtype == MX[dtype]
    np.testing.assert_array_equal(np.array(q.codes), codes)
    np.testing.assert_array_equal(_np(q.scales), scales)
    np.testing.assert_array_equal(_np(q.biases), biases)


@pytest.mark.parametrize("bits,group", [(4, 32), (8, 64), (3, 128)])
def test_dequantize_matches_numpy(bits, group):
    """A stored quantized weight (arbitrary codes, negative scales included) dequantizes to scale * code + bias."""
    codes = RNG.integers(0, 2**bits, size=(5, 128))
    packed = ref.pack_codes(codes, bits)
    scales = _rand(5, 128 // group, scale=0.05)
    biases = _rand(5, 128 // group, scale=0.5)
    stored = QuantizedTensor(mx.array(packed), mx.array(scales), mx.array(biases), mlxc.ir.Quant(bits, group))
    out = derive({"w": (f"f32[5, 128] q{bits}g{group}", stored)}, "%wf = dequantize(%w) : f32[5, 128]")
    want = np.repeat(scales, group, axis=1) * codes + np.repeat(biases, group, axis=1)
    _close(out["wf"], want.astype(np.float32), rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("bits, group, scales", [(4, 32, "f16"), (8, 32, "f16"), (4, 64, "f32"), (8, 128, "f32")])
def test_pack_matches_numpy(bits, group, scales):
    """`pack` (the native CPU kernels' layout) moves codes, scales and biases, exactly, to where the layout puts them:
    per tile of 16 rows and 32-element block, 4-bit: byte 4r + i of quad j (64 bytes) is code 4j + i of row r, with
    code 16 + 4j + i in the high nibble; 8-bit: 8 quads, one code per byte; scales and biases [tile, group * 16 + r].
    Rows past n (37 here) are zero."""
    n, k = 37, 128
    codes = RNG.integers(0, 2**bits, size=(n, k))
    sc, bi = _rand(n, k // group, scale=0.05), _rand(n, k // group, scale=0.5)
    stored = QuantizedTensor(mx.array(ref.pack_codes(codes, bits)), mx.array(sc).astype(MX[scales]),
                             mx.array(bi).astype(MX[scales]), Quant(bits, group))
    q = f"q{bits}g{group}" + ("_f16" if scales == "f16" else "")
    program = verify(parse_program(
        f"func @main(%x: f32[1, {k}]) -> f32[1, {n}] {{\n  param %w: f32[{n}, {k}] {q}\n"
        f"  derive %wp = pack(%w) : f32[{n}, {k}] {q}_packed\n"
        f"  %y = linear(%x, %wp) {{kernel = native}} : f32[1, {n}]\n  return %y\n}}\n"))
    out = run_derived(program, {"w": stored})["wp"]
    tiles = -(-n // 16)
    c = np.zeros((tiles * 16, k), np.uint8)
    c[:n] = codes
    c = c.reshape(tiles, 16, k // 32, 8, 4).transpose(0, 2, 3, 1, 4)  # tile, block, quad, row, byte
    if bits == 4:
        c = c[:, :, :4] | (c[:, :, 4:] << 4)
    side = lambda a: np.pad(a, ((0, tiles * 16 - n), (0, 0))).reshape(tiles, 16, -1).transpose(0, 2, 1).reshape(tiles, -1)  # noqa: E731,E501
    assert out.quant == Quant(bits, group, None if scales == "f32" else mlxc.ir.DType.F16, packed=True)
    assert out.shape == (n, k) and out.codes.dtype == mx.uint8
    np.testing.assert_array_equal(np.array(out.codes), c.reshape(tiles, -1))
    np.testing.assert_array_equal(_np(out.scales), side(_np(stored.scales)))
    np.testing.assert_array_equal(_np(out.biases), side(_np(stored.biases)))
    assert out.scales.dtype == MX[scales]


def test_quantize_then_dequantize_round_trip_and_quantized_concat():
    """The quantize -> concat (quantized rows, groups intact) -> dequantize chain a fused quantized projection uses:
    each weight's rows come back as the reference's dequantization of that weight."""
    a, b = _rand(4, 64, scale=0.1), _rand(2, 64, scale=3.0)  # very different ranges: groups must not mix rows
    out = derive({"a": ("f32[4, 64]", a), "b": ("f32[2, 64]", b)},
                 "%aq = quantize(%a) {bits = 4, group_size = 32} : f32[4, 64] q4g32",
                 "%bq = quantize(%b) {bits = 4, group_size = 32} : f32[2, 64] q4g32",
                 "%ab = concat(%aq, %bq) {axis = 0} : f32[6, 64] q4g32",
                 "%abf = dequantize(%ab) : f32[6, 64]")
    want = np.concatenate([ref.affine_dequantize(*ref.affine_quantize(a, 32, 4), 32, 4),
                           ref.affine_dequantize(*ref.affine_quantize(b, 32, 4), 32, 4)])
    np.testing.assert_array_equal(out["abf"], want)
    assert np.abs(out["abf"] - np.concatenate([a, b])).max() > 0  # really went through 4 bits


# ------------------------------------------------------------------------------------------------ arithmetic


def test_linear():
    x, w, b = _rand(3, 5), _rand(4, 5), _rand(4)
    out = derive({"x": ("f32[3, 5]", x), "w": ("f32[4, 5]", w), "b": ("f32[4]", b)},
                 "%y = linear(%x, %w) : f32[3, 4]",
                 "%yb = linear(%x, %w, %b) : f32[3, 4]")
    want = x.astype(np.float64) @ w.astype(np.float64).T  # weight laid out [out, in]
    _close(out["y"], want)
    _close(out["yb"], want + b)


def test_rms_norm():
    x, w = _rand(3, 8, scale=0.3), _rand(8)
    out = derive({"x": ("f32[3, 8]", x), "w": ("f32[8]", w)},
                 "%n = rms_norm(%x, %w) {eps = 0.25} : f32[3, 8]")  # an eps large enough to matter
    x64 = x.astype(np.float64)
    _close(out["n"], x64 / np.sqrt((x64**2).mean(-1, keepdims=True) + 0.25) * w)


def test_layer_norm_with_and_without_affine():
    x, w, b = _rand(3, 8) + 2.0, _rand(8), _rand(8)
    out = derive({"x": ("f32[3, 8]", x), "w": ("f32[8]", w), "b": ("f32[8]", b)},
                 "%wb = layer_norm(%x, %w, %b) {eps = 0.1} : f32[3, 8]",
                 "%w_only = layer_norm(%x, %w) {eps = 0.1} : f32[3, 8]",
                 "%plain = layer_norm(%x) {eps = 0.1} : f32[3, 8]")
    x64 = x.astype(np.float64)
    norm = (x64 - x64.mean(-1, keepdims=True)) / np.sqrt(x64.var(-1, keepdims=True) + 0.1)  # biased variance
    _close(out["plain"], norm)
    _close(out["w_only"], norm * w)
    _close(out["wb"], norm * w + b)


def test_activations():
    x = np.concatenate([np.linspace(-6, 6, 25, dtype=np.float32), _rand(15, scale=3)]).reshape(8, 5)
    out = derive({"x": ("f32[8, 5]", x)},
                 "%s = silu(%x) : f32[8, 5]", "%g = gelu(%x) : f32[8, 5]", "%gt = gelu_tanh(%x) : f32[8, 5]",
                 "%r = relu(%x) : f32[8, 5]")
    x64 = x.astype(np.float64)
    erf = np.vectorize(math.erf)
    _close(out["s"], x64 / (1 + np.exp(-x64)))
    _close(out["g"], 0.5 * x64 * (1 + erf(x64 / math.sqrt(2))), rtol=1e-5, atol=1e-5)
    _close(out["gt"], 0.5 * x64 * (1 + np.tanh(math.sqrt(2 / math.pi) * (x64 + 0.044715 * x64**3))),
           rtol=1e-5, atol=1e-5)
    np.testing.assert_array_equal(out["r"], np.maximum(x, 0))
    # exact and tanh GELU really differ here, so each is checked against its own formula
    assert np.abs(out["g"] - out["gt"]).max() > 1e-4


def test_glu():
    x = _rand(3, 10, scale=3)
    out = derive({"x": ("f32[3, 10]", x)}, '%s = glu(%x) {activation = "silu"} : f32[3, 5]',
                 '%g = glu(%x) {activation = "gelu_tanh"} : f32[3, 5]', '%r = glu(%x) {activation = "relu"} : f32[3, 5]')
    a, b = x[:, :5].astype(np.float64), x[:, 5:].astype(np.float64)
    _close(out["s"], a / (1 + np.exp(-a)) * b)
    _close(out["g"], 0.5 * a * (1 + np.tanh(math.sqrt(2 / math.pi) * (a + 0.044715 * a**3))) * b, rtol=1e-5, atol=1e-5)
    _close(out["r"], np.maximum(a, 0) * b)


def test_scale_add_mul_with_broadcasting():
    a, b, row, col = _rand(4, 6), _rand(4, 6), _rand(6), _rand(4, 1)
    out = derive({"a": ("f32[4, 6]", a), "b": ("f32[4, 6]", b), "row": ("f32[6]", row), "col": ("f32[4, 1]", col)},
                 "%s = scale(%a) {factor = 0.375} : f32[4, 6]",
                 "%sum = add(%a, %b) : f32[4, 6]",
                 "%prod = mul(%a, %b) : f32[4, 6]",
                 "%rowsum = add(%row, %a) : f32[4, 6]",
                 "%outer = mul(%col, %row) : f32[4, 6]")
    np.testing.assert_array_equal(out["s"], a * np.float32(0.375))
    np.testing.assert_array_equal(out["sum"], a + b)
    np.testing.assert_array_equal(out["prod"], a * b)
    np.testing.assert_array_equal(out["rowsum"], row[None, :] + a)
    np.testing.assert_array_equal(out["outer"], col * row[None, :])


def test_bf16_arithmetic_rounds_once():
    """In bfloat16 an elementwise op gives the exact result rounded once to bfloat16 (ties to even)."""
    a, b = ref.bf16_round(_rand(4, 8)), ref.bf16_round(_rand(4, 8))
    out = derive({"a": ("bf16[4, 8]", a), "b": ("bf16[4, 8]", b)},
                 "%sum = add(%a, %b) : bf16[4, 8]", "%prod = mul(%a, %b) : bf16[4, 8]")
    np.testing.assert_array_equal(out["sum"], ref.bf16_round(a + b))
    np.testing.assert_array_equal(out["prod"], ref.bf16_round(a * b))


def test_cast():
    x = np.concatenate([_rand(30, scale=10), np.float32([1 + 2**-9, 1 + 3 * 2**-9, 65504.0, 1e-6])]).reshape(2, 17)
    out = derive({"x": ("f32[2, 17]", x)},
                 "%h = cast(%x) {dtype = f16} : f16[2, 17]",
                 "%bh = cast(%x) {dtype = bf16} : bf16[2, 17]",
                 "%back = cast(%h) {dtype = f32} : f32[2, 17]")
    np.testing.assert_array_equal(out["h"], x.astype(np.float16).astype(np.float32))
    np.testing.assert_array_equal(out["bh"], ref.bf16_round(x))  # round to nearest even, not truncation
    np.testing.assert_array_equal(out["back"], x.astype(np.float16).astype(np.float32))


@needs_op("sigmoid")
@needs_op("tanh")
def test_sigmoid_and_tanh():
    x = _rand(4, 5, scale=3)
    out = derive({"x": ("f32[4, 5]", x)}, "%s = sigmoid(%x) : f32[4, 5]", "%t = tanh(%x) : f32[4, 5]")
    x64 = x.astype(np.float64)
    _close(out["s"], 1 / (1 + np.exp(-x64)))
    _close(out["t"], np.tanh(x64))


@needs_op("exp")
def test_exp():
    x = _rand(4, 5, scale=3)
    out = derive({"x": ("f32[4, 5]", x)}, "%e = exp(%x) : f32[4, 5]")
    _close(out["e"], np.exp(x.astype(np.float64)))


@needs_op("rms_norm_gated")
@pytest.mark.parametrize("dtype", ["f32", "bf16"])
def test_rms_norm_gated(dtype):
    """Mamba-2's gated norm: x * silu(gate) normalized over each group of features (transformers'
    MambaRMSNormGated), in float32, rounded to the input's dtype, then times the weight."""
    x, gate, w = _rand(2, 3, 12), _rand(2, 3, 12, scale=2), _rand(12)
    if dtype == "bf16":
        x, gate, w = ref.bf16_round(x), ref.bf16_round(gate), ref.bf16_round(w)
    out = derive({"x": (f"{dtype}[2, 3, 12]", x), "g": (f"{dtype}[2, 3, 12]", gate), "w": (f"{dtype}[12]", w)},
                 f"%n = rms_norm_gated(%x, %g, %w) {{eps = 0.01, groups = 3}} : {dtype}[2, 3, 12]",
                 f"%n1 = rms_norm_gated(%x, %g, %w) {{eps = 0.01}} : {dtype}[2, 3, 12]")
    h = x.astype(np.float64) * gate / (1 + np.exp(-gate.astype(np.float64)))
    for name, groups in (("n", 3), ("n1", 1)):
        hg = h.reshape(2, 3, groups, -1)
        normed = (hg / np.sqrt((hg**2).mean(-1, keepdims=True) + 0.01)).reshape(2, 3, 12)
        if dtype == "bf16":  # rounded to bf16, then the product with the weight rounded again
            _close(out[name], ref.bf16_round(ref.bf16_round(normed.astype(np.float32)) * w), rtol=1e-2, atol=1e-2)
        else:
            _close(out[name], normed * w)
    assert np.abs(out["n"] - out["n1"]).max() > 1e-2  # the groups matter


def _rope_reference(x: np.ndarray, offset: int, dims: int, base: float, factor: float = 1.0,
                    traditional: bool = False) -> np.ndarray:
    """Rotary embedding written from its definition (RoFormer; transformers' rotate_half form, or adjacent pairs when
    `traditional`), on the first `dims` features, at positions offset, offset + 1, ..."""
    inv = 1.0 / (base ** (np.arange(0, dims, 2, dtype=np.float64) / dims)) / factor
    angles = (offset + np.arange(x.shape[2]))[:, None] * inv[None]  # [T, dims/2]
    cos, sin = np.cos(angles), np.sin(angles)
    rot, rest = x[..., :dims].astype(np.float64), x[..., dims:]
    if traditional:
        even, odd = rot[..., 0::2], rot[..., 1::2]
        out = np.empty_like(rot)
        out[..., 0::2], out[..., 1::2] = even * cos - odd * sin, even * sin + odd * cos
    else:
        half = dims // 2
        lo, hi = rot[..., :half], rot[..., half:]
        out = np.concatenate([lo * cos - hi * sin, hi * cos + lo * sin], axis=-1)
    return np.concatenate([out, rest], axis=-1).astype(np.float32)


@pytest.mark.parametrize("dims,traditional,scaling,factor", [
    (8, False, "", 1.0), (4, False, "", 1.0), (8, True, "", 1.0),
    (8, False, ", scaling = #rope<kind = linear, factor = 4.0>", 4.0),
])
def test_rope(dims, traditional, scaling, factor):
    """Pure given its explicit offset (a parameter here), so the interpreter runs it like any load-time op."""
    x = _rand(1, 2, 5, 8)
    trad = ", traditional = true" if traditional else ""
    out = derive({"x": ("f32[1, 2, 5, 8]", x), "off": ("i32[]", np.int32(3))},
                 f"%r = rope(%x, %off) {{dims = {dims}, base = 10000.0{scaling}{trad}}} : f32[1, 2, 5, 8]")
    _close(out["r"], _rope_reference(x, 3, dims, 10000.0, factor, traditional), rtol=1e-5, atol=2e-6)


@needs_op("shift")
@needs_op("softcap")
def test_shift_and_softcap():
    x = _rand(4, 5, scale=40)
    out = derive({"x": ("f32[4, 5]", x)}, "%s = shift(%x) {value = 1.0} : f32[4, 5]",
                 "%c = softcap(%x) {cap = 30.0} : f32[4, 5]")
    np.testing.assert_array_equal(out["s"], x + np.float32(1.0))
    _close(out["c"], 30.0 * np.tanh(x.astype(np.float64) / 30.0), rtol=1e-5, atol=1e-5)
    assert np.abs(out["c"]).max() < 30.0 < np.abs(x).max()


@needs_op("clip")
def test_clip():
    x = _rand(4, 5, scale=3)
    out = derive({"x": ("f32[4, 5]", x)}, "%c = clip(%x) {min = -1.5, max = 0.5} : f32[4, 5]")
    np.testing.assert_array_equal(out["c"], np.minimum(np.maximum(x, np.float32(-1.5)), np.float32(0.5)))
    assert (x < -1.5).any() and (x > 0.5).any() and ((x > -1.5) & (x < 0.5)).any()


@needs_op("stack")
def test_stack():
    a, b, c = _rand(2, 3), _rand(2, 3), _rand(2, 3)
    out = derive({"a": ("f32[2, 3]", a), "b": ("f32[2, 3]", b), "c": ("f32[2, 3]", c)},
                 "%e = stack(%a, %b, %c) : f32[3, 2, 3]", "%m = stack(%a, %b) {axis = 2} : f32[2, 3, 2]")
    np.testing.assert_array_equal(out["e"], np.stack([a, b, c], axis=0))
    np.testing.assert_array_equal(out["m"], np.stack([a, b], axis=2))


def _llama_cpp_permute(w: np.ndarray, n_head: int) -> np.ndarray:
    """What llama.cpp's converter does to Q/K rows (HF half-split rotary order -> interleaved), as its source
    writes it: reshape rows to (head, 2, d/2) and swap the last two axes."""
    return w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def test_deinterleave_rows_undoes_llama_cpp_permutation():
    w, b = _rand(24, 8), _rand(24)
    out = derive({"w": ("f32[24, 8]", _llama_cpp_permute(w, 3)), "b": ("f32[24]", _llama_cpp_permute(b, 3))},
                 "%w_hf = deinterleave_rows(%w) {groups = 3} : f32[24, 8]",
                 "%b_hf = deinterleave_rows(%b) {groups = 3} : f32[24]")
    np.testing.assert_array_equal(out["w_hf"], w)
    np.testing.assert_array_equal(out["b_hf"], b)


def test_deinterleave_rows_moves_quantized_rows_whole():
    w = _rand(16, 64)
    q = QuantizedTensor(*mx.quantize(mx.array(_llama_cpp_permute(w, 2)), group_size=32, bits=4), quant=Quant(4, 32))
    out = derive({"w": ("f32[16, 64] q4g32", q)}, "%w_hf = deinterleave_rows(%w) {groups = 2} : f32[16, 64] q4g32")
    rows = np.array(q.dequantize())
    np.testing.assert_array_equal(np.array(out["w_hf"].dequantize()), _llama_cpp_permute_inverse_rows(rows, 2))


def _llama_cpp_permute_inverse_rows(rows: np.ndarray, n_head: int) -> np.ndarray:
    order = _llama_cpp_permute(np.arange(rows.shape[0]), n_head)  # where each HF row went
    out = np.empty_like(rows)
    out[order] = rows
    return out


@needs_op("pool")
@pytest.mark.parametrize("mode", ["last", "first", "mean"])
def test_pool(mode):
    """One vector per sequence, skipping padding (id 0 here) on either side."""
    x = _rand(2, 5, 3)
    ids = np.array([[0, 0, 4, 5, 6], [7, 8, 9, 0, 0]], dtype=np.int32)
    out = derive({"x": ("f32[2, 5, 3]", x), "ids": ("i32[2, 5]", ids)},
                 f'%p = pool(%x, %ids) {{mode = "{mode}", pad_token_id = 0}} : f32[2, 3]')
    keep = ids != 0
    want = []
    for b in range(2):
        rows = x[b][keep[b]]
        want.append({"last": rows[-1], "first": rows[0], "mean": rows.astype(np.float64).mean(0)}[mode])
    _close(out["p"], np.array(want))


@needs_op("moe")
@pytest.mark.parametrize("normalize", [False, True])
def test_moe(normalize):
    """Each token's top-2 of 4 experts by softmax(router logits), outputs down(silu(gate x) * up x) weighted by the
    chosen probabilities (renormalized over the two when asked)."""
    n, h, i, e = 3, 4, 6, 4
    x, router = _rand(n, h), _rand(n, e, scale=2)
    gate, up, down = _rand(e, i, h), _rand(e, i, h), _rand(e, h, i)
    out = derive({"x": (f"f32[{n}, {h}]", x), "r": (f"f32[{n}, {e}]", router), "g": (f"f32[{e}, {i}, {h}]", gate),
                  "u": (f"f32[{e}, {i}, {h}]", up), "d": (f"f32[{e}, {h}, {i}]", down)},
                 f"%y = moe(%x, %r, %g, %u, %d) {{top_k = 2, normalize = {str(normalize).lower()}}} : f32[{n}, {h}]")
    r64 = router.astype(np.float64)
    probs = np.exp(r64 - r64.max(-1, keepdims=True))
    probs /= probs.sum(-1, keepdims=True)
    want = np.zeros((n, h))
    for t in range(n):
        chosen = np.argsort(-probs[t])[:2]
        weights = probs[t, chosen] / (probs[t, chosen].sum() if normalize else 1.0)
        for wgt, ex in zip(weights, chosen):
            g, u = gate[ex] @ x[t], up[ex] @ x[t]
            want[t] += wgt * (down[ex] @ (g / (1 + np.exp(-g)) * u))
    _close(out["y"], want, rtol=1e-4, atol=1e-5)


# ------------------------------------------------------------------------------------------------ whole programs


def test_lifted_weight_math_matches_numpy():
    """A program whose body scales and adds weights before a matmul: lifting that work to load time (so the artifact
    stores its result) gives the logits numpy computes from the same weights, and so does running it in the body."""
    text = """
func @main(%input_ids: i32[B, T]) -> f32[B, T, 16] {
  param %embed_tokens.weight: f32[16, 8]
  param %w.weight: f32[16, 8]
  param %delta.weight: f32[16, 8]
  param %norm.weight: f32[8]
  %h = embed(%input_ids, %embed_tokens.weight) : f32[B, T, 8]
  %d = scale(%delta.weight) {factor = 0.5} : f32[16, 8]
  %w2 = add(%w.weight, %d) : f32[16, 8]
  %w3 = rms_norm(%w2, %norm.weight) {eps = 1e-05} : f32[16, 8]
  %logits = linear(%h, %w3) : f32[B, T, 16]
  return %logits
}
"""
    from mlxc.codegen import generate_module, import_module, write_module
    from mlxc.runtime import weights as W

    program = mlxc.ir.verify(mlxc.ir.parse_program(text))
    lifted = run_pipeline(program, ["lift-params"])
    assert len(lifted.main.derived) == 3 and len(lifted.main.ops) == 2
    assert re.search(r"derive %w3 = rms_norm", str(lifted))
    weights = W.random_weights(program, seed=1, scale=0.5)
    weights["norm.weight"] = mx.array(_rand(8))  # not all ones, so a dropped norm weight shows
    ids = [[1, 2, 3, 4], [15, 0, 7, 7]]
    p = {k: np.array(v).astype(np.float64) for k, v in weights.items()}
    w2 = p["w.weight"] + 0.5 * p["delta.weight"]
    w3 = w2 / np.sqrt((w2**2).mean(-1, keepdims=True) + 1e-5) * p["norm.weight"]
    want = p["embed_tokens.weight"][np.array(ids)] @ w3.T
    for prog in (program, lifted):
        module = import_module(write_module(generate_module(prog)))
        net = module.Model()
        net.load_weights(W.bind(prog, weights))
        _close(np.array(net(mx.array(ids))), want, rtol=1e-4, atol=1e-5)
