"""Hybrid stacks mlxc defines itself (no Hugging Face class): attention layers mixed with recurrent and state-space
layers, as a spec's `layer_pattern` lays them out. Their presets are architectures to try with random weights.

`hybrid-tiny` repeats minGRU, Mamba-2 and attention layers. Another block kind joins the same way once its builder
is registered (frontends/blocks/): its entry in the pattern and its settings field in the spec (`mamba:` for
Mamba v1).
"""

from __future__ import annotations

from ...ir.errors import MlxcError
from ..spec import Mamba2Spec, ModelSpec, RecurrentSpec
from .base import Family


def config(c):
    raise MlxcError("hybrid models are defined by mlxc specs; there is no Hugging Face config to read")


PRESETS = (
    ModelSpec(name="hybrid-tiny", family="hybrid", vocab_size=256, hidden_size=64, intermediate_size=128,
              num_layers=6, num_heads=4, num_kv_heads=2, recurrent=RecurrentSpec(),
              mamba2=Mamba2Spec(num_heads=8, head_dim=16, state_size=16),
              layer_pattern=["mingru", "mamba2", "attention"], bos_token_id=1, eos_token_ids=(2,)),
)

FAMILIES = (Family("hybrid", architectures=(), config=config, presets=PRESETS),)
