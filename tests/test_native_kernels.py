"""Native CPU kernels (mlxc.kernels.native): each kernel against its reference, `mx.dequantize` then a float32
matmul in MLX, on every instruction set this CPU runs (the portable C++ path included), every bit width and group
size, odd shapes (rows not a multiple of 8, batch 1 and 7, K = 32 x odd), float16/bfloat16 scales and activations,
GGUF Q4_0/Q4_1/Q8_0 blocks as mlxc loads them, under `mx.compile` and inside a graph of other ops.

Tolerances. The float path differs from the reference only by float32 summation order: |err| <= 1e-5 * (|x| @ |W|.T).
The int8 path quantizes each 32-element activation block to x ~= d * q, d = max|x_block| / 127, so each element is
off by at most d / 2 and the result is exactly W @ (d q) (the biases multiply block sums of d q), so
    |y - x @ W.T| <= sum_blocks (d / 2) * sum_{k in block} |W[n, k]|       (the bound `act_bound` computes)
plus the same float32 slack, and its RMS is that of rounding noise (variance sum_blocks d^2/12 * sum_block W^2):
about 5e-3 of the output's RMS for Gaussian activations, more for activations with outliers.
"""

from __future__ import annotations

import numpy as np
import pytest

import mlx.core as mx

from mlxc.kernels import native

pytestmark = pytest.mark.skipif(not native.available(), reason=f"native kernels unavailable: {native.reason()}")

ISAS = native.supported_isas()
BITS_GROUPS = [(4, 32), (8, 32), (4, 64), (8, 64), (4, 128), (8, 128)]
# (M, N, K): batch 1 and 7 (and 4, 5, 19: full and partial register tiles; 19 x 37 also full and partial 16-row
# tiles of the batched path), N not a multiple of 8, K = 32 x odd
SHAPES = [(1, 37, 32 * 7), (7, 61, 32 * 9), (1, 5, 32), (4, 13, 32 * 3), (5, 19, 32 * 17), (19, 37, 32 * 5)]


@pytest.fixture(params=ISAS)
def isa(request):
    native.set_isa(request.param)
    yield request.param
    native.set_isa("auto")


