"""mlxc: a graph-IR compiler for language models that targets MLX."""

# --- BLAS preload: KEEP THESE LINES FIRST. ---------------------------------------------------------------------
# On Linux, `activate()` loads a fast system BLAS (OpenBLAS) globally so that MLX uses it instead of the reference
# BLAS in its wheel. It only works if it runs before anything imports `mlx.core`, so nothing that may import mlx
# can come above it. Set MLXC_BLAS=off to disable; see blas.py.
from . import blas as _blas  # noqa: E402  (imports no mlx)

_blas.activate()
# --- end of BLAS preload; other package-level code and exports go below. -------------------------------------

import importlib  # noqa: E402

__version__ = "0.1.0"

# The public API, imported on first use (PEP 562): `import mlxc.cli` stays cheap, so the command line can catch a
# Ctrl-C during MLX's start-up, and `import mlxc` loads MLX only when something needs it.
_EXPORTS = {
    "compile": "api", "load": "api", "load_artifact": "api", "load_async": "api", "resolve": "api",
    "save_adapter": "api", "LoRAConfig": "passes.lora", "lower": "frontends.lower", "ModelSpec": "frontends.spec",
    "MlxcError": "ir.errors", "CompiledModel": "runtime.model", "ModelOutput": "runtime.model",
    "diff": "tools.diff", "DiffReport": "tools.diff", "perplexity": "runtime.perplexity",
    "Perplexity": "runtime.perplexity", "export": "tools.export",
}
_SUBPACKAGES = ("api", "cli", "codegen", "frontends", "ir", "kernels", "passes", "runtime", "tools")


def __getattr__(name: str):
    if name in _EXPORTS:
        value = getattr(importlib.import_module(f".{_EXPORTS[name]}", __name__), name)
        globals()[name] = value
        return value
    if name in _SUBPACKAGES:
        return importlib.import_module(f".{name}", __name__)
    raise AttributeError(f"module 'mlxc' has no attribute {name!r}")


def __dir__():
    return sorted(list(globals()) + list(_EXPORTS) + list(_SUBPACKAGES))


__all__ = sorted(_EXPORTS) + ["__version__"]
