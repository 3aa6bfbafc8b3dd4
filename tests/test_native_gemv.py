"""mlxc's float matrix-vector kernel (`native.linear`: x @ w.T + bias for few rows of x) against an independent
reference, numpy in float64 on the same (dtype-rounded) values, on every instruction set this CPU runs.

Tolerances. Float32: the kernel sums in float32 (per-lane partial sums, then a tree), so it agrees with the float64
product to float32 rounding: 1e-5 relative RMS and 1e-4 of the output's scale (max |reference|) per element.
float16 / bfloat16 weights: inputs are exact in float64 and the kernel accumulates in float32 too, then rounds the
result to the dtype once, so each element is within one rounding of the dtype (unit roundoff u = 2^-11 for float16,
2^-8 for bfloat16, relative to the element) plus the float32 bound above.
"""

from __future__ import annotations

import os

import numpy as np
import pytest

import mlx.core as mx

from mlxc.kernels import native

pytestmark = pytest.mark.skipif(not native.available(), reason=f"native kernels unavailable: {native.reason()}")

ISAS = native.supported_isas()
MS = (1, 2, 3, 5, 8, 17)
KS = (1, 15, 64, 576, 1000, 1031)
NS = (1, 7, 33, 960, 4099)
ROUNDOFF = {mx.float16: 2.0 ** -11, mx.bfloat16: 2.0 ** -8}
BATCH = {1: (1, 1), 2: (1, 2), 3: (3, 1), 5: (1, 5), 8: (2, 4), 17: (17, 1)}  # M as [B, T]


@pytest.fixture
def restored():
    yield
    native.set_isa("auto")
    native.set_threads(0)
    native._ext.set_tuning("parallel_min_work", int(os.environ.get("MLXC_NATIVE_PAR_MIN", 1 << 20)))


@pytest.fixture(scope="module")
def data():
    """One random x, W and bias at the largest shape; cases take leading slices (copied contiguous)."""
    rng = np.random.default_rng(7)
    return (rng.standard_normal((max(MS), max(KS))).astype(np.float32),
            rng.standard_normal((max(NS), max(KS))).astype(np.float32),
            rng.standard_normal(max(NS)).astype(np.float32))


def _f64(a: mx.array) -> np.ndarray:
    return np.array(a.astype(mx.float32)).astype(np.float64)


def _reference(x: mx.array, w: mx.array, b) -> np.ndarray:
    y = _f64(x) @ _f64(w).T
    return y + _f64(b) if b is not None else y


def _check(got: mx.array, x: mx.array, w: mx.array, b=None):
    assert got.dtype == x.dtype and got.shape == x.shape[:-1] + (w.shape[0],)
    ref = _reference(x, w, b)
    g = _f64(got)
    scale = max(float(np.abs(ref).max()), 1e-30)
    if x.dtype == mx.float32:
        rms = float(np.sqrt(np.mean((g - ref) ** 2)) / max(np.sqrt(np.mean(ref ** 2)), 1e-30))
        assert rms <= 1e-5, f"relative RMS error {rms:.3g}"
        np.testing.assert_allclose(g, ref, rtol=0, atol=1e-4 * scale)
    else:
        np.testing.assert_allclose(g, ref, rtol=ROUNDOFF[x.dtype], atol=1e-4 * scale)


def _case(data, m, k, n, dtype=mx.float32, batched=False, bias=True):
    xs, ws, bs = data
    x = mx.array(np.ascontiguousarray(xs[:m, :k])).astype(dtype)
    if batched:
        x = x.reshape(*BATCH[m], k)
    w = mx.array(np.ascontiguousarray(ws[:n, :k])).astype(dtype)
    b = mx.array(bs[:n]).astype(dtype) if bias else None
    return x, w, b


