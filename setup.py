"""Builds mlxc's native CPU kernels (kernels/native, an MLX C++ extension) during `pip install` / `pip install -e .`.

Everything else about the package is in pyproject.toml. The extension is optional: when it cannot be built (no C++
compiler, a CMake error, ...), installation still succeeds, the reason is written to
mlxc/kernels/native/_build_error.txt, and `mlxc.kernels.native.reason()` reports it. MLXC_NATIVE_BUILD=0 skips the
build; MLXC_NATIVE_BUILD=require makes a failed build fail the installation.
"""

import os
import shutil
import subprocess
import sys
import traceback
from pathlib import Path

from setuptools import Extension, setup
from setuptools.command.build_ext import build_ext
from setuptools.command.build_py import build_py

HERE = Path(__file__).resolve().parent
ERROR_FILE = "_build_error.txt"


class CMakeExtension(Extension):
    def __init__(self, name: str, sourcedir: Path):
        super().__init__(name, sources=[])
        self.sourcedir = str(sourcedir)


class BuildError(Exception):
    pass


def _cmake() -> str:
    try:  # the `cmake` package from PyPI (a build requirement): new enough whatever the system has
        import cmake

        exe = Path(cmake.CMAKE_BIN_DIR) / "cmake"
        if exe.exists():
            return str(exe)
    except ImportError:
        pass
    exe = shutil.which("cmake")
    if exe is None:
        raise BuildError("CMake was not found (pip installs it from PyPI as a build requirement)")
    return exe


def _summary(lines: list[str]) -> str:
    """The line of a failed build that says what went wrong: CMake's message (the indented lines after
    "CMake Error at ..."), else the compiler's first error."""
    for i, ln in enumerate(lines):
        if ln.startswith("CMake Error"):
            message = []
            for nxt in lines[i + 1:i + 6]:
                if not nxt.startswith("  ") or nxt.strip().startswith("It fails with"):
                    break
                message.append(nxt.strip())
            return " ".join(message) or ln.strip()
        if "error:" in ln.lower() or "fatal error" in ln.lower():
            return ln.strip()
    errors = [ln for ln in lines if "error" in ln.lower()] or lines[-1:] or ["(no output)"]
    return errors[0].strip()


def _run(cmd: list[str], cwd: Path, what: str) -> None:
    res = subprocess.run(cmd, cwd=cwd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    sys.stderr.write(res.stdout)
    if res.returncode != 0:
        lines = [ln for ln in res.stdout.splitlines() if ln.strip()]
        raise BuildError(f"{what} failed: {_summary(lines)}\n\n" + "\n".join(lines[-60:]))


class OptionalNativeBuild(build_ext):
    """Runs CMake for each CMakeExtension; a failure is recorded beside the package instead of raised."""

    def run(self) -> None:
        mode = os.environ.get("MLXC_NATIVE_BUILD", "auto").lower()
        for ext in self.extensions:
            target = Path(self.get_ext_fullpath(ext.name)).resolve()  # in the source tree for editable installs
            error_file = target.parent / ERROR_FILE
            target.parent.mkdir(parents=True, exist_ok=True)
            if mode in ("0", "off", "no", "false"):
                error_file.write_text("skipped: MLXC_NATIVE_BUILD=0 was set at install time\n")
                continue
            try:
                self._build(ext, target)
                error_file.unlink(missing_ok=True)
            except Exception as e:  # noqa: BLE001 - any failure leaves the pure-MLX fallback
                if mode == "require":
                    raise
                detail = str(e) if isinstance(e, BuildError) else f"{type(e).__name__}: {e}\n\n{traceback.format_exc()}"
                error_file.write_text(detail + "\n")
                self.warn(f"mlxc: native kernels were not built ({detail.splitlines()[0]}); mlxc works without them. "
                          f"Details: {error_file}")

    def _build(self, ext: CMakeExtension, target: Path) -> None:
        if shutil.which(os.environ.get("CXX", "c++")) is None and shutil.which("g++") is None \
                and shutil.which("clang++") is None:
            raise BuildError("no C++ compiler found (install g++ or clang++, e.g. `apt-get install g++`)")
        build_dir = Path(self.build_temp).resolve() / "native"
        build_dir.mkdir(parents=True, exist_ok=True)
        cmake = _cmake()
        _run([cmake, "-S", ext.sourcedir, "-B", str(build_dir), "-DCMAKE_BUILD_TYPE=Release",
              f"-DPython_EXECUTABLE={sys.executable}", f"-DMLXC_OUTPUT_DIR={target.parent}"],
             build_dir, "CMake configure")
        jobs = os.environ.get("CMAKE_BUILD_PARALLEL_LEVEL") or str(os.cpu_count() or 1)
        _run([cmake, "--build", str(build_dir), "--config", "Release", "-j", jobs], build_dir, "CMake build")
        if not target.exists():
            raise BuildError(f"the build finished but {target.name} is missing")


class BuildPy(build_py):
    """The repository root is the `mlxc` package, so this script would be installed as `mlxc.setup`: leave it out."""

    def find_package_modules(self, package, package_dir):
        return [m for m in super().find_package_modules(package, package_dir) if (m[0], m[1]) != ("mlxc", "setup")]


if __name__ == "__main__":
    setup(
        ext_modules=[CMakeExtension("mlxc.kernels.native._mlxc_native", HERE / "kernels" / "native")],
        cmdclass={"build_ext": OptionalNativeBuild, "build_py": BuildPy},
    )
