"""Model families, one file each. Every module here defining `FAMILIES` (a tuple of `Family`) is found on first
use, so adding a family is adding a file; `all_families()` lists them in a stable order (Llama first: it is the
fallback when only tensor names are known)."""

from __future__ import annotations

import importlib
import pkgutil
from functools import lru_cache

from ...ir.errors import MlxcError
from .base import HEAD_NAMES, UNMAPPED, Family, NameTable

__all__ = ["Family", "HEAD_NAMES", "NameTable", "UNMAPPED", "all_families", "family"]

_FIRST = ("llama",)


@lru_cache(maxsize=1)
def all_families() -> tuple[Family, ...]:
    found: list[Family] = []
    for info in pkgutil.iter_modules(__path__):
        if info.name.startswith("_") or info.name == "base":
            continue
        module = importlib.import_module(f"{__name__}.{info.name}")
        found += list(getattr(module, "FAMILIES", ()))
    names = [f.name for f in found]
    dup = next((n for n in names if names.count(n) > 1), None)
    if dup is not None:
        raise MlxcError(f"model family {dup!r} is declared twice")
    return tuple(sorted(found, key=lambda f: (f.name not in _FIRST, f.name)))


def family(name: str) -> Family:
    """The family called `name`, or else the one whose `model_types` list it (a config writer's `model_type` may
    differ from its family's name: Gemma 3 writes `gemma3_text`)."""
    for f in all_families():
        if f.name == name:
            return f
    for f in all_families():
        if name in f.model_types:
            return f
    raise MlxcError(f"unsupported architecture family {name!r}; supported: "
                    f"{', '.join(f.name for f in all_families())}")
