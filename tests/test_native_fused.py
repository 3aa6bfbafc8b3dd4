"""mlxc's fused decode-step kernels (`attention_qkv_decode`, `glu`) against the compositions they replace, written
with MLX's own ops (mx.split, reshape, transpose, mx.fast.rope, slice updates, mx.fast.scaled_dot_product_attention,
nn.silu, nn.gelu_approx): the independent reference.

Tolerances. Float32: both sides compute in float32, so they agree to float32 rounding (1e-5 relative to the
output's scale for attention, 2e-6 relative per element for glu). Half precision: the kernels round where the native
rope and attention_decode round (cos/sin, rotated q and k, q * scale and the softmax probabilities in the dtype,
float32 sums), and MLX's composition rounds a little differently, so they agree to a couple of roundings of the
dtype (HALF_TOL below, relative to the output's scale), and to one rounding with the composed native ops.
"""

from __future__ import annotations

import numpy as np
import pytest

import mlx.core as mx
import mlx.nn as nn

from mlxc.kernels import native

pytestmark = pytest.mark.skipif(not native.available(), reason=f"native kernels unavailable: {native.reason()}")

TOL = {mx.float32: 1e-5, mx.float16: 2e-3, mx.bfloat16: 1.6e-2}
EPS = {mx.float16: 2.0 ** -10, mx.bfloat16: 2.0 ** -7}


def _f32(a: mx.array) -> np.ndarray:
    return np.array(a.astype(mx.float32))


def _close(got, want, tol):
    g, w = _f32(got), _f32(want)
    np.testing.assert_allclose(g, w, rtol=tol, atol=tol * max(1.0, float(np.abs(w).max())))


@pytest.fixture
def isa_restored():
    yield
    native.set_isa("auto")
    native.set_threads(0)


# ------------------------------------------------------------------------------------------------ attention_qkv_decode

def _freqs(dims):
    return mx.array(10000.0 ** (np.arange(0, dims, 2) / dims), dtype=mx.float32)


def _inputs(rng, b, hq, hkv, d, c, dtype):
    qkv = mx.array(rng.standard_normal((b, 1, (hq + 2 * hkv) * d)).astype(np.float32)).astype(dtype)
    k = mx.array(rng.standard_normal((b, hkv, c, d)).astype(np.float32)).astype(dtype)
    v = mx.array(rng.standard_normal((b, hkv, c, d)).astype(np.float32)).astype(dtype)
    return qkv, k, v


def _reference(qkv, k_cache, v_cache, freqs, *, offset, q_heads, kv_heads, head_dim, rope_dims, traditional, scale,
               window=0, rope=None, attend=None):
    """The composition the fused op replaces (MLX's ops by default; `rope`/`attend` swap in the native ones)."""
    rope = rope or (lambda x: mx.fast.rope(x, rope_dims, traditional=traditional, base=None, scale=1.0,
                                           offset=offset, freqs=freqs))
    b, d = qkv.shape[0], head_dim
    q, k, v = mx.split(qkv, [q_heads * d, (q_heads + kv_heads) * d], axis=-1)
    q = q.reshape(b, 1, q_heads, d).transpose(0, 2, 1, 3)
    k = k.reshape(b, 1, kv_heads, d).transpose(0, 2, 1, 3)
    v = v.reshape(b, 1, kv_heads, d).transpose(0, 2, 1, 3)
    q, k = rope(q), rope(k)
    k_cache, v_cache = mx.array(k_cache), mx.array(v_cache)  # new arrays: the caller's stay as they are
    k_cache[:, :, offset:offset + 1] = k
    v_cache[:, :, offset:offset + 1] = v
    start = max(0, offset + 1 - window) if window else 0
    keys, values = k_cache[:, :, start:offset + 1], v_cache[:, :, start:offset + 1]
    if attend is None:
        out = mx.fast.scaled_dot_product_attention(q, keys, values, scale=scale)
    else:
        out = attend(q, keys, values)
    return out.transpose(0, 2, 1, 3).reshape(b, 1, q_heads * d), k_cache, v_cache


