"""mlxc: a graph-IR compiler for language models that targets MLX."""

# --- BLAS preload: KEEP THESE LINES FIRST. ---------------------------------------------------------------------
# On Linux, `activate()` loads a fast system BLAS (OpenBLAS) globally so that MLX uses it instead of the reference
# BLAS in its wheel. It only works if it runs before anything imports `mlx.core`, so nothing that may import mlx
# can come above it. Set MLXC_BLAS=off to disable; see blas.py.
from . import blas as _blas  # noqa: E402  (imports no mlx)

_blas.activate()
# --- end of BLAS preload; other package-level code and exports go below. -------------------------------------

__version__ = "0.1.0"

from .api import compile, load, load_artifact, load_async, resolve, save_adapter  # noqa: E402
from .passes.lora import LoRAConfig  # noqa: E402
from .frontends.lower import lower  # noqa: E402
from .frontends.spec import ModelSpec  # noqa: E402
from .ir.errors import MlxcError  # noqa: E402
from .runtime.model import CompiledModel, ModelOutput  # noqa: E402

__all__ = [
    "CompiledModel", "LoRAConfig", "MlxcError", "ModelOutput", "ModelSpec", "__version__", "compile", "load", "load_artifact",
    "load_async", "lower", "resolve", "save_adapter",
]
