"""The BLAS preload (mlxc.blas), each case in a fresh interpreter: the preload only works before mlx.core loads.

What is checked is what the user is told against what really happens, with two independent witnesses:

- the dynamic linker (glibc's `LD_DEBUG=bindings`) says which library the `cblas_sgemm` that libmlx calls was bound
  to; it must be the library `active_blas()` reports;
- the numbers: MLX's matmul is bit for bit what the reported library's own `cblas_sgemm` (called through ctypes in the
  same process) computes, and close to numpy's float64 product. OpenBLAS and the reference BLAS round differently,
  so a preload that silently did not take effect shows up as a result that differs from OpenBLAS's.

No timings are asserted: speed is for benchmarks/blas_matmul.py, not for tests on a shared machine.
"""

from __future__ import annotations

import json
import os
import platform
import re
import subprocess
import sys
import textwrap
import types
from pathlib import Path

import numpy as np
import pytest

from mlxc import blas

# Runs in the child: reports the BLAS info, a matmul computed by MLX on the CPU, and the same product computed by
# calling cblas_sgemm of the library active_blas() names (row-major, no transposes, alpha 1, beta 0).
_CHILD = textwrap.dedent(
    """
    import ctypes, json, sys
    import numpy as np
    {pre}
    import mlxc
    import mlx.core as mx
    from mlxc.blas import active_blas
    rng = np.random.default_rng(0)
    a = rng.standard_normal((96, 80)).astype(np.float32)
    b = rng.standard_normal((80, 112)).astype(np.float32)
    with mx.stream(mx.cpu):
        c = np.array(mx.array(a) @ mx.array(b))
    info = active_blas()
    direct = None
    if info.path:
        f = ctypes.CDLL(info.path).cblas_sgemm
        f.restype = None
        out = np.zeros((96, 112), np.float32)
        P = ctypes.POINTER(ctypes.c_float)
        f(101, 111, 111, 96, 112, 80, ctypes.c_float(1.0), a.ctypes.data_as(P), 80, b.ctypes.data_as(P), 112,
          ctypes.c_float(0.0), out.ctypes.data_as(P), 112)
        direct = out.tolist()
    print(json.dumps({{"name": info.name, "path": info.path, "reason": info.reason, "c": c.tolist(),
                      "direct": direct}}))
    """
)

GLIBC = sys.platform.startswith("linux") and platform.libc_ver()[0] == "glibc"
_BINDING = re.compile(r"binding file (\S*libmlx\.so\S*) \[\d+\] to (\S+) \[\d+\]: normal symbol `cblas_sgemm'")


def _run(setting: str | None, pre: str = "", trace_dir: Path | None = None) -> dict:
    env = dict(os.environ)
    env.pop("MLXC_BLAS", None)
    env.pop("LD_PRELOAD", None)
    if setting is not None:
        env["MLXC_BLAS"] = setting
    if trace_dir is not None:
        env["LD_DEBUG"] = "bindings"
        env["LD_DEBUG_OUTPUT"] = str(trace_dir / "ld")
    proc = subprocess.run(
        [sys.executable, "-c", _CHILD.format(pre=pre)], env=env, capture_output=True, text=True, timeout=120
    )
    assert proc.returncode == 0, proc.stderr
    out = json.loads(proc.stdout.strip().splitlines()[-1])
    if trace_dir is not None:
        out["bound_to"] = _bound_library(trace_dir, proc)
    return out


def _bound_library(trace_dir: Path, proc) -> str:
    """The file the dynamic linker bound libmlx's cblas_sgemm to, from the child's LD_DEBUG log."""
    files = list(trace_dir.glob("ld.*"))
    if not files:
        pytest.skip("the dynamic linker ignored LD_DEBUG here")
    found = set()
    for f in files:
        for m in _BINDING.finditer(f.read_text(errors="replace")):
            found.add(os.path.realpath(m.group(2)))
    assert len(found) == 1, f"libmlx's cblas_sgemm bindings: {found or 'none found'}"
    return found.pop()


def _expected() -> np.ndarray:
    rng = np.random.default_rng(0)
    a = rng.standard_normal((96, 80)).astype(np.float32)
    b = rng.standard_normal((80, 112)).astype(np.float32)
    return a.astype(np.float64) @ b.astype(np.float64)


def _check_numbers(out: dict) -> None:
    """Close to numpy's float64 product, and exactly what the reported library computes for the same call."""
    c = np.array(out["c"], dtype=np.float64)
    ref = _expected()
    assert np.linalg.norm(c - ref) / np.linalg.norm(ref) < 1e-4
    assert out["direct"] is not None, "active_blas() names no library"
    np.testing.assert_array_equal(np.array(out["c"], np.float32), np.array(out["direct"], np.float32))


def _check_bound(out: dict) -> None:
    """The library the linker bound libmlx's cblas_sgemm to is the one active_blas() reports."""
    assert out["path"] and out["bound_to"] == os.path.realpath(out["path"]), out["reason"]


