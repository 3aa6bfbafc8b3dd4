"""OLMoE (allenai/OLMoE-1B-7B): Llama-style blocks whose queries and keys are RMS-normalized over the whole
projection (one norm across all heads, before the head split; Qwen3 normalizes each head instead), optionally
clamped to [-clip_qkv, clip_qkv] with the values, and a mixture of SwiGLU experts of `intermediate_size` on every
layer. Routing is Qwen-MoE's: float32 softmax, top-k, renormalized when `norm_topk_prob`, cast to the compute dtype.
"""

from __future__ import annotations

from typing import Any

from ..spec import FFNType, ModelSpec, RopeSpec
from . import _moe, llama
from .base import HEAD_NAMES, Family, NameTable

# transformers' OlmoeConfig defaults, for keys a config.json leaves out
DEFAULTS: dict[str, Any] = {
    "num_key_value_heads": None,  # None: as many as attention heads
    "head_dim": None,
    "hidden_act": "silu",
    "max_position_embeddings": 4096,
    "rms_norm_eps": 1e-5,
    "pad_token_id": 1,
    "bos_token_id": None,
    "eos_token_id": 50279,
    "tie_word_embeddings": False,
    "rope_theta": 10000.0,
    "attention_bias": False,
    "clip_qkv": None,
    "num_experts_per_tok": 8,
    "num_experts": 64,
    "norm_topk_prob": False,
}

NAMES = NameTable(
    (
        ("model.embed_tokens.weight", "embed_tokens.weight"),
        ("model.layers.{i}.input_layernorm.weight", "layers.{i}.input_norm.weight"),
        ("model.layers.{i}.self_attn.{qkvo}_proj.{kind}", "layers.{i}.attn.{qkvo}_proj.{kind}"),
        ("model.layers.{i}.self_attn.{qk}_norm.weight", "layers.{i}.attn.{qk}_norm.weight"),
        ("model.layers.{i}.post_attention_layernorm.weight", "layers.{i}.post_attention_norm.weight"),
        *_moe.EXPERT_NAMES,
        ("model.norm.weight", "norm.weight"),
    ) + HEAD_NAMES,
    fields={**_moe.FIELDS, "qk": "[qk]"},
    ignored=r"(?:model\.)?(?:layers\.\d+\.self_attn\.)?rotary_emb\.inv_freq",
)


def config(c) -> dict[str, Any]:
    llama_fields = llama.config(c)
    experts = _moe.num_experts(c, "num_experts", "num_local_experts")
    if experts == 0:
        raise c.error("`num_experts` must be a positive integer, got 0")
    moe = _moe.moe_settings(c, experts, "num_experts", "intermediate_size", normalize=c.get("norm_topk_prob"))
    clip = c.get("clip_qkv")
    if clip is not None and (isinstance(clip, bool) or not isinstance(clip, (int, float)) or clip <= 0):
        raise c.error(f"`clip_qkv` must be a positive number or null, got {clip!r}")
    bias = bool(c.get("attention_bias"))
    return {**llama_fields, "qk_norm": True, "qk_norm_across_heads": True, "clip_qkv": clip,
            "attention_bias": bias, "attention_out_bias": bias, "mlp_bias": False, "ffn": FFNType.MOE, "moe": moe}


def to_hf_config(spec: ModelSpec) -> dict[str, Any]:
    out = llama.to_hf_config(spec.model_copy(update={"mlp_bias": False}))
    out.pop("mlp_bias", None)
    out.pop("head_dim", None)  # OLMoE's norms are sized by hidden_size: heads always split it evenly
    m = spec.moe
    out.update(architectures=["OlmoeForCausalLM"], model_type="olmoe", clip_qkv=spec.clip_qkv,
               intermediate_size=m.intermediate_size if m is not None else spec.intermediate_size,
               num_experts=m.num_experts if m is not None else 1, **_moe.moe_fields(spec))
    return out


PRESETS = (
    # allenai/OLMoE-1B-7B-0924
    ModelSpec(name="olmoe-1b-7b", family="olmoe", vocab_size=50304, hidden_size=2048, intermediate_size=1024,
              num_layers=16, num_heads=16, max_position_embeddings=4096, norm_eps=1e-5,
              rope=RopeSpec(theta=10000.0), qk_norm=True, qk_norm_across_heads=True, ffn=FFNType.MOE,
              moe=dict(num_experts=64, top_k=8, intermediate_size=1024, normalize=False), pad_token_id=1,
              eos_token_ids=(50279,)),
)

FAMILIES = (
    Family(
        "olmoe",
        architectures=("Olmoe",),
        config=config,
        model_types=("olmoe",),
        defaults=DEFAULTS,
        names=NAMES,
        layout=_moe.layout,
        # the same tensor names as Qwen3-MoE without dense layers: only the config tells the two apart
        tensor_markers=(
            r"(model\.)?layers\.\d+\.self_attn\.q_norm\.weight",
            r"(model\.)?layers\.\d+\.mlp\.gate\.weight",
            r"(model\.)?layers\.\d+\.mlp\.experts\.\d+\.gate_proj\.weight",
        ),
        presets=PRESETS,
        hub_ids=((r"allenai/OLMoE-1B-7B-0924", "olmoe-1b-7b"),),
        to_hf_config=to_hf_config,
    ),
)
