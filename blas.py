"""Fast BLAS for MLX on Linux, by preloading a system BLAS before `mlx.core` is loaded.

The Linux `mlx[cpu]` wheel links a bundled reference BLAS (a few GFLOP/s for an fp32 matmul). `libmlx.so` is
loaded privately (RTLD_LOCAL) by Python, so the dynamic linker looks up `cblas_sgemm` in the process's global
scope first: a library opened with RTLD_GLOBAL *before* `mlx.core` is imported serves every matmul that MLX runs.
Opening it after `mlx.core` has been imported has no effect (measured), so `activate()` must run first; `import
mlxc` calls it in its first lines.

`MLXC_BLAS` chooses what to load:

- `auto` (the default, also when unset or empty): the first working optimized BLAS among known install paths;
- `off` / `reference` / `none` / `0`: nothing (MLX keeps its bundled reference BLAS);
- anything else: the path (or soname) of a shared library to load; if it cannot be loaded, import still works
  and `active_blas().reason` says why.

This module imports nothing from mlx at import time or in `activate()`.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import glob
import importlib.util
import os
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path

__all__ = ["BlasInfo", "activate", "active_blas", "candidate_paths", "find_library", "matmul_gflops"]

ENV_VAR = "MLXC_BLAS"
REFERENCE = "reference (bundled with mlx)"
_OFF_VALUES = {"off", "reference", "none", "0", "false", "no"}


@dataclass(frozen=True)
class BlasInfo:
    """Which BLAS serves MLX's CPU matmuls in this process.

    name: "openblas", "blis", "mkl", "Accelerate", "reference (bundled with mlx)", or a library's file name.
    path: the shared library providing it, when known.
    reason: how it came to be chosen (or why a requested one was not).
    """

    name: str
    path: str | None
    reason: str
    warning: str | None = None  # set when what the user asked for could not be honoured: said on every command

    @property
    def is_reference(self) -> bool:
        return self.name == REFERENCE

    def __str__(self) -> str:
        where = f" ({self.path})" if self.path else ""
        return f"{self.name}{where}: {self.reason}"


_lock = threading.Lock()
_info: BlasInfo | None = None
_handle: ctypes.CDLL | None = None  # kept alive for the life of the process


# ------------------------------------------------------------------------------------------------ discovery


def candidate_paths() -> list[str]:
    """Known locations of optimized BLAS libraries on common Linux distributions, most preferred first."""
    patterns = [
        # Debian / Ubuntu (libopenblas0-pthread, -openmp, -serial), any multiarch triplet
        "/usr/lib/*-linux-gnu/openblas-pthread/libopenblas.so.0",
        "/usr/lib/*-linux-gnu/openblas-openmp/libopenblas.so.0",
        "/usr/lib/*-linux-gnu/openblas-serial/libopenblas.so.0",
        "/usr/lib/*-linux-gnu/libopenblas.so.0",
        # Fedora / RHEL / openSUSE (p = pthreads, o = OpenMP)
        "/usr/lib64/libopenblasp.so.0",
        "/usr/lib64/libopenblas.so.0",
        "/usr/lib64/libopenblaso.so.0",
        # Arch, Alpine, Gentoo, Void
        "/usr/lib/libopenblas.so.0",
        "/usr/lib/libopenblas.so.3",
        "/usr/lib/libopenblas.so",
        "/usr/local/lib/libopenblas.so.0",
        "/usr/local/lib/libopenblas.so",
        "/opt/OpenBLAS/lib/libopenblas.so",
        # BLIS, as packaged by Debian
        "/usr/lib/*-linux-gnu/blis-pthread/libblis.so.4",
        "/usr/lib/*-linux-gnu/blis-openmp/libblis.so.4",
    ]
    out: list[str] = []
    for pattern in patterns:
        for path in sorted(glob.glob(pattern)):
            if path not in out:
                out.append(path)
    # The `libblas.so.3` alternative (Debian's update-alternatives, FlexiBLAS, ...), when it points at an optimized
    # implementation rather than the reference one.
    for pattern in ("/usr/lib/*-linux-gnu/libblas.so.3", "/usr/lib64/libblas.so.3", "/usr/lib/libblas.so.3"):
        for path in sorted(glob.glob(pattern)):
            if _kind_of(path) not in ("reference", None) and path not in out:
                out.append(path)
    return out


def find_library() -> str | None:
    """The first optimized BLAS that `auto` would try to load, without loading it (None if there is none)."""
    paths = candidate_paths()
    if paths:
        return paths[0]
    return ctypes.util.find_library("openblas")


def _kind_of(path: str) -> str | None:
    """A short name for the implementation behind a library path (following symlinks), or None if unknown."""
    try:
        real = os.path.realpath(path).lower()
    except OSError:
        real = path.lower()
    for key in ("openblas", "blis", "mkl", "flexiblas", "atlas"):
        if key in real:
            return key
    if "mlx" in real or "/blas/" in real or "netlib" in real:
        return "reference"
    return None


def _bundled_blas_path() -> str | None:
    """The reference BLAS shipped inside the mlx wheel, found without importing mlx.core."""
    try:
        spec = importlib.util.find_spec("mlx")
    except (ImportError, ValueError):
        return None
    if spec is None or not spec.submodule_search_locations:
        return None
    for loc in spec.submodule_search_locations:
        site = Path(loc).parent
        for libs in sorted(site.glob("mlx*.libs")):
            hits = sorted(libs.glob("libblas*.so*"))
            if hits:
                return str(hits[0])
    return None


def _global_cblas_provider() -> str | None:
    """The file of the library that `cblas_sgemm` resolves to in the process's global scope, if any.

    Whatever provides it there serves libmlx.so when that is loaded later; None means only mlx's bundled copy will.
    """
    try:
        libc = ctypes.CDLL(None)
        fn = getattr(libc, "cblas_sgemm")  # dlsym(RTLD_DEFAULT, ...)
    except (AttributeError, OSError):
        return None

    class _DlInfo(ctypes.Structure):
        _fields_ = [
            ("dli_fname", ctypes.c_char_p),
            ("dli_fbase", ctypes.c_void_p),
            ("dli_sname", ctypes.c_char_p),
            ("dli_saddr", ctypes.c_void_p),
        ]

    try:
        dladdr = libc.dladdr
        dladdr.argtypes = [ctypes.c_void_p, ctypes.POINTER(_DlInfo)]
        dladdr.restype = ctypes.c_int
        info = _DlInfo()
        if dladdr(ctypes.cast(fn, ctypes.c_void_p), ctypes.byref(info)) and info.dli_fname:
            return os.fsdecode(info.dli_fname)
    except (AttributeError, OSError, ValueError):
        pass
    return "(unknown library)"


def _mlx_loaded() -> bool:
    """Whether libmlx is already in this process (imported as mlx.core, or loaded some other way)."""
    if "mlx.core" in sys.modules:
        return True
    try:
        with open("/proc/self/maps", encoding="utf-8", errors="replace") as f:
            return any("libmlx" in line for line in f)
    except OSError:
        return False


def _describe(path: str, lib: ctypes.CDLL | None) -> tuple[str, str]:
    """(name, detail) for a loaded library."""
    kind = _kind_of(path) or Path(path).name
    detail = ""
    if lib is not None:
        get_config = getattr(lib, "openblas_get_config", None)
        if get_config is not None:
            kind = "openblas"
            try:
                get_config.restype = ctypes.c_char_p
                detail = get_config().decode(errors="replace").strip()
            except (OSError, ValueError, AttributeError):
                detail = ""
    return kind, detail


# ------------------------------------------------------------------------------------------------ activation


def _try_load(path: str) -> tuple[ctypes.CDLL | None, str]:
    """Open a library globally; (handle, "") or (None, why not)."""
    try:
        lib = ctypes.CDLL(path, mode=ctypes.RTLD_GLOBAL)
    except OSError as e:
        return None, f"could not load {path}: {e}"
    if not hasattr(lib, "cblas_sgemm"):
        return None, f"{path} has no cblas_sgemm, so MLX would not use it"
    return lib, ""


def _result_after_load(path: str, lib: ctypes.CDLL, how: str) -> BlasInfo:
    name, detail = _describe(path, lib)
    provider = _global_cblas_provider()
    real = os.path.realpath(path) if os.path.exists(path) else path
    if provider not in (None, "(unknown library)") and os.path.realpath(provider) != real:
        # Something loaded earlier (LD_PRELOAD, say) already provides cblas_sgemm: that one wins.
        pname, _ = _describe(provider, None)
        return BlasInfo(pname, provider, f"{how} loaded {path}, but {provider} already provides cblas_sgemm globally")
    reason = f"{how}: preloaded before mlx.core" + (f" ({detail})" if detail else "")
    shown = provider if provider not in (None, "(unknown library)") else path
    return BlasInfo(name, shown, reason)


def _reference(reason: str) -> BlasInfo:
    provider = _global_cblas_provider()
    if provider is not None:
        # Not ours, but honest: a library already global in the process (LD_PRELOAD, a host app) serves MLX.
        name, _ = _describe(provider, None)
        return BlasInfo(name, provider, reason + f"; but cblas_sgemm is already provided globally by {provider}")
    return BlasInfo(REFERENCE, _bundled_blas_path(), reason)


def _activate() -> BlasInfo:
    global _handle
    setting = os.environ.get(ENV_VAR, "auto").strip()
    if sys.platform == "darwin":
        return BlasInfo("Accelerate", "/System/Library/Frameworks/Accelerate.framework", "mlx on macOS uses Accelerate")
    if not sys.platform.startswith("linux"):
        return BlasInfo(REFERENCE, None, f"BLAS preloading is only implemented on Linux (this is {sys.platform})")
    if setting.lower() in _OFF_VALUES:
        return _reference(f"{ENV_VAR}={setting}: nothing preloaded")
    if _mlx_loaded():
        why = ("mlx.core was imported before mlxc.blas.activate() ran, so a BLAS preload could not take effect "
               "(import mlxc before mlx)")
        return BlasInfo(REFERENCE, _bundled_blas_path(), why, why if setting.lower() not in ("", "auto") else None)

    if setting.lower() in ("", "auto"):
        tried: list[str] = []
        paths = candidate_paths()
        found = ctypes.util.find_library("openblas")
        if found and found not in paths:
            paths.append(found)
        for path in paths:
            lib, why = _try_load(path)
            if lib is None:
                tried.append(why)
                continue
            _handle = lib
            return _result_after_load(path, lib, f"{ENV_VAR}=auto found {path}")
        detail = "; ".join(tried) if tried else "none of the known paths exist (install libopenblas0-pthread)"
        return _reference(f"{ENV_VAR}=auto found no optimized BLAS: {detail}")

    lib, why = _try_load(setting)
    if lib is None:
        info = _reference(f"{ENV_VAR}={setting}: {why}; using the BLAS bundled with mlx")
        warning = (f"{ENV_VAR}={setting} could not be used ({why}); MLX falls back to {info.name}, "
                   "which is tens of times slower for matmuls")
        return BlasInfo(info.name, info.path, info.reason, warning)
    _handle = lib
    return _result_after_load(setting, lib, f"{ENV_VAR}={setting}")


def activate() -> BlasInfo:
    """Preload the chosen BLAS (once per process; later calls return the first result). Never raises."""
    global _info
    with _lock:
        if _info is None:
            try:
                _info = _activate()
            except Exception as e:  # noqa: BLE001 - importing mlxc must never fail because of BLAS discovery
                _info = BlasInfo(REFERENCE, None, f"BLAS preload failed unexpectedly: {type(e).__name__}: {e}")
        return _info


def active_blas() -> BlasInfo:
    """Which BLAS MLX uses in this process, as decided when `activate()` ran (it runs now if it has not)."""
    return activate()


# ------------------------------------------------------------------------------------------------ measuring


def matmul_gflops(n: int = 1024, repeats: int = 5) -> float:
    """fp32 n x n matmul throughput on MLX's CPU device, in GFLOP/s: the best of `repeats` timed runs."""
    activate()
    import mlx.core as mx

    with mx.stream(mx.cpu):
        a = mx.random.normal((n, n), dtype=mx.float32)
        b = mx.random.normal((n, n), dtype=mx.float32)
        mx.eval(a, b)
        mx.eval(a @ b)  # warm-up: thread pools, page faults
        best = float("inf")
        for _ in range(max(1, repeats)):
            t0 = time.perf_counter()
            mx.eval(a @ b)
            best = min(best, time.perf_counter() - t0)
    return 2.0 * n**3 / best / 1e9
