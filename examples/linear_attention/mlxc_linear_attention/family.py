"""The `linear_hybrid` family, a family file outside mlxc: a Hugging Face style config.json whose `layer_types`
say which layers are linear attention, its checkpoint tensor names, how to recognise it, and a preset.

    {"architectures": ["LinearHybridForCausalLM"], "model_type": "linear_hybrid",
     "layer_types": ["linear_attention", "linear_attention", "full_attention", ...],
     "linear_num_heads": 4, ...Llama's keys}

Full-attention layers keep Llama's names (`self_attn.q_proj`, ...); linear-attention layers are `linear_attn.*`.
"""

from typing import Any

from mlxc.frontends.hf import HF_ACTIVATION, rope_parameters
from mlxc.frontends.spec import LayerSpec, ModelSpec
from mlxc.plugins import Family, NameTable

from .block import LinearAttentionSpec

NAMES = NameTable(
    (
        ("model.embed_tokens.weight", "embed_tokens.weight"),
        ("model.layers.{i}.input_layernorm.weight", "layers.{i}.input_norm.weight"),
        ("model.layers.{i}.self_attn.{qkvo}_proj.{kind}", "layers.{i}.attn.{qkvo}_proj.{kind}"),
        ("model.layers.{i}.linear_attn.{qkvo}_proj.{kind}", "layers.{i}.linear_attn.{qkvo}_proj.{kind}"),
        ("model.layers.{i}.post_attention_layernorm.weight", "layers.{i}.post_attention_norm.weight"),
        ("model.layers.{i}.mlp.{mlp}_proj.{kind}", "layers.{i}.mlp.{mlp}_proj.{kind}"),
        ("model.norm.weight", "norm.weight"),
        ("lm_head.weight", "lm_head.weight"),
    )
)

DEFAULTS = {"hidden_act": "silu", "max_position_embeddings": 2048, "rms_norm_eps": 1e-6, "rope_theta": 10000.0,
            "tie_word_embeddings": False, "linear_eps": 1e-6}
KINDS = {"linear_attention": "linear_attention", "full_attention": "attention"}


def config(c) -> dict[str, Any]:
    """config.json -> ModelSpec fields: Llama's keys, plus which layers are linear attention and their heads."""
    fields = c.common()
    types = c.get("layer_types") or ["full_attention"] * fields["num_layers"]
    unknown = sorted(set(types) - set(KINDS))
    if unknown or len(types) != fields["num_layers"]:
        raise c.error(f"layer_types must list {fields['num_layers']} entries of {', '.join(KINDS)}, got {types}")
    return {**fields, "layers": tuple(LayerSpec(block=KINDS[t]) for t in types),
            "extensions": {"linear_attention": LinearAttentionSpec(
                num_heads=c.get("linear_num_heads") or fields["num_heads"], head_dim=c.get("linear_head_dim"),
                eps=c.get("linear_eps"))}}


def to_hf_config(spec: ModelSpec) -> dict[str, Any]:
    """The inverse of `config`, so `mlxc export` writes checkpoints this family reads back."""
    la = spec.extensions["linear_attention"]
    return {
        "architectures": ["LinearHybridForCausalLM"], "model_type": "linear_hybrid",
        "vocab_size": spec.vocab_size, "hidden_size": spec.hidden_size, "intermediate_size": spec.intermediate_size,
        "num_hidden_layers": spec.num_layers, "num_attention_heads": spec.num_heads,
        "num_key_value_heads": spec.kv_heads, "head_dim": spec.dim_per_head,
        "hidden_act": HF_ACTIVATION[spec.activation], "max_position_embeddings": spec.max_position_embeddings,
        "rms_norm_eps": spec.norm_eps, "tie_word_embeddings": spec.tie_word_embeddings,
        "bos_token_id": spec.bos_token_id, "eos_token_id": list(spec.eos_token_ids) or None,
        "rope_parameters": rope_parameters(spec),
        "layer_types": [next(k for k, v in KINDS.items() if v == layer.block.value) for layer in spec.layers],
        "linear_num_heads": la.num_heads, "linear_head_dim": la.head_dim, "linear_eps": la.eps,
    }


PRESETS = (
    ModelSpec(name="linear-hybrid-tiny", family="linear_hybrid", vocab_size=256, hidden_size=64,
              intermediate_size=128, num_layers=6, num_heads=4, num_kv_heads=2,
              layer_pattern=["linear_attention", "linear_attention", "attention"],
              extensions={"linear_attention": LinearAttentionSpec(num_heads=4)}, bos_token_id=1, eos_token_ids=(2,)),
)

FAMILIES = (
    Family("linear_hybrid", architectures=("LinearHybrid",), config=config, model_types=("linear_hybrid",),
           defaults=DEFAULTS, names=NAMES, tensor_markers=(r"(?:model\.)?layers\.\d+\.linear_attn\.q_proj\.weight",),
           presets=PRESETS, to_hf_config=to_hf_config),
)
