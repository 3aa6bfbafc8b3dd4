"""The Metal emulator (kernels/emulator) and MLX's source rules (kernels/metal/source.py).

Sources are compared byte for byte with what MLX itself generates (captured through `mx.export_function`); the
emulator is checked on Metal's semantics (barriers, threadgroup memory, SIMD-group functions, thread positions)
and on every error it exists to report. Kernels are tiny; compiled kernels are cached (~/.cache/mlxc/emulator).
"""

from __future__ import annotations

import shutil

import mlx.core as mx
import numpy as np
import pytest

from mlxc.kernels.emulator import Choices, EmulatorError, build, emulate, emulate_result
from mlxc.kernels.emulator.emulator import rewrite_threadgroup
from mlxc.kernels.metal.source import capture_metal_source, render_metal

pytestmark = pytest.mark.skipif(shutil.which("g++") is None, reason="the emulator compiles kernels with g++")


def _src(body, inputs, out_dtypes, template=(), header="", names=None, onames=None):
    names = names or [f"in{i}" for i in range(len(inputs))]
    onames = onames or [f"out{i}" for i in range(len(out_dtypes))]
    return render_metal("t", names, onames, body, header, inputs, out_dtypes, template)


def _run(body, inputs, outs, grid, tg, template=(), header="", **kw):
    """outs: [(shape, dtype)]; returns the EmulatorResult."""
    src = _src(body, inputs, [d for _, d in outs], template, header)
    return emulate_result(src, inputs, [s for s, _ in outs], [d for _, d in outs], grid, tg, **kw)


def _ok(res):
    assert not res.findings, res.findings
    return [np.array(o) for o in res.outputs]


def _kinds(res):
    return [f.kind for f in res.findings]


# ------------------------------------------------------------------------------------------------ MLX's source


_TRICKY = [
    # templates (dtype, int, bool), a header, a small constant input, shape buffer, two outputs with an attribute
    dict(name="tmpl", input_names=["a", "b"], output_names=["o", "p"], header="// header\n",
         body="uint i = thread_position_in_grid.x; o[i] = a[i] * b[0] + a_shape[0]; p[i] = T(N) + B;",
         inputs=[mx.zeros((16,)), mx.zeros((2,), mx.float16)], out=[((16,), mx.float32), ((16,), mx.float16)],
         template=[("T", mx.float32), ("N", 3), ("B", True)]),
    # 0-d input (constant reference), strides and ndim buffers, several attributes in MLX's order, bfloat16
    dict(name="scal", input_names=["s", "x"], output_names=["o"], header="",
         body="o[thread_index_in_simdgroup + simdgroup_index_in_threadgroup * 32] = s + x[x_strides[0]] + x_ndim "
              "+ threads_per_threadgroup.x + threadgroup_position_in_grid.y;",
         inputs=[mx.array(2.0, mx.bfloat16), mx.zeros((3, 4), mx.int32)], out=[((64,), mx.float32)],
         template=[("F", False)]),
    # the MLX bug: several outputs, a shape buffer, no attribute — the signature closes after the first output
    dict(name="bug", input_names=["a"], output_names=["o", "p"], header="",
         body="o[0] = a_shape[0]; p[0] = a_ndim;", inputs=[mx.zeros((4, 5))],
         out=[((1,), mx.float32), ((1,), mx.int32)], template=[]),
    # no template, one output, an input mentioned only in the header (no shape buffer from the header)
    dict(name="plain", input_names=["w"], output_names=["o"], header="// w_shape in the header adds nothing\n",
         body="o[thread_position_in_grid.x] = w[thread_position_in_grid.x];", inputs=[mx.zeros((9,), mx.uint8)],
         out=[((9,), mx.uint8)], template=[]),
]


@pytest.mark.parametrize("case", _TRICKY, ids=[c["name"] for c in _TRICKY])
def test_source_is_mlx_own(case):
    src = render_metal(case["name"], case["input_names"], case["output_names"], case["body"], case["header"],
                       case["inputs"], [d for _, d in case["out"]], case["template"])
    cap = capture_metal_source(case["name"], case["input_names"], case["output_names"], case["body"],
                               case["header"], case["inputs"], [s for s, _ in case["out"]],
                               [d for _, d in case["out"]], (32, 1, 1), (32, 1, 1), case["template"])
    assert src.kernel_name == cap.kernel_name
    assert src.source == cap.source
    assert src.broken == (case["name"] == "bug")


