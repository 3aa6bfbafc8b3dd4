"""Qwen2-MoE (Qwen1.5-MoE, Qwen2-57B-A14B): Qwen2's attention (Q/K/V biases) with a mixture of SwiGLU experts plus
a shared expert that every token runs through, scaled by sigmoid(shared_expert_gate(x)).

The router is a float32 softmax over all experts; the top `num_experts_per_tok` are renormalized only when
`norm_topk_prob`, then cast to the compute dtype before they scale the expert outputs. Layers listed in
`mlp_only_layers`, and all but every `decoder_sparse_step`-th, have a dense MLP of `intermediate_size` instead.
Sliding windows follow transformers 5's Qwen2-MoE rule: `layer_types` when given, else even-numbered layers below
`max_window_layers` when `use_sliding_window`.
"""

from __future__ import annotations

from typing import Any

from ..spec import AttentionType, FFNType, LayerSpec, ModelSpec
from . import _moe, llama
from .base import HEAD_NAMES, Family, NameTable

# transformers' Qwen2MoeConfig defaults, for keys a config.json leaves out
DEFAULTS: dict[str, Any] = {
    "num_key_value_heads": 16,
    "head_dim": None,  # not a config field; the modeling code derives hidden_size // num_attention_heads
    "hidden_act": "silu",
    "max_position_embeddings": 32768,
    "rms_norm_eps": 1e-6,
    "tie_word_embeddings": False,
    "rope_theta": 10000.0,
    "use_sliding_window": False,
    "sliding_window": 4096,
    "max_window_layers": 28,
    "layer_types": None,
    "decoder_sparse_step": 1,
    "moe_intermediate_size": 1408,
    "shared_expert_intermediate_size": 5632,
    "num_experts_per_tok": 4,
    "num_experts": 60,
    "norm_topk_prob": False,
    "mlp_only_layers": None,
    "qkv_bias": True,
    "bos_token_id": None,
    "eos_token_id": None,
    "pad_token_id": None,
}

NAMES = NameTable(
    (
        ("model.embed_tokens.weight", "embed_tokens.weight"),
        ("model.layers.{i}.input_layernorm.weight", "layers.{i}.input_norm.weight"),
        ("model.layers.{i}.self_attn.{qkv}_proj.{kind}", "layers.{i}.attn.{qkv}_proj.{kind}"),
        ("model.layers.{i}.self_attn.o_proj.weight", "layers.{i}.attn.o_proj.weight"),
        ("model.layers.{i}.post_attention_layernorm.weight", "layers.{i}.post_attention_norm.weight"),
        ("model.layers.{i}.mlp.{mlp}_proj.weight", "layers.{i}.mlp.{mlp}_proj.weight"),  # dense layers
        ("model.layers.{i}.mlp.shared_expert.{mlp}_proj.weight", "layers.{i}.mlp.shared_expert.{mlp}_proj.weight"),
        ("model.layers.{i}.mlp.shared_expert_gate.weight", "layers.{i}.mlp.shared_expert_gate.weight"),
        *_moe.EXPERT_NAMES,
        ("model.norm.weight", "norm.weight"),
    ) + HEAD_NAMES,
    fields={**_moe.FIELDS, "qkv": "[qkv]"},
    ignored=r"(?:model\.)?(?:layers\.\d+\.self_attn\.)?rotary_emb\.inv_freq",
)

_LAYER_TYPES = {"full_attention": AttentionType.FULL, "sliding_attention": AttentionType.SLIDING_WINDOW}


def attention_kinds(c, count: int) -> tuple[list[AttentionType], Any]:
    """Each layer's attention and the window, as Qwen2MoeConfig resolves them."""
    window = c.get("sliding_window") if c.get("use_sliding_window") else None
    types = c.get("layer_types")
    if types is None:
        first = c.get("max_window_layers")
        if window is not None and not isinstance(first, int):
            raise c.error(f"max_window_layers must be an integer, got {first!r}")
        kinds = [AttentionType.SLIDING_WINDOW if window is not None and i % 2 == 0 and i < first
                 else AttentionType.FULL for i in range(count)]
    else:
        if not isinstance(types, list) or len(types) != count or any(t not in _LAYER_TYPES for t in types):
            raise c.error(f"layer_types must list full_attention or sliding_attention for each of the {count} "
                          f"layers, got {types!r}")
        kinds = [_LAYER_TYPES[t] for t in types]
    if AttentionType.SLIDING_WINDOW in kinds and not window:
        raise c.error("layer_types lists sliding_attention layers but use_sliding_window is false or "
                      "sliding_window is unset, so they have no window")
    return kinds, window if AttentionType.SLIDING_WINDOW in kinds else None


