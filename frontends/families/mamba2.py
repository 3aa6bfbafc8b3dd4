"""Mamba-2 (state-spaces/mamba2-*, transformers' Mamba2ForCausalLM): attention-free, every layer a pre-norm RMSNorm
around a Mamba-2 mixer (frontends/blocks/mamba2.py) and no FFN; a final RMSNorm and an LM head, usually tied.

transformers keeps the residual stream in float32 (`residual_in_fp32`), which only matters below float32; mlxc
keeps it in the compute dtype.
"""

from __future__ import annotations

import math
from typing import Any

from pydantic import ValidationError

from ..spec import BlockKind, FFNType, LayerSpec, Mamba2Spec, ModelSpec, PositionEmbedding
from ..spec_file import validation_message
from .base import HEAD_NAMES, Family, NameTable

# transformers' Mamba2Config defaults, for keys a config.json leaves out
DEFAULTS: dict[str, Any] = {
    "num_heads": 128,
    "head_dim": 64,
    "vocab_size": 32768,
    "hidden_size": 4096,
    "state_size": 128,
    "num_hidden_layers": 64,
    "layer_norm_epsilon": 1e-5,
    "pad_token_id": 1,
    "bos_token_id": 0,
    "eos_token_id": 2,
    "expand": 2,
    "conv_kernel": 4,
    "n_groups": 8,
    "use_bias": False,
    "use_conv_bias": True,
    "hidden_act": "silu",
    "time_step_limit": (0.0, math.inf),
    "chunk_size": 256,
    "tie_word_embeddings": False,
}

_MIXER = r"in_proj\.(?:weight|bias)|out_proj\.(?:weight|bias)|conv1d\.(?:weight|bias)|A_log|D|dt_bias|norm\.weight"

NAMES = NameTable(
    (
        ("backbone.embeddings.weight", "embed_tokens.weight"),
        ("backbone.embedding.weight", "embed_tokens.weight"),  # older checkpoints (transformers renames on load)
        ("backbone.layers.{i}.norm.weight", "layers.{i}.input_norm.weight"),
        ("backbone.layers.{i}.mixer.{part}", "layers.{i}.mixer.{part}"),
        ("backbone.norm_f.weight", "norm.weight"),
    ) + HEAD_NAMES,
    fields={"part": _MIXER},
)

_KEYS = {"num_heads": "num_heads", "head_dim": "head_dim", "state_size": "state_size", "n_groups": "n_groups",
         "expand": "expand", "conv_kernel": "conv_kernel", "chunk_size": "chunk_size",
         "time_step_limit": "time_step_limit"}


def _number(value):
    """A config number; transformers 5 writes infinities as {"__float__": "Infinity"}."""
    if isinstance(value, dict) and set(value) == {"__float__"} and isinstance(value["__float__"], str):
        try:
            return float(value["__float__"])
        except ValueError:
            return value
    return value


def _time_step_limit(c) -> tuple[float, float | None]:
    limit = c.get("time_step_limit")
    limit = [_number(v) for v in limit] if isinstance(limit, (list, tuple)) else limit
    if not isinstance(limit, (list, tuple)) or len(limit) != 2 or \
            not all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in limit):
        raise c.error(f"`time_step_limit` must be a pair of numbers [min, max], got {limit!r}")
    low, high = float(limit[0]), float(limit[1])
    return low, None if high == math.inf else high


def config(c) -> dict[str, Any]:
    if c.get("hidden_act") != "silu":
        raise c.error(f"hidden_act {c.get('hidden_act')!r} is not supported for Mamba-2 (its convolution uses silu)")
    hidden, layers = c.get("hidden_size"), c.get("num_hidden_layers")
    fields = {k: c.get(key) for k, key in _KEYS.items()}
    fields.update(time_step_limit=_time_step_limit(c), use_bias=bool(c.get("use_bias")),
                  use_conv_bias=bool(c.get("use_conv_bias")))
    try:
        mixer = Mamba2Spec(**fields)
    except ValidationError as err:
        raise c.error(validation_message(err, "mamba2", _KEYS)) from None
    if isinstance(hidden, int) and mixer.intermediate_size != mixer.expand * hidden:
        raise c.error(f"num_heads * head_dim ({mixer.intermediate_size}) must equal expand * hidden_size "
                      f"({mixer.expand * hidden}), as transformers requires")
    count = layers if isinstance(layers, int) and not isinstance(layers, bool) and layers > 0 else None
    return dict(
        vocab_size=c.get("vocab_size"),
        hidden_size=hidden,
        intermediate_size=mixer.intermediate_size,
        num_layers=layers,
        layers=tuple(LayerSpec(block=BlockKind.MAMBA2) for _ in range(count or 0)),
        mamba2=mixer,
        ffn=FFNType.NONE,
        position=PositionEmbedding.NONE,
        norm_eps=c.get("layer_norm_epsilon"),
        tie_word_embeddings=bool(c.get("tie_word_embeddings")),
        bos_token_id=c.get("bos_token_id"),
        eos_token_ids=c.eos_ids(),
        pad_token_id=c.get("pad_token_id"),
        head=c.head(),
    )


