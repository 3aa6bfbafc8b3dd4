"""Named ModelSpecs with the hyperparameters of the published checkpoints' config.json files.

They let a user compile a known architecture without downloading anything, and tests pin parameter counts to the
published model sizes.
"""

from __future__ import annotations

import difflib
from typing import Any, Final

from ..ir.attrs import RopeKind
from ..ir.errors import MlxcError
from .spec import ModelSpec, RopeSpec

_LLAMA3_BOS, _LLAMA3_EOS = 128000, 128001  # <|begin_of_text|>, <|end_of_text|> (base models)


def _llama3_rope(factor: float) -> RopeSpec:
    """Llama 3.1 / 3.2 frequency scaling, as in their `rope_scaling` blocks."""
    return RopeSpec(
        theta=500000.0,
        kind=RopeKind.LLAMA3,
        factor=factor,
        low_freq_factor=1.0,
        high_freq_factor=4.0,
        original_max_position_embeddings=8192,
    )


def _spec(name: str, **fields: Any) -> ModelSpec:
    """Llama-2-style defaults (32k vocab, bos 1 / eos 2, eps 1e-5), overridden per model."""
    base: dict[str, Any] = dict(vocab_size=32000, norm_eps=1e-5, bos_token_id=1, eos_token_ids=(2,))
    return ModelSpec(name=name, **{**base, **fields})


def _llama3(name: str, **fields: Any) -> ModelSpec:
    base: dict[str, Any] = dict(
        vocab_size=128256,
        max_position_embeddings=8192,
        rope=RopeSpec(theta=500000.0),
        bos_token_id=_LLAMA3_BOS,
        eos_token_ids=(_LLAMA3_EOS,),
    )
    return _spec(name, **{**base, **fields})


def _smollm2(name: str, **fields: Any) -> ModelSpec:
    """SmolLM2 base models: 49152-token vocab, 8k context, tied embeddings, <|endoftext|> (0) as bos and eos."""
    base: dict[str, Any] = dict(
        vocab_size=49152, max_position_embeddings=8192, tie_word_embeddings=True, bos_token_id=0, eos_token_ids=(0,)
    )
    return _spec(name, **{**base, **fields})


_ALL: Final[tuple[ModelSpec, ...]] = (
    _spec(
        "tiny",
        vocab_size=256,
        hidden_size=64,
        intermediate_size=128,
        num_layers=2,
        num_heads=4,
        num_kv_heads=2,
        max_position_embeddings=256,
    ),
    # meta-llama/Llama-2-{7,13,70}b-hf
    _spec("llama2-7b", hidden_size=4096, intermediate_size=11008, num_layers=32, num_heads=32,
          max_position_embeddings=4096),
    _spec("llama2-13b", hidden_size=5120, intermediate_size=13824, num_layers=40, num_heads=40,
          max_position_embeddings=4096),
    _spec("llama2-70b", hidden_size=8192, intermediate_size=28672, num_layers=80, num_heads=64, num_kv_heads=8,
          max_position_embeddings=4096),
    # meta-llama/Meta-Llama-3-{8,70}B
    _llama3("llama3-8b", hidden_size=4096, intermediate_size=14336, num_layers=32, num_heads=32, num_kv_heads=8),
    _llama3("llama3-70b", hidden_size=8192, intermediate_size=28672, num_layers=80, num_heads=64, num_kv_heads=8),
    # meta-llama/Llama-3.1-8B
    _llama3("llama3.1-8b", hidden_size=4096, intermediate_size=14336, num_layers=32, num_heads=32, num_kv_heads=8,
            max_position_embeddings=131072, rope=_llama3_rope(8.0)),
    # meta-llama/Llama-3.2-{1,3}B
    _llama3("llama3.2-1b", hidden_size=2048, intermediate_size=8192, num_layers=16, num_heads=32, num_kv_heads=8,
            head_dim=64, max_position_embeddings=131072, rope=_llama3_rope(32.0), tie_word_embeddings=True),
    _llama3("llama3.2-3b", hidden_size=3072, intermediate_size=8192, num_layers=28, num_heads=24, num_kv_heads=8,
            head_dim=128, max_position_embeddings=131072, rope=_llama3_rope(32.0), tie_word_embeddings=True),
    # mistralai/Mistral-7B-v0.1
    _spec("mistral-7b", family="mistral", hidden_size=4096, intermediate_size=14336, num_layers=32, num_heads=32,
          num_kv_heads=8, max_position_embeddings=32768, sliding_window=4096),
    # codellama/CodeLlama-7b-hf: Llama 2 7B with 16 infilling tokens and a 1e6 rope base
    _spec("codellama-7b", vocab_size=32016, hidden_size=4096, intermediate_size=11008, num_layers=32, num_heads=32,
          max_position_embeddings=16384, rope=RopeSpec(theta=1000000.0)),
    # TinyLlama/TinyLlama-1.1B-Chat-v1.0
    _spec("tinyllama-1.1b", hidden_size=2048, intermediate_size=5632, num_layers=22, num_heads=32, num_kv_heads=4,
          max_position_embeddings=2048),
    # HuggingFaceTB/SmolLM2-{135M,360M,1.7B}
    _smollm2("smollm2-135m", hidden_size=576, intermediate_size=1536, num_layers=30, num_heads=9, num_kv_heads=3,
             rope=RopeSpec(theta=100000.0)),
    _smollm2("smollm2-360m", hidden_size=960, intermediate_size=2560, num_layers=32, num_heads=15, num_kv_heads=5,
             rope=RopeSpec(theta=100000.0)),
    _smollm2("smollm2-1.7b", hidden_size=2048, intermediate_size=8192, num_layers=24, num_heads=32, num_kv_heads=32,
             rope=RopeSpec(theta=130000.0)),
)

PRESETS: Final[dict[str, ModelSpec]] = {spec.name: spec for spec in _ALL}


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
