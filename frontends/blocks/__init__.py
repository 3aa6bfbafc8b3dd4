"""Builders for the non-attention mixers a layer can have (Mamba, Mamba-2, recurrent cells), one module each.

A module registers its builder with `@mixer(BlockKind.X, prefix="mixer")`; the builder makes one IR function named
`fname` from `x: [B, T, hidden]` to `[B, T, hidden]`, declaring its parameters under that function and keeping its
state through stateful ops. Lowering calls it once per distinct configuration and calls the function from each
layer with the registered parameter prefix. Modules here are found on first use, like the family files.

A plugin adds a kind the same way, naming it with a string and giving the pydantic model of its settings:
`@mixer("linear_attention", prefix="linear_attn", settings=LinearAttentionSpec)` registers the kind (see
`spec.register_kind`), so spec files can use it per layer and give its settings under its name. An FFN kind is
added the same way with `@ffn("relu2", settings=Relu2Spec)`: its builder writes the layer's feed-forward function.
"""

from __future__ import annotations

import importlib
import pkgutil
from dataclasses import dataclass
from typing import Callable

from ...ir.errors import MlxcError
from ..spec import BlockKind, FFNType, register_kind, unregister_kind


@dataclass(frozen=True)
class MixerBuilder:
    build: Callable  # (lowering, fname, settings, layer config) -> None
    prefix: str  # the layer's parameter prefix for the mixer (`mixer` in Mamba checkpoints)


_BUILDERS: dict[BlockKind, MixerBuilder] = {}
_LOADED = False


def mixer(kind: BlockKind | str, prefix: str = "mixer", settings: type | None = None):
    """Register the decorated function as the builder of `kind` layers; a new kind (from a plugin) comes with the
    pydantic model of its settings."""

    def register(build: Callable) -> Callable:
        if settings is not None:
            if kind in BlockKind._known:
                raise ValueError(f"block kind {kind!r} exists already; a plugin adds a kind with a new name")
            register_kind(BlockKind, str(kind), settings)
        key = BlockKind(kind)
        if key in _BUILDERS:
            raise ValueError(f"two builders for {key.value} layers")
        _BUILDERS[key] = MixerBuilder(build, prefix)
        return build

    return register


def registered() -> dict[BlockKind, MixerBuilder]:
    """Every mixer builder, built-in ones found first."""
    _load_builtin()
    return dict(_BUILDERS)


def unregister(kind: str) -> None:
    """Forget a plugin's block or FFN kind and its builder (unloading the plugin)."""
    _BUILDERS.pop(BlockKind._known.get(kind), None)
    _FFN_BUILDERS.pop(FFNType._known.get(kind), None)
    unregister_kind(kind)


_FFN_BUILDERS: dict[FFNType, Callable] = {}


def ffn(kind: str, settings: type):
    """Register the decorated function as the builder of a new FFN kind (from a plugin), with the pydantic model of
    its settings. The builder gets (lowering, function builder, x [B, T, hidden], settings, FFNConfig) and returns
    the output value; its parameters are the layer's `mlp.*`."""

    def register(build: Callable) -> Callable:
        key = register_kind(FFNType, kind, settings)
        _FFN_BUILDERS[key] = build
        return build

    return register


def ffn_builders() -> dict[FFNType, Callable]:
    return dict(_FFN_BUILDERS)


def ffn_builder(kind: FFNType) -> Callable:
    if kind not in _FFN_BUILDERS:
        raise MlxcError(f"{kind.value} FFNs cannot be compiled: no builder for them")
    return _FFN_BUILDERS[kind]


def _load_builtin() -> None:
    global _LOADED
    if not _LOADED:
        for info in pkgutil.iter_modules(__path__):
            importlib.import_module(f"{__name__}.{info.name}")
        _LOADED = True


def builder(kind: BlockKind) -> MixerBuilder:
    _load_builtin()
    if kind not in _BUILDERS:
        raise MlxcError(f"{kind.value} layers cannot be compiled yet: no builder for them")
    return _BUILDERS[kind]
