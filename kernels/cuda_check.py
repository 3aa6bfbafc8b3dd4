"""Compile-check the CUDA twins with nvcc, wrapped exactly as `mx.fast.cuda_kernel` wraps them.

MLX compiles a custom CUDA kernel with NVRTC at run time: its generated source includes
`mlx/backend/cuda/device/utils.cuh` and `<cooperative_groups.h>`, opens `namespace mlx::core::cu`, passes shapes as
`__grid_constant__ Shape` and turns template arguments into constexprs (kernels/metal/source.py, `render_cuda`).
NVRTC is not installed here, so nvcc compiles the same source with `-std=c++17 -arch=sm_80` — close to MLX's
compile, not identical. MLX's headers come from `$MLXC_MLX_SOURCE` (an MLX checkout) or the installed mlx package
when they are there; otherwise from a stand-in (kernels/metal/cuda_include) that declares what the signatures use.
All twins go into one translation unit (one nvcc start-up instead of one per twin); a success is cached by source
hash.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import tempfile
from dataclasses import dataclass
from pathlib import Path

import mlx.core as mx

from .emulator.emulator import _sha, cache_dir

STAND_IN = Path(__file__).parent / "metal" / "cuda_include"
_UTILS = Path("mlx") / "backend" / "cuda" / "device" / "utils.cuh"
NVCC_FLAGS = ["-std=c++17", "-arch=sm_80"]


def nvcc() -> str | None:
    found = shutil.which("nvcc")
    if found:
        return found
    for cand in (os.environ.get("CUDA_HOME"), "/usr/local/cuda", "/usr/local"):
        if cand and (Path(cand) / "bin" / "nvcc").exists():
            return str(Path(cand) / "bin" / "nvcc")
    return None


def mlx_cuda_include() -> tuple[Path, bool]:
    """(include directory, whether it is MLX's own) for `mlx/backend/cuda/device/utils.cuh`."""
    roots = []
    if os.environ.get("MLXC_MLX_SOURCE"):
        roots.append(Path(os.environ["MLXC_MLX_SOURCE"]))
    import mlx

    roots += [Path(p) / "include" for p in mlx.__path__]
    for r in roots:
        if (r / _UTILS).exists():
            return r, True
    return STAND_IN, False


@dataclass
class CudaCheck:
    ok: bool
    kernels: list[str]
    headers: str  # "MLX's" or "stand-in"
    message: str = ""


def compile_twins(sources: list[tuple[str, str]], flags: list[str] | None = None) -> CudaCheck:
    """nvcc -c over (kernel name, source) pairs as one translation unit; raises FileNotFoundError without nvcc."""
    exe = nvcc()
    if exe is None:
        raise FileNotFoundError("nvcc is not installed")
    include, real = mlx_cuda_include()
    headers = "MLX's" if real else "stand-in"
    flags = flags or NVCC_FLAGS
    seen, parts, names = set(), [], []
    for name, src in sources:
        if name in seen:
            continue
        seen.add(name)
        names.append(name)
        parts.append(f'#line 1 "{name}.cu"\n{src}')
    tu = "".join(parts)
    stamp = cache_dir() / f"nvcc-ok-{_sha(tu, exe, str(include), headers, *flags)}"
    if stamp.exists():
        return CudaCheck(True, names, headers, "cached")
    with tempfile.TemporaryDirectory() as d:
        cu = Path(d) / "twins.cu"
        cu.write_text(tu)
        proc = subprocess.run([exe, *flags, "-I", str(include), "-c", str(cu), "-o", str(Path(d) / "twins.o")],
                              capture_output=True, text=True)
    if proc.returncode != 0:
        errors = [line for line in proc.stderr.splitlines() if "error" in line]
        return CudaCheck(False, names, headers, "; ".join(errors[:6]) or proc.stderr[-1000:])
    stamp.write_text("ok\n")
    return CudaCheck(True, names, headers)


def twin_sources(dtypes=(mx.float32, mx.float16, mx.bfloat16)) -> list[tuple[str, str]]:
    """One twin per (kernel, dtype) of the check cases, with every feature flag the cases use."""
    from .check import all_cases
    from .registry import REGISTRY

    out = []
    for c in all_cases():
        info = REGISTRY[c.kernel]
        if not info.has_cuda or c.dtype not in dtypes:
            continue
        launch, _ = c.make()
        out.append(info.kernel.cuda_source(launch))
    return out
