"""Render the module template and load the result as a real file, so tracebacks point at readable lines."""

from __future__ import annotations

import hashlib
from importlib import metadata
import importlib
import importlib.util
import inspect
import os
import re
import sys
import textwrap
import time
from pathlib import Path
from types import ModuleType

import jinja2

from ..files import write_text_atomic
from ..ir import Program
from ..ir.errors import MlxcError
from .emit import emit_program
from .mlx_ops import HELPER_SOURCES

_ENV = jinja2.Environment(
    loader=jinja2.PackageLoader("mlxc.codegen", "templates"),
    keep_trailing_newline=True,
    trim_blocks=True,
    lstrip_blocks=False,
    undefined=jinja2.StrictUndefined,
)


def _python_source(module: str, *names: str) -> str:
    """The source of functions defined in another mlxc module (a kernel's plain-MLX reference), which a helper
    template carries verbatim: the math has one definition, there and in every generated module."""
    mod = importlib.import_module(module)
    return "\n\n\n".join(textwrap.dedent(inspect.getsource(getattr(mod, name))).rstrip() for name in names)


_ENV.globals["python_source"] = _python_source


def generate_module(program: Program, title: str = "A language model compiled by mlxc.", ir_file: str = "program.mlxc") -> str:
    parts = emit_program(program)
    header = _ENV.get_template("module.py.j2").render(
        title=_docstring_text(title),
        version=_version(),
        ir_file=ir_file,
        states=_compact_list([(s.kind.value, s.window) for s in parts.states]),
    )
    blocks = [header.rstrip("\n")]
    for helper in sorted(parts.helpers):
        blocks.append(helper_source(helper).rstrip("\n"))
    if parts.constants:
        blocks.append("\n".join(f"{name} = {src}" for src, name in parts.constants.items()))
    blocks += [_ENV.get_template("class.py.j2").render(cls=c).rstrip("\n") for c in parts.classes]
    src = "\n\n\n".join(blocks) + "\n"
    compile(src, "<generated>", "exec")  # a codegen bug should fail here, not at first use
    return src


def _docstring_text(text: str) -> str:
    """Text for the module docstring, which is code: the title carries names from the user's files (a spec's
    `name`, a directory), so quotes and backslashes are escaped and nothing in it can end the string early."""
    return _UNSAFE_IN_DOCSTRING.sub(lambda m: _ESCAPES.get(m.group(), f"\\u{ord(m.group()):04x}"), text)


_UNSAFE_IN_DOCSTRING = re.compile(r'[\\"\x00-\x08\x0b-\x1f\x7f\ud800-\udfff]')  # quotes, backslashes, control
_ESCAPES = {"\\": "\\\\", '"': '\\"'}  # characters (not newlines and tabs) and lone surrogates


def helper_namespace(names) -> dict:
    """The helper functions named (templates/<name>.py.j2), defined in a namespace with the module's imports: what
    the load-time interpreter needs to run a fragment that calls a helper."""
    import math

    import mlx.core as mx
    import mlx.nn as nn
    import numpy as np

    namespace = {"mx": mx, "nn": nn, "np": np, "math": math}
    for name in sorted(names):
        exec(compile(helper_source(name), f"<{name} helper>", "exec"), namespace)  # noqa: S102
    return namespace


def helper_source(name: str) -> str:
    """A helper's source: templates/<name>.py.j2, or one registered from outside mlxc (`mlx_ops.helper`)."""
    if name in HELPER_SOURCES:
        return HELPER_SOURCES[name]
    return _ENV.get_template(f"{name}.py.j2").render()


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


CACHE_ENV = "MLXC_CACHE"
CACHE_LIMIT = 64  # generated modules kept; older ones (by last use) are removed when a new one is written
CACHE_GRACE_S = 600  # a module used this recently is kept whatever the count: another process may be importing it


def cache_dir() -> Path:
    """Where generated modules live: `$MLXC_CACHE/modules`, by default `~/.cache/mlxc/modules`."""
    return Path(os.environ.get(CACHE_ENV) or Path.home() / ".cache" / "mlxc") / "modules"


def write_module(source: str, directory: str | os.PathLike | None = None) -> Path:
    """Write generated source to a file named by its hash (default: the cache directory, bounded to CACHE_LIMIT
    files)."""
    digest = hashlib.sha256(source.encode()).hexdigest()[:16]
    root = Path(directory) if directory else cache_dir()
    try:
        root.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise MlxcError(f"cannot create the module cache {root}: {e.strerror or e} (set {CACHE_ENV} elsewhere)") from None
    path = root / f"mlxc_model_{digest}.py"
    try:
        if path.read_text() == source:
            path.touch()  # recently used: the last to be evicted
            return path
    except FileNotFoundError:  # not there, or evicted by another process just now
        pass
    write_text_atomic(path, source)
    if directory is None:
        _evict(root, keep=path)
    return path


def _evict(root: Path, keep: Path) -> None:
    """Remove the least recently used modules beyond CACHE_LIMIT, never one used in the last CACHE_GRACE_S seconds
    (processes sharing the cache write, then import: a fresh file may be about to be imported elsewhere)."""
    used = []
    for p in root.glob("mlxc_model_*.py"):
        try:
            used.append((p.stat().st_mtime, p))
        except FileNotFoundError:  # removed by another process meanwhile
            pass
    used.sort(reverse=True)
    stale = time.time() - CACHE_GRACE_S
    for mtime, old in used[CACHE_LIMIT:]:
        if old != keep and mtime < stale:
            old.unlink(missing_ok=True)


def import_module(path: str | os.PathLike) -> ModuleType:
    """Import a generated module from its file; a broken (e.g. hand-edited) file is an error naming file and line."""
    path = Path(path)
    name = f"mlxc_generated.{path.stem}_{abs(hash(str(path.resolve()))):x}"
    spec = importlib.util.spec_from_file_location(name, path)
    if spec is None or spec.loader is None:
        raise MlxcError(f"{path}: not a Python module")
    module = importlib.util.module_from_spec(spec)
    try:
        spec.loader.exec_module(module)
    except SyntaxError as e:
        raise MlxcError(f"{e.filename or path}:{e.lineno}: syntax error in the generated module: {e.msg}") from None
    except Exception as e:
        line = _line_in(e, path)
        raise MlxcError(f"{path}{line}: the module fails to import: {type(e).__name__}: {e}") from None
    sys.modules[name] = module
    return module


def _line_in(error: BaseException, path: Path) -> str:
    tb, line = error.__traceback__, ""
    while tb is not None:
        if Path(tb.tb_frame.f_code.co_filename) == path:
            line = f":{tb.tb_lineno}"
        tb = tb.tb_next
    return line