def _check_caches(got_k, got_v, want_k, want_v, k0, v0, offset, tol):
    """The new position as the reference wrote it (values exactly), every other position untouched."""
    gk, gv = _f32(got_k), _f32(got_v)
    others = np.ones(gk.shape[2], bool)
    others[offset] = False
    np.testing.assert_array_equal(gk[:, :, others], k0[:, :, others])
    np.testing.assert_array_equal(gv[:, :, others], v0[:, :, others])
    _close(got_k[:, :, offset], want_k[:, :, offset], tol)
    np.testing.assert_array_equal(gv[:, :, offset], _f32(want_v[:, :, offset]))


# (q_heads, kv_heads, head_dim, rope_dims, traditional, offset, capacity, window, batch)
SHAPES = [
    (9, 3, 64, 64, False, 37, 48, 0, 1),     # SmolLM2's grouped-query heads
    (9, 3, 64, 32, True, 1, 8, 0, 2),        # rope on part of head_dim, interleaved pairs, batch 2
    (4, 4, 80, 80, False, 0, 5, 0, 1),       # one head per kv head, head_dim 80, the first position
    (8, 1, 32, 16, True, 63, 64, 10, 1),     # one kv head, the last position, a window shorter than the offset
    (6, 2, 72, 64, False, 40, 41, 7, 1),     # head_dim 72 (not a multiple of the vector width)
]


@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "hq{}-hkv{}-d{}-r{}{}-off{}-c{}-w{}-b{}".format(
    s[0], s[1], s[2], s[3], "t" if s[4] else "", s[5], s[6], s[7], s[8]))
@pytest.mark.parametrize("dtype", [mx.float32, mx.float16, mx.bfloat16], ids=str)
def test_attention_qkv_decode_equals_mlx(shape, dtype):
    hq, hkv, d, dims, trad, offset, cap, window, b = shape
    rng = np.random.default_rng(hq * 100 + offset)
    qkv, k, v = _inputs(rng, b, hq, hkv, d, cap, dtype)
    k0, v0 = _f32(k), _f32(v)
    kw = dict(offset=offset, q_heads=hq, kv_heads=hkv, head_dim=d, rope_dims=dims, traditional=trad,
              scale=d ** -0.5, window=window)
    want, want_k, want_v = _reference(qkv, k, v, _freqs(dims), **kw)
    out, k2, v2 = native.attention_qkv_decode(qkv, k, v, _freqs(dims), **kw)
    assert out.shape == (b, 1, hq * d) and out.dtype == dtype and k2.dtype == v2.dtype == dtype
    _close(out, want, TOL[dtype])
    _check_caches(k2, v2, want_k, want_v, k0, v0, offset, TOL[dtype])
    # The test held k and v (not donatable), so the op wrote copies and the originals are as they were.
    np.testing.assert_array_equal(_f32(k), k0)
    np.testing.assert_array_equal(_f32(v), v0)


@pytest.mark.parametrize("dtype", [mx.float16, mx.bfloat16], ids=str)
def test_half_precision_rounds_as_the_composed_native_ops(dtype):
    """Split, native rope, slice updates, native attention_decode: the same roundings, so one rounding apart."""
    hq, hkv, d, offset = 9, 3, 64, 45
    rng = np.random.default_rng(3)
    qkv, k, v = _inputs(rng, 1, hq, hkv, d, 64, dtype)
    freqs = _freqs(d)
    kw = dict(offset=offset, q_heads=hq, kv_heads=hkv, head_dim=d, rope_dims=d, traditional=False, scale=0.125,
              window=20)
    want, want_k, _ = _reference(
        qkv, k, v, freqs, **kw,
        rope=lambda x: native.rope(x, d, traditional=False, freqs=freqs, offset=offset),
        attend=lambda q, keys, values: native.attention_decode(q, keys, values, scale=0.125))
    out, k2, _ = native.attention_qkv_decode(qkv, k, v, freqs, **kw)
    np.testing.assert_array_equal(_f32(k2), _f32(want_k))
    g, w = _f32(out), _f32(want)
    np.testing.assert_allclose(g, w, rtol=EPS[dtype], atol=EPS[dtype] * float(np.abs(w).max()))


