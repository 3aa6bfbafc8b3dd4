"""Compiled artifacts: a directory with the generated module, transformed weights, the IR and a manifest.

Written to a temporary sibling and renamed into place, so a failed compile never leaves half an artifact.
"""

from __future__ import annotations

import json
import os
from dataclasses import asdict, dataclass, field
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
        (tmp / MANIFEST_FILE).write_text(json.dumps(asdict(manifest), indent=2) + "\n")
    return out


def read_manifest(path: Path) -> Manifest:
    try:
        data = json.loads((path / MANIFEST_FILE).read_text())
        if data.get("format") != FORMAT:
            raise MlxcError(f"{path / MANIFEST_FILE} is not an mlxc artifact manifest")
        if data.get("format_version") != FORMAT_VERSION:
            raise MlxcError(f"{path} has artifact format {data.get('format_version')}; this mlxc reads "
                            f"{FORMAT_VERSION}: compile the source again")
        return Manifest(**data)
    except (json.JSONDecodeError, TypeError) as e:
        raise MlxcError(f"{path / MANIFEST_FILE}: malformed manifest ({e})") from None


def read_program(path: Path) -> Program:
    return verify(parse_program((path / PROGRAM_FILE).read_text()))
