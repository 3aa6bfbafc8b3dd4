"""Writing files the way a user expects: all or nothing (temporary sibling + rename), with normal permissions, and
errors that name the user's path rather than a temporary one. Imports nothing of mlxc but its error type."""

from __future__ import annotations

import os
import shutil
import tempfile
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

from .ir.errors import MlxcError


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def make_sibling_dir(out: Path) -> Path:
    """A fresh hidden directory beside `out` to write into and rename into place, with the permissions a normal
    `mkdir` would give (mkdtemp's are 0700). Errors name `out`, never the temporary name."""
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", dir=out.parent))
    except OSError as e:
        raise MlxcError(f"cannot create {out}: {e.strerror or e}") from None
    tmp.chmod(0o777 & ~_umask())
    return tmp


def write_text_atomic(path: Path, text: str) -> None:
    """Write a file through a temporary sibling and a rename, so a failure leaves no half-written file."""
    try:
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    except OSError as e:
        raise MlxcError(f"cannot write {path}: {e.strerror or e}") from None
    try:
        with os.fdopen(fd, "w") as f:
            f.write(text)
        os.chmod(tmp, 0o666 & ~_umask())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


@contextmanager
def replacing_dir(out: Path) -> Iterator[Path]:
    """Fill a fresh sibling directory, then put it in `out`'s place in one rename (replacing what was there); on any
    failure remove it, so `out` is either untouched or complete."""
    tmp = make_sibling_dir(out)
    try:
        yield tmp
        if out.exists():
            shutil.rmtree(out)
        os.replace(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
