"""Qwen2 / Qwen2.5 and DeepSeek-R1-Distill-Qwen: Llama's blocks with biases on the Q, K and V projections (none on
the output projection or the MLP, whatever the config says: transformers' Qwen2 hard-codes them) and optional
sliding-window attention on the upper layers.

Which layers slide is transformers 5's rule: `sliding_window` counts only when `use_sliding_window` is true; an explicit
`layer_types` list wins, otherwise layers from `max_window_layers` upward slide. Qwen3 (qwen3.py) reads windows the
same way.
"""

from __future__ import annotations

from typing import Any

from ...ir.attrs import RopeKind
from ..gguf import COMMON_TENSORS, GGUFArch, tensor_rules
from ..spec import AttentionType, LayerSpec, ModelSpec, RopeSpec
from . import llama
from .base import HEAD_NAMES, Family, NameTable

# transformers' Qwen2Config defaults, for keys a config.json leaves out
DEFAULTS: dict[str, Any] = {
    "num_key_value_heads": 32,
    "head_dim": None,  # not a Qwen2Config field; the modeling code derives hidden_size // num_attention_heads
    "hidden_act": "silu",
    "max_position_embeddings": 32768,
    "rms_norm_eps": 1e-6,
    "tie_word_embeddings": False,
    "use_sliding_window": False,
    "sliding_window": 4096,
    "max_window_layers": 28,
    "layer_types": None,
    "bos_token_id": None,
    "eos_token_id": None,
    "pad_token_id": None,
    "rope_theta": 10000.0,
}

_LEGACY_LAYER_TYPES = {"attention": "full_attention"}  # transformers renames these on load
_LAYER_TYPES = {"full_attention": AttentionType.FULL, "sliding_attention": AttentionType.SLIDING_WINDOW}


# Llama's names, with only the tensors Qwen2 has: Q/K/V biases, no output-projection or MLP biases (so a Llama
# checkpoint with those biases does not fit this table when only tensor names are known)
NAMES = NameTable(
    (
        ("model.embed_tokens.weight", "embed_tokens.weight"),
        ("model.layers.{i}.input_layernorm.weight", "layers.{i}.input_norm.weight"),
        ("model.layers.{i}.self_attn.{qkv}_proj.{kind}", "layers.{i}.attn.{qkv}_proj.{kind}"),
        ("model.layers.{i}.self_attn.o_proj.weight", "layers.{i}.attn.o_proj.weight"),
        ("model.layers.{i}.post_attention_layernorm.weight", "layers.{i}.post_attention_norm.weight"),
        ("model.layers.{i}.mlp.{mlp}_proj.weight", "layers.{i}.mlp.{mlp}_proj.weight"),
        ("model.norm.weight", "norm.weight"),
    ) + HEAD_NAMES,
    fields={"qkv": "[qkv]"},
    ignored=r"(?:model\.)?(?:layers\.\d+\.self_attn\.)?rotary_emb\.inv_freq",  # recomputed from the config
)

# Llama's markers and the Q/K/V biases: more evidence than Llama's alone when both tables fit
MARKERS = llama.FAMILIES[0].tensor_markers + tuple(
    rf"(model\.)?layers\.\d+\.self_attn\.{p}_proj\.bias" for p in "qkv")


