"""Named ModelSpecs with the hyperparameters of the published checkpoints' config.json files, gathered from the
family files (frontends/families/).

They let a user compile a known architecture without downloading anything, and tests pin parameter counts to the
published model sizes.
"""

from __future__ import annotations

import difflib
import re
from dataclasses import dataclass
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


def refresh() -> None:
    """Rebuild PRESETS in place after a family was added or removed (a plugin loaded or unloaded)."""
    fresh = _all()
    PRESETS.clear()
    PRESETS.update(fresh)


@dataclass(frozen=True)
class HubMatch:
    """What the families' tables say a hub id is: its family and the preset with its published architecture."""

    repo_id: str
    family: str
    preset: str


_HUB_PREFIXES = ("https://huggingface.co/", "http://huggingface.co/", "huggingface.co/", "hf.co/")


def normalize_hub_id(text: str) -> str:
    """`https://huggingface.co/google/gemma-2-2b-it/` -> `google/gemma-2-2b-it`: the forms people paste."""
    repo = text.strip()
    for prefix in _HUB_PREFIXES:
        if repo.lower().startswith(prefix):
            repo = repo[len(prefix):]
            break
    return repo.strip("/")


def match_hub_id(repo_id: str) -> Optional[HubMatch]:
    """The family and preset a Hugging Face hub id names (`google/gemma-2-2b-it` -> gemma2, `gemma2-2b`), from the
    families' `hub_ids` tables, ignoring case; None when no family knows the id. Lets architecture-only commands
    work offline. Two families claiming one id, or a row naming a preset nobody declares, is an MlxcError."""
    from .families import all_families

    repo = normalize_hub_id(repo_id)
    found: dict[str, str] = {}
    for f in all_families():
        for pattern, template in f.hub_ids:
            m = re.fullmatch(pattern, repo, flags=re.IGNORECASE)
            if m:
                name = m.expand(template).lower()
                if name not in PRESETS:
                    raise MlxcError(f"family {f.name}: hub id {repo} maps to preset {name!r}, which no family declares")
                found.setdefault(name, f.name)
    if len(found) > 1:
        raise MlxcError(f"hub id {repo} is claimed by several presets: "
                        f"{', '.join(f'{n} ({fam})' for n, fam in found.items())}")
    if not found:
        return None
    (name, fam), = found.items()
    return HubMatch(repo, fam, name)


def preset_for_hub_id(repo_id: str) -> Optional[str]:
    """The preset name a hub id names (see `match_hub_id`); None when no family knows the id."""
    match = match_hub_id(repo_id)
    return match.preset if match else None


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
