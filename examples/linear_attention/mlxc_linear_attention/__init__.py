"""mlxc-linear-attention: causal linear attention for mlxc, from outside mlxc.

The `mlxc.plugins` entry point names this module; importing it registers

- the `linear_attention` op and its MLX implementation (ops.py, math in kernels.py),
- the `linear_attention` block kind for spec files (block.py),
- the `linear_hybrid` family: config.json, tensor names, detection, a preset (family.py; `FAMILIES` below),
- the `chunk-linear-attention` pass (passes.py).
"""

from . import block, ops, passes  # noqa: F401  (registration happens on import)
from .family import FAMILIES  # noqa: F401  (a family file's declaration: mlxc registers it)

__version__ = "0.1.0"
