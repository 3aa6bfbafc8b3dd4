"""Model families, one file each. Every module here defining `FAMILIES` (a tuple of `Family`) is found on first
use, so adding a family is adding a file; `all_families()` lists them in a stable order (Llama first: it is the
fallback when only tensor names are known). A family file outside the package (a plugin's) joins through
`register_family`, and then detection, config reading, name tables and presets treat it like these."""

from __future__ import annotations

import importlib
import pkgutil
from functools import lru_cache

from ...ir.errors import MlxcError
from .base import HEAD_NAMES, UNMAPPED, Family, NameTable

__all__ = ["Family", "HEAD_NAMES", "NameTable", "UNMAPPED", "all_families", "family", "register_family",
           "unregister_family"]

_FIRST = ("llama",)


@lru_cache(maxsize=1)
def all_families() -> tuple[Family, ...]:
    found: list[Family] = []
    for info in pkgutil.iter_modules(__path__):
        if info.name.startswith("_") or info.name == "base":
            continue
        module = importlib.import_module(f"{__name__}.{info.name}")
        found += list(getattr(module, "FAMILIES", ()))
    found += _REGISTERED
    names = [f.name for f in found]
    dup = next((n for n in names if names.count(n) > 1), None)
    if dup is not None:
        raise MlxcError(f"model family {dup!r} is declared twice")
    return tuple(sorted(found, key=lambda f: (f.name not in _FIRST, f.name)))


_REGISTERED: list[Family] = []  # families from outside the package (plugins), in registration order


def register_family(f: Family) -> None:
    """Add a family declared outside this package; its name and its presets' names must be new."""
    if not isinstance(f, Family):
        raise MlxcError(f"a family must be a mlxc Family, got {type(f).__name__}")
    if f.name in {g.name for g in all_families()}:
        raise MlxcError(f"model family {f.name!r} is declared twice")
    _REGISTERED.append(f)
    all_families.cache_clear()
    try:
        _sync_presets()
    except MlxcError:
        unregister_family(f.name)
        raise


def unregister_family(name: str) -> None:
    """Forget a family added with `register_family` (its plugin unloaded)."""
    _REGISTERED[:] = [f for f in _REGISTERED if f.name != name]
    all_families.cache_clear()
    _sync_presets()


def _sync_presets() -> None:
    """The presets table (frontends/presets.py) follows the families, once it exists."""
    import sys

    presets = sys.modules.get(__name__.rsplit(".", 1)[0] + ".presets")
    if presets is not None:
        presets.refresh()


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