def test_every_instruction_set_and_the_threaded_path(isa_restored):
    """Each copy of the float32 loops (AVX-512, AVX2, baseline: whichever this CPU runs), on one thread and on
    several (a long cache splits its keys into chunks there, combined by their softmax maxima and sums)."""
    hq, hkv, d, offset, cap = 9, 3, 64, 1100, 1104
    rng = np.random.default_rng(5)
    qkv, k, v = _inputs(rng, 1, hq, hkv, d, cap, mx.float32)
    freqs = _freqs(d)
    kw = dict(offset=offset, q_heads=hq, kv_heads=hkv, head_dim=d, rope_dims=d, traditional=False, scale=0.125)
    want, want_k, _ = _reference(qkv, k, v, freqs, **kw)
    small = _inputs(rng, 1, 6, 2, 72, 16, mx.float32)
    skw = dict(offset=13, q_heads=6, kv_heads=2, head_dim=72, rope_dims=72, traditional=True, scale=0.1, window=5)
    small_want = _reference(*small, _freqs(72), **skw)[0]
    for isa in native.supported_isas():
        native.set_isa(isa)
        for threads in (1, 2):
            native.set_threads(threads)
            out, k2, _ = native.attention_qkv_decode(qkv, k, v, freqs, **kw)
            _close(out, want, TOL[mx.float32])
            _close(k2[:, :, offset], want_k[:, :, offset], TOL[mx.float32])
            _close(native.attention_qkv_decode(*small, _freqs(72), **skw)[0], small_want, TOL[mx.float32])


def test_strided_inputs():
    """qkv a slice of a wider row, the caches transposed views: read through their strides, written to copies."""
    hq, hkv, d, offset, cap = 4, 2, 32, 9, 12
    rng = np.random.default_rng(7)
    wide = mx.array(rng.standard_normal((2, 1, 2 * (hq + 2 * hkv) * d)).astype(np.float32))
    qkv = wide[..., ::2]
    k = mx.array(rng.standard_normal((2, cap, hkv, d)).astype(np.float32)).transpose(0, 2, 1, 3)
    v = mx.array(rng.standard_normal((2, cap, hkv, d)).astype(np.float32)).transpose(0, 2, 1, 3)
    kw = dict(offset=offset, q_heads=hq, kv_heads=hkv, head_dim=d, rope_dims=d, traditional=False, scale=0.2)
    want, want_k, want_v = _reference(qkv, k, v, _freqs(d), **kw)
    out, k2, v2 = native.attention_qkv_decode(qkv, k, v, _freqs(d), **kw)
    _close(out, want, TOL[mx.float32])
    _check_caches(k2, v2, want_k, want_v, _f32(k), _f32(v), offset, TOL[mx.float32])


def test_caches_are_updated_in_place_when_donatable():
    """With no other reference to the old caches, the new ones take their buffers: no second copy in memory."""
    hq, hkv, d, cap = 9, 3, 64, 2048
    rng = np.random.default_rng(11)
    qkv, k, v = _inputs(rng, 1, hq, hkv, d, cap, mx.float32)
    freqs = _freqs(d)
    kw = dict(offset=5, q_heads=hq, kv_heads=hkv, head_dim=d, rope_dims=d, traditional=False, scale=0.125)
    want, want_k, want_v = _reference(qkv, k, v, freqs, **kw)
    k0, v0 = _f32(k), _f32(v)
    mx.eval(want, want_k, want_v)
    mx.reset_peak_memory()
    base = mx.get_active_memory()
    out, k, v = native.attention_qkv_decode(qkv, k, v, freqs, **kw)  # drops the only other references
    mx.eval(out, k, v)
    cache_bytes = k.nbytes
    assert mx.get_peak_memory() - base < cache_bytes / 4, "the caches were copied, not updated in place"
    _close(out, want, TOL[mx.float32])
    _check_caches(k, v, want_k, want_v, k0, v0, 5, TOL[mx.float32])


