"""IR -> IR rewrites. Passes import only `mlxc.ir`."""

from .base import Pass, PassReport
from .pipeline import DEFAULT_PIPELINE, PASSES, parse_pipeline, run_pipeline

__all__ = ["DEFAULT_PIPELINE", "PASSES", "Pass", "PassReport", "parse_pipeline", "run_pipeline"]
