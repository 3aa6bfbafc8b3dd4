"""Compiled artifacts: a directory with the generated module, transformed weights, the IR and a manifest.

Written to a temporary sibling and renamed into place, so a failed compile never leaves half an artifact.
"""

from __future__ import annotations

import ast
import hashlib
import json
import os
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path

import mlx.core as mx

from ..ir import Program, parse_program, print_program, verify
from ..files import replacing_dir
from ..ir.errors import MlxcError

FORMAT = "mlxc-artifact"
FORMAT_VERSION = 2  # 2: weights are stored before load-time expansions (quantized stays quantized)
MODULE_FILE, PROGRAM_FILE, WEIGHTS_FILE, MANIFEST_FILE = "model.py", "program.mlxc", "weights.safetensors", "manifest.json"


@dataclass
class Manifest:
    mlxc_version: str
    source: str
    dtype: str
    passes: list[str]
    spec: dict | None = None
    tokenizer_files: list[str] = field(default_factory=list)
    lora: dict | None = None  # the adapters' configuration when the artifact has unmerged LoRA adapters (merged: None)
    target: str = "cpu"  # where the pipeline chose kernels for
    kernels: str = "reference"  # the implementation family select-kernels chose there ("native", "reference")
    # SHA-256 of the module, the program and the tokenizer files, and the weights' size, checked at load
    files: dict[str, str] = field(default_factory=dict)
    weights_bytes: int | None = None
    # the plugins (mlxc.plugins) whose ops and block kinds the program and spec use: name, module, package, version
    # and what is used of each, so loading without one says which package to install
    plugins: list[dict] = field(default_factory=list)
    format: str = FORMAT
    format_version: int = FORMAT_VERSION


def is_artifact(path: Path) -> bool:
    return path.is_dir() and (path / MANIFEST_FILE).exists()


def check_destination(out_dir: str | os.PathLike, overwrite: bool) -> Path:
    """Where an artifact may be written; checked before any work so a long compile cannot fail at the end."""
    out = Path(out_dir)
    if out.exists() and not out.is_dir():
        raise MlxcError(f"{out} exists and is not a directory")
    if out.exists() and not overwrite:
        raise MlxcError(f"{out} already exists (use --force to replace it)")
    if out.exists() and not is_artifact(out) and any(out.iterdir()):
        raise MlxcError(f"{out} exists and is not an mlxc artifact; refusing to replace it")
    return out


def save_artifact(out_dir: str | os.PathLike, *, module_source: str, program: Program, weights: list[tuple[str, mx.array]],
                  manifest: Manifest, tokenizer=None, overwrite: bool = False) -> Path:
    out = check_destination(out_dir, overwrite)
    with replacing_dir(out) as tmp:
        (tmp / MODULE_FILE).write_text(module_source)
        (tmp / PROGRAM_FILE).write_text(print_program(program))
        mx.save_safetensors(str(tmp / WEIGHTS_FILE), dict(weights), metadata={"format": "mlx"})
        if tokenizer is not None:
            manifest.tokenizer_files = tokenizer.save(tmp)
        record_files(tmp, manifest)
        (tmp / MANIFEST_FILE).write_text(json.dumps(asdict(manifest), indent=2) + "\n")
    return out


def read_manifest(path: Path) -> Manifest:
    where = path / MANIFEST_FILE
    try:
        data = json.loads(where.read_text(encoding="utf-8"))
    except OSError as e:
        raise MlxcError(f"cannot read {where}: {e.strerror or e}") from None
    except (json.JSONDecodeError, UnicodeDecodeError, RecursionError) as e:
        raise MlxcError(f"{where}: malformed manifest ({type(e).__name__}: {e})") from None
    if not isinstance(data, dict) or data.get("format") != FORMAT:
        raise MlxcError(f"{where} is not an mlxc artifact manifest")
    if data.get("format_version") != FORMAT_VERSION:
        raise MlxcError(f"{path} has artifact format {data.get('format_version')}; this mlxc reads "
                        f"{FORMAT_VERSION}: compile the source again")
    try:
        manifest = Manifest(**data)
    except TypeError as e:
        raise MlxcError(f"{where}: malformed manifest ({e})") from None
    for f in fields(Manifest):
        value = getattr(manifest, f.name)
        if not _has_type(value, _FIELD_TYPES.get(f.name)):
            shown = repr(value) if len(repr(value)) <= 60 else repr(value)[:57] + "..."
            raise MlxcError(f"{where}: malformed manifest (`{f.name}` is {shown})")
    return manifest


# what each manifest field may hold: a type, a tuple of them, or ("list", T) / ("dict", T) for their items
_FIELD_TYPES = {"mlxc_version": str, "source": str, "dtype": str, "passes": ("list", str), "spec": (dict, type(None)),
                "tokenizer_files": ("list", str), "lora": (dict, type(None)), "target": str,
                "files": ("dict", str), "weights_bytes": (int, type(None)), "format": str, "format_version": int,
                "plugins": ("list", dict)}


