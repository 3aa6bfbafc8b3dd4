"""The BLAS preload (mlxc.blas), each case in a fresh interpreter: the preload only works before mlx.core loads."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest

from mlxc import blas

# Runs in the child: reports the BLAS info and a matmul result computed by MLX on the CPU.
_CHILD = textwrap.dedent(
    """
    import json, sys
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
    print(json.dumps({{"name": info.name, "path": info.path, "reason": info.reason, "c": c.tolist()}}))
    """
)


def _run(setting: str | None, pre: str = "") -> dict:
    env = dict(os.environ)
    env.pop("MLXC_BLAS", None)
    if setting is not None:
        env["MLXC_BLAS"] = setting
    proc = subprocess.run(
        [sys.executable, "-c", _CHILD.format(pre=pre)], env=env, capture_output=True, text=True, timeout=120
    )
    assert proc.returncode == 0, proc.stderr
    return json.loads(proc.stdout.strip().splitlines()[-1])


def _expected() -> np.ndarray:
    rng = np.random.default_rng(0)
    a = rng.standard_normal((96, 80)).astype(np.float32)
    b = rng.standard_normal((80, 112)).astype(np.float32)
    return a.astype(np.float64) @ b.astype(np.float64)


def _check_numbers(out: dict) -> None:
    c = np.array(out["c"], dtype=np.float64)
    ref = _expected()
    assert np.linalg.norm(c - ref) / np.linalg.norm(ref) < 1e-4


linux_only = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="the preload is Linux-only")


@linux_only
@pytest.mark.parametrize("setting", ["off", "reference", "OFF"])
def test_off_reports_reference(setting):
    out = _run(setting)
    assert out["name"] == blas.REFERENCE
    assert "nothing preloaded" in out["reason"]
    _check_numbers(out)


@linux_only
def test_auto_finds_openblas():
    if not any("openblas" in p for p in blas.candidate_paths()):
        pytest.skip("no OpenBLAS installed here (apt-get install libopenblas0-pthread)")
    out = _run("auto")
    assert out["name"] == "openblas", out
    assert out["path"] and Path(out["path"]).exists()
    _check_numbers(out)


@linux_only
def test_default_is_auto():
    if blas.find_library() is None:
        pytest.skip("no optimized BLAS installed here")
    assert _run(None)["name"] == _run("auto")["name"] != blas.REFERENCE


@linux_only
def test_bogus_path_still_imports_and_says_why(tmp_path):
    bogus = str(tmp_path / "libnothere.so")
    out = _run(bogus)
    assert out["name"] == blas.REFERENCE
    assert bogus in out["reason"] and "could not load" in out["reason"]
    _check_numbers(out)


@linux_only
def test_library_without_cblas_is_refused():
    libm = "libm.so.6"
    out = _run(libm)
    assert out["name"] == blas.REFERENCE
    assert "cblas_sgemm" in out["reason"]


@linux_only
def test_explicit_path():
    path = blas.find_library()
    if path is None or not os.path.exists(path):
        pytest.skip("no optimized BLAS installed here")
    out = _run(path)
    assert out["name"] != blas.REFERENCE
    assert Path(out["path"]).exists()
    _check_numbers(out)


@linux_only
def test_mlx_imported_first_is_reported_honestly():
    if blas.find_library() is None:
        pytest.skip("no optimized BLAS installed here")
    out = _run("auto", pre="import mlx.core")
    assert out["name"] == blas.REFERENCE
    assert "could not take effect" in out["reason"]
    _check_numbers(out)


def test_same_numbers_under_both_settings():
    off, auto = _run("off"), _run("auto")
    _check_numbers(off)
    _check_numbers(auto)
    np.testing.assert_allclose(np.array(off["c"]), np.array(auto["c"]), rtol=1e-4, atol=1e-4)


def test_info_is_frozen_and_activate_is_idempotent():
    info = blas.active_blas()
    assert blas.activate() is info
    with pytest.raises(AttributeError):
        info.name = "x"  # type: ignore[misc]
    assert isinstance(info.reason, str) and info.reason


def test_matmul_gflops_is_positive():
    assert blas.matmul_gflops(64, repeats=1) > 0
