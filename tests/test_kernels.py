"""mlxc's custom kernels: every kernel in the emulator against its reference ops (through `mlxc kernels check`),
deliberately broken kernels failing it, generated Metal source equal to MLX's own, references equal to
transformers' Mamba/Mamba-2 and to a plain softmax attention, CUDA twins compiling with nvcc, and the CLI.
"""

from __future__ import annotations

import json
import shutil
from dataclasses import replace

import mlx.core as mx
import numpy as np
import pytest

from mlxc.cli import main
from mlxc.kernels import check, registry
from mlxc.kernels.metal import attention, scan, ssd
from mlxc.kernels.metal.source import capture_metal_source

needs_gxx = pytest.mark.skipif(shutil.which("g++") is None, reason="the emulator compiles kernels with g++")


def _cli(capsys, *argv):
    code = main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


# ------------------------------------------------------------------------------------------------ the check


@pytest.fixture(scope="module")
def check_rows():
    """`mlxc kernels check --json`: every kernel, every configuration, in the emulator."""
    import io
    import sys

    old, old_err = sys.stdout, sys.stderr
    sys.stdout, sys.stderr = io.StringIO(), io.StringIO()
    try:
        code = main(["kernels", "check", "--json"])
        text, err = sys.stdout.getvalue(), sys.stderr.getvalue()
    finally:
        sys.stdout, sys.stderr = old, old_err
    assert text.strip(), f"`mlxc kernels check --json` printed nothing (exit {code}): {err}"
    return code, json.loads(text)


@needs_gxx
def test_check_passes(check_rows):
    code, rows = check_rows
    failed = [r for r in rows if r["verdict"] != "ok"]
    assert code == 0 and not failed, failed


@needs_gxx
@pytest.mark.parametrize("name", list(registry.REGISTRY))
def test_every_kernel_within_tolerance(check_rows, name):
    _, rows = check_rows
    mine = [r for r in rows if r["kernel"] == name]
    assert {r["dtype"] for r in mine} == {"float32", "float16", "bfloat16"}
    for r in mine:
        assert r["max_error"] is not None and r["max_error"] <= r["tolerance"], r
        if "state float16" not in r["config"]:  # a float16 state output is judged at float16's tolerance
            assert r["tolerance"] == {"float32": 1e-4}.get(r["dtype"], 1e-2)


def test_check_covers_the_features():
    configs = {(c.kernel, c.config) for c in check.all_cases()}
    text = " | ".join(f"{k}: {c}" for k, c in configs)
    for feature in ("Hq4/Hkv2", "Hq4/Hkv1", "Hq3/Hkv3", "window", "softcap", " z", " h0", "dt_limit", "N128",
                    "N24", "N64", "T13", "T17"):
        assert feature in text, feature
    # softcap off and on, window off and on, for both attention kernels
    for kernel in ("attention_decode", "attention_prefill"):
        mine = [c for k, c in configs if k == kernel]
        assert any("softcap" in c for c in mine) and any("softcap" not in c for c in mine)
        assert any("window" in c for c in mine) and any("window" not in c for c in mine)


def _check_fails(capsys, only: str):
    code, out, err = _cli(capsys, "kernels", "check", "--only", only, "--dtype", "float32")
    assert code == 1
    return out


@needs_gxx
def test_missing_barrier_fails_the_check(monkeypatch, capsys):
    info = registry.REGISTRY["attention_prefill"]
    barrier = "threadgroup_barrier(mem_flags::mem_threadgroup);\n    const int kn"
    assert barrier in info.kernel.body
    broken = info.kernel.with_body(info.kernel.body.replace(barrier, "const int kn"))
    monkeypatch.setitem(registry.REGISTRY, "attention_prefill", replace(info, kernel=broken))
    out = _check_fails(capsys, "attention_prefill")
    assert "FAIL attention_prefill" in out and "race" in out


@needs_gxx
def test_missing_barrier_in_the_decode_combine_fails(monkeypatch, capsys):
    info = registry.REGISTRY["attention_decode"]
    body = info.kernel.body
    assert body.count("threadgroup_barrier(") == 1
    broken = info.kernel.with_body(body.replace("threadgroup_barrier(mem_flags::mem_threadgroup);", ""))
    monkeypatch.setitem(registry.REGISTRY, "attention_decode", replace(info, kernel=broken))
    out = _check_fails(capsys, "attention_decode")
    assert "race" in out


