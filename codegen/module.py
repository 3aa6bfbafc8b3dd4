"""Render the module template and load the result as a real file, so tracebacks point at readable lines."""

from __future__ import annotations

import hashlib
from importlib import metadata
import importlib.util
import os
import sys
import tempfile
from pathlib import Path
from types import ModuleType

import jinja2

from ..ir import Program
from .emit import emit_program

_ENV = jinja2.Environment(
    loader=jinja2.PackageLoader("mlxc.codegen", "templates"),
    keep_trailing_newline=True,
    trim_blocks=True,
    lstrip_blocks=False,
    undefined=jinja2.StrictUndefined,
)


def generate_module(program: Program, title: str = "A language model compiled by mlxc.", ir_file: str = "program.mlxc") -> str:
    parts = emit_program(program)
    header = _ENV.get_template("module.py.j2").render(
        title=title,
        version=_version(),
        ir_file=ir_file,
        cache_windows=_compact_list(parts.cache_windows),
    )
    blocks = [header.rstrip("\n")]
    if parts.ropes:
        blocks.append(_ENV.get_template("rope.py.j2").render().rstrip("\n"))
        blocks.append("\n".join(f"{name} = {src}" for src, name in parts.ropes.items()))
    if parts.uses_dropout:
        blocks.append(_ENV.get_template("dropout.py.j2").render().rstrip("\n"))
    if parts.uses_attention:
        blocks.append(_ENV.get_template("attention.py.j2").render().rstrip("\n"))
    blocks += [_ENV.get_template("class.py.j2").render(cls=c).rstrip("\n") for c in parts.classes]
    src = "\n\n\n".join(blocks) + "\n"
    compile(src, "<generated>", "exec")  # a codegen bug should fail here, not at first use
    return src


def _version() -> str:
    """mlxc's installed version, read from package metadata (codegen does not import the package's top level)."""
    try:
        return metadata.version("mlxc")
    except metadata.PackageNotFoundError:
        return "unknown"


def _compact_list(items: list) -> str:
    if len(items) > 1 and len(set(items)) == 1:
        return f"[{items[0]!r}] * {len(items)}"
    return repr(items)


def write_module(source: str, directory: str | os.PathLike | None = None) -> Path:
    """Write generated source to a file named by its hash (default: a per-user cache directory)."""
    digest = hashlib.sha256(source.encode()).hexdigest()[:16]
    root = Path(directory) if directory else Path(os.environ.get("MLXC_CACHE", Path.home() / ".cache" / "mlxc")) / "modules"
    root.mkdir(parents=True, exist_ok=True)
    path = root / f"mlxc_model_{digest}.py"
    if not path.exists() or path.read_text() != source:
        fd, tmp = tempfile.mkstemp(dir=root, suffix=".py.tmp")
        with os.fdopen(fd, "w") as f:
            f.write(source)
        os.replace(tmp, path)
    return path


def import_module(path: str | os.PathLike) -> ModuleType:
    path = Path(path)
    name = f"mlxc_generated.{path.stem}_{abs(hash(str(path.resolve()))):x}"
    spec = importlib.util.spec_from_file_location(name, path)
    assert spec and spec.loader
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)
    return module