def test_mlx_signature_bug_is_refused():
    case = _TRICKY[2]
    src = render_metal(case["name"], case["input_names"], case["output_names"], case["body"], case["header"],
                       case["inputs"], [d for _, d in case["out"]])
    assert ") {\n  device int32_t* p" in src.source  # closed after the first output, as MLX writes it
    with pytest.raises(EmulatorError) as info:
        build(src)
    assert info.value.kind == "mlx-signature-bug"


def test_threadgroup_rewrite_keeps_pointers_comments_and_lines():
    text = ("// one threadgroup per row\nthreadgroup float a[3][4];\nthreadgroup float* p = a[0];\n"
            "threadgroup T s;  /* threadgroup */\n")
    out = rewrite_threadgroup(text)
    assert out.count("\n") == text.count("\n")
    assert "auto& a = mlxc_threadgroup<float [3][4]>(0, __LINE__);" in out
    assert "auto& s = mlxc_threadgroup<T>(1, __LINE__);" in out
    assert "threadgroup float* p = a[0];" in out and "// one threadgroup per row" in out
    with pytest.raises(EmulatorError):
        rewrite_threadgroup("threadgroup float a[4], b[4];")


# ------------------------------------------------------------------------------------------------ semantics


def test_elementwise_dtypes_and_template():
    x = mx.arange(40, dtype=mx.float32) / 7
    body = """
    uint i = thread_position_in_grid.x;
    o32[i] = x[i] * K;
    o16[i] = static_cast<half>(x[i]);
    obf[i] = static_cast<bfloat16_t>(x[i]);
    oi[i] = static_cast<int>(metal::floor(x[i] * 3.0f)) + (FLAG ? 1000 : 0);
    """
    src = render_metal("ew", ["x"], ["o32", "o16", "obf", "oi"], body, "", [x],
                       [mx.float32, mx.float16, mx.bfloat16, mx.int32], [("K", 3), ("FLAG", True)])
    o32, o16, obf, oi = emulate(src, [x], [(40,)] * 4, [mx.float32, mx.float16, mx.bfloat16, mx.int32], (40, 1, 1),
                                (16, 1, 1))
    assert np.allclose(np.array(o32), np.array(x) * 3)
    assert np.array_equal(np.array(o16), np.array(x.astype(mx.float16)))
    assert mx.array_equal(obf, x.astype(mx.bfloat16)).item()  # round to nearest even, as MLX converts
    assert np.array_equal(np.array(oi), np.floor(np.array(x) * 3).astype(np.int32) + 1000)


def test_barrier_shares_threadgroup_memory_per_group():
    x = mx.arange(96, dtype=mx.float32)
    body = """
    threadgroup float buf[32];
    uint i = thread_position_in_threadgroup.x;
    buf[i] = in0[thread_position_in_grid.x];
    threadgroup_barrier(mem_flags::mem_threadgroup);
    float s = 0.0f;
    for (uint j = 0; j < threads_per_threadgroup.x; ++j) s += buf[j];
    out0[thread_position_in_grid.x] = s + buf[(i + 1) % threads_per_threadgroup.x];
    """
    (out,) = _ok(_run(body, [x], [((96,), mx.float32)], (96, 1, 1), (32, 1, 1)))
    xs = np.arange(96, dtype=np.float32).reshape(3, 32)
    expect = xs.sum(1, keepdims=True) + np.roll(xs, -1, axis=1)
    assert np.array_equal(out, expect.reshape(-1))


