"""Builders for the non-attention mixers a layer can have (Mamba, Mamba-2, recurrent cells), one module each.

A module registers its builder with `@mixer(BlockKind.X, prefix="mixer")`; the builder makes one IR function named
`fname` from `x: [B, T, hidden]` to `[B, T, hidden]`, declaring its parameters under that function and keeping its
state through stateful ops. Lowering calls it once per distinct configuration and calls the function from each
layer with the registered parameter prefix. Modules here are found on first use, like the family files.
"""

from __future__ import annotations

import importlib
import pkgutil
from dataclasses import dataclass
from typing import Callable

from ...ir.errors import MlxcError
from ..spec import BlockKind


@dataclass(frozen=True)
class MixerBuilder:
    build: Callable  # (lowering, fname, settings, layer config) -> None
    prefix: str  # the layer's parameter prefix for the mixer (`mixer` in Mamba checkpoints)


_BUILDERS: dict[BlockKind, MixerBuilder] = {}
_LOADED = False


def mixer(kind: BlockKind, prefix: str = "mixer"):
    """Register the decorated function as the builder of `kind` layers."""

    def register(build: Callable) -> Callable:
        if kind in _BUILDERS:
            raise ValueError(f"two builders for {kind.value} layers")
        _BUILDERS[kind] = MixerBuilder(build, prefix)
        return build

    return register


def builder(kind: BlockKind) -> MixerBuilder:
    global _LOADED
    if not _LOADED:
        for info in pkgutil.iter_modules(__path__):
            importlib.import_module(f"{__name__}.{info.name}")
        _LOADED = True
    if kind not in _BUILDERS:
        raise MlxcError(f"{kind.value} layers cannot be compiled yet: no builder for them")
    return _BUILDERS[kind]