def test_under_compile():
    hq, hkv, d, offset = 9, 3, 64, 20
    rng = np.random.default_rng(13)
    qkv, k, v = _inputs(rng, 1, hq, hkv, d, 32, mx.float32)
    kw = dict(offset=offset, q_heads=hq, kv_heads=hkv, head_dim=d, rope_dims=d, traditional=False, scale=0.125)
    step = mx.compile(lambda a, b, c, f: native.attention_qkv_decode(a, b, c, f, **kw))
    want = native.attention_qkv_decode(qkv, k, v, _freqs(d), **kw)
    for got, ref in zip(step(qkv, k, v, _freqs(d)), want):
        np.testing.assert_array_equal(_f32(got), _f32(ref))


def test_attention_qkv_decode_refuses_bad_arguments():
    freqs = _freqs(8)
    good = dict(offset=3, q_heads=4, kv_heads=2, head_dim=8, rope_dims=8, traditional=False, scale=1.0)
    qkv, k, v = mx.zeros((1, 1, 64)), mx.zeros((1, 2, 4, 8)), mx.zeros((1, 2, 4, 8))
    native.attention_qkv_decode(qkv, k, v, freqs, **good)
    for offset in (4, 9, -1):
        with pytest.raises(ValueError, match=r"\[mlxc.attention_qkv_decode\] offset .* outside the cache"):
            native.attention_qkv_decode(qkv, k, v, freqs, **{**good, "offset": offset})
    with pytest.raises(ValueError, match="features"):
        native.attention_qkv_decode(mx.zeros((1, 1, 56)), k, v, freqs, **good)
    with pytest.raises(ValueError, match="one token"):
        native.attention_qkv_decode(mx.zeros((1, 2, 64)), k, v, freqs, **good)
    with pytest.raises(ValueError, match="multiple of kv_heads"):
        native.attention_qkv_decode(qkv, k, v, freqs, **{**good, "q_heads": 3})
    with pytest.raises(ValueError, match=r"\[B, kv_heads, C, head_dim\]"):
        native.attention_qkv_decode(qkv, mx.zeros((1, 2, 4, 16)), v, freqs, **good)
    with pytest.raises(ValueError, match=r"\[B, kv_heads, C, head_dim\]"):
        native.attention_qkv_decode(qkv, k, mx.zeros((1, 2, 5, 8)), freqs, **good)
    with pytest.raises(ValueError, match="dtype"):
        native.attention_qkv_decode(qkv, k.astype(mx.float16), v, freqs, **good)
    with pytest.raises(ValueError, match="dtype"):
        native.attention_qkv_decode(qkv.astype(mx.bfloat16), k, v, freqs, **good)
    with pytest.raises(ValueError, match="rope_dims must be even"):
        native.attention_qkv_decode(qkv, k, v, freqs, **{**good, "rope_dims": 7})
    with pytest.raises(ValueError, match="rope_dims must be even"):
        native.attention_qkv_decode(qkv, k, v, freqs, **{**good, "rope_dims": 10})
    with pytest.raises(ValueError, match="freqs"):
        native.attention_qkv_decode(qkv, k, v, _freqs(4), **good)


def test_attention_qkv_decode_has_no_gradient():
    qkv, k, v = mx.ones((1, 1, 64)), mx.zeros((1, 2, 4, 8)), mx.zeros((1, 2, 4, 8))
    kw = dict(offset=1, q_heads=4, kv_heads=2, head_dim=8, rope_dims=8, traditional=False, scale=1.0)
    with pytest.raises(ValueError, match="no gradient"):
        mx.grad(lambda x: native.attention_qkv_decode(x, k, v, _freqs(8), **kw)[0].sum())(qkv)


# ------------------------------------------------------------------------------------------------ glu

ACTIVATIONS = {"silu": nn.silu, "gelu_tanh": nn.gelu_approx}


def _exact(x: np.ndarray, activation: str) -> np.ndarray:
    """float64: a sigmoid(a) b, and gelu_tanh as a sigmoid(2u) b (0.5 a (1 + tanh u) without its cancellation)."""
    n = x.shape[-1] // 2
    a, b = x[..., :n].astype(np.float64), x[..., n:].astype(np.float64)
    z = a if activation == "silu" else 2 * np.sqrt(2 / np.pi) * (a + 0.044715 * a ** 3)
    return a / (1 + np.exp(-z)) * b


