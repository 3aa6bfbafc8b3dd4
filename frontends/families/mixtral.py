"""Mixtral: Mistral's attention (optionally sliding on every layer) with a mixture of SwiGLU experts in place of the
MLP. The router is a softmax over all experts in float32, the top `num_experts_per_tok` renormalized to sum to one;
unlike Qwen-MoE, those float32 weights scale the expert outputs before the cast back to the compute dtype.

Checkpoints keep the original release's names: `block_sparse_moe.gate` (the router) and one `w1` (gate), `w3` (up)
and `w2` (down) per expert, which transformers 5 still writes.
"""

from __future__ import annotations

from typing import Any

from ..spec import FFNType, ModelSpec, RopeSpec
from . import _moe, llama
from .base import HEAD_NAMES, Family, NameTable

# transformers' MixtralConfig defaults, for keys a config.json leaves out
DEFAULTS: dict[str, Any] = {
    **llama.DEFAULTS,
    "num_key_value_heads": 8,
    "max_position_embeddings": 4096 * 32,
    "rms_norm_eps": 1e-5,
    "rope_theta": 1000000.0,
    "sliding_window": None,
    "num_local_experts": 8,
    "num_experts_per_tok": 2,
}

NAMES = NameTable(
    (
        ("model.embed_tokens.weight", "embed_tokens.weight"),
        ("model.layers.{i}.input_layernorm.weight", "layers.{i}.input_norm.weight"),
        ("model.layers.{i}.self_attn.{qkvo}_proj.weight", "layers.{i}.attn.{qkvo}_proj.weight"),
        ("model.layers.{i}.post_attention_layernorm.weight", "layers.{i}.post_attention_norm.weight"),
        ("model.layers.{i}.block_sparse_moe.gate.weight", "layers.{i}.mlp.router.weight"),
        ("model.layers.{i}.block_sparse_moe.experts.{e}.w1.weight", "layers.{i}.mlp.experts.{e}.gate_proj.weight"),
        ("model.layers.{i}.block_sparse_moe.experts.{e}.w3.weight", "layers.{i}.mlp.experts.{e}.up_proj.weight"),
        ("model.layers.{i}.block_sparse_moe.experts.{e}.w2.weight", "layers.{i}.mlp.experts.{e}.down_proj.weight"),
        ("model.norm.weight", "norm.weight"),
    ) + HEAD_NAMES,
    fields=_moe.FIELDS,
    ignored=r"(?:model\.)?(?:layers\.\d+\.self_attn\.)?rotary_emb\.inv_freq",
)


def config(c) -> dict[str, Any]:
    llama_fields = llama.config(c)  # Llama's keys, and its refusal of partial rotary
    experts = _moe.num_experts(c, "num_local_experts", "num_experts")
    if experts == 0:
        raise c.error("`num_local_experts` must be a positive integer, got 0")
    moe = _moe.moe_settings(c, experts, "num_local_experts", "intermediate_size", normalize=True,
                            weights_in_float32=True)
    return {**llama_fields, "attention_bias": False, "mlp_bias": False, "ffn": FFNType.MOE, "moe": moe,
            "sliding_window": c.get("sliding_window")}


def to_hf_config(spec: ModelSpec) -> dict[str, Any]:
    """Mixtral's config.json for a spec; what it cannot hold (biases, shared experts, dense layers, ...) is found
    by `hf_config_from_spec` comparing the programs."""
    out = llama.to_hf_config(spec.model_copy(update={"attention_bias": False, "mlp_bias": False}))
    for key in ("attention_bias", "mlp_bias"):
        out.pop(key, None)
    m = spec.moe
    out.update(
        architectures=["MixtralForCausalLM"],
        model_type="mixtral",
        intermediate_size=m.intermediate_size if m is not None else spec.intermediate_size,
        num_local_experts=m.num_experts if m is not None else 1,
        sliding_window=spec.sliding_window,
        **_moe.moe_fields(spec),
    )
    out.pop("norm_topk_prob", None)  # Mixtral always renormalizes
    return out


PRESETS = (
    # mistralai/Mixtral-8x7B-v0.1
    llama.preset("mixtral-8x7b", family="mixtral", hidden_size=4096, intermediate_size=14336, num_layers=32,
                 num_heads=32, num_kv_heads=8, max_position_embeddings=32768, rope=RopeSpec(theta=1000000.0),
                 ffn=FFNType.MOE, moe=dict(num_experts=8, top_k=2, intermediate_size=14336, normalize=True,
                                           weights_in_float32=True)),
)

FAMILIES = (
    Family(
        "mixtral",
        architectures=("Mixtral",),
        config=config,
        model_types=("mixtral",),
        defaults=DEFAULTS,
        names=NAMES,
        layout=_moe.layout,
        tensor_markers=(
            r"(model\.)?layers\.\d+\.self_attn\.q_proj\.weight",
            r"(model\.)?layers\.\d+\.block_sparse_moe\.gate\.weight",
            r"(model\.)?layers\.\d+\.block_sparse_moe\.experts\.\d+\.w1\.weight",
        ),
        presets=PRESETS,
        hub_ids=((r"mistralai/Mixtral-8x7B(-Instruct)?-v0\.1", "mixtral-8x7b"),),
        to_hf_config=to_hf_config,
    ),
)