def windows(c) -> dict[str, Any]:
    """`sliding_window` and per-layer `layers` as transformers 5's Qwen2/Qwen3 configs resolve them."""
    count = c.need("num_hidden_layers")
    window = c.get("sliding_window") if c.get("use_sliding_window") else None
    types = c.get("layer_types")
    if types is None:
        first = c.get("max_window_layers")
        if window is not None and not isinstance(first, int):
            raise c.error(f"max_window_layers must be an integer, got {first!r}")
        kinds = [AttentionType.SLIDING_WINDOW if window is not None and i >= first else AttentionType.FULL
                 for i in range(count)]
    else:
        if not isinstance(types, list) or len(types) != count:
            raise c.error(f"layer_types must list one entry per layer ({count}), got {types!r}")
        unknown = sorted({str(t) for t in types if _LEGACY_LAYER_TYPES.get(t, t) not in _LAYER_TYPES})
        if unknown:
            raise c.error(f"unsupported layer_types entries {unknown}; supported: {', '.join(_LAYER_TYPES)}")
        kinds = [_LAYER_TYPES[_LEGACY_LAYER_TYPES.get(t, t)] for t in types]
    sliding = AttentionType.SLIDING_WINDOW in kinds
    if sliding and window is None:  # transformers fails building the sliding mask of such a config
        why = "use_sliding_window is false" if not c.get("use_sliding_window") else "sliding_window is null"
        raise c.error(f"layer_types lists sliding_attention layers but {why}, so they have no window")
    return {"sliding_window": window if sliding else None, "layers": tuple(LayerSpec(attention=k) for k in kinds)}


def rotary(c) -> dict[str, Any]:
    """Qwen's default rope turns whole heads whatever `partial_rotary_factor` says; the scaled kinds would turn
    part of each head and transformers then fails (the cos/sin tables are narrower than the heads), so they are
    refused here."""
    common = c.common()
    params = c.get("rope_scaling") or c.get("rope_parameters") or {}
    partial = c.get("partial_rotary_factor") or (params.get("partial_rotary_factor") if isinstance(params, dict)
                                                 else None)
    if partial not in (None, 1, 1.0) and common["rope"].kind != RopeKind.DEFAULT:
        raise c.error(f"partial_rotary_factor={partial} with {common['rope'].kind.value} rope is not supported "
                      "(Qwen's modeling code cannot apply it either)")
    return {**common, "partial_rotary_factor": 1.0}


def config(c) -> dict[str, Any]:
    return {**rotary(c), **windows(c), "attention_bias": True, "attention_out_bias": False, "mlp_bias": False}


def hf_fields(spec: ModelSpec) -> dict[str, Any]:
    """The config.json keys Qwen2 and Qwen3 share, from a spec (the inverse of `config` and `windows`)."""
    from ..hf import HF_ACTIVATION, rope_parameters

    rope = rope_parameters(spec)
    eos = list(spec.eos_token_ids)
    sliding = [layer.attention == AttentionType.SLIDING_WINDOW for layer in spec.layers]
    # transformers 4 and mlx-lm read max_window_layers; it says the same as layer_types when the sliding layers are
    # the top ones, and layer_types (which transformers 5 reads first) says it always
    first = sliding.index(True) if any(sliding) else spec.num_layers
    return {
        "vocab_size": spec.vocab_size,
        "hidden_size": spec.hidden_size,
        "intermediate_size": spec.intermediate_size,
        "num_hidden_layers": spec.num_layers,
        "num_attention_heads": spec.num_heads,
        "num_key_value_heads": spec.kv_heads,
        "hidden_act": HF_ACTIVATION[spec.activation],
        "max_position_embeddings": spec.max_position_embeddings,
        "rms_norm_eps": spec.norm_eps,
        "tie_word_embeddings": spec.tie_word_embeddings,
        "bos_token_id": spec.bos_token_id,
        "eos_token_id": eos[0] if len(eos) == 1 else (eos or None),
        "pad_token_id": spec.pad_token_id,
        "rope_parameters": rope,
        "rope_theta": spec.rope.theta,
        "rope_scaling": None if spec.rope.kind == RopeKind.DEFAULT else {k: v for k, v in rope.items()
                                                                         if k != "rope_theta"},
        "use_sliding_window": any(sliding),
        "sliding_window": spec.sliding_window if any(sliding) else None,
        "max_window_layers": first if all(sliding[first:]) else spec.num_layers,
        "layer_types": ["sliding_attention" if s else "full_attention" for s in sliding],
    }