linux_only = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="the preload is Linux-only")
glibc_only = pytest.mark.skipif(not GLIBC, reason="the linker witness needs glibc's LD_DEBUG")


@linux_only
@glibc_only
@pytest.mark.parametrize("setting", ["off", "reference", "OFF"])
def test_off_reports_reference(setting, tmp_path):
    out = _run(setting, trace_dir=tmp_path if setting == "off" else None)
    assert out["name"] == blas.REFERENCE
    assert "nothing preloaded" in out["reason"]
    if "bound_to" in out:
        assert "mlx" in out["bound_to"]  # the copy bundled in the mlx wheel
        _check_bound(out)
    _check_numbers(out)


@linux_only
@glibc_only
def test_auto_finds_openblas_and_it_serves_mlx(tmp_path):
    if not any("openblas" in p for p in blas.candidate_paths()):
        pytest.skip("no OpenBLAS installed here (apt-get install libopenblas0-pthread)")
    out = _run("auto", trace_dir=tmp_path)
    assert out["name"] == "openblas", out
    assert out["path"] and Path(out["path"]).exists()
    assert "openblas" in out["bound_to"]
    _check_bound(out)
    _check_numbers(out)


@linux_only
def test_default_is_auto():
    if blas.find_library() is None:
        pytest.skip("no optimized BLAS installed here")
    assert _run(None)["name"] == _run("auto")["name"] != blas.REFERENCE


@linux_only
@glibc_only
def test_bogus_path_still_imports_and_says_why(tmp_path):
    bogus = str(tmp_path / "libnothere.so")
    out = _run(bogus, trace_dir=tmp_path)
    assert out["name"] == blas.REFERENCE
    assert bogus in out["reason"] and "could not load" in out["reason"]
    _check_bound(out)
    _check_numbers(out)


@linux_only
@glibc_only
def test_library_without_cblas_is_refused(tmp_path):
    libm = "libm.so.6"
    out = _run(libm, trace_dir=tmp_path)
    assert out["name"] == blas.REFERENCE
    assert "cblas_sgemm" in out["reason"]
    _check_bound(out)


@linux_only
@glibc_only
def test_explicit_path(tmp_path):
    path = blas.find_library()
    if path is None or not os.path.exists(path):
        pytest.skip("no optimized BLAS installed here")
    out = _run(path, trace_dir=tmp_path)
    assert out["name"] != blas.REFERENCE
    assert Path(out["path"]).exists()
    assert out["bound_to"] == os.path.realpath(path)
    _check_bound(out)
    _check_numbers(out)


@linux_only
@glibc_only
def test_mlx_imported_first_is_reported_honestly(tmp_path):
    """Too late to preload: the report says so, and the linker agrees that the bundled BLAS serves MLX."""
    if blas.find_library() is None:
        pytest.skip("no optimized BLAS installed here")
    out = _run("auto", pre="import mlx.core", trace_dir=tmp_path)
    assert out["name"] == blas.REFERENCE
    assert "could not take effect" in out["reason"]
    _check_bound(out)
    _check_numbers(out)


@linux_only
def test_preload_changes_which_code_computes_the_product():
    """Both settings give numpy's product to float32 accuracy, each equal to its own library's cblas_sgemm, and the
    two differ in the last bits (OpenBLAS's blocked FMA kernels vs the reference's sequential sum): were the preload
    reported but not in effect, auto would reproduce the reference BLAS's bits."""
    if blas.find_library() is None:
        pytest.skip("no optimized BLAS installed here")
    off, auto = _run("off"), _run("auto")
    assert off["name"] == blas.REFERENCE and auto["name"] != blas.REFERENCE
    _check_numbers(off)
    _check_numbers(auto)
    np.testing.assert_allclose(np.array(off["c"]), np.array(auto["c"]), rtol=1e-4, atol=1e-4)
    assert not np.array_equal(np.array(off["c"], np.float32), np.array(auto["c"], np.float32))


def test_info_is_frozen_and_activate_is_idempotent():
    info = blas.active_blas()
    assert blas.activate() is info
    with pytest.raises(AttributeError):
        info.name = "x"  # type: ignore[misc]
    assert isinstance(info.reason, str) and info.reason


def test_matmul_gflops_is_two_n_cubed_over_the_best_time(monkeypatch):
    """The benchmark's arithmetic, on a fake clock (no real timing): 2 n^3 flops over the fastest of the timed runs.
    Fails on n^2, a missing factor 2, a mean or the slowest run instead of the best, or a timed warm-up."""
    ticks = iter([100.0, 100.5, 200.0, 200.25, 300.0, 300.4])  # three timed runs: 0.5 s, 0.25 s, 0.4 s
    monkeypatch.setattr(blas, "time", types.SimpleNamespace(perf_counter=lambda: next(ticks)))
    assert blas.matmul_gflops(64, repeats=3) == pytest.approx(2 * 64**3 / 0.25 / 1e9, rel=1e-12)