def _has_type(value, kind) -> bool:
    if kind is None:  # a field added after this table: no constraint
        return True
    if isinstance(kind, tuple) and kind[0] == "list":
        return isinstance(value, list) and all(isinstance(v, kind[1]) for v in value)
    if isinstance(kind, tuple) and kind[0] == "dict":
        return isinstance(value, dict) and all(isinstance(x, kind[1]) for x in (*value, *value.values()))
    return isinstance(value, kind) and not isinstance(value, bool)


def read_program(path: Path) -> Program:
    try:
        text = (path / PROGRAM_FILE).read_text(encoding="utf-8")
    except OSError as e:
        raise MlxcError(f"cannot read {path / PROGRAM_FILE}: {e.strerror or e}") from None
    except UnicodeDecodeError:
        raise MlxcError(f"{path / PROGRAM_FILE} is not UTF-8 text") from None
    return verify(parse_program(text))


# ---------------------------------------------------------------------------------------------------- integrity
# An artifact is a directory anyone can hand over, and its model.py is Python that `mlxc.load` would import. The
# manifest records the SHA-256 of the files that decide what runs (the module, the program, the tokenizer files) and
# the size of the weights, and loading checks them; beyond that, unless the user trusts the artifact, mlxc imports
# its model.py only when it is, docstring aside, exactly the module this mlxc generates from the program (which is
# data: parsed and verified), and otherwise runs that regenerated module instead. `trust=True` (`--trust`) skips both.

_HASH_CHUNK = 1 << 20


def file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(_HASH_CHUNK), b""):
            digest.update(chunk)
    return digest.hexdigest()


def record_files(directory: Path, manifest: Manifest) -> None:
    """Fill in the manifest's file hashes and weights size from what `directory` holds (at compile time)."""
    names = [MODULE_FILE, PROGRAM_FILE, *manifest.tokenizer_files]
    manifest.files = {name: file_sha256(directory / name) for name in names}
    manifest.weights_bytes = (directory / WEIGHTS_FILE).stat().st_size


def _untrusted(path: Path, what: str) -> MlxcError:
    return MlxcError(f"{path}: {what}; mlxc will not run an artifact it cannot vouch for: compile the source again, "
                     "or pass --trust (trust=True) if you know where this artifact came from")


def check_integrity(path: Path, manifest: Manifest) -> None:
    """The files that decide what runs are the ones the manifest recorded at compile time (else an MlxcError that
    names the file and says how to proceed)."""
    files = manifest.files
    if not files:
        raise _untrusted(path, f"its {MANIFEST_FILE} records no file hashes (it was written by an older mlxc), so "
                               f"nothing shows that {MODULE_FILE} is the code mlxc generated")
    needed = [MODULE_FILE, PROGRAM_FILE, *manifest.tokenizer_files]
    for name in needed:
        if name not in files:
            raise _untrusted(path, f"its {MANIFEST_FILE} records no hash for {name}")
    for name, digest in files.items():
        f = path / name
        if Path(name).name != name or name in ("", ".", ".."):
            raise _untrusted(path, f"its {MANIFEST_FILE} lists {name!r}, which is not a file of the artifact")
        if not f.is_file():
            raise _untrusted(path, f"{name} is missing")
        if file_sha256(f) != digest:
            raise _untrusted(path, f"{name} was changed after the artifact was compiled (its SHA-256 differs from "
                                   f"the one in {MANIFEST_FILE})")
    weights = path / WEIGHTS_FILE
    if manifest.weights_bytes is not None and weights.is_file() and weights.stat().st_size != manifest.weights_bytes:
        raise _untrusted(path, f"{WEIGHTS_FILE} has {weights.stat().st_size} bytes, not the {manifest.weights_bytes} "
                               "it was written with")


def _split_docstring(data: bytes) -> tuple[bytes, bytes] | None:
    """(what precedes the module docstring, what follows it), or None when the module does not begin with one."""
    try:
        text = data.decode("utf-8")
        first = ast.parse(text).body[0]
    except (SyntaxError, ValueError, RecursionError, MemoryError, IndexError, UnicodeDecodeError):
        return None
    if not (isinstance(first, ast.Expr) and isinstance(first.value, ast.Constant) and isinstance(first.value.value, str)):
        return None
    lines = data.splitlines(keepends=True)
    start = sum(map(len, lines[: first.lineno - 1])) + first.col_offset  # ast columns count UTF-8 bytes
    end = sum(map(len, lines[: first.end_lineno - 1])) + first.end_col_offset
    return data[:start], data[end:]


def module_to_import(path: Path, program: Program, trust: bool = False) -> Path:
    """The module file that runs `program`: the artifact's own model.py when trusted, or when it is exactly what this
    mlxc generates from the program (the docstring, which carries the title and version, may differ); otherwise the
    regenerated module, written to the module cache."""
    from ..codegen import generate_module, write_module

    own = path / MODULE_FILE
    if trust:
        return own
    generated = generate_module(program, title=f"{path.name}: regenerated by mlxc from {PROGRAM_FILE}.")
    try:
        theirs = _split_docstring(own.read_bytes())
    except OSError:
        theirs = None
    if theirs is not None and theirs == _split_docstring(generated.encode("utf-8")):
        return own
    return write_module(generated)