def layers(c, attention: list[AttentionType], experts: int) -> tuple[LayerSpec, ...]:
    sparse = _moe.sparse_layers(c, len(attention), experts)
    return tuple(LayerSpec(attention=a, ffn=FFNType.MOE if s else FFNType.GATED) for a, s in zip(attention, sparse))


def config(c) -> dict[str, Any]:
    llama_fields = llama.config(c)  # the shared keys, and the refusal of partial rotary
    count = c.need("num_hidden_layers")
    experts = _moe.num_experts(c, "num_experts", "num_local_experts")
    kinds, window = attention_kinds(c, count)
    moe = None
    if experts:
        moe = _moe.moe_settings(c, experts, "num_experts", "moe_intermediate_size", normalize=c.get("norm_topk_prob"),
                                shared_key="shared_expert_intermediate_size")
    bias = c.get("qkv_bias")
    if not isinstance(bias, bool):
        raise c.error(f"`qkv_bias` must be true or false, got {bias!r}")
    return {**llama_fields, "attention_bias": bias, "attention_out_bias": False, "mlp_bias": False,
            "ffn": FFNType.MOE if moe else FFNType.GATED, "moe": moe, "sliding_window": window,
            "layers": layers(c, kinds, experts)}


def window_fields(spec: ModelSpec) -> dict[str, Any]:
    sliding = [layer.attention == AttentionType.SLIDING_WINDOW for layer in spec.layers]
    return {"use_sliding_window": any(sliding), "sliding_window": spec.sliding_window if any(sliding) else None,
            "layer_types": ["sliding_attention" if s else "full_attention" for s in sliding]}


def base_fields(spec: ModelSpec, architecture: str, model_type: str) -> dict[str, Any]:
    """The keys Qwen2-MoE and Qwen3-MoE configs share: Llama's, the router's and `mlp_only_layers`."""
    out = llama.to_hf_config(spec.model_copy(update={"attention_bias": False, "mlp_bias": False,
                                                     "sliding_window": None, "layers": ()}))
    for key in ("attention_bias", "mlp_bias", "head_dim"):
        out.pop(key, None)
    m = spec.moe  # None: no experts at all, every layer dense (num_experts 0)
    out.update(architectures=[architecture], model_type=model_type, num_experts=m.num_experts if m else 0,
               decoder_sparse_step=1, mlp_only_layers=_moe.dense_layers(spec) if m else [], **_moe.moe_fields(spec))
    if m is not None:
        out["moe_intermediate_size"] = m.intermediate_size
    return out


def to_hf_config(spec: ModelSpec) -> dict[str, Any]:
    out = base_fields(spec, "Qwen2MoeForCausalLM", "qwen2_moe")
    out.update(qkv_bias=spec.attention_bias, **window_fields(spec))
    if spec.moe is not None:
        out["shared_expert_intermediate_size"] = spec.moe.shared_expert_intermediate_size
    if spec.head_dim is not None and spec.head_dim != spec.hidden_size // spec.num_heads:
        out["head_dim"] = spec.head_dim  # not a config field, but the modeling code reads it
    return out


FAMILIES = (
    Family(
        "qwen2_moe",
        architectures=("Qwen2Moe",),
        config=config,
        model_types=("qwen2_moe",),
        defaults=DEFAULTS,
        names=NAMES,
        layout=_moe.layout,
        tensor_markers=(
            r"(model\.)?layers\.\d+\.self_attn\.q_proj\.bias",
            r"(model\.)?layers\.\d+\.mlp\.gate\.weight",
            r"(model\.)?layers\.\d+\.mlp\.shared_expert_gate\.weight",
        ),
        to_hf_config=to_hf_config,
    ),
)