@needs_gxx
def test_wrong_index_fails_the_check(monkeypatch, capsys):
    # GQA: the KV head is hq / GQA; reading head hq instead is wrong (and past the buffer for hq >= Hkv)
    info = registry.REGISTRY["attention_decode"]
    broken = info.kernel.with_body(info.kernel.body.replace("const int hk = hq / GQA;", "const int hk = hq;"))
    monkeypatch.setitem(registry.REGISTRY, "attention_decode", replace(info, kernel=broken))
    out = _check_fails(capsys, "attention_decode")
    assert "FAIL attention_decode" in out
    # and an off-by-one in the scan's time index
    info = registry.REGISTRY["selective_scan"]
    broken = info.kernel.with_body(info.kernel.body.replace("const size_t row = size_t(b) * L + t;",
                                                            "const size_t row = size_t(b) * L + t + 1;"))
    monkeypatch.setitem(registry.REGISTRY, "selective_scan", replace(info, kernel=broken))
    out = _check_fails(capsys, "selective_scan")
    assert "FAIL selective_scan" in out


@needs_gxx
def test_grid_in_threadgroups_fails_the_check(monkeypatch, capsys):
    real = attention.attention_decode_launch

    def in_threadgroups(*a, **kw):
        launch = real(*a, **kw)
        tg = launch.threadgroup
        return replace(launch, grid=tuple(-(-g // t) for g, t in zip(launch.grid, tg)))

    monkeypatch.setattr(attention, "attention_decode_launch", in_threadgroups)
    out = _check_fails(capsys, "attention_decode")
    assert "unwritten-output" in out


# ------------------------------------------------------------------------------------------------ MLX's source


def test_generated_source_is_mlx_own():
    """For every check configuration, the source the emulator runs is the source MLX generates."""
    seen = set()
    for case in check.all_cases():
        launch, _ = case.make()
        kdef = registry.REGISTRY[case.kernel].kernel
        src = kdef.metal_source(launch)
        if src.kernel_name in seen:
            continue
        seen.add(src.kernel_name)
        cap = capture_metal_source(kdef.name, kdef.input_names, kdef.output_names, kdef.body, kdef.header,
                                   launch.inputs, launch.output_shapes, launch.output_dtypes, launch.grid,
                                   launch.threadgroup, launch.template)
        assert (src.kernel_name, src.source) == (cap.kernel_name, cap.source), case
        assert (cap.grid, cap.threadgroup) == (launch.grid, launch.threadgroup)
        assert not src.broken
    assert len(seen) >= 30


# ------------------------------------------------------------------------------------------------ references


def _rnd(rng, *shape, scale=1.0):
    return (rng.standard_normal(shape) * scale).astype(np.float32)


def test_selective_scan_reference_is_transformers():
    torch = pytest.importorskip("torch")
    hub = pytest.importorskip("transformers.models.mamba.modeling_mamba")
    rng = np.random.default_rng(0)
    b, L, dm, n = 2, 6, 5, 4
    u, delta, z = _rnd(rng, b, L, dm), _rnd(rng, b, L, dm), _rnd(rng, b, L, dm)
    A, B, C = -np.exp(_rnd(rng, dm, n, scale=0.5)), _rnd(rng, b, L, n), _rnd(rng, b, L, n)
    D, bias = _rnd(rng, dm), _rnd(rng, dm)
    t = torch.tensor
    want_y, want_h = hub.mamba_selective_scan(
        t(u).transpose(1, 2), t(delta).transpose(1, 2), t(A), t(B).transpose(1, 2), t(C).transpose(1, 2), D=t(D),
        z=t(z).transpose(1, 2), delta_bias=t(bias), delta_softplus=True, return_last_state=True)
    y, h = scan.selective_scan_reference(*map(mx.array, (u, delta, A, B, C, D, z, bias)))
    assert np.allclose(np.array(y), want_y.transpose(1, 2).numpy(), atol=1e-5)
    assert np.allclose(np.array(h), want_h.numpy(), atol=1e-5)
    # the decode step, from a cached state
    state = _rnd(rng, b, dm, n)
    ts = t(state.copy())
    want = hub.mamba_selective_state_update(ts, t(u[:, 0]), t(delta[:, 0]), t(A), t(B[:, 0]), t(C[:, 0]), t(D),
                                            dt_bias=t(bias), dt_softplus=True, z=t(z[:, 0]))
    y1, s1 = scan.selective_state_update_reference(*map(mx.array, (u[:, 0], delta[:, 0], A, B[:, 0], C[:, 0], D,
                                                                    state, z[:, 0], bias)))
    assert np.allclose(np.array(y1), want.numpy(), atol=1e-5) and np.allclose(np.array(s1), ts.numpy(), atol=1e-5)


def test_mamba2_references_are_transformers():
    torch = pytest.importorskip("torch")
    m2 = pytest.importorskip("transformers.models.mamba2.modeling_mamba2")
    rng = np.random.default_rng(1)
    b, L, h, g, p, n = 2, 11, 4, 2, 3, 8
    x, dt = _rnd(rng, b, L, h, p), _rnd(rng, b, L, h)
    A, B, C = -np.exp(_rnd(rng, h, scale=0.5)), _rnd(rng, b, L, g, n), _rnd(rng, b, L, g, n)
    D, bias, state = _rnd(rng, h), _rnd(rng, h), _rnd(rng, b, h, p, n)
    t = torch.tensor
    limit = (0.05, 1.5)
    want_y, want_s = m2.mamba2_chunk_scan(t(x), t(dt), t(A), t(B), t(C), chunk_size=4, D=t(D), dt_bias=t(bias),
                                          initial_states=t(state), dt_softplus=True, dt_limit=limit,
                                          return_final_states=True)
    args = [mx.array(a) for a in (x, dt, A, B, C, D, bias)]
    y, s = ssd.mamba2_chunk_scan_reference(*args, dt_limit=limit, state=mx.array(state), chunk=4)
    assert np.allclose(np.array(y), want_y.numpy(), atol=1e-4) and np.allclose(np.array(s), want_s.numpy(), atol=1e-4)
    ys, ss = ssd.mamba2_scan_sequential(*args, dt_limit=limit, state=mx.array(state))
    assert np.allclose(np.array(ys), np.array(y), atol=1e-4) and np.allclose(np.array(ss), np.array(s), atol=1e-4)
    # the decode step (transformers applies no dt_limit here)
    ts = t(state.copy()).reshape(b, h, p, n)
    want = m2.mamba2_selective_state_update(
        ts, t(x[:, 0]), t(dt[:, 0])[..., None].expand(-1, -1, p), t(A)[:, None, None].expand(-1, p, n),
        t(B[:, 0]), t(C[:, 0]), t(D)[:, None].expand(-1, p), dt_bias=t(bias)[:, None].expand(-1, p),
        dt_softplus=True)
    y1, s1 = ssd.mamba2_state_update_reference(*[mx.array(a) for a in (x[:, 0], dt[:, 0], A, B[:, 0], C[:, 0], D,
                                                                       state, bias)])
    assert np.allclose(np.array(y1), want.numpy(), atol=1e-5) and np.allclose(np.array(s1), ts.numpy(), atol=1e-5)


@pytest.mark.parametrize("window,softcap", [(None, None), (3, None), (None, 5.0), (4, 20.0)])
def test_attention_reference(window, softcap):
    rng = np.random.default_rng(2)
    b, hq, hkv, T, d, cap, start, kv_len = 1, 4, 2, 5, 8, 16, 3, 9
    q, k, v = _rnd(rng, b, hq, T, d), _rnd(rng, b, hkv, cap, d), _rnd(rng, b, hkv, cap, d)
    scale = 0.3
    got = np.array(attention.attention_reference(mx.array(q), mx.array(k), mx.array(v), scale, window, softcap,
                                                 start, kv_len))
    ks, vs = k[:, :, start:start + kv_len], v[:, :, start:start + kv_len]
    for hh in range(hq):
        s = q[0, hh] @ ks[0, hh // 2].T * scale
        if softcap:
            s = softcap * np.tanh(s / softcap)
        qpos = np.arange(kv_len - T, kv_len)[:, None]
        kpos = np.arange(kv_len)[None]
        ok = (kpos <= qpos) & ((qpos - kpos < window) if window else True)
        s = np.where(ok, s, -np.inf)
        w = np.exp(s - s.max(-1, keepdims=True))
        assert np.allclose(got[0, hh], (w / w.sum(-1, keepdims=True)) @ vs[0, hh // 2], atol=1e-5)


@needs_gxx
def test_ops_run_emulated():
    rng = np.random.default_rng(3)
    q, k, v = (mx.array(_rnd(rng, 1, 2, 1, 32)), mx.array(_rnd(rng, 1, 1, 6, 32)), mx.array(_rnd(rng, 1, 1, 6, 32)))
    ref = attention.attention(q, k, v, 0.2, window=3, kv_len=5)
    emu = attention.attention(q, k, v, 0.2, window=3, kv_len=5, impl="emulated")
    assert np.allclose(np.array(ref), np.array(emu), atol=1e-5)
    with pytest.raises(ValueError):
        attention.attention(q, k, v, 0.2, kv_start=4, kv_len=5, impl="emulated")


# ------------------------------------------------------------------------------------------------ CUDA twins


def test_cuda_twins_compile_with_nvcc():
    from mlxc.kernels import cuda_check

    if cuda_check.nvcc() is None:
        pytest.skip("nvcc is not installed: the CUDA twins are not compile-checked")
    sources = cuda_check.twin_sources()
    assert {n.split("_")[3] for n, _ in sources} >= {"selective", "mamba2", "attention"}
    result = cuda_check.compile_twins(sources)
    assert result.ok, result.message
    assert len(result.kernels) == len({n for n, _ in sources})


def test_cuda_source_is_wrapped_as_mlx_wraps_it():
    info = registry.REGISTRY["attention_decode"]
    launch, _ = next(c for c in check.all_cases() if c.kernel == "attention_decode").make()
    name, src = info.kernel.cuda_source(launch)
    assert name == "custom_kernel_mlxc_attention_decode_float_64_2_0_f_4"
    assert src.startswith('\n#include "mlx/backend/cuda/device/utils.cuh"\n\n#include <cooperative_groups.h>\n\n')
    assert "namespace mlx::core::cu {\n\nnamespace cg = cooperative_groups;\n\n__global__ void " + name in src
    assert "    const float* q,\n    const __grid_constant__ Shape q_shape,\n" in src
    assert "  using T = float;\n  constexpr int D = 64;\n" in src and "  constexpr bool SOFTCAP = false;\n" in src
    assert src.endswith("\n}\n\n} // namespace mlx::core::cu\n")


def test_broken_cuda_twin_fails_to_compile():
    from mlxc.kernels import cuda_check

    if cuda_check.nvcc() is None:
        pytest.skip("nvcc is not installed")
    from mlxc.kernels.metal.source import render_cuda

    name, src = render_cuda("broken", ["x"], ["y"], "y[0] = x[0] + not_declared;", "", [mx.zeros((4,))],
                            [mx.float32])
    result = cuda_check.compile_twins([(name, src)])
    assert not result.ok and "not_declared" in result.message


# ------------------------------------------------------------------------------------------------ CLI


def test_kernels_lists_targets(capsys):
    code, out, _ = _cli(capsys, "kernels", "--json")
    assert code == 0
    listed = {k["name"]: k for k in json.loads(out)}
    assert set(listed) == set(registry.REGISTRY)
    for k in listed.values():
        assert k["targets"] == {"metal": "metal", "cuda": "cuda", "cpu": "reference"}
    code, out, _ = _cli(capsys, "kernels")
    assert code == 0 and "selective_scan" in out and "CUDA twin" in out and "reference ops" in out


def test_kernels_source(capsys):
    code, out, err = _cli(capsys, "kernels", "source", "mamba2_chunk_scan", "--dtype", "bfloat16")
    assert code == 0
    case = next(c for c in check.all_cases() if c.kernel == "mamba2_chunk_scan" and c.dtype == mx.bfloat16)
    launch, _ = case.make()
    assert out == registry.REGISTRY["mamba2_chunk_scan"].kernel.metal_source(launch).source
    assert "[[kernel]] void custom_kernel_mlxc_mamba2_chunk_scan__bfloat16_t_" in out
    code, out, _ = _cli(capsys, "kernels", "source", "attention_prefill", "--cuda")
    assert code == 0 and "__global__ void custom_kernel_mlxc_attention_prefill" in out
    code, out, _ = _cli(capsys, "kernels", "source", "attention_prefill", "--emulator")
    assert code == 0 and '#include "metal.h"' in out and "mlxc_kernel_entry" in out
    code, _, err = _cli(capsys, "kernels", "source", "nope")
    assert code == 1 and "unknown kernel 'nope'" in err


# ------------------------------------------------------------------------------------------------ wiring


def test_registry_and_select_kernels_name_the_same_ops():
    """select-kernels (passes/, which may not import kernels/) offers a kernel for an op exactly where the registry
    has kernels behind it, and CUDA only where every one of them has a twin."""
    from mlxc.ir import Kernel
    from mlxc.passes.select_kernels import CUSTOM

    ops = {i.op for i in registry.REGISTRY.values()}
    assert ops == set(CUSTOM)
    for op in ops:
        twins = all(i.has_cuda for i in registry.REGISTRY.values() if i.op == op)
        assert (Kernel.CUDA in CUSTOM[op]) == twins
        assert Kernel.METAL in CUSTOM[op] and Kernel.EMULATED in CUSTOM[op]


def test_select_kernels_per_target():
    import mlxc.api as api
    from mlxc.codegen import generate_module
    from mlxc.frontends.presets import PRESETS
    from mlxc.ir import Kernel
    from mlxc.ir.errors import MlxcError
    from mlxc.passes import build_pipeline

    spec = PRESETS["tiny"]
    chosen = {}
    for target, family in (("cpu", "reference"), ("cpu", "emulated"), ("gpu", "metal"), ("gpu", "cuda"),
                           ("gpu", "reference")):
        program = api.compile_program(spec, passes=build_pipeline(target=target, kernels=family))
        kernels = {o.attrs.get("kernel", Kernel.REFERENCE) for f in program.functions for o in f.ops
                   if o.op == "attention"}
        code = generate_module(program)
        calls = [line.strip() for line in code.splitlines() if "= kernel_attention(" in line]
        chosen[(target, family)] = (kernels, calls)
    assert chosen[("cpu", "reference")] == ({Kernel.REFERENCE}, [])
    for (target, family), (kernels, calls) in chosen.items():
        if family != "reference":
            assert kernels == {Kernel(family)} and calls and all(f'impl="{family}"' in c for c in calls), (family,
                                                                                                         calls)
    # what cannot run on a target is refused, not silently swapped
    for target, family, why in (("cpu", "metal", "run on a GPU"), ("gpu", "native", "run on the CPU"),
                                ("cpu", "metal+emulated", "two choices"), ("cpu", "fast", "unknown kernels")):
        with pytest.raises(MlxcError, match=why):
            api.compile_program(spec, passes=build_pipeline(target=target, kernels=family))


def test_kernel_family_choices():
    import mlxc.api as api
    from mlxc.ir.errors import MlxcError

    assert api.kernel_family("emulated", "cpu") in ("emulated", "native+emulated")
    assert api.kernel_family("reference", "gpu") == "reference"
    if api.gpu_kernels() is None:  # this machine: no Metal, no CUDA back-end
        assert api.kernel_family("auto", "gpu") == "reference"
        with pytest.raises(MlxcError, match="neither Metal nor MLX's CUDA"):
            api.kernel_family("custom", "gpu")


@needs_gxx
def test_emulated_artifact_keeps_its_kernels(tmp_path, capsys):
    """`mlxc compile --kernels emulated`: the manifest records it, the artifact's module calls the emulator, and
    the artifact refuses another choice."""
    import mlxc
    from mlxc.ir.errors import MlxcError

    out = tmp_path / "tiny"
    code, _, err = _cli(capsys, "compile", "preset:tiny", "-o", str(out), "--kernels", "emulated")
    assert code == 0, err
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["kernels"] in ("emulated", "native+emulated") and manifest["target"] == "cpu"
    assert 'impl="emulated"' in (out / "model.py").read_text()
    tokens = mx.array([[5, 9, 3, 200, 17, 4, 4, 81]])
    emu = mlxc.load(str(out))
    ref = mlxc.load("preset:tiny", kernels="reference")
    assert np.abs(np.array(emu(tokens).logits) - np.array(ref(tokens).logits)).max() <= 1e-4
    with pytest.raises(MlxcError, match="compiled with"):
        mlxc.load(str(out), kernels="reference")


# ------------------------------------------------------------------------------------------------ bench --compare

MAMBA_SPEC = """\
name: mamba-tiny
vocab_size: 128
hidden_size: 32
intermediate_size: 64
num_layers: 2
eos_token_ids: [2]
mamba: {state_size: 8}
layer_pattern:
  - {block: mamba, ffn: none}
"""
_QUICK = ("--prompt-len", "8", "--gen-len", "2", "--repeats", "1", "--warmup", "0")


def test_bench_compare_scan_and_kernels_on_mamba(tmp_path, capsys):
    from mlxc.kernels import native

    spec = tmp_path / "mamba.yaml"
    spec.write_text(MAMBA_SPEC)
    code, out, err = _cli(capsys, "bench", str(spec), "--compare", "scan,kernels", *_QUICK, "--json")
    if not native.available():  # kernels=custom on this CPU means the native extension, which is missing
        assert code == 1 and "native extension" in err
        code, out, err = _cli(capsys, "bench", str(spec), "--compare", "scan", *_QUICK, "--json")
    assert code == 0, err
    report = json.loads(out)
    variants = {v["name"]: v for v in report["variants"]}
    assert set(variants) >= {"sequential", "chunked"} or set(variants) == {
        "sequential+reference", "sequential+custom", "chunked+reference", "chunked+custom"}
    for v in variants.values():
        assert v["prefill"]["median"] > 0 and v["decode"]["median"] > 0
        assert any("selective scan prefill " + v["settings"]["scan"] in n for n in v["notes"])
        if v["settings"].get("kernels") == "custom":  # the Metal scan kernels are not timed on this CPU
            assert any("need an Apple GPU: not timed here" in n for n in v["notes"])
    code, out, err = _cli(capsys, "bench", str(spec), "--compare", "scan", *_QUICK)
    assert code == 0 and "sequential" in out and "chunked" in out and "vs sequential" in out


def test_bench_compare_on_llama(capsys):
    from mlxc.kernels import native

    code, out, err = _cli(capsys, "bench", "preset:tiny", "--compare", "fusion,kernels", "--quantize", "8",
                          *_QUICK)
    if native.available():
        assert code == 0, err
        assert "unfused+reference" in out and "fused+custom" in out and "native kernels on" in out
    else:
        assert code == 1 and "native extension" in err
    code, out, err = _cli(capsys, "bench", "preset:tiny", "--compare", "scan", *_QUICK)
    assert code == 1 and "--compare scan" in err and "has none" in err
    code, out, err = _cli(capsys, "bench", "preset:tiny", "--kernels", "emulated", *_QUICK)
    assert code == 1 and "emulator" in err and "refuse" in err


def test_packaging_ships_kernel_sources():
    """pyproject.toml lists the kernel packages and package-data covering every kernel body, CUDA header and
    emulator source (a wheel without them would render no kernel); a wheel built from it was checked by hand."""
    import fnmatch
    import tomllib
    from pathlib import Path

    root = Path(registry.__file__).resolve().parent.parent
    tool = tomllib.loads((root / "pyproject.toml").read_text())["tool"]["setuptools"]
    for pkg in ("mlxc.kernels.metal", "mlxc.kernels.emulator"):
        assert pkg in tool["packages"]
        folder = root / pkg.removeprefix("mlxc.").replace(".", "/")
        globs = tool["package-data"][pkg]
        data = [p.relative_to(folder).as_posix() for p in folder.rglob("*")
                if p.is_file() and p.suffix not in (".py", ".pyc") and "__pycache__" not in p.parts]
        assert data
        missing = [f for f in data if not any(fnmatch.fnmatch(f, g) for g in globs)]
        assert not missing, missing
