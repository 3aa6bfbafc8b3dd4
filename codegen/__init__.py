"""Codegen: IR program -> a readable MLX Python module (jinja2 templates), written to disk and importable."""

from .module import generate_module, import_module, write_module

__all__ = ["generate_module", "import_module", "write_module"]
