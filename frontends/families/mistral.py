"""Mistral: Llama's blocks with sliding-window attention on every layer and no biases (its modeling code ignores
the bias keys)."""

from __future__ import annotations

from typing import Any

from . import llama
from .base import Family

DEFAULTS: dict[str, Any] = {
    **llama.DEFAULTS,
    "num_key_value_heads": 8,
    "max_position_embeddings": 4096 * 32,
    "sliding_window": 4096,
}


def config(c) -> dict[str, Any]:
    return {**c.common(), "sliding_window": c.get("sliding_window")}


FAMILIES = (
    Family(
        "mistral",
        architectures=("Mistral",),
        config=config,
        model_types=("mistral",),
        defaults=DEFAULTS,
        names=llama.NAMES,
        presets=(
            # mistralai/Mistral-7B-v0.1
            llama.preset("mistral-7b", family="mistral", hidden_size=4096, intermediate_size=14336, num_layers=32,
                         num_heads=32, num_kv_heads=8, max_position_embeddings=32768, sliding_window=4096),
        ),
        hub_ids=((r"mistralai/Mistral-7B(-Instruct)?-v0\.1", "mistral-7b"),),
        to_hf_config=llama.to_hf_config,
    ),
)
