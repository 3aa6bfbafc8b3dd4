"""The memory a model's weights take, checked before anything is allocated.

A config is a few numbers anyone can write (`vocab_size: 1000000000000`). Without this check such a model fails
deep inside an allocation, or the kernel kills the process once it has filled the machine; with it, `mlxc.load`
refuses at once and says what the model would need.
"""

from __future__ import annotations

import math
import os

from ..ir import DType, Program, TensorType
from ..ir.errors import MlxcError

_BYTES = {DType.F32: 4, DType.F16: 2, DType.BF16: 2, DType.I32: 4, DType.I64: 8, DType.U32: 4, DType.BOOL: 1}


def tensor_bytes(t: TensorType) -> int:
    """The bytes one parameter of type `t` is stored in (a quantized one: its codes plus per-group scales and
    biases)."""
    n = math.prod(d for d in t.shape if isinstance(d, int))
    if t.quant is None:
        return n * _BYTES.get(t.dtype, 4)
    scale_dtype = getattr(t.quant, "scales", None) or t.dtype
    return n * t.quant.bits // 8 + 2 * (n // t.quant.group_size) * _BYTES.get(scale_dtype, 4)


def release_free_memory() -> None:
    """Give memory freed during a load back to the system. MLX keeps freed buffers for reuse and glibc's malloc keeps
    freed heap pages, so a load's temporaries (blocks read, converted and packed) would otherwise stay resident:
    SmolLM2-135M Q4_1 (a 93 MB file) held 291 MB after loading, 184 MB after this."""
    import ctypes

    import mlx.core as mx

    mx.clear_cache()
    try:
        ctypes.CDLL(None).malloc_trim(0)  # glibc only; elsewhere there is nothing to call
    except (AttributeError, OSError):
        pass


def physical_memory() -> int | None:
    """This machine's memory in bytes, where the system says."""
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError, AttributeError):
        return None


def memory_budget() -> tuple[int | None, str]:
    """The memory this process may fill, and how to say where the bound comes from: the machine's physical memory,
    or a smaller address-space limit (`ulimit -v`), past which an allocation fails with a MemoryError."""
    have = physical_memory()
    label = "this machine's {} of memory"
    try:
        import resource

        soft = resource.getrlimit(resource.RLIMIT_AS)[0]
    except (ImportError, ValueError, OSError):
        soft = resource = None
    if resource is not None and soft not in (resource.RLIM_INFINITY, None) and soft > 0 and \
            (have is None or soft < have):
        have, label = soft, "the {} this process may address (ulimit -v)"
    return have, label


def human(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB", "PiB"):
        if n < 1024 or unit == "PiB":
            return f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} PiB"


def check_weights_fit(program: Program, what: str, memory: int | None = None) -> None:
    """Refuse a program whose weights (as the checkpoint holds them, or as the model runs them, whichever is larger)
    exceed the memory the process may use (`memory`, default: `memory_budget()`), before anything is allocated."""
    from .weights import stage_parameters

    have, label = memory_budget() if memory is None else (memory, "the {} of memory allowed")
    if not have:
        return
    checkpoint = stage_parameters(program, "checkpoint")
    need = max(sum(tensor_bytes(p.type) for p in checkpoint.values()),
               sum(tensor_bytes(p.type) for p in stage_parameters(program, "runtime").values()))
    if need > have:
        count = sum(math.prod(d for d in p.type.shape if isinstance(d, int)) for p in checkpoint.values())
        raise MlxcError(f"{what} has {count:,} parameters ({count:.3g}): its weights need {human(need)}, more than "
                        f"{label.format(human(have))}; nothing was allocated (check the config's sizes)")