def to_hf_config(spec: ModelSpec) -> dict[str, Any]:
    """Mamba2's config.json for a spec; what it cannot hold (attention layers, FFNs, ...) is found by
    `hf_config_from_spec` comparing the programs."""
    m = spec.mamba2 or Mamba2Spec(num_heads=1)
    eos = list(spec.eos_token_ids)
    low, high = m.time_step_limit
    return {
        "architectures": ["Mamba2ForCausalLM"],
        "model_type": "mamba2",
        "vocab_size": spec.vocab_size,
        "hidden_size": spec.hidden_size,
        "num_hidden_layers": spec.num_layers,
        "num_heads": m.num_heads,
        "head_dim": m.head_dim,
        "state_size": m.state_size,
        "n_groups": m.n_groups,
        "expand": m.expand,
        "conv_kernel": m.conv_kernel,
        "chunk_size": m.chunk_size,
        "use_bias": m.use_bias,
        "use_conv_bias": m.use_conv_bias,
        "hidden_act": "silu",
        "layer_norm_epsilon": spec.norm_eps,
        "time_step_limit": [low, math.inf if high is None else high],
        "tie_word_embeddings": spec.tie_word_embeddings,
        "bos_token_id": spec.bos_token_id,
        "eos_token_id": eos[0] if len(eos) == 1 else (eos or None),
        "pad_token_id": spec.pad_token_id,
    }


# ------------------------------------------------------------------------------------------------------ presets


def _preset(name: str, hidden: int, layers: int) -> ModelSpec:
    """state-spaces/mamba2-* (AntonV/mamba2-*-hf in transformers' format): GPT-NeoX's vocabulary padded to a multiple
    of 16, 64-wide heads, a 128-wide state, one group, chunks of 256, tied embeddings; <|endoftext|> (0) as bos, eos
    and padding."""
    mixer = Mamba2Spec(num_heads=2 * hidden // 64, head_dim=64, state_size=128, n_groups=1, expand=2, conv_kernel=4,
                       chunk_size=256)
    return ModelSpec(name=name, family="mamba2", vocab_size=50288, hidden_size=hidden,
                     intermediate_size=mixer.intermediate_size, num_layers=layers,
                     layers=tuple(LayerSpec(block=BlockKind.MAMBA2) for _ in range(layers)), mamba2=mixer,
                     ffn=FFNType.NONE, position=PositionEmbedding.NONE, norm_eps=1e-5, tie_word_embeddings=True,
                     bos_token_id=0, eos_token_ids=(0,), pad_token_id=0)


PRESETS = (
    _preset("mamba2-130m", 768, 24),
    _preset("mamba2-370m", 1024, 48),
    _preset("mamba2-780m", 1536, 48),
    _preset("mamba2-1.3b", 2048, 48),
    _preset("mamba2-2.7b", 2560, 64),
)

FAMILIES = (
    Family(
        "mamba2",
        architectures=("Mamba2",),
        config=config,
        model_types=("mamba2",),
        defaults=DEFAULTS,
        names=NAMES,
        tensor_markers=(
            r"backbone\.layers\.\d+\.mixer\.A_log",
            r"backbone\.layers\.\d+\.mixer\.dt_bias",
            r"backbone\.layers\.\d+\.mixer\.norm\.weight",
        ),
        presets=PRESETS,
        hub_ids=((r"(?:state-spaces|AntonV)/mamba2-(130m|370m|780m|1\.3b|2\.7b)(?:-hf)?", r"mamba2-\1"),),
        to_hf_config=to_hf_config,
    ),
)
