"""The native CPU selective scan (kernels/native/src/scan.cpp) against a float64 numpy recurrence on odd shapes, for
every instruction set this CPU runs; its gradients against the sequential reference's; and a whole Mamba model with
the native scan against the same model on the reference MLX ops and against transformers."""

from __future__ import annotations

import sys

import numpy as np
import pytest

import mlx.core as mx
from mamba_ref import numpy_scan

from mlxc.codegen.module import helper_namespace
from mlxc.kernels import native

pytestmark = pytest.mark.skipif(not native.scan_available(),
                                reason=f"the native selective scan is unavailable: {native.reason()}")


def _inputs(seed, b, T, dm, n, fast=False):
    """u, delta, A, B, C, D, dt_bias, z, h0 as float32 numpy; `fast`: dt up to ~40 and |A| up to ~50 (decays that
    underflow float32 within a step or two)."""
    rng = np.random.default_rng(seed)
    f = lambda *s: rng.normal(size=s).astype(np.float32)  # noqa: E731
    A = -np.exp(f(dm, n) * (1.5 if fast else 0.5) + (2.0 if fast else 0.0)).astype(np.float32)
    delta = f(b, T, dm) * (8.0 if fast else 1.0)
    return f(b, T, dm), delta, A, f(b, T, n), f(b, T, n), f(dm), f(dm) * 0.5, f(b, T, dm), f(b, dm, n)


def _rel(got, want) -> float:
    return float(np.abs(np.asarray(got, np.float64) - want).max() / max(np.abs(want).max(), 1e-30))


@pytest.fixture(params=native.supported_isas())
def isa(request):
    native.set_isa(request.param)
    yield request.param
    native.set_isa("auto")


SHAPES = [  # b, T, Dm, N, z, h0, fast
    (1, 1, 5, 4, False, False, False),     # one token, fewer channels than a vector
    (2, 37, 19, 16, True, True, False),    # a channel tail of 3, gated, from a state
    (2, 37, 40, 4, False, True, True),     # fast decays (underflow), N = 4
    (1, 70, 33, 16, True, False, False),
]


@pytest.mark.parametrize("b, T, dm, n, with_z, with_h, fast", SHAPES)
def test_native_scan_equals_the_float64_recurrence(isa, b, T, dm, n, with_z, with_h, fast):
    u, delta, A, B, C, D, bias, z, h0 = _inputs(T + dm, b, T, dm, n, fast)
    z, h0 = (z if with_z else None), (h0 if with_h else None)
    y, h = native.selective_scan(*(mx.array(v) for v in (u, delta, A, B, C, D, bias)),
                                 z=None if z is None else mx.array(z), h=None if h0 is None else mx.array(h0))
    assert y.dtype == mx.float32 and y.shape == (b, T, dm) and h.shape == (b, dm, n)
    want_y, want_h = numpy_scan(u, delta, A, B, C, D, bias, z, h0)
    assert _rel(y, want_y) <= 1e-5 and _rel(h, want_h) <= 1e-5


@pytest.mark.parametrize("dtype", [mx.float16, mx.bfloat16])
def test_half_inputs_run_in_float32(dtype):
    """Half-precision inputs, float32 inside: the float64 recurrence on the same (rounded) inputs."""
    u, delta, A, B, C, D, bias, z, h0 = (mx.array(v).astype(dtype) for v in _inputs(5, 2, 29, 21, 16))
    y, h = native.selective_scan(u, delta, A, B, C, D, bias, z=z, h=h0)
    want_y, want_h = numpy_scan(*(np.array(v.astype(mx.float32)) for v in (u, delta, A, B, C, D, bias, z, h0)))
    assert _rel(y, want_y) <= 1e-5 and _rel(h, want_h) <= 1e-5


def test_strided_inputs():
    """Slices of a wider projection (as the model passes B and C) read as the contiguous arrays do."""
    u, delta, A, B, C, D, bias, z, _ = _inputs(8, 2, 23, 17, 8)
    bc = mx.array(np.concatenate([B, C], axis=-1))
    y, h = native.selective_scan(mx.array(u), mx.array(delta).transpose(0, 1, 2), mx.array(A), bc[..., :8],
                                 bc[..., 8:], mx.array(D), mx.array(bias), z=mx.array(z))
    want_y, want_h = numpy_scan(u, delta, A, B, C, D, bias, z)
    assert _rel(y, want_y) <= 1e-5 and _rel(h, want_h) <= 1e-5


def test_bad_shapes_are_one_clear_error():
    u, delta, A, B, C, D, bias, z, _ = (mx.array(v) for v in _inputs(1, 1, 4, 8, 4))
    with pytest.raises(ValueError, match="B and C must be"):
        native.selective_scan(u, delta, A, B[..., :3], C, D, bias)
    with pytest.raises(ValueError, match="N .* must be between"):
        native.selective_scan(u, delta, mx.zeros((8, 300)), B, C, D, bias)


def test_helper_gradients_match_the_sequential_scan():
    """The generated code's native scan differentiates as the sequential reference does (LoRA training)."""
    ns = helper_namespace(["selective_scan"])
    assert ns["NATIVE_SCAN"]
    u, delta, A, B, C, D, bias, z, h0 = (mx.array(v) for v in _inputs(11, 2, 23, 12, 5))
    w = mx.array(np.random.default_rng(3).normal(size=(2, 23, 12)).astype(np.float32))

    def loss(scan):
        def f(u, delta, B, C, z, h0):
            y, h = scan(u, delta, B, C, z, h0)
            return (y * w).sum() + (h * h).sum()
        return f

    ours = mx.grad(loss(lambda u, delta, B, C, z, h0: ns["native_selective_scan"](u, delta, A, B, C, D, bias, z, h0)),
                   argnums=tuple(range(6)))(u, delta, B, C, z, h0)
    want = mx.grad(loss(lambda u, delta, B, C, z, h0: ns["selective_scan_reference"](u, delta, A, B, C, D, z, bias,
                                                                                      h0)),
                   argnums=tuple(range(6)))(u, delta, B, C, z, h0)
    for g, r in zip(ours, want):
        assert float(np.abs(np.array(g) - np.array(r)).max()) <= 1e-5 * max(np.abs(np.array(r)).max(), 1.0)


def test_mamba_model_with_the_native_scan(tmp_path_factory):
    """A random MambaForCausalLM: the native scan (kernels=auto on this CPU) gives the reference ops' logits and
    transformers', prefill and one token at a time."""
    pytest.importorskip("transformers")
    import mlxc
    from parity import check_logits, ids
    from test_family_mamba import VOCAB, _case

    hf, path = _case("mamba-bias", tmp_path_factory)
    nat, ref = mlxc.load(str(path)), mlxc.load(str(path), kernels="reference")
    ops = {o.op: o.attrs.get("kernel") for fn in nat.program.functions for o in fn.ops}
    assert ops["selective_scan"].value == "native"
    mod = sys.modules[type(nat.net).__module__]
    assert mod.NATIVE_SCAN and mod.SELECTIVE_SCAN == "auto"
    tokens = mx.array(ids(VOCAB, (2, 37), seed=9))
    a, b = np.array(nat(tokens).logits), np.array(ref(tokens).logits)
    assert float(np.abs(a - b).max()) <= 1e-4
    check_logits(hf, nat, VOCAB, seq=37)
    cache = nat.make_cache()
    steps = [np.array(nat(tokens[:, :30], cache=cache).logits)]
    steps += [np.array(nat(tokens[:, t:t + 1], cache=cache).logits) for t in range(30, 37)]
    assert float(np.abs(np.concatenate(steps, axis=1) - a).max()) <= 1e-4
