"""Files the way a user expects: writes all or nothing, with normal permissions, and errors that name the user's path
rather than a temporary one; reads of other people's weight files checked before anything trusts what they declare
(`check_safetensors`). Imports nothing of mlxc but its error type.

Every write goes to a hidden temporary sibling (`.NAME.mlxc-PID-…`), is flushed to disk, and is renamed into place
in one step, so a crash, Ctrl-C or `kill -9` at any point leaves the old file or directory or the new one, never a
mix. A directory that already exists is swapped with its replacement in one `renameat2(RENAME_EXCHANGE)` where the
system has it (Linux), else moved aside first. Temporaries a killed writer left behind are removed by the next write
to the same destination (their process is gone).
"""

from __future__ import annotations

import ctypes
import ctypes.util
import json
import os
import re
import shutil
import sys
import tempfile
from contextlib import contextmanager
from pathlib import Path
from typing import Callable, Iterator

from .ir.errors import MlxcError

_PREVIOUS = "previous"  # the suffix of an old directory moved aside (only without an atomic exchange)


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def _prefix(out: Path) -> str:
    """Temporaries name their process, so a later write can tell a dead writer's leftovers from a live one's."""
    return f".{out.name}.mlxc-{os.getpid()}-"


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except OSError:  # exists, owned by someone else
        return True
    return True


def sweep_stale(out: Path) -> None:
    """Remove what killed writers left beside `out`: temporaries of processes that no longer run. An old directory
    moved aside is kept while `out` is missing (it is then the only copy; the user may want it back)."""
    pattern = re.compile(rf"\.{re.escape(out.name)}\.mlxc-(\d+)-.*")
    try:
        siblings = list(out.parent.iterdir()) if out.parent.is_dir() else []
    except OSError:
        return
    for p in siblings:
        m = pattern.fullmatch(p.name)
        if m is None or int(m.group(1)) == os.getpid() or _alive(int(m.group(1))):
            continue
        if p.name.endswith(_PREVIOUS) and not out.exists():
            continue
        if p.is_dir() and not p.is_symlink():
            shutil.rmtree(p, ignore_errors=True)
        else:
            p.unlink(missing_ok=True)


def make_sibling_dir(out: Path) -> Path:
    """A fresh hidden directory beside `out` to write into and rename into place, with the permissions a normal
    `mkdir` would give (mkdtemp's are 0700). Errors name `out`, never the temporary name."""
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
        sweep_stale(out)
        tmp = Path(tempfile.mkdtemp(prefix=_prefix(out), dir=out.parent))
    except OSError as e:
        raise MlxcError(f"cannot create {out}: {e.strerror or e}") from None
    tmp.chmod(0o777 & ~_umask())
    return tmp


