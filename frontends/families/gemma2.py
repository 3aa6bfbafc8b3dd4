"""Gemma 2 (google/gemma-2-2b, 9b, 27b): Gemma's (1 + w) norms, tanh-GELU GeGLU and scaled embeddings, plus
- four norms per block ("sandwich": the attention and MLP outputs are normed before they join the residual),
- sliding-window layers alternating with global ones (`layer_types`; by default even layers slide),
- soft-capped attention scores and final logits (cap * tanh(x / cap)),
- queries scaled by `query_pre_attn_scalar ** -0.5` rather than head_dim's (the 27B model differs).
"""

from __future__ import annotations

from typing import Any

from ..gguf import COMMON_TENSORS, GGUFArch, GGUFMetadata, tensor_rules
from ..spec import AttentionType, LayerSpec, ModelSpec, Residual
from . import gemma
from .base import Family

# transformers' Gemma2Config defaults, for keys a config.json leaves out
DEFAULTS: dict[str, Any] = {
    **gemma.DEFAULTS,
    "num_key_value_heads": 4,
    "hidden_activation": "gelu_pytorch_tanh",
    "query_pre_attn_scalar": 256,
    "sliding_window": 4096,
    "layer_types": None,
    "final_logit_softcapping": 30.0,
    "attn_logit_softcapping": 50.0,
}

LAYER_TYPES = {"sliding_attention": AttentionType.SLIDING_WINDOW, "full_attention": AttentionType.FULL,
               "attention": AttentionType.FULL}  # "attention": transformers' legacy name for full attention


def layer_kinds(c, default) -> list[AttentionType]:
    """Each layer's attention from `layer_types` (transformers' names), or `default(i)` when the config has none."""
    n = c.need("num_hidden_layers")
    types = c.get("layer_types")
    if types is None:
        return [default(i) for i in range(n)]
    if not isinstance(types, list) or len(types) != n or any(t not in LAYER_TYPES for t in types):
        raise c.error(f"`layer_types` must list one of {sorted(LAYER_TYPES)} for each of the {n} layers, "
                      f"got {types!r}")
    return [LAYER_TYPES[t] for t in types]


def window(c, kinds: list[AttentionType]) -> Any:
    size = c.get("sliding_window")
    if AttentionType.SLIDING_WINDOW in kinds and size is None:
        raise c.error("`layer_types` has sliding_attention layers but `sliding_window` is null")
    return size


def softcap(c, key: str) -> Any:
    return None if c.get(key) is None else gemma.positive(c, key)


def sandwich_fields(c) -> dict[str, Any]:
    """What Gemma 2 and 3 read alike: the block shape, the query scale, both soft-caps, the tanh-GELU MLP."""
    gemma.refuse_unsupported(c)
    act = c.activation("hidden_activation")  # Gemma 2/3's MLP reads `hidden_activation`, not `hidden_act`
    return dict(residual=Residual.SANDWICH, norm_unit_offset=True, activation=act, partial_rotary_factor=1.0,
                query_scale=gemma.positive(c, "query_pre_attn_scalar") ** -0.5,
                attn_logit_softcap=softcap(c, "attn_logit_softcapping"),
                final_logit_softcap=softcap(c, "final_logit_softcapping"),
                attention_bias=bool(c.get("attention_bias")))


def common(c, **overrides: Any) -> dict[str, Any]:
    """The shared reader's fields with `overrides` in the config first (keys it reads that Gemma 2/3 read
    elsewhere or differently)."""
    from ..hf import HFConfig

    return HFConfig({**c.data, **overrides}, c.family, c.where).common()


def config(c) -> dict[str, Any]:
    sandwich = sandwich_fields(c)
    kinds = layer_kinds(c, lambda i: AttentionType.SLIDING_WINDOW if i % 2 == 0 else AttentionType.FULL)
    fields = common(c, hidden_act=c.get("hidden_activation"))
    return {**fields, **sandwich, "embedding_multiplier": fields["hidden_size"] ** 0.5,
            "sliding_window": window(c, kinds), "layers": tuple(LayerSpec(attention=k) for k in kinds)}


# ------------------------------------------------------------------------------------------------ config writer


def query_pre_attn_scalar(spec: ModelSpec) -> Any:
    """The inverse of `query_scale = query_pre_attn_scalar ** -0.5`, an int when it is one (the config field is)."""
    scale = spec.query_scale if spec.query_scale is not None else spec.dim_per_head**-0.5
    value = scale**-2
    return round(value) if abs(value - round(value)) <= 1e-9 * value else value


def layer_types(spec: ModelSpec) -> list[str]:
    return ["sliding_attention" if layer.attention == AttentionType.SLIDING_WINDOW else "full_attention"
            for layer in spec.layers]


def sandwich_hf_fields(spec: ModelSpec) -> dict[str, Any]:
    act = gemma.hf_fields(spec)["hidden_act"]
    return {**gemma.hf_fields(spec), "hidden_activation": act, "query_pre_attn_scalar": query_pre_attn_scalar(spec),
            "sliding_window": spec.sliding_window, "layer_types": layer_types(spec),
            "attn_logit_softcapping": spec.attn_logit_softcap, "final_logit_softcapping": spec.final_logit_softcap}


