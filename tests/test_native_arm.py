"""The arm64 kernels (kernels/native/src/kernels_arm.inc: NEON, and NEON with ARMv8.2's dot product), verified
without arm64 hardware: tests/native_harness/kernel_harness.cpp and the sources the extension builds from are
compiled for arm64 with Debian's cross compiler and run under qemu-aarch64, which executes the real instructions.

Each case runs every kernel set the emulated CPU reports (qemu's `max` CPU has the dot product: neon_dotprod, neon
and the portable scalar kernels; a Cortex-A72 is ARMv8.0: neon and scalar, which also checks the run-time dispatch)
on MLX's affine layout (int8 and float activation paths) and on the packed layout, with weights quantized by
tests/affine_ref.py and packed by `mlxc.kernels.native.pack`. The reference is float64 numpy: the dequantized
weight times the int8 activations the harness reports it used (d * q), so the only allowed difference is float32
rounding, 1e-5 * (|x| @ |W|.T) — much tighter than the activation-quantization bound of test_native_kernels.py.

The whole extension, too: CMakeLists.txt cross-builds it against MLX's arm64 wheel, and the native kernels' own
test files run with it under qemu in Debian's arm64 Python (mx.compile's JIT included: MLX's `g++` is the cross
compiler there), every kernel set on every case, as they run on this machine.

Needs `aarch64-linux-gnu-g++` (Debian: g++-aarch64-linux-gnu) and `qemu-aarch64` (qemu-user), and for the whole
extension the arm64 environment .ci/arm64-env prepares (`MLXC_ARM64_ENV`, default ~/.cache/mlxc/arm64-env), CMake
and nanobind; .ci/run prepares all of it, elsewhere these tests skip and say why.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

import mlx.core as mx

from affine_ref import affine_quantize, unpack_codes
from mlxc.kernels import native

CXX = shutil.which("aarch64-linux-gnu-g++")
OBJDUMP = shutil.which("aarch64-linux-gnu-objdump")
QEMU = shutil.which("qemu-aarch64")
pytestmark = pytest.mark.skipif(
    not (CXX and QEMU),
    reason="the arm64 kernels' tests need aarch64-linux-gnu-g++ and qemu-aarch64 (Debian: g++-aarch64-linux-gnu "
           "qemu-user; .ci/run installs them)")

SRC = Path(native.__file__).parent / "src"
HARNESS = Path(__file__).parent / "native_harness" / "kernel_harness.cpp"
ARM_ISAS = ["neon", "neon_dotprod"]


def isa_flags(isa: str) -> list[str]:
    """The flags CMakeLists.txt compiles an arm64 kernel unit with (`set(MLXC_ISA_FLAGS_<isa> ...)`)."""
    found = re.search(rf"set\(MLXC_ISA_FLAGS_{isa}\s+([^)]*)\)", (SRC.parent / "CMakeLists.txt").read_text())
    assert found, f"CMakeLists.txt sets no MLXC_ISA_FLAGS_{isa}"
    return found.group(1).split()


BITS_GROUPS = [(4, 32), (8, 32), (4, 64), (8, 64), (4, 128), (8, 128)]
# (M, N, K): batch 1 (decode) and more (prefill: full and partial pairs of activation rows), N not a multiple of 4
# or 16 (partial tiles), K = 32 x odd
SHAPES = [(1, 37, 32 * 7), (7, 61, 32 * 9), (1, 5, 32), (4, 13, 32 * 3), (5, 19, 32 * 17), (2, 48, 32 * 5)]


@pytest.fixture(scope="module")
def harness(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("arm64")
    common = ["-std=c++20", "-O3", "-Wall", "-DMLXC_HAVE_ARM=1", "-DMLXC_HAVE_X86=0", f"-I{SRC}"]
    objs = []
    for isa in ARM_ISAS:
        obj = out / f"kernels_{isa}.o"
        subprocess.run([CXX, *common, *isa_flags(isa), "-c", str(SRC / f"kernels_{isa}.cpp"), "-o", str(obj)],
                       check=True)
        objs.append(str(obj))
    exe = out / "kernel_harness"
    subprocess.run([CXX, *common, "-static", str(HARNESS), str(SRC / "common.cpp"), str(SRC / "dispatch.cpp"), *objs,
                    "-o", str(exe)], check=True)
    return exe


def run(harness: Path, *args: str, cpu: str = "max") -> str:
    proc = subprocess.run([QEMU, "-cpu", cpu, str(harness), *args], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    return proc.stdout


def sdot_count(obj: Path) -> int:
    proc = subprocess.run([OBJDUMP, "-d", str(obj)], capture_output=True, text=True, check=True)
    return len(re.findall(r"\tsdot\t", proc.stdout))


def check_sdot_only_in_dotprod_units(objects: dict[str, Path]) -> None:
    """The ARMv8.0 set must not hold an instruction an ARMv8.0 CPU lacks (it would stop with SIGILL there), and the
    dot-product set must really use it (with the same numbers either way, no result would tell)."""
    counts = {isa: sdot_count(obj) for isa, obj in objects.items()}
    assert counts["neon"] == 0 and counts["neon_dotprod"] > 0, counts


@pytest.mark.skipif(OBJDUMP is None, reason="needs aarch64-linux-gnu-objdump (Debian: binutils-aarch64-linux-gnu)")
def test_sdot_only_in_the_dotprod_set(harness):
    check_sdot_only_in_dotprod_units({isa: harness.parent / f"kernels_{isa}.o" for isa in ARM_ISAS})


def test_dispatch_follows_the_cpu(harness):
    """The dot-product kernels run where the CPU has sdot (hwcap ASIMDDP) and only there."""
    assert run(harness, "--isas", cpu="max").split() == ["neon_dotprod", "neon", "scalar"]
    assert run(harness, "--isas", cpu="cortex-a72").split() == ["neon", "scalar"]  # ARMv8.0
    assert run(harness, "--isas", cpu="cortex-a76").split() == ["neon_dotprod", "neon", "scalar"]  # ARMv8.2


def make_case(tmp: Path, m: int, n: int, k: int, bits: int, group_size: int, mode: str, scale_dtype: str,
              chunk_rows: int, seed: int = 0):
    """Writes a case for the harness; returns (x, W) as float64 (W dequantized, exactly what the codes mean)."""
    rng = np.random.default_rng(seed)
    w = (rng.standard_normal((n, k)) * 0.05).astype(np.float32)
    codes, scales, biases = affine_quantize(w, group_size, bits, dtype=scale_dtype)
    wq = unpack_codes(codes, bits).astype(np.float64)
    groups = lambda a: np.repeat(np.asarray(a, np.float64), group_size, axis=1)  # noqa: E731
    w_ref = groups(scales) * wq + groups(biases)
    x = rng.standard_normal((m, k)).astype(np.float32)
    x[:, ::7] *= 4.0  # some larger entries, as activations have
    store = np.float16 if scale_dtype == "float16" else np.float32
    if mode == "packed":
        pc, ps, pb = native.pack(mx.array(codes), mx.array(scales.astype(store)), mx.array(biases.astype(store)),
                                 bits=bits, group_size=group_size)
        arrays = [np.array(pc), np.array(ps), np.array(pb)]
    else:
        arrays = [codes, scales.astype(store), biases.astype(store)]
    tmp.mkdir(parents=True, exist_ok=True)
    for name, a in zip(("codes", "scales", "biases"), arrays):
        (tmp / f"{name}.bin").write_bytes(np.ascontiguousarray(a).tobytes())
    (tmp / "x.bin").write_bytes(x.tobytes())
    scale_type = 1 if scale_dtype == "float16" else 0
    (tmp / "case.txt").write_text(f"{m} {n} {k} {bits} {group_size} {scale_type} {mode} {chunk_rows}\n")
    return x.astype(np.float64), w_ref


def int8_activations(tmp: Path, m: int, k: int, bits: int, mode: str) -> np.ndarray:
    """d * q as the harness prepared them, back in natural order (the unpacked 4-bit kernels store each block's even
    elements, then its odd ones)."""
    q = np.fromfile(tmp / "q.bin", np.int8).reshape(m, k // 32, 32).astype(np.float64)
    d = np.fromfile(tmp / "d.bin", np.float32).reshape(m, k // 32, 1).astype(np.float64)
    xq = q * d
    if bits == 4 and mode != "packed":
        nat = np.empty_like(xq)
        nat[..., 0::2], nat[..., 1::2] = xq[..., :16], xq[..., 16:]
        xq = nat
    return xq.reshape(m, k)


def check(harness: Path, tmp: Path, m, n, k, bits, group_size, mode, scale_dtype="float32", chunk_rows=None):
    chunk_rows = chunk_rows or n
    x, w = make_case(tmp, m, n, k, bits, group_size, mode, scale_dtype, chunk_rows)
    # an ARMv8.0 CPU (the neon set as it runs there), then one with the dot product (every set)
    for cpu, isas in (("cortex-a72", ["neon", "scalar"]), ("max", ["neon_dotprod", "neon", "scalar"])):
        for old in tmp.glob("y_*.bin"):
            old.unlink()
        run(harness, str(tmp), cpu=cpu)
        xa = x if mode == "float" else int8_activations(tmp, m, k, bits, mode)
        ref = xa @ w.T
        slack = 1e-5 * (np.abs(xa) @ np.abs(w).T) + 1e-6
        assert sorted(p.name for p in tmp.glob("y_*.bin")) == sorted(f"y_{isa}.bin" for isa in isas), cpu
        for isa in isas:
            y = np.fromfile(tmp / f"y_{isa}.bin", np.float32).reshape(m, n).astype(np.float64)
            err = np.abs(y - ref)
            assert (err <= slack).all(), f"{isa} on {cpu}: max error {err.max():.3g} (slack {slack.min():.3g})"
    if mode != "float":  # and the activations are the int8 scheme's: within its bound of x itself
        xb = np.abs(x).reshape(m, -1, 32).max(axis=2) / 127.0 / 2.0
        bound = xb @ np.abs(w).reshape(n, -1, 32).sum(2).T + slack
        assert (np.abs(ref - x @ w.T) <= bound).all()


@pytest.mark.parametrize("bits,group_size", BITS_GROUPS)
@pytest.mark.parametrize("mode", ["int8", "float", "packed"])
@pytest.mark.parametrize("m,n,k", SHAPES)
def test_kernels_equal_the_dequantized_reference(harness, tmp_path, bits, group_size, mode, m, n, k):
    if k % group_size:
        k = group_size * (k // group_size | 1 if k >= group_size else 1)
    # calls split N as the extension's threads do: whole tiles for the packed kernels, 4 rows for the others
    chunk = 16 if mode == "packed" else 4
    check(harness, tmp_path, m, n, k, bits, group_size, mode, chunk_rows=chunk if n > chunk else None)


@pytest.mark.parametrize("bits,group_size", [(4, 32), (8, 32), (4, 128)])
@pytest.mark.parametrize("mode", ["int8", "float", "packed"])
def test_float16_scales(harness, tmp_path, bits, group_size, mode):
    """GGUF keeps scales and biases in float16; the kernels read them as stored."""
    check(harness, tmp_path, 3, 29, 32 * 5 if group_size == 32 else 128 * 3, bits, group_size, mode, "float16")


@pytest.mark.parametrize("scale_dtype", ["float32", "float16"])
@pytest.mark.parametrize("m,n,k", [(1, 37, 32 * 7), (5, 19, 32 * 3), (2, 64, 256)])
def test_group_16(harness, tmp_path, scale_dtype, m, n, k):
    """8-bit codes with a scale per 16 (GGUF Q6_K as mlxc keeps it): two groups per 32-block, packed kernels."""
    check(harness, tmp_path, m, n, k, 8, 16, "packed", scale_dtype)


# ------------------------------------------------------------------------------------------------ the whole extension

ENV = Path(os.environ.get("MLXC_ARM64_ENV", "~/.cache/mlxc/arm64-env")).expanduser()
REPO = Path(native.__file__).parents[2]
# the test files of the native kernels; none needs torch (the parts that compare with transformers skip without it)
NATIVE_TESTS = ["test_native_kernels.py", "test_native_gemv.py", "test_native_fused.py", "test_native_scan.py",
                "test_native_prefill_attention.py", "test_native_path.py", "test_kquants.py"]


def _arm64_python() -> Path | None:
    version = ENV / "python-version"
    if not version.exists():
        return None
    exe = ENV / "root" / "usr" / "bin" / f"python{version.read_text().strip()}"
    return exe if exe.exists() and (ENV / "site" / "mlx").is_dir() else None


def _missing() -> str | None:
    if _arm64_python() is None:
        return f"no arm64 environment in {ENV} (run `bash .ci/arm64-env`, or set MLXC_ARM64_ENV)"
    built_for = (ENV / "python-version").read_text().strip()
    if built_for != f"{sys.version_info.major}.{sys.version_info.minor}":
        return (f"the arm64 environment's Python is {built_for} and this one {sys.version_info.major}."
                f"{sys.version_info.minor}: the extension is built with this Python's headers")
    if shutil.which("cmake") is None:
        return "cmake is not installed"
    try:
        import nanobind  # noqa: F401
    except ImportError:
        return "nanobind is not installed (pip install 'nanobind>=3.0.1,<4')"
    return None


@pytest.fixture(scope="module")
def arm64_tree(tmp_path_factory) -> Path:
    """A copy of mlxc with the extension cross-built for arm64 in it; returns the directory that holds `mlxc`."""
    if (why := _missing()) is not None:
        pytest.skip(why)
    tmp = tmp_path_factory.mktemp("arm64-ext")
    toolchain = tmp / "aarch64.cmake"
    toolchain.write_text("set(CMAKE_SYSTEM_NAME Linux)\nset(CMAKE_SYSTEM_PROCESSOR aarch64)\n"
                         f"set(CMAKE_CXX_COMPILER {CXX})\n")
    import sysconfig
    build, out = tmp / "build", tmp / "out"
    subprocess.run(["cmake", "-S", str(REPO / "kernels" / "native"), "-B", str(build), "-DCMAKE_BUILD_TYPE=Release",
                    f"-DCMAKE_TOOLCHAIN_FILE={toolchain}", f"-DPython_EXECUTABLE={sys.executable}",
                    f"-DPython_INCLUDE_DIR={sysconfig.get_paths()['include']}",
                    f"-DMLX_ROOT={ENV / 'site' / 'mlx' / 'share' / 'cmake' / 'MLX'}", f"-DMLXC_OUTPUT_DIR={out}"],
                   check=True, capture_output=True)
    proc = subprocess.run(["cmake", "--build", str(build), "-j", str(os.cpu_count() or 2)], capture_output=True,
                          text=True)
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]
    assert "warning" not in proc.stdout + proc.stderr, proc.stdout + proc.stderr
    (built,) = out.glob("_mlxc_native*.so")
    pkg = tmp / "pkg"
    shutil.copytree(REPO, pkg / "mlxc", ignore=shutil.ignore_patterns(
        ".git", "build", "__pycache__", "*.so", "_build_error.txt", ".pytest_cache", ".hypothesis", "artifacts"))
    version = (ENV / "python-version").read_text().strip().replace(".", "")
    shutil.copy(built, pkg / "mlxc" / "kernels" / "native" / f"_mlxc_native.cpython-{version}-aarch64-linux-gnu.so")
    return pkg


def run_arm64_python(tree: Path, tmp: Path, *args: str, timeout: int = 1500) -> subprocess.CompletedProcess:
    """Debian's arm64 Python under qemu, with the arm64 wheels and `tree` on its path. MLX's mx.compile runs `g++`:
    here the cross compiler, and its cache of built kernels goes to a temporary directory of its own (the host's
    MLX would otherwise find arm64 libraries in /tmp/mlx)."""
    bin_dir = tmp / "bin"
    bin_dir.mkdir(exist_ok=True)
    (bin_dir / "g++").write_text(f'#!/bin/sh\nexec {CXX} "$@"\n')
    (bin_dir / "g++").chmod(0o755)
    (tmp / "tmp").mkdir(exist_ok=True)
    env = {"PATH": f"{bin_dir}:{os.environ['PATH']}", "PYTHONPATH": f"{tree}:{ENV / 'site'}", "TMPDIR": str(tmp / "tmp"),
           "HOME": str(tmp), "PYTHONDONTWRITEBYTECODE": "1"}
    return subprocess.run([QEMU, "-L", str(ENV / "root"), str(_arm64_python()), *args], cwd=tree / "mlxc", env=env,
                          capture_output=True, text=True, timeout=timeout)


@pytest.mark.skipif(OBJDUMP is None, reason="needs aarch64-linux-gnu-objdump (Debian: binutils-aarch64-linux-gnu)")
def test_the_extension_build_keeps_sdot_in_the_dotprod_set(arm64_tree):
    build = arm64_tree.parent / "build"
    check_sdot_only_in_dotprod_units({isa: next(build.rglob(f"kernels_{isa}.cpp.o")) for isa in ARM_ISAS})


def test_the_extension_runs_on_arm64(arm64_tree, tmp_path):
    proc = run_arm64_python(arm64_tree, tmp_path, "-c", "import platform; from mlxc.kernels import native; "
                            "print(platform.machine(), native.reason(), native.isa(), *native.supported_isas())")
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.split() == ["aarch64", "None", "neon_dotprod", "neon_dotprod", "neon", "scalar"]


def test_native_tests_pass_on_arm64(arm64_tree, tmp_path):
    """The native kernels' test files, unchanged, on arm64: every kernel set (neon_dotprod, neon, scalar) on every
    case, the fused layers, the selective scan, the float matvecs and small models through the native path."""
    proc = run_arm64_python(arm64_tree, tmp_path, "-m", "pytest", "-q", "-p", "no:cacheprovider",
                            *[f"tests/{name}" for name in NATIVE_TESTS])
    tail = proc.stdout[-6000:] + proc.stderr[-2000:]
    assert proc.returncode == 0, tail
    assert " passed" in proc.stdout.splitlines()[-1] and "failed" not in proc.stdout.splitlines()[-1], tail