def _all_shapes():
    i = 0
    for k in KS:
        for n in NS:
            for m in MS:
                yield m, k, n, (i // 2) % 2 == 1, i % 2 == 0  # batched and bias alternate independently
                i += 1


@pytest.mark.parametrize("isa", ISAS)
def test_float32_every_shape(isa, data, restored):
    """Every M x K x N of the grid, [M, K] and [B, T, K] inputs, with and without bias, one thread."""
    native.set_isa(isa)
    native.set_threads(1)
    for m, k, n, batched, bias in _all_shapes():
        x, w, b = _case(data, m, k, n, batched=batched, bias=bias)
        _check(native.linear(x, w, b), x, w, b)


@pytest.mark.parametrize("dtype", [mx.float16, mx.bfloat16], ids=["float16", "bfloat16"])
@pytest.mark.parametrize("isa", ISAS)
def test_half_weights(isa, dtype, data, restored):
    native.set_isa(isa)
    native.set_threads(1)
    for i, (m, k, n) in enumerate([(1, 1, 7), (1, 15, 33), (2, 64, 1), (3, 1031, 960), (5, 1000, 33), (8, 576, 7),
                                   (17, 15, 4099), (1, 1031, 4099), (4, 1024, 960)]):
        x, w, b = _case(data, m, k, n, dtype, batched=i % 2 == 1, bias=i % 3 != 0)
        _check(native.linear(x, w, b), x, w, b)


@pytest.mark.parametrize("dtype", [mx.float16, mx.bfloat16], ids=["float16", "bfloat16"])
@pytest.mark.parametrize("isa", ISAS)
def test_half_special_values(isa, dtype, restored):
    """Subnormal, signed-zero, infinite and NaN weights widen exactly (the portable kernel converts float16 by hand)."""
    native.set_isa(isa)
    k = 37  # a masked tail on every ISA
    j = np.arange(k)
    tiny = 2.0 ** -20 if dtype == mx.float16 else 2.0 ** -130  # subnormal in the dtype
    w = np.zeros((6, k), np.float32)
    w[0] = tiny * (j % 5 - 2)                                 # subnormals of both signs: a subnormal sum
    w[1] = np.array([1.5, -2.25, 0.0, -0.0, 3.0])[j % 5]
    w[2], w[2, 36] = -0.0, np.inf                             # +inf in the masked tail
    w[3], w[3, 3], w[3, 20] = 1.0, np.inf, -np.inf            # nan
    w[4] = -0.0
    w[5], w[5, 16] = 1.0, np.nan
    x = np.where(j % 2 == 0, 1.0, 0.5).astype(np.float32)[None].repeat(2, 0)
    x[1] *= -1.0
    xm, wm = mx.array(x).astype(dtype), mx.array(w).astype(dtype)
    with np.errstate(invalid="ignore"):  # inf - inf in row 3
        got, ref = _f64(native.linear(xm, wm)), _f64(xm) @ _f64(wm).T
    np.testing.assert_array_equal(np.isnan(got), np.isnan(ref))
    np.testing.assert_array_equal(got[np.isinf(ref)], ref[np.isinf(ref)])
    fin = np.isfinite(ref)
    assert ref[0, 0] != 0
    np.testing.assert_allclose(got[fin], ref[fin], rtol=ROUNDOFF[dtype], atol=0)


@pytest.mark.parametrize("isa", ISAS)
def test_two_threads_match_one(isa, data, restored):
    """Split over the pool (forced for small shapes too): chunk boundaries change nothing, bit for bit."""
    native.set_isa(isa)
    native._ext.set_tuning("parallel_min_work", 0)
    for i, (m, k, n) in enumerate([(1, 1031, 4099), (3, 15, 33), (5, 64, 960), (17, 1000, 7), (2, 576, 4099),
                                   (8, 1, 33)]):
        for dtype in (mx.float32, mx.bfloat16) if i < 2 else (mx.float32,):
            x, w, b = _case(data, m, k, n, dtype, batched=i % 2 == 0, bias=i % 2 == 1)
            native.set_threads(1)
            one = native.linear(x, w, b)
            native.set_threads(2)
            two = native.linear(x, w, b)
            mx.eval(one, two)
            _check(two, x, w, b)
            np.testing.assert_array_equal(np.array(one.astype(mx.float32)), np.array(two.astype(mx.float32)))


def test_strided_inputs(data):
    """Transposed and sliced x, row-strided and transposed W, a strided bias, a broadcast x: any strides work."""
    xs, ws, bs = data
    x = mx.array(np.ascontiguousarray(xs[:5, :64].T)).T  # views: [5, 64] with strides (1, 5)
    wbig = mx.array(ws[:33, :100])
    w_rows = wbig[:, 10:74]  # each row contiguous, rows 100 apart
    w_t = mx.array(np.ascontiguousarray(ws[:33, :64].T)).T  # [33, 64] with strides (1, 33)
    b = mx.array(bs[:66])[::2]
    for w in (w_rows, w_t):
        _check(native.linear(x, w, b), x, w, b)
    xb = mx.broadcast_to(mx.array(xs[:1, :64]), (3, 64))
    _check(native.linear(xb, w_t), xb, w_t)
    xh = mx.array(np.ascontiguousarray(xs[:3, :64].T)).astype(mx.float16).T
    _check(native.linear(xh, w_t.astype(mx.float16)), xh, w_t.astype(mx.float16))


@pytest.mark.parametrize("bias", [True, False], ids=["bias", "no-bias"])
def test_gradients_match_mlx(bias, data):
    x, w, b = _case(data, 3, 64, 33, batched=True, bias=bias)
    args = [x, w] + ([b] if bias else [])
    c = mx.array(np.random.default_rng(3).standard_normal((1, 3, 33)).astype(np.float32))

    def ours(*a):
        return (native.linear(*a) * c).sum()

    def mlx_ref(*a):
        y = a[0] @ a[1].T
        return ((y + a[2] if len(a) > 2 else y) * c).sum()

    argnums = tuple(range(len(args)))
    got = mx.grad(ours, argnums=argnums)(*args)
    want = mx.grad(mlx_ref, argnums=argnums)(*args)
    for g, r in zip(got, want):
        np.testing.assert_allclose(np.array(g), np.array(r), rtol=1e-5, atol=1e-5 * float(np.abs(np.array(r)).max()))


@pytest.mark.parametrize("shapeless", [False, True])
def test_compiled(shapeless, data):
    x, w, b = _case(data, 1, 64, 33)
    f = mx.compile(lambda x, w, b: native.linear(x, w, b) * 2.0, shapeless=shapeless)
    _check(f(x, w, b) / 2.0, x, w, b)
    x3, _, _ = _case(data, 3, 64, 33, batched=True)
    y3 = f(x3, w, b)
    assert y3.shape == (3, 1, 33)
    _check(y3 / 2.0, x3, w, b)


def test_empty_and_tiny(data):
    w = mx.array(data[1][:7, :15])
    x0 = mx.zeros((0, 15))
    assert native.linear(x0, w).shape == (0, 7)
    b = mx.array(data[2][:7])
    y = native.linear(mx.zeros((2, 0)), mx.zeros((7, 0)), b)
    np.testing.assert_array_equal(np.array(y), np.broadcast_to(np.array(b), (2, 7)))


def test_errors(data):
    x, w, b = _case(data, 2, 64, 33)
    with pytest.raises(ValueError, match=r"\[mlxc.linear\] x \(2, 63\) must end in K = 64"):
        native.linear(x[:, :63], w)
    with pytest.raises(ValueError, match=r"\[mlxc.linear\] x \(float16\) and w \(float32\) must have the same dtype"):
        native.linear(x.astype(mx.float16), w)
    with pytest.raises(ValueError, match=r"\[mlxc.linear\] bias must have shape \(33,\)"):
        native.linear(x, w, b[:32])
    with pytest.raises(ValueError, match=r"\[mlxc.linear\] bias must have shape \(33,\)"):
        native.linear(x, w, b.reshape(1, 33))
    with pytest.raises(ValueError, match=r"\[mlxc.linear\] bias \(bfloat16\) must have w's dtype \(float32\)"):
        native.linear(x, w, b.astype(mx.bfloat16))
    with pytest.raises(ValueError, match=r"\[mlxc.linear\] w must be a 2-D \[N, K\] array, got shape \(64,\)"):
        native.linear(x, w[0])
    with pytest.raises(ValueError, match=r"\[mlxc.linear\] w must be a 2-D \[N, K\] array"):
        native.linear(x, w.reshape(1, 33, 64))
    with pytest.raises(ValueError, match=r"\[mlxc.linear\] w must be float32, float16 or bfloat16"):
        native.linear(x.astype(mx.int32), w.astype(mx.int32))
