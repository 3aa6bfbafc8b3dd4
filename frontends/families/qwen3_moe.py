"""Qwen3-MoE (Qwen3-30B-A3B, Qwen3-235B-A22B): Qwen3's attention (an RMSNorm over each head's features on queries
and keys before rope, `attention_bias` on all four projections) with a mixture of SwiGLU experts and no shared
expert. Routing is Qwen2-MoE's (float32 softmax, top-k, renormalized when `norm_topk_prob`, cast to the compute
dtype); `mlp_only_layers` and `decoder_sparse_step` place dense layers. `use_sliding_window` makes every layer
slide.
"""

from __future__ import annotations

from typing import Any

from ..spec import AttentionType, FFNType, ModelSpec, RopeSpec
from . import _moe, llama, qwen2_moe
from .base import HEAD_NAMES, Family, NameTable

# transformers' Qwen3MoeConfig defaults, for keys a config.json leaves out
DEFAULTS: dict[str, Any] = {
    **qwen2_moe.DEFAULTS,
    "num_key_value_heads": 4,
    "attention_bias": False,
    "moe_intermediate_size": 768,
    "num_experts_per_tok": 8,
    "num_experts": 128,
}

NAMES = NameTable(
    (
        ("model.embed_tokens.weight", "embed_tokens.weight"),
        ("model.layers.{i}.input_layernorm.weight", "layers.{i}.input_norm.weight"),
        ("model.layers.{i}.self_attn.{qkvo}_proj.{kind}", "layers.{i}.attn.{qkvo}_proj.{kind}"),
        ("model.layers.{i}.self_attn.{qk}_norm.weight", "layers.{i}.attn.{qk}_norm.weight"),
        ("model.layers.{i}.post_attention_layernorm.weight", "layers.{i}.post_attention_norm.weight"),
        ("model.layers.{i}.mlp.{mlp}_proj.weight", "layers.{i}.mlp.{mlp}_proj.weight"),  # dense layers
        *_moe.EXPERT_NAMES,
        ("model.norm.weight", "norm.weight"),
    ) + HEAD_NAMES,
    fields={**_moe.FIELDS, "qk": "[qk]"},
    ignored=r"(?:model\.)?(?:layers\.\d+\.self_attn\.)?rotary_emb\.inv_freq",
)


def config(c) -> dict[str, Any]:
    llama_fields = llama.config(c)
    count = c.need("num_hidden_layers")
    experts = _moe.num_experts(c, "num_experts", "num_local_experts")
    window = c.get("sliding_window") if c.get("use_sliding_window") else None
    kind = AttentionType.SLIDING_WINDOW if window else AttentionType.FULL
    moe = None
    if experts:
        moe = _moe.moe_settings(c, experts, "num_experts", "moe_intermediate_size", normalize=c.get("norm_topk_prob"))
    bias = bool(c.get("attention_bias"))
    return {**llama_fields, "qk_norm": True, "attention_bias": bias, "attention_out_bias": bias, "mlp_bias": False,
            "ffn": FFNType.MOE if moe else FFNType.GATED, "moe": moe, "sliding_window": window or None,
            "layers": qwen2_moe.layers(c, [kind] * count, experts)}


def to_hf_config(spec: ModelSpec) -> dict[str, Any]:
    out = qwen2_moe.base_fields(spec, "Qwen3MoeForCausalLM", "qwen3_moe")
    out.update(head_dim=spec.dim_per_head, attention_bias=spec.attention_bias,
               use_sliding_window=spec.sliding_window is not None, sliding_window=spec.sliding_window)
    return out


PRESETS = (
    # Qwen/Qwen3-30B-A3B
    ModelSpec(name="qwen3-30b-a3b", family="qwen3_moe", vocab_size=151936, hidden_size=2048, intermediate_size=6144,
              num_layers=48, num_heads=32, num_kv_heads=4, head_dim=128, max_position_embeddings=40960,
              norm_eps=1e-6, rope=RopeSpec(theta=1000000.0), qk_norm=True, ffn=FFNType.MOE,
              moe=dict(num_experts=128, top_k=8, intermediate_size=768, normalize=True), bos_token_id=151643,
              eos_token_ids=(151645,)),
)

FAMILIES = (
    Family(
        "qwen3_moe",
        architectures=("Qwen3Moe",),
        config=config,
        model_types=("qwen3_moe",),
        defaults=DEFAULTS,
        names=NAMES,
        layout=_moe.layout,
        tensor_markers=(
            r"(model\.)?layers\.\d+\.self_attn\.q_norm\.weight",
            r"(model\.)?layers\.\d+\.mlp\.gate\.weight",
            r"(model\.)?layers\.\d+\.mlp\.experts\.\d+\.gate_proj\.weight",
        ),
        presets=PRESETS,
        hub_ids=((r"Qwen/Qwen3-30B-A3B", "qwen3-30b-a3b"),),
        to_hf_config=to_hf_config,
    ),
)