def k_for(k: int, group_size: int) -> int:
    """K as given when the group size divides it, else the nearest odd multiple of the group size."""
    if k % group_size == 0:
        return k
    n = max(1, k // group_size)
    return group_size * (n if n % 2 else n + 1)


def weight(n: int, k: int, bits: int, group_size: int, seed: int = 0, dtype=mx.float32):
    """Codes, scales and biases of a random weight, and the weight they represent (float32)."""
    rng = np.random.default_rng(seed)
    w = mx.array(rng.standard_normal((n, k)).astype(np.float32) * 0.05)
    codes, scales, biases = mx.quantize(w, group_size=group_size, bits=bits)
    scales, biases = scales.astype(dtype), biases.astype(dtype)
    ref = mx.dequantize(codes, scales.astype(mx.float32), biases.astype(mx.float32), group_size=group_size, bits=bits)
    return codes, scales, biases, ref


def activations(m: int, k: int, seed: int = 1) -> mx.array:
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((m, k)).astype(np.float32)
    x[:, ::7] *= 4.0  # some larger entries, as activations have
    return mx.array(x)


def act_bound(x: mx.array, w: mx.array) -> np.ndarray:
    """The int8 path's worst-case error: sum over 32-blocks of (max|x_block| / 254) * sum_block |W[n, :]|."""
    xb = np.abs(np.array(x, np.float64)).reshape(x.shape[0], -1, 32)
    half_d = xb.max(axis=2) / 127.0 / 2.0                                    # M x blocks
    wb = np.abs(np.array(w, np.float64)).reshape(w.shape[0], -1, 32).sum(2)  # N x blocks
    return half_d @ wb.T


def float_slack(x: mx.array, w: mx.array, rel: float = 1e-5) -> np.ndarray:
    return rel * (np.abs(np.array(x, np.float64)) @ np.abs(np.array(w, np.float64)).T) + 1e-6


def assert_int8_close(y, x, w):
    ref = np.array(x @ w.T, np.float64)
    err = np.abs(np.array(y, np.float64) - ref)
    bound = act_bound(x, w) + float_slack(x, w)
    worst = (err / bound).max()
    assert worst <= 1.0, f"error {err.max():.3g} exceeds the activation-quantization bound (ratio {worst:.3f})"
    # and it behaves like rounding noise: uniform on [-d/2, d/2] per element, variance sum_b d^2/12 sum_block W^2
    xb = np.abs(np.array(x, np.float64)).reshape(x.shape[0], -1, 32).max(axis=2) / 127.0
    wb = (np.array(w, np.float64) ** 2).reshape(w.shape[0], -1, 32).sum(2)
    predicted = np.sqrt(((xb ** 2 / 12.0) @ wb.T).mean())
    assert np.sqrt((err ** 2).mean()) <= 2.0 * predicted + 1e-6


@pytest.mark.parametrize("bits,group_size", BITS_GROUPS)
@pytest.mark.parametrize("m,n,k", SHAPES)
def test_int8_path_within_activation_quantization_bound(isa, bits, group_size, m, n, k):
    k = k_for(k, group_size)
    codes, scales, biases, w = weight(n, k, bits, group_size)
    x = activations(m, k)
    y = native.qmatmul(x, codes, scales, biases, bits=bits, group_size=group_size)
    assert y.shape == (m, n) and y.dtype == mx.float32
    assert_int8_close(y, x, w)


@pytest.mark.parametrize("bits,group_size", BITS_GROUPS)
@pytest.mark.parametrize("m,n,k", SHAPES)
def test_float_path_equals_reference(isa, bits, group_size, m, n, k):
    k = k_for(k, group_size)
    codes, scales, biases, w = weight(n, k, bits, group_size)
    x = activations(m, k)
    y = native.qmatmul(x, codes, scales, biases, bits=bits, group_size=group_size, int8_activations=False)
    err = np.abs(np.array(y, np.float64) - np.array(x @ w.T, np.float64))
    assert (err <= float_slack(x, w)).all(), f"max error {err.max():.3g}"


@pytest.mark.parametrize("bits,group_size", [(4, 32), (8, 32), (4, 128)])
def test_every_isa_computes_what_the_portable_kernel_computes(bits, group_size):
    """Same quantized activations, same integer sums: the SIMD kernels differ from the scalar C++ only in float
    summation order (and the int8 error is the same, not just within the same bound)."""
    m, n, k = 7, 45, k_for(32 * 11, group_size)
    codes, scales, biases, w = weight(n, k, bits, group_size, seed=3)
    x = activations(m, k, seed=4)
    results = {}
    try:
        for name in ISAS:
            native.set_isa(name)
            results[name] = np.array(native.qmatmul(x, codes, scales, biases, bits=bits, group_size=group_size))
    finally:
        native.set_isa("auto")
    for name, y in results.items():
        np.testing.assert_allclose(y, results["scalar"], rtol=0, atol=float_slack(x, w).max(), err_msg=name)


@pytest.mark.parametrize("scale_dtype", [mx.float16, mx.bfloat16])
@pytest.mark.parametrize("int8", [True, False])
def test_half_precision_scales(isa, scale_dtype, int8):
    """GGUF keeps scales in float16; they are read as such (no float32 copy needed)."""
    codes, scales, biases, w = weight(29, 32 * 5, 4, 32, dtype=scale_dtype)
    x = activations(3, 32 * 5)
    y = native.qmatmul(x, codes, scales, biases, bits=4, group_size=32, int8_activations=int8)
    if int8:
        assert_int8_close(y, x, w)
    else:
        np.testing.assert_array_less(np.abs(np.array(y - x @ w.T)), float_slack(x, w))


@pytest.mark.parametrize("x_dtype,eps", [(mx.float16, 2.0 ** -11), (mx.bfloat16, 2.0 ** -8)])
@pytest.mark.parametrize("int8", [True, False])
def test_half_precision_activations(x_dtype, eps, int8):
    codes, scales, biases, w = weight(33, 32 * 7, 8, 32)
    x = activations(2, 32 * 7).astype(x_dtype)
    y = native.qmatmul(x, codes, scales, biases, bits=8, group_size=32, int8_activations=int8)
    assert y.dtype == x_dtype
    x32 = x.astype(mx.float32)
    ref = np.array(x32 @ w.T, np.float64)
    allowed = (act_bound(x32, w) if int8 else 0) + float_slack(x32, w) + np.abs(ref) * eps
    assert (np.abs(np.array(y.astype(mx.float32), np.float64) - ref) <= allowed).all()


def test_leading_dimensions_and_strided_inputs():
    codes, scales, biases, w = weight(21, 32 * 3, 4, 32)
    x = activations(6, 32 * 3).reshape(2, 3, 32 * 3)
    y = native.qmatmul(x, codes, scales, biases, bits=4, group_size=32, int8_activations=False)
    assert y.shape == (2, 3, 21)
    np.testing.assert_allclose(np.array(y), np.array(x @ w.T), atol=1e-5)
    # a transposed view of x and every other row of the weight: copied through their strides
    xt = mx.array(np.array(x[0]).T.copy()).T  # (3, K) view of a (K, 3) array
    rows = slice(None, None, 2)
    ys = native.qmatmul(xt, codes[rows], scales[rows], biases[rows], bits=4, group_size=32, int8_activations=False)
    np.testing.assert_allclose(np.array(ys), np.array(xt @ w[rows].T), atol=1e-5)


def test_threads_do_not_change_results():
    codes, scales, biases, _ = weight(1003, 32 * 9, 4, 32)  # large enough to be split between threads
    x = activations(7, 32 * 9)
    before = native.threads()
    try:
        native.set_threads(1)
        one = np.array(native.qmatmul(x, codes, scales, biases, bits=4, group_size=32))
        native.set_threads(2)
        two = np.array(native.qmatmul(x, codes, scales, biases, bits=4, group_size=32))
    finally:
        native.set_threads(before)
    np.testing.assert_array_equal(one, two)


@pytest.mark.parametrize("shapeless", [False, True])
def test_under_mx_compile(shapeless):
    codes, scales, biases, w = weight(40, 32 * 5, 4, 32)

    def f(x):
        return native.qmatmul(x, codes, scales, biases, bits=4, group_size=32)

    g = mx.compile(f, shapeless=shapeless)
    for m in (1, 7, 3):
        x = activations(m, 32 * 5, seed=m)
        np.testing.assert_array_equal(np.array(g(x)), np.array(f(x)))
        assert_int8_close(g(x), x, w)


def test_in_a_graph_with_other_ops():
    """An MLP block (RMSNorm, SwiGLU on quantized gate/up/down projections, residual) through the native kernels in
    float mode equals the same block on the dequantized weights, eagerly and compiled."""
    d, hidden = 32 * 5, 32 * 9
    gate, up = weight(hidden, d, 4, 32, seed=10), weight(hidden, d, 4, 32, seed=11)
    down = weight(d, hidden, 8, 32, seed=12)
    norm = mx.array(np.random.default_rng(5).standard_normal(d).astype(np.float32))

    def block(x, mm):
        h = mx.fast.rms_norm(x, norm, 1e-5)
        return x + mm(mx.sigmoid(mm(h, gate)) * mm(h, gate) * mm(h, up), down)

    def native_mm(x, w):
        return native.qmatmul(x, *w[:3], bits=8 if w is down else 4, group_size=32, int8_activations=False)

    x = activations(7, d).reshape(1, 7, d)
    ref = block(x, lambda x, w: x @ w[3].T)
    got = block(x, native_mm)
    compiled = mx.compile(lambda x: block(x, native_mm))(x)
    np.testing.assert_allclose(np.array(got), np.array(ref), rtol=1e-4, atol=1e-4)
    np.testing.assert_allclose(np.array(compiled), np.array(got), rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("scale_dtype", [mx.float32, mx.float16])
def test_gradient_with_respect_to_x(scale_dtype):
    """For LoRA training on a quantized base: d(x @ W.T)/dx through MLX's quantized matmul, in float32."""
    codes, scales, biases, w = weight(17, 32 * 3, 4, 32, dtype=scale_dtype)
    x = activations(2, 32 * 3)
    g = mx.grad(lambda x: native.qmatmul(x, codes, scales, biases, bits=4, group_size=32).sum())(x)
    assert g.dtype == mx.float32
    np.testing.assert_allclose(np.array(g), np.array(mx.ones((2, 17)) @ w), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("bits,group_size", BITS_GROUPS)
@pytest.mark.parametrize("dtype", [mx.float32, mx.float16])
def test_qembed_equals_dequantized_rows(bits, group_size, dtype):
    codes, scales, biases, _ = weight(50, 32 * 12, bits, group_size, dtype=dtype)
    ids = mx.array([[3, 0, 49], [7, 7, 1]])
    got = native.qembed(ids, codes, scales, biases, bits=bits, group_size=group_size)
    # computed in float32 and rounded once (MLX's float16 dequantize rounds the product and the sum separately)
    ref = mx.dequantize(codes[ids], scales[ids].astype(mx.float32), biases[ids].astype(mx.float32),
                        group_size=group_size, bits=bits)
    assert got.shape == (2, 3, 32 * 12) and got.dtype == dtype
    np.testing.assert_allclose(np.array(got.astype(mx.float32)), np.array(ref),
                               rtol=2.0 ** -11 if dtype == mx.float16 else 1e-6, atol=1e-7)
    compiled = mx.compile(lambda i: native.qembed(i, codes, scales, biases, bits=bits, group_size=group_size))
    np.testing.assert_array_equal(np.array(compiled(ids).astype(mx.float32)), np.array(got.astype(mx.float32)))


def test_gguf_blocks_as_mlxc_loads_them(tmp_path):
    """Q4_0, Q4_1 and Q8_0 tensors written by the `gguf` package and read by mlxc's loader (fp16 scales, MLX's
    affine layout): the kernels multiply by exactly the weights the gguf package dequantizes."""
    gguf = pytest.importorskip("gguf")
    from gguf import GGMLQuantizationType as Q
    from gguf.quants import dequantize, quantize

    from mlxc.runtime import weights as W

    rng = np.random.default_rng(8)
    path = tmp_path / "blocks.gguf"
    writer = gguf.GGUFWriter(str(path), "llama")
    want, types = {}, {}
    for name, qtype, rows in (("a", Q.Q4_0, 19), ("b", Q.Q4_1, 37), ("c", Q.Q8_0, 11)):
        w = rng.standard_normal((rows, 32 * 7)).astype(np.float32) * np.float32(0.1)
        blocks = quantize(w, qtype)
        writer.add_tensor(name, blocks, raw_shape=blocks.shape, raw_dtype=qtype)
        want[name] = mx.array(dequantize(blocks, qtype))
        types[name] = W.GGUF_NATIVE[qtype.name]
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    x = activations(7, 32 * 7, seed=9)
    for name, t in W.read_gguf_blocks(path, types).items():
        args = (t.codes, t.scales, t.biases)
        exact = native.qmatmul(x, *args, bits=t.quant.bits, group_size=32, int8_activations=False)
        ref = x @ want[name].T
        assert (np.abs(np.array(exact - ref)) <= float_slack(x, want[name])).all(), name
        assert_int8_close(native.qmatmul(x, *args, bits=t.quant.bits, group_size=32), x, want[name])


@pytest.mark.parametrize("bits,group_size", BITS_GROUPS)
@pytest.mark.parametrize("scale_dtype", [mx.float32, mx.float16])
@pytest.mark.parametrize("m", [1, 7, 19])
def test_packed_weights_compute_what_the_unpacked_kernel_computes(isa, bits, group_size, scale_dtype, m):
    """`pack` moves codes, scales and biases into 16-row tiles; `qmatmul_packed` then does the same integer dot
    products as `qmatmul` (so the same activation-quantization bound), N = 37 leaving a partial tile."""
    n, k = 37, k_for(32 * 9, group_size)
    codes, scales, biases, w = weight(n, k, bits, group_size, seed=21, dtype=scale_dtype)
    x = activations(m, k, seed=22)
    pc, ps, pb = native.pack(codes, scales, biases, bits=bits, group_size=group_size)
    assert pc.shape == (3, k // 32 * (256 if bits == 4 else 512)) and ps.shape == (3, k // group_size * 16)
    y = native.qmatmul_packed(x, pc, ps, pb, bits=bits, group_size=group_size, n=n)
    assert y.shape == (m, n)
    ref = native.qmatmul(x, codes, scales, biases, bits=bits, group_size=group_size)
    np.testing.assert_allclose(np.array(y), np.array(ref), rtol=0, atol=float_slack(x, w).max())
    assert_int8_close(y, x, w)
    compiled = mx.compile(lambda x: native.qmatmul_packed(x, pc, ps, pb, bits=bits, group_size=group_size, n=n))
    np.testing.assert_array_equal(np.array(compiled(x)), np.array(y))


@pytest.mark.parametrize("bits,group_size", BITS_GROUPS)
@pytest.mark.parametrize("scale_dtype", [mx.float32, mx.float16])
def test_qembed_on_packed_tables(bits, group_size, scale_dtype):
    """The packed table gives the same rows as the MLX layout (a tied embedding and LM head share one copy)."""
    codes, scales, biases, _ = weight(37, 32 * 12, bits, group_size, seed=23, dtype=scale_dtype)
    pc, ps, pb = native.pack(codes, scales, biases, bits=bits, group_size=group_size)
    ids = mx.array([[36, 0, 15, 16], [17, 31, 32, -1]])
    got = native.qembed_packed(ids, pc, ps, pb, bits=bits, group_size=group_size, n=37, dtype=mx.float32)
    want = native.qembed(ids, codes, scales, biases, bits=bits, group_size=group_size, dtype=mx.float32)
    np.testing.assert_array_equal(np.array(got), np.array(want))


def test_packed_arguments_are_checked():
    codes, scales, biases, _ = weight(20, 64, 4, 32)
    pc, ps, pb = native.pack(codes, scales, biases, bits=4, group_size=32)
    with pytest.raises(ValueError, match="ceil"):
        native.qmatmul_packed(mx.zeros((1, 64)), pc, ps, pb, bits=4, group_size=32, n=40)
    with pytest.raises(ValueError, match="float32 or float16"):
        native.qmatmul_packed(mx.zeros((1, 64)), pc, ps.astype(mx.bfloat16), pb.astype(mx.bfloat16), bits=4,
                              group_size=32, n=20)
    with pytest.raises(ValueError, match="must end in K = 64"):
        native.qmatmul_packed(mx.zeros((1, 32)), pc, ps, pb, bits=4, group_size=32, n=20)


def test_bad_arguments_are_refused_with_a_reason():
    codes, scales, biases, _ = weight(8, 64, 4, 32)
    with pytest.raises(ValueError, match="must end in K = 64"):
        native.qmatmul(mx.zeros((2, 32)), codes, scales, biases, bits=4, group_size=32)
    with pytest.raises(ValueError, match="group_size"):
        native.qmatmul(mx.zeros((2, 64)), codes, scales, biases, bits=4, group_size=16)
    with pytest.raises(ValueError, match="scales of shape"):
        native.qmatmul(mx.zeros((2, 128)), codes, scales, biases, bits=8, group_size=64)
    with pytest.raises(ValueError, match="uint32"):
        native.qmatmul(mx.zeros((2, 64)), codes.astype(mx.int32), scales, biases, bits=4, group_size=32)
    foreign = next(name for name in ("neon", "avx2") if name not in ISAS)  # an ISA of the other architecture
    with pytest.raises(ValueError, match="cannot run"):
        native.set_isa(foreign)


def test_reports_what_runs():
    assert native.reason() is None
    assert native.isa() in ISAS and ISAS[-1] == "scalar"
    assert native.threads() >= 1
    assert native.isa() in native.describe()


@pytest.mark.parametrize("m,n,k", [(1, 37, 32 * 7), (5, 19, 32 * 17)])
def test_two_activation_passes_shrink_the_error(m, n, k):
    """act_terms=2 codes x ~= d1 q1 + d2 q2 (q2 the first pass's residual, per 32-block), so each element is off by
    at most d2 / 2 = max|residual_block| / 254: the same bound as one pass with the residual in place of x."""
    codes, scales, biases, w = weight(n, k, 4, 32, seed=29)
    x = activations(m, k, seed=31)
    xb = np.array(x, np.float64).reshape(m, -1, 32)
    d1 = np.abs(xb).max(axis=2, keepdims=True) / 127.0
    residual = mx.array((xb - d1 * np.round(xb / d1)).reshape(m, k).astype(np.float32))
    bound = act_bound(residual, w) + float_slack(x, w)
    ref = np.array(x @ w.T, np.float64)
    pc, ps, pb = native.pack(codes, scales, biases, bits=4, group_size=32)
    for y in (native.qmatmul(x, codes, scales, biases, bits=4, group_size=32, act_terms=2),
              native.qmatmul_packed(x, pc, ps, pb, bits=4, group_size=32, n=n, act_terms=2)):
        err = np.abs(np.array(y, np.float64) - ref)
        assert (err / bound).max() <= 1.0
    one = np.abs(np.array(native.qmatmul(x, codes, scales, biases, bits=4, group_size=32), np.float64) - ref)
    assert np.sqrt((err ** 2).mean()) < np.sqrt((one ** 2).mean()) / 50


# ------------------------------------------------------------------------------------------------ decode-step ops
# Each against MLX's own op (mx.fast.*, composed from several ops on the CPU): float32 inside, so float32 inputs
# agree to float32 rounding, and half-precision inputs to one rounding of the result.

HALF_TOL = {mx.float32: 2e-6, mx.float16: 2e-3, mx.bfloat16: 1.6e-2}


def _close(got, want, dtype):
    g, w = np.array(got.astype(mx.float32)), np.array(want.astype(mx.float32))
    np.testing.assert_allclose(g, w, rtol=HALF_TOL[dtype], atol=HALF_TOL[dtype] * max(1.0, np.abs(w).max()))


@pytest.mark.parametrize("dtype", [mx.float32, mx.float16, mx.bfloat16])
def test_rms_norm_equals_mlx(dtype):
    rng = np.random.default_rng(41)
    x = mx.array(rng.standard_normal((2, 3, 96)).astype(np.float32) * 3).astype(dtype)
    w = mx.array(1.0 + rng.standard_normal(96).astype(np.float32) * 0.1)
    _close(native.rms_norm(x, w, 1e-5), mx.fast.rms_norm(x, w.astype(dtype), 1e-5), dtype)


@pytest.mark.parametrize("traditional", [False, True])
@pytest.mark.parametrize("dims", [64, 32])
@pytest.mark.parametrize("dtype", [mx.float32, mx.float16])
def test_rope_equals_mlx(traditional, dims, dtype):
    """[B, H, T, D] at an int or array offset, on a transposed view (as attention makes them), partial dims too."""
    rng = np.random.default_rng(43)
    x = mx.array(rng.standard_normal((2, 5, 3, 64)).astype(np.float32)).astype(dtype).transpose(0, 2, 1, 3)
    freqs = mx.array(10000.0 ** (np.arange(0, dims, 2) / dims), dtype=mx.float32)
    want = mx.fast.rope(x, dims, traditional=traditional, base=None, scale=1.0, offset=37, freqs=freqs)
    _close(native.rope(x, dims, traditional=traditional, freqs=freqs, offset=37), want, dtype)
    _close(native.rope(x, dims, traditional=traditional, freqs=freqs, offset=mx.array(37)), want, dtype)


@pytest.mark.parametrize("dtype", [mx.float32, mx.float16])
@pytest.mark.parametrize("hq,hkv,s,window", [(9, 3, 1, 0), (9, 3, 70, 0), (4, 4, 33, 0), (6, 2, 70, 16)])
def test_attention_decode_equals_mlx(dtype, hq, hkv, s, window):
    """One query per head over a KV cache's buffer in place (a view of the first s of 128 positions)."""
    rng = np.random.default_rng(47)
    q = mx.array(rng.standard_normal((2, hq, 1, 64)).astype(np.float32)).astype(dtype)
    kb = mx.array(rng.standard_normal((2, hkv, 128, 64)).astype(np.float32)).astype(dtype)
    vb = mx.array(rng.standard_normal((2, hkv, 128, 64)).astype(np.float32)).astype(dtype)
    k, v = kb[:, :, :s], vb[:, :, :s]
    kw, vw = (k, v) if not window else (k[:, :, -window:], v[:, :, -window:])
    want = mx.fast.scaled_dot_product_attention(q, kw, vw, scale=0.125)
    _close(native.attention_decode(q, k, v, scale=0.125, window=window), want, dtype)


def test_decode_ops_refuse_bad_shapes():
    with pytest.raises(ValueError, match="one query per head"):
        native.attention_decode(mx.zeros((1, 2, 3, 8)), mx.zeros((1, 2, 4, 8)), mx.zeros((1, 2, 4, 8)), scale=1.0)
    with pytest.raises(ValueError, match="multiple of key heads"):
        native.attention_decode(mx.zeros((1, 3, 1, 8)), mx.zeros((1, 2, 4, 8)), mx.zeros((1, 2, 4, 8)), scale=1.0)
    with pytest.raises(ValueError, match="dims must be even"):
        native.rope(mx.zeros((1, 1, 2, 8)), 3, traditional=False, freqs=mx.ones((1,)), offset=0)
    with pytest.raises(ValueError, match="w must be a vector"):
        native.rms_norm(mx.zeros((2, 8)), mx.ones((4,)), 1e-5)