def test_simd_functions():
    x = mx.array(np.random.default_rng(0).standard_normal(64).astype(np.float32))
    body = """
    uint i = thread_position_in_grid.x;
    uint lane = thread_index_in_simdgroup;
    float v = in0[i];
    out0[i * 12 + 0] = simd_sum(v);
    out0[i * 12 + 1] = simd_max(v);
    out0[i * 12 + 2] = simd_min(v);
    out0[i * 12 + 3] = simd_prefix_inclusive_sum(v);
    out0[i * 12 + 4] = simd_prefix_exclusive_sum(v);
    out0[i * 12 + 5] = simd_shuffle(v, (lane + 5) % 32);
    out0[i * 12 + 6] = simd_shuffle_down(v, 3);
    out0[i * 12 + 7] = simd_shuffle_up(v, 2);
    out0[i * 12 + 8] = simd_shuffle_xor(v, 6);
    out0[i * 12 + 9] = simd_broadcast(v, 7);
    out0[i * 12 + 10] = simd_all(v > -10.0f) + 2 * simd_any(v > 2.5f);
    out0[i * 12 + 11] = static_cast<float>(static_cast<uint64_t>(simd_ballot(v > 0.0f)) & 0xFFFF);
    """
    (out,) = _ok(_run(body, [x], [((64 * 12,), mx.float32)], (64, 1, 1), (64, 1, 1)))
    out = out.reshape(2, 32, 12)
    v = np.array(x).reshape(2, 32)
    lane = np.arange(32)
    for g in range(2):
        r, w = out[g], v[g]
        assert np.allclose(r[:, 0], w.sum(), atol=1e-5) and np.all(r[:, 1] == w.max()) and np.all(r[:, 2] == w.min())
        assert np.allclose(r[:, 3], np.cumsum(w), atol=1e-5)
        assert np.allclose(r[:, 4], np.cumsum(w) - w, atol=1e-5)
        assert np.array_equal(r[:, 5], w[(lane + 5) % 32])
        assert np.array_equal(r[:, 6], np.where(lane + 3 < 32, w[np.minimum(lane + 3, 31)], w))  # edge: own value
        assert np.array_equal(r[:, 7], np.where(lane >= 2, w[np.maximum(lane - 2, 0)], w))
        assert np.array_equal(r[:, 8], w[lane ^ 6])
        assert np.all(r[:, 9] == w[7])
        assert np.all(r[:, 10] == 1 + 2 * (w > 2.5).any())
        assert np.all(r[:, 11] == sum(1 << i for i in range(16) if w[i] > 0))


def test_simd_over_active_lanes_only():
    # a 40-thread group: SIMD-group 1 has 8 lanes; lanes that returned take no part either
    body = """
    uint t = thread_index_in_threadgroup;
    if (t == 3) { out0[t] = -1.0f; return; }
    out0[t] = simd_sum(1.0f) + 100.0f * simd_broadcast_first(float(t));
    """
    res = _run(body, [mx.zeros((1,))], [((40,), mx.float32)], (40, 1, 1), (64, 1, 1))
    (out,) = _ok(res)
    assert out[3] == -1 and np.all(out[:3] == 31) and np.all(out[4:32] == 31)  # lane 3 returned; lane 0 first
    assert np.all(out[32:] == 8 + 100 * 32)


