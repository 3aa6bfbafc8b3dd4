"""IR -> IR rewrites. Passes import only `mlxc.ir`."""

from .base import Pass, PassReport
from .pipeline import DEFAULT_PIPELINE, PASSES, build_pipeline, describe, parse_pipeline, pass_name, run_pipeline
from .lora import LoRA, LoRAConfig, MergeLoRA
from .quantize import Quantize, StorageTypes
from .select_kernels import SelectKernels

__all__ = [
    "DEFAULT_PIPELINE", "PASSES", "LoRA", "LoRAConfig", "MergeLoRA", "Pass", "PassReport", "Quantize", "SelectKernels",
    "StorageTypes", "build_pipeline", "describe", "parse_pipeline", "pass_name", "run_pipeline",
]