def _fsync(path: Path) -> None:
    """Flush a file's data (or a directory's entries) to disk, so the rename never lands before the bytes do."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:  # some filesystems cannot fsync a directory
        pass
    finally:
        os.close(fd)


def _fsync_tree(root: Path) -> None:
    for dirpath, _, names in os.walk(root):
        for name in names:
            _fsync(Path(dirpath) / name)
        _fsync(Path(dirpath))


@contextmanager
def replacing_file(path: Path) -> Iterator[Path]:
    """A temporary sibling path (same suffix, so writers that insist on one accept it) to write `path` through with
    any writer (`mx.save_safetensors`, ...); renamed over `path` when the block ends, removed on any failure."""
    path = Path(path)
    try:
        sweep_stale(path)
        fd, name = tempfile.mkstemp(prefix=_prefix(path), suffix=path.suffix, dir=path.parent)
        os.close(fd)
    except OSError as e:
        raise MlxcError(f"cannot write {path}: {e.strerror or e}") from None
    tmp = Path(name)
    try:
        yield tmp
        if not tmp.exists():
            raise MlxcError(f"cannot write {path}: nothing was written")
        os.chmod(tmp, 0o666 & ~_umask())
        _fsync(tmp)
        os.replace(tmp, path)
        _fsync(path.parent)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def write_bytes_atomic(path: Path, data: bytes) -> None:
    """Write a file through a temporary sibling and a rename, so a failure leaves no half-written file."""
    with replacing_file(path) as tmp, open(tmp, "wb") as f:
        f.write(data)


def write_text_atomic(path: Path, text: str, encoding: str = "utf-8") -> None:
    """`write_bytes_atomic` for text."""
    write_bytes_atomic(Path(path), text.encode(encoding))


def _exchange_function() -> Callable[[Path, Path], bool] | None:
    """An atomic swap of two paths where the C library offers one (Linux renameat2, macOS renamex_np)."""
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or None, use_errno=True)
    except OSError:
        return None
    if sys.platform.startswith("linux") and hasattr(libc, "renameat2"):
        at_fdcwd, exchange = -100, 2

        def swap(a: Path, b: Path) -> bool:
            return libc.renameat2(at_fdcwd, os.fsencode(a), at_fdcwd, os.fsencode(b), exchange) == 0
        return swap
    if sys.platform == "darwin" and hasattr(libc, "renamex_np"):
        def swap(a: Path, b: Path) -> bool:
            return libc.renamex_np(os.fsencode(a), os.fsencode(b), 2) == 0  # RENAME_SWAP
        return swap
    return None


_EXCHANGE = _exchange_function()


def _swap_in(tmp: Path, out: Path) -> None:
    """Put the directory `tmp` at `out`. An existing `out` is exchanged with it in one step (then removed), or, where
    the system cannot exchange, moved aside just before the rename."""
    if out.is_dir() and not out.is_symlink():
        if _EXCHANGE is not None and _EXCHANGE(tmp, out):
            shutil.rmtree(tmp, ignore_errors=True)  # now the old directory
            return
        aside = out.parent / f"{_prefix(out)}{_PREVIOUS}"
        os.replace(out, aside)
        try:
            os.replace(tmp, out)
        except BaseException:
            os.replace(aside, out)
            raise
        shutil.rmtree(aside, ignore_errors=True)
        return
    os.replace(tmp, out)


@contextmanager
def replacing_dir(out: Path) -> Iterator[Path]:
    """Fill a fresh sibling directory, then put it in `out`'s place in one rename (replacing what was there); on any
    failure remove it, so `out` is either untouched or complete."""
    out = Path(out)
    tmp = make_sibling_dir(out)
    try:
        yield tmp
        _fsync_tree(tmp)
        _swap_in(tmp, out)
        _fsync(out.parent)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def carry_over(src: Path, dst: Path, skip: tuple[str, ...] = ()) -> None:
    """Copy `src`'s entries but `skip` into `dst` as hard links where possible (no data copied), so a directory can
    be rebuilt beside itself and swapped in whole."""
    def link_or_copy(a: str, b: str) -> None:
        try:
            os.link(a, b)
        except OSError:
            shutil.copy2(a, b)

    for entry in src.iterdir():
        if entry.name in skip:
            continue
        target = dst / entry.name
        if entry.is_dir() and not entry.is_symlink():
            shutil.copytree(entry, target, symlinks=True, copy_function=link_or_copy)
        elif entry.is_symlink():
            os.symlink(os.readlink(entry), target)
        else:
            link_or_copy(str(entry), str(target))


# safetensors dtypes and their sizes in bits; the header may declare nothing else
_ST_BITS = {"BOOL": 8, "U8": 8, "I8": 8, "F8_E5M2": 8, "F8_E4M3": 8, "I16": 16, "U16": 16, "F16": 16, "BF16": 16,
            "I32": 32, "U32": 32, "F32": 32, "F64": 64, "I64": 64, "U64": 64, "C64": 64}
MAX_SAFETENSORS_HEADER = 100 << 20  # the safetensors library's own limit on the JSON header


def check_safetensors(path: Path, error: type[MlxcError] = MlxcError) -> None:
    """Check a safetensors file's header against the file before anything reads tensors from it: a bounded JSON
    header, and every tensor's dtype and shape matching a byte range that lies inside the data, with no two ranges
    overlapping (the checks the safetensors library makes). A damaged or hostile file is an `error` naming it,
    never an allocation the file cannot back."""
    try:
        with open(path, "rb") as f:
            size = os.fstat(f.fileno()).st_size
            head = f.read(8)
            n = int.from_bytes(head, "little") if len(head) == 8 else None
            limit = MAX_SAFETENSORS_HEADER
            if n is None or n > limit or 8 + n > size:
                what = ("it is too short to hold a safetensors header" if n is None else
                        f"its header declares {n} bytes (at most {limit})" if n > limit else
                        f"its header declares {n} bytes but the file has {size}")
                raise error(f"cannot read {path}: not a safetensors file, or truncated: {what}")
            raw = f.read(n)
    except OSError as e:
        raise error(f"cannot read {path}: {e.strerror or e}") from None
    try:
        header = json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError, RecursionError) as e:
        raise error(f"cannot read {path}: its safetensors header is not valid JSON ({type(e).__name__})") from None
    if not isinstance(header, dict):
        raise error(f"cannot read {path}: its safetensors header is not a JSON object")
    data_size, spans = size - 8 - n, []
    for name, entry in header.items():
        if name == "__metadata__":  # null is what mx.save_safetensors writes without metadata (safetensors accepts it)
            if entry is not None and not (isinstance(entry, dict) and all(isinstance(v, str) for v in entry.values())):
                raise error(f"cannot read {path}: its __metadata__ must map strings to strings")
            continue
        spans.append(_tensor_span(path, name, entry, data_size, error))
    spans.sort()
    for (a0, a1, a), (b0, b1, b) in zip(spans, spans[1:]):
        if b0 < a1:
            raise error(f"cannot read {path}: tensors {a} and {b} overlap (bytes {a0}-{a1} and {b0}-{b1})")


def _tensor_span(path: Path, name: str, entry, data_size: int, error: type[MlxcError]) -> tuple[int, int, str]:
    def bad(why: str) -> MlxcError:
        return error(f"cannot read {path}: tensor {name}: {why}")

    if not isinstance(entry, dict):
        raise bad("its header entry is not an object")
    dtype, shape, offsets = entry.get("dtype"), entry.get("shape"), entry.get("data_offsets")
    if dtype not in _ST_BITS:
        raise bad(f"unknown dtype {dtype!r}")
    ints = (lambda xs, k: isinstance(xs, list) and len(xs) in k and all(
        isinstance(x, int) and not isinstance(x, bool) and x >= 0 for x in xs))
    if not ints(shape, range(0, 33)):
        raise bad(f"shape {shape!r} is not a list of non-negative integers")
    if not ints(offsets, (2,)) or offsets[0] > offsets[1]:
        raise bad(f"data_offsets {offsets!r} are not [begin, end]")
    begin, end = offsets
    if end > data_size:
        raise bad(f"its data (bytes {begin}-{end}) lies beyond the file's {data_size} bytes of tensor data")
    count = 1
    for d in shape:
        count *= d
    if count * _ST_BITS[dtype] != (end - begin) * 8:
        raise bad(f"{dtype} {shape} needs {count * _ST_BITS[dtype] // 8} bytes but its data_offsets give "
                  f"{end - begin}")
    return begin, end, name