def test_thread_positions_3d_and_partial_groups():
    body = """
    uint3 g = thread_position_in_grid;
    uint i = (g.z * 5 + g.y) * 7 + g.x;
    out0[i * 4 + 0] = thread_position_in_threadgroup.x + 10 * thread_position_in_threadgroup.y
        + 100 * thread_position_in_threadgroup.z;
    out0[i * 4 + 1] = threadgroup_position_in_grid.x + 10 * threadgroup_position_in_grid.y
        + 100 * threadgroup_position_in_grid.z;
    out0[i * 4 + 2] = threads_per_threadgroup.x * threads_per_threadgroup.y * threads_per_threadgroup.z;
    out0[i * 4 + 3] = thread_index_in_threadgroup;
    """
    shape, grid, tg = (3, 5, 7), (7, 5, 3), (4, 2, 2)
    for choice, sizes in (("actual", None), ("dispatched", 16)):
        res = _run(body, [mx.zeros((1,))], [((3 * 5 * 7 * 4,), mx.int32)], grid, tg,
                   choices=Choices(partial_threadgroups=choice))
        (out,) = _ok(res)
        out = out.reshape(*shape, 4)
        z, y, x = np.meshgrid(np.arange(3), np.arange(5), np.arange(7), indexing="ij")
        lx, ly, lz = x % 4, y % 2, z % 2
        assert np.array_equal(out[..., 0], lx + 10 * ly + 100 * lz)
        assert np.array_equal(out[..., 1], x // 4 + 10 * (y // 2) + 100 * (z // 2))
        ax = np.minimum(4, 7 - (x // 4) * 4)
        ay = np.minimum(2, 5 - (y // 2) * 2)
        az = np.minimum(2, 3 - (z // 2) * 2)
        if sizes is None:  # edge groups report their real size and number their threads densely
            assert np.array_equal(out[..., 2], ax * ay * az)
            assert np.array_equal(out[..., 3], lx + ax * (ly + ay * lz))
        else:
            assert np.all(out[..., 2] == sizes)
            assert np.array_equal(out[..., 3], lx + 4 * (ly + 2 * lz))


def test_grid_smaller_than_threadgroup_shrinks_the_group():
    # MLX dispatches min(threadgroup, grid): a 10-thread grid with 32-thread groups runs one group of 10
    res = _run("out0[thread_position_in_grid.x] = threads_per_threadgroup.x;", [mx.zeros((1,))],
               [((10,), mx.int32)], (10, 1, 1), (32, 1, 1))
    assert np.all(_ok(res)[0] == 10)


def test_atomics_and_init_value():
    body = "atomic_fetch_add_explicit(&out0[thread_position_in_grid.x % 4], 1, memory_order_relaxed);"
    src = render_metal("at", ["in0"], ["out0"], body, "", [mx.zeros((1,))], [mx.int32], atomic_outputs=True)
    (out,) = emulate(src, [mx.zeros((1,))], [(4,)], [mx.int32], (64, 1, 1), (32, 1, 1), init_value=5)
    assert np.array_equal(np.array(out), [21, 21, 21, 21])


def test_compile_error_is_reported():
    res = _run("out0[0] = undefined_name;", [mx.zeros((1,))], [((1,), mx.float32)], (1, 1, 1), (1, 1, 1))
    assert _kinds(res) == ["compile"] and "undefined_name" in res.findings[0].message


def test_builds_are_cached():
    src = _src("out0[thread_position_in_grid.x] = 2.0f;", [mx.zeros((1,))], [mx.float32])
    assert build(src) == build(src)


# ------------------------------------------------------------------------------------------------ what it reports


_COPY = "out0[thread_position_in_grid.x] = in0[thread_position_in_grid.x];"


def test_race_from_a_missing_barrier():
    body = """
    threadgroup float buf[64];
    uint i = thread_position_in_threadgroup.x;
    buf[i] = in0[i];
    out0[i] = buf[(i + 1) % 64];
    """
    res = _run(body, [mx.arange(64, dtype=mx.float32)], [((64,), mx.float32)], (64, 1, 1), (64, 1, 1))
    assert _kinds(res) == ["race"] and "differs between thread orders" in res.findings[0].message


def test_two_threads_writing_one_element_is_a_race():
    res = _run("out0[0] = float(thread_position_in_grid.x);", [mx.zeros((1,))], [((1,), mx.float32)],
               (8, 1, 1), (4, 1, 1))
    assert "race" in _kinds(res)


def test_barrier_divergence():
    body = """
    if (thread_position_in_grid.x % 2) { threadgroup_barrier(mem_flags::mem_threadgroup); }
    else { threadgroup_barrier(mem_flags::mem_threadgroup); }
    out0[thread_position_in_grid.x] = 1.0f;
    """
    res = _run(body, [mx.zeros((1,))], [((32,), mx.float32)], (32, 1, 1), (32, 1, 1))
    assert _kinds(res) == ["barrier-divergence"]
    assert "different threadgroup_barrier calls" in res.findings[0].message


def test_simd_divergence():
    body = """
    uint i = thread_position_in_grid.x;
    if (i % 2) { out0[i] = simd_sum(1.0f); } else { out0[i] = simd_max(2.0f); }
    """
    res = _run(body, [mx.zeros((1,))], [((32,), mx.float32)], (32, 1, 1), (32, 1, 1))
    assert _kinds(res) == ["simd-divergence"]
    body = """
    uint i = thread_position_in_grid.x;
    if (i < 16) { out0[i] = simd_sum(1.0f); } else { threadgroup_barrier(mem_flags::mem_threadgroup); out0[i] = 0; }
    """
    res = _run(body, [mx.zeros((1,))], [((32,), mx.float32)], (32, 1, 1), (32, 1, 1))
    assert _kinds(res) == ["simd-divergence"] and "threadgroup_barrier" in res.findings[0].message


def test_deadlock_when_returned_threads_miss_a_barrier():
    body = """
    if (thread_position_in_grid.x == 3) { return; }
    threadgroup_barrier(mem_flags::mem_threadgroup);
    out0[thread_position_in_grid.x] = 1.0f;
    """
    res = _run(body, [mx.zeros((1,))], [((32,), mx.float32)], (32, 1, 1), (32, 1, 1))
    assert _kinds(res) == ["deadlock"] and "returned" in res.findings[0].message
    # the other reading of Metal's rule, one switch away
    res = _run(body, [mx.zeros((1,))], [((32,), mx.float32)], (32, 1, 1), (32, 1, 1),
               choices=Choices(exited_at_barrier="release"))
    assert _kinds(res) == ["unwritten-output"]  # element 3 only


def test_deadlock_from_a_spin_loop_times_out():
    body = """
    device float* flag = out0;
    if (thread_position_in_grid.x == 0) { while (flag[1] != 7.0f) {} }
    out0[thread_position_in_grid.x] = 7.0f;
    """
    res = _run(body, [mx.zeros((1,))], [((2,), mx.float32)], (2, 1, 1), (2, 1, 1), timeout=1)
    assert _kinds(res) == ["deadlock"] and "no progress" in res.findings[0].message


def test_write_past_an_output():
    res = _run("out0[thread_position_in_grid.x + 1] = 1.0f;", [mx.zeros((1,))], [((16,), mx.float32)],
               (16, 1, 1), (16, 1, 1))
    kinds = _kinds(res)
    assert kinds[0] == "out-of-bounds-write" and "past the end of output 'out0'" in res.findings[0].message
    assert "unwritten-output" in kinds  # element 0
    res = _run("out0[int(thread_position_in_grid.x) - 1] = 1.0f;", [mx.zeros((1,))], [((16,), mx.float32)],
               (16, 1, 1), (16, 1, 1))
    assert "out-of-bounds-write" in _kinds(res) and "before the start" in res.findings[0].message


def test_read_far_past_an_input():
    res = _run("out0[thread_position_in_grid.x] = in0[thread_position_in_grid.x + 100000];",
               [mx.zeros((16,))], [((16,), mx.float32)], (16, 1, 1), (16, 1, 1))
    assert _kinds(res) == ["out-of-bounds-read"] and "input 'in0'" in res.findings[0].message


def test_threadgroup_memory_over_32k():
    body = "threadgroup float big[8200]; big[thread_position_in_grid.x] = 1; out0[0] = big[0];"
    res = _run(body, [mx.zeros((1,))], [((1,), mx.float32)], (1, 1, 1), (1, 1, 1))
    assert _kinds(res) == ["threadgroup-memory"] and "32768" in res.findings[0].message


def test_threadgroup_over_1024_threads():
    res = _run(_COPY, [mx.zeros((64,))], [((64,), mx.float32)], (64, 1, 1), (64, 32, 1))
    assert _kinds(res) == ["threadgroup-size"]


def test_grid_in_threadgroups_leaves_outputs_unwritten():
    # meant: 4 threadgroups of 32 threads; MLX's grid counts threads, so only 4 threads run
    res = _run(_COPY, [mx.zeros((128,))], [((128,), mx.float32)], (4, 1, 1), (32, 1, 1))
    assert _kinds(res) == ["unwritten-output"]
    assert "124 of 128" in res.findings[0].message and "threadgroups" in res.findings[0].message


def test_emulate_raises_with_every_finding():
    src = _src("out0[thread_position_in_grid.x + 1] = 1.0f;", [mx.zeros((1,))], [mx.float32])
    with pytest.raises(EmulatorError) as info:
        emulate(src, [mx.zeros((1,))], [(8,)], [mx.float32], (8, 1, 1), (8, 1, 1))
    assert info.value.kind == "out-of-bounds-write" and len(info.value.findings) == 2
