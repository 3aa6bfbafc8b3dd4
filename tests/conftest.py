# Import mlxc before anything loads mlx.core, so its fast-BLAS preload takes effect for the whole test run.
import mlxc  # noqa: F401

# Shared test helpers (parity.py, affine_ref.py) import as top-level modules under pytest's importlib mode.
import sys  # noqa: E402
from pathlib import Path  # noqa: E402

sys.path.insert(0, str(Path(__file__).parent))
