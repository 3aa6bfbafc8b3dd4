"""Named ModelSpecs with the hyperparameters of the published checkpoints' config.json files, gathered from the
family files (frontends/families/).

They let a user compile a known architecture without downloading anything, and tests pin parameter counts to the
published model sizes.
"""

from __future__ import annotations

import difflib
import re
from typing import Final, Optional

from ..ir.errors import MlxcError
from .spec import ModelSpec

def _all() -> dict[str, ModelSpec]:
    from .families import all_families

    out: dict[str, ModelSpec] = {}
    for f in all_families():
        for spec in f.presets:
            if spec.name in out:
                raise MlxcError(f"preset {spec.name!r} is declared twice")
            out[spec.name] = spec
    return out


PRESETS: Final[dict[str, ModelSpec]] = _all()


def preset_for_hub_id(repo_id: str) -> Optional[str]:
    """The preset a Hugging Face hub id names (`google/gemma-2-2b-it` -> `gemma2-2b`), from the families' tables;
    None when no family knows the id. Lets architecture-only commands work offline."""
    from .families import all_families

    for f in all_families():
        for pattern, name in f.hub_ids:
            m = re.fullmatch(pattern, repo_id, flags=re.IGNORECASE)
            if m:
                return m.expand(name).lower()
    return None


def get_preset(name: str) -> ModelSpec:
    """The preset called `name` or `preset:name`, ignoring case."""
    key = name.strip()
    if key.lower().startswith("preset:"):
        key = key[len("preset:"):]
    key = key.strip().lower()
    if key in PRESETS:
        return PRESETS[key]
    close = difflib.get_close_matches(key, PRESETS, n=3, cutoff=0.6)
    hint = f" (did you mean {' or '.join(repr(c) for c in close)}?)" if close else ""
    raise MlxcError(f"unknown preset {name!r}{hint}; available: {', '.join(PRESETS)}")
