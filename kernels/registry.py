"""Every custom kernel mlxc has, what it implements, and which implementation each target runs.

Targets: "metal" (Apple GPU: the Metal kernel through `mx.fast.metal_kernel`), "cuda" (MLX's CUDA back-end: the
CUDA twin through `mx.fast.cuda_kernel`, where one exists), "cpu" (the reference MLX ops). "emulated" is not a
target but a forced choice for testing: the Metal source in the emulator (kernels/emulator).
"""

from __future__ import annotations

from dataclasses import dataclass

from .metal import attention, scan, ssd
from .metal.kernel import KernelDef

TARGETS = ("metal", "cuda", "cpu")
IMPLEMENTATIONS = ("reference", "metal", "cuda", "emulated")


@dataclass(frozen=True)
class KernelInfo:
    name: str
    kernel: KernelDef
    implements: str
    reference: str  # the reference (fallback) function, module:qualname
    op: str  # the IR op it runs (select-kernels gives the op `kernel = metal | cuda | emulated`)

    @property
    def has_cuda(self) -> bool:
        return self.kernel.cuda_body_file is not None

    def implementation(self, target: str) -> str:
        """"metal", "cuda" or "reference" for a target."""
        if target == "metal":
            return "metal"
        if target == "cuda":
            return "cuda" if self.has_cuda else "reference"
        if target == "cpu":
            return "reference"
        raise ValueError(f"unknown target {target!r}; expected one of {', '.join(TARGETS)}")


def _ref(fn) -> str:
    return f"{fn.__module__}:{fn.__qualname__}"


REGISTRY: dict[str, KernelInfo] = {
    "selective_scan": KernelInfo("selective_scan", scan.SELECTIVE_SCAN,
                                 "Mamba selective scan, prefill over the whole sequence",
                                 _ref(scan.selective_scan_reference), "selective_scan"),
    "selective_state_update": KernelInfo("selective_state_update", scan.SELECTIVE_STATE_UPDATE,
                                         "Mamba decode step (cached state advances one token)",
                                         _ref(scan.selective_state_update_reference), "selective_scan"),
    "mamba2_state_update": KernelInfo("mamba2_state_update", ssd.MAMBA2_STATE_UPDATE,
                                      "Mamba-2 decode step (per-head scalar decay, grouped B/C)",
                                      _ref(ssd.mamba2_state_update_reference), "ssd"),
    "mamba2_chunk_scan": KernelInfo("mamba2_chunk_scan", ssd.MAMBA2_CHUNK_SCAN, "Mamba-2 chunked SSD prefill",
                                    _ref(ssd.mamba2_chunk_scan_reference), "ssd"),
    "attention_decode": KernelInfo("attention_decode", attention.ATTENTION_DECODE,
                                   "attention, one query per head, over the KV cache (GQA, window, soft-cap)",
                                   _ref(attention.attention_reference), "attention"),
    "attention_prefill": KernelInfo("attention_prefill", attention.ATTENTION_PREFILL,
                                    "causal attention, tiled over queries and keys (GQA, window, soft-cap)",
                                    _ref(attention.attention_reference), "attention"),
}


def lookup(name: str) -> KernelInfo:
    """A kernel by its registry name (`attention_decode`) or its MLX name (`mlxc_attention_decode`)."""
    for info in REGISTRY.values():
        if name in (info.name, info.kernel.name):
            return info
    from ..ir.errors import MlxcError

    raise MlxcError(f"unknown kernel {name!r}; kernels: {', '.join(REGISTRY)}")