def to_hf_config(spec: ModelSpec) -> dict[str, Any]:
    return {"architectures": ["Gemma2ForCausalLM"], "model_type": "gemma2", **sandwich_hf_fields(spec),
            **gemma.rope_keys(spec, spec.rope)}


# ------------------------------------------------------------------------------------------------------ GGUF

NORMS = gemma.NORMS + ("attn_out_norm", "ffn_out_norm")

# llama.cpp's names for the two norms on the block's outputs (its `ffn_norm` is the one before the MLP, as in Llama)
SANDWICH_TENSORS = (
    (r"blk\.(\d+)\.post_attention_norm\.weight", r"layers.\1.attn_out_norm.weight"),
    (r"blk\.(\d+)\.post_ffw_norm\.weight", r"layers.\1.ffn_out_norm.weight"),
)


def llama_cpp_query_scale(md: GGUFMetadata, common: dict[str, Any], big_layers: int) -> float:
    """llama.cpp does not store query_pre_attn_scalar: it takes hidden / heads for the 27B model (recognised by its
    layer count) and head_dim for every other size, as gemma_pytorch's configs do."""
    if md.get("block_count") == big_layers:
        return (common["hidden_size"] // common["num_heads"]) ** -0.5
    return (common["head_dim"] or common["hidden_size"] // common["num_heads"]) ** -0.5


def swa_kinds(n: int, pattern: int) -> list[AttentionType]:
    """llama.cpp's sliding-window layout (`set_swa_pattern`): layer i slides unless i % pattern == pattern - 1. The
    pattern is fixed per architecture (2 for gemma2, 6 for gemma3); the file stores none."""
    return [AttentionType.SLIDING_WINDOW if i % pattern < pattern - 1 else AttentionType.FULL for i in range(n)]


def gguf_fields(md: GGUFMetadata, common: dict[str, Any]) -> dict[str, Any]:
    """llama.cpp's gemma2 graph: windows on even layers (4096 unless stored), soft-caps 50 and 30 unless stored."""
    kinds = swa_kinds(common["num_layers"], 2)
    return {**gemma.gemma_fields(common["hidden_size"]), "residual": Residual.SANDWICH,
            "sliding_window": md.get("attention.sliding_window", 4096),
            "layers": tuple(LayerSpec(attention=k) for k in kinds),
            "attn_logit_softcap": md.get("attn_logit_softcapping", 50.0),
            "final_logit_softcap": md.get("final_logit_softcapping", 30.0),
            "query_scale": llama_cpp_query_scale(md, common, big_layers=46)}


# ------------------------------------------------------------------------------------------------------ presets


def preset(name: str, **fields: Any) -> ModelSpec:
    """Gemma 2's published settings: Gemma's vocabulary and conventions, sandwich blocks, a 4096-token window on
    even layers, soft-caps 50 (attention) and 30 (logits), GQA with head_dim 256 unless given."""
    n = fields["num_layers"]
    base: dict[str, Any] = dict(
        family="gemma2", head_dim=256, residual=Residual.SANDWICH, sliding_window=4096,
        layers=tuple(LayerSpec(attention=AttentionType.SLIDING_WINDOW if i % 2 == 0 else AttentionType.FULL)
                     for i in range(n)),
        attn_logit_softcap=50.0, final_logit_softcap=30.0)
    return gemma.preset(name, **{**base, **fields})


PRESETS = (
    # google/gemma-2-2b
    preset("gemma2-2b", hidden_size=2304, intermediate_size=9216, num_layers=26, num_heads=8, num_kv_heads=4,
           query_scale=256**-0.5),
    # google/gemma-2-9b
    preset("gemma2-9b", hidden_size=3584, intermediate_size=14336, num_layers=42, num_heads=16, num_kv_heads=8,
           query_scale=256**-0.5),
    # google/gemma-2-27b: head_dim 128, queries scaled by (hidden / heads) = 144 ** -0.5
    preset("gemma2-27b", hidden_size=4608, intermediate_size=36864, num_layers=46, num_heads=32, num_kv_heads=16,
           head_dim=128, query_scale=144**-0.5),
)

FAMILIES = (
    Family(
        "gemma2",
        architectures=("Gemma2",),
        config=config,
        model_types=("gemma2",),
        defaults=DEFAULTS,
        names=gemma.SANDWICH_NAMES,
        tensor_markers=(
            r"(model\.)?layers\.\d+\.self_attn\.q_proj\.weight",
            r"(model\.)?layers\.\d+\.pre_feedforward_layernorm\.weight",
            r"(model\.)?layers\.\d+\.post_feedforward_layernorm\.weight",
        ),
        gguf=GGUFArch("gemma2", "gemma2", tensor_rules(*COMMON_TENSORS, *SANDWICH_TENSORS), spec_fields=gguf_fields,
                      layout=gemma.norm_layout(NORMS)),
        presets=PRESETS,
        hub_ids=((r"google/gemma-2-(2b|9b|27b)(-it)?", r"gemma2-\1"),),
        to_hf_config=to_hf_config,
    ),
)