@pytest.mark.parametrize("activation", ["silu", "gelu_tanh"])
@pytest.mark.parametrize("shape", [(1, 1, 2 * 1537), (2, 5, 2 * 37)], ids=lambda s: "x".join(map(str, s)))
def test_glu_float32_equals_mlx(activation, shape, isa_restored):
    rng = np.random.default_rng(17)
    x = mx.array((rng.standard_normal(shape) * 3).astype(np.float32))
    n = shape[-1] // 2
    want = np.array(ACTIVATIONS[activation](x[..., :n]) * x[..., n:])
    a = np.array(x[..., :n])
    for isa in native.supported_isas():
        native.set_isa(isa)
        got = np.array(native.glu(x, activation=activation))
        assert got.shape == shape[:-1] + (n,)
        if activation == "silu":
            np.testing.assert_allclose(got, want, rtol=2e-6, atol=1e-30)
        else:
            # MLX's 0.5 a (1 + tanh u) loses digits to cancellation for a below about -2 (tanh u near -1); there
            # the two agree to the output's scale, and the kernel to float64 (away from float32's underflow).
            fine = a > -2
            np.testing.assert_allclose(got[fine], want[fine], rtol=2e-6, atol=1e-30)
            np.testing.assert_allclose(got, want, rtol=0, atol=2e-6 * np.abs(want).max())
            ok = np.abs(a) < 4
            np.testing.assert_allclose(got[ok], _exact(np.array(x), activation)[ok], rtol=2e-6, atol=1e-30)


@pytest.mark.parametrize("activation", ["silu", "gelu_tanh"])
@pytest.mark.parametrize("dtype", [mx.float16, mx.bfloat16], ids=str)
def test_glu_half_precision_is_float32_rounded_once(activation, dtype):
    rng = np.random.default_rng(19)
    x = mx.array((rng.standard_normal((2, 5, 2 * 37)) * 3).astype(np.float32)).astype(dtype)
    got = native.glu(x, activation=activation)
    assert got.dtype == dtype
    want = _exact(_f32(x), activation)
    np.testing.assert_allclose(_f32(got), want, rtol=EPS[dtype], atol=EPS[dtype] * 1e-3 * np.abs(want).max())
    n = x.shape[-1] // 2  # and MLX's composition in the dtype, to a few of its roundings
    _close(got, ACTIVATIONS[activation](x[..., :n]) * x[..., n:], TOL[dtype])


def test_glu_strided_input():
    rng = np.random.default_rng(23)
    x = mx.array(rng.standard_normal((2 * 21, 3)).astype(np.float32)).T  # last axis stride 3
    np.testing.assert_allclose(np.array(native.glu(x, activation="silu")), _exact(np.array(x), "silu"),
                               rtol=2e-6, atol=1e-30)


@pytest.mark.parametrize("activation", ["silu", "gelu_tanh"])
def test_glu_gradient_is_the_compositions(activation):
    rng = np.random.default_rng(29)
    x = mx.array((rng.standard_normal((2, 3, 2 * 19)) * 2).astype(np.float32))
    w = mx.array(rng.standard_normal((2, 3, 19)).astype(np.float32))
    act = ACTIVATIONS[activation]
    got = mx.grad(lambda t: (native.glu(t, activation=activation) * w).sum())(x)
    want = mx.grad(lambda t: (act(t[..., :19]) * t[..., 19:] * w).sum())(x)
    np.testing.assert_allclose(np.array(got), np.array(want), rtol=1e-5, atol=1e-6)


def test_glu_refuses_bad_arguments():
    with pytest.raises(ValueError, match=r"\[mlxc.glu\] activation must be 'silu' or 'gelu_tanh', got 'relu'"):
        native.glu(mx.zeros((1, 4)), activation="relu")
    with pytest.raises(ValueError, match="even length"):
        native.glu(mx.zeros((1, 5)), activation="silu")
    with pytest.raises(ValueError, match="float32, float16 or bfloat16"):
        native.glu(mx.zeros((1, 4), mx.int32), activation="silu")