def to_hf_config(spec: ModelSpec) -> dict[str, Any]:
    out = {"architectures": ["Qwen2ForCausalLM"], "model_type": "qwen2", **hf_fields(spec)}
    if spec.head_dim is not None and spec.head_dim != spec.hidden_size // spec.num_heads:
        out["head_dim"] = spec.head_dim  # not a Qwen2Config field, but its modeling code reads it
    return out


# ------------------------------------------------------------------------------------------------------ presets

_QWEN_BOS = _QWEN_EOS = 151643  # <|endoftext|>: Qwen2.5 base models' bos and eos


def preset(name: str, **fields: Any) -> ModelSpec:
    """Qwen2.5 base-model defaults (151936-token vocabulary, rope base 1e6, eps 1e-6, Q/K/V biases, no windows)."""
    base: dict[str, Any] = dict(family="qwen2", vocab_size=151936, norm_eps=1e-6, rope=RopeSpec(theta=1000000.0),
                                attention_bias=True, attention_out_bias=False, bos_token_id=_QWEN_BOS,
                                eos_token_ids=(_QWEN_EOS,))
    return ModelSpec(name=name, **{**base, **fields})


def _r1_distill(name: str, **fields: Any) -> ModelSpec:
    """DeepSeek-R1-Distill-Qwen: Qwen2.5 bodies with DeepSeek's tokens (bos <｜begin▁of▁sentence｜> 151646), rope
    base 1e4, 128k context and an untied head."""
    return preset(name, rope=RopeSpec(theta=10000.0), max_position_embeddings=131072, bos_token_id=151646,
                  eos_token_ids=(151643,), tie_word_embeddings=False, **fields)


PRESETS = (
    # Qwen/Qwen2.5-{0.5B,1.5B,3B,7B}
    preset("qwen2.5-0.5b", hidden_size=896, intermediate_size=4864, num_layers=24, num_heads=14, num_kv_heads=2,
           max_position_embeddings=32768, tie_word_embeddings=True),
    preset("qwen2.5-1.5b", hidden_size=1536, intermediate_size=8960, num_layers=28, num_heads=12, num_kv_heads=2,
           max_position_embeddings=131072, tie_word_embeddings=True),
    preset("qwen2.5-3b", hidden_size=2048, intermediate_size=11008, num_layers=36, num_heads=16, num_kv_heads=2,
           max_position_embeddings=32768, tie_word_embeddings=True),
    preset("qwen2.5-7b", vocab_size=152064, hidden_size=3584, intermediate_size=18944, num_layers=28, num_heads=28,
           num_kv_heads=4, max_position_embeddings=131072),
    # deepseek-ai/DeepSeek-R1-Distill-Qwen-{1.5B,7B}
    _r1_distill("deepseek-r1-distill-qwen-1.5b", hidden_size=1536, intermediate_size=8960, num_layers=28,
                num_heads=12, num_kv_heads=2),
    _r1_distill("deepseek-r1-distill-qwen-7b", vocab_size=152064, hidden_size=3584, intermediate_size=18944,
                num_layers=28, num_heads=28, num_kv_heads=4),
)

FAMILIES = (
    Family(
        "qwen2",
        architectures=("Qwen2",),
        config=config,
        model_types=("qwen2",),
        defaults=DEFAULTS,
        names=NAMES,
        tensor_markers=MARKERS,
        # llama.cpp's qwen2 rotates halves (NeoX order), so its converter leaves Q/K rows as Hugging Face has them
        gguf=GGUFArch("qwen2", "qwen2", tensor_rules(*COMMON_TENSORS), permute_qk=False),
        presets=PRESETS,
        hub_ids=(
            (r"Qwen/Qwen2\.5-(0\.5|1\.5|3|7)B(-Instruct)?", r"qwen2.5-\1b"),
            (r"deepseek-ai/DeepSeek-R1-Distill-Qwen-(1\.5|7)B", r"deepseek-r1-distill-qwen-\1b"),
        ),
        to_hf_config=to_hf_config,
    ),
)
