"""BLOOM (`BloomForCausalLM`): ALiBi instead of rotary positions, a LayerNorm right after the word embeddings, pre-norm
LayerNorm blocks, biases on every projection, a dense tanh-GELU MLP four times the hidden size, and an LM head tied to
the embeddings.

The checkpoint stores Q, K and V as one `query_key_value` whose rows run per head (head 0's q, k, v, then head 1's,
...); a grouped split rule (`SplitParam(groups=heads)`) makes the three projections at load. The ALiBi slopes are
transformers' `_get_alibi_slopes` (any head count); BLOOM adds slope * key position, mlxc slope * (key - query
position), which the softmax cannot tell apart (see the `attention` op). BLOOM has no position limit; generation is
bounded by the training context (`seq_length`, 2048 unless the config says) like every family's, and `max_kv_size`
lifts the bound.
"""

from __future__ import annotations

from typing import Any

from ...ir.layout import LayoutRule, SplitParam
from ..spec import Activation, FFNType, ModelSpec, NormType, PositionEmbedding, Residual
from .base import HEAD_NAMES, Family, NameTable

# transformers' BloomConfig defaults, for keys a config.json leaves out
DEFAULTS: dict[str, Any] = {
    "vocab_size": 250880,
    "hidden_size": 64,
    "n_layer": 2,
    "n_head": 8,
    "layer_norm_epsilon": 1e-5,
    "bos_token_id": 1,
    "eos_token_id": 2,
    "pad_token_id": None,
    "apply_residual_connection_post_layernorm": False,
    "tie_word_embeddings": True,
}
CONTEXT = 2048  # BLOOM's training sequence length, when the config has no `seq_length`

NAMES = NameTable(
    (
        ("transformer.word_embeddings.weight", "embed_tokens.weight"),
        ("transformer.word_embeddings_layernorm.{kind}", "embed_norm.{kind}"),
        ("transformer.h.{i}.input_layernorm.{kind}", "layers.{i}.input_norm.{kind}"),
        ("transformer.h.{i}.self_attention.query_key_value.{kind}", "layers.{i}.attn.query_key_value.{kind}"),
        ("transformer.h.{i}.self_attention.dense.{kind}", "layers.{i}.attn.o_proj.{kind}"),
        ("transformer.h.{i}.post_attention_layernorm.{kind}", "layers.{i}.post_attention_norm.{kind}"),
        ("transformer.h.{i}.mlp.dense_h_to_4h.{kind}", "layers.{i}.mlp.up_proj.{kind}"),
        ("transformer.h.{i}.mlp.dense_4h_to_h.{kind}", "layers.{i}.mlp.down_proj.{kind}"),
        ("transformer.ln_f.{kind}", "norm.{kind}"),
    ) + HEAD_NAMES,
)


def layout(spec: ModelSpec) -> tuple[LayoutRule, ...]:
    """`query_key_value` rows per head: [heads, (q, k, v), head_dim] (BloomAttention._reshape's view)."""
    parts = ("q_proj", "k_proj", "v_proj")
    return tuple(SplitParam(f"query_key_value.{kind}", tuple(f"{p}.{kind}" for p in parts), groups=spec.num_heads)
                 for kind in ("weight", "bias"))


def _first(c, *keys: str) -> Any:
    """The first of `keys` the config holds (BloomConfig's aliases: n_embed, num_hidden_layers, ...), else the
    default of the last."""
    for key in keys:
        if key in c:
            return c.data[key]
    return c.get(keys[-1])


def config(c) -> dict[str, Any]:
    """The spec fields BloomConfig reads from a config.json."""
    if c.get("apply_residual_connection_post_layernorm"):
        raise c.error("apply_residual_connection_post_layernorm (the normalized input as the residual) is not "
                      "supported")
    hidden = _first(c, "n_embed", "hidden_size")
    heads = _first(c, "num_attention_heads", "n_head")
    if isinstance(hidden, int) and isinstance(heads, int) and heads > 0 and hidden % heads:
        raise c.error(f"hidden_size ({hidden}) is not divisible by n_head ({heads})")
    head = c.head()
    return dict(
        vocab_size=c.get("vocab_size"),
        hidden_size=hidden,
        intermediate_size=4 * hidden if isinstance(hidden, int) else hidden,
        num_layers=_first(c, "num_hidden_layers", "n_layer"),
        num_heads=heads,
        max_position_embeddings=c.data.get("seq_length") or CONTEXT,
        norm=NormType.LAYER,
        norm_eps=c.get("layer_norm_epsilon"),
        residual=Residual.PRE_NORM,
        ffn=FFNType.DENSE,
        activation=Activation.GELU_TANH,  # bloom_gelu_forward: the tanh approximation
        position=PositionEmbedding.ALIBI,
        embedding_norm=True,
        attention_bias=True,
        mlp_bias=True,
        tie_word_embeddings=bool(c.get("tie_word_embeddings")) and head.kind.value == "causal_lm",
        bos_token_id=c.get("bos_token_id"),
        eos_token_ids=c.eos_ids(),
        pad_token_id=c.get("pad_token_id"),
        head=head,
    )


def to_hf_config(spec: ModelSpec) -> dict[str, Any]:
    """BloomForCausalLM's config.json for a spec (the inverse of `config`)."""
    eos = list(spec.eos_token_ids)
    return {
        "architectures": ["BloomForCausalLM"],
        "model_type": "bloom",
        "vocab_size": spec.vocab_size,
        "hidden_size": spec.hidden_size,
        "n_layer": spec.num_layers,
        "n_head": spec.num_heads,
        "seq_length": spec.max_position_embeddings,
        "layer_norm_epsilon": spec.norm_eps,
        "apply_residual_connection_post_layernorm": False,
        "tie_word_embeddings": spec.tie_word_embeddings,
        "bos_token_id": spec.bos_token_id,
        "eos_token_id": eos[0] if len(eos) == 1 else (eos or None),
        "pad_token_id": spec.pad_token_id,
    }


PRESETS = (
    # bigscience/bloom-560m
    ModelSpec(name="bloom-560m", family="bloom", vocab_size=250880, hidden_size=1024, intermediate_size=4096,
              num_layers=24, num_heads=16, max_position_embeddings=CONTEXT, norm=NormType.LAYER, norm_eps=1e-5,
              ffn=FFNType.DENSE, activation=Activation.GELU_TANH, position=PositionEmbedding.ALIBI, embedding_norm=True,
              attention_bias=True, mlp_bias=True, tie_word_embeddings=True, bos_token_id=1, eos_token_ids=(2,),
              pad_token_id=3),
)

FAMILIES = (
    Family(
        "bloom",
        architectures=("Bloom",),
        config=config,
        model_types=("bloom",),
        defaults=DEFAULTS,
        names=NAMES,
        layout=layout,
        tensor_markers=(
            r"transformer\.h\.\d+\.self_attention\.query_key_value\.weight",
            r"transformer\.word_embeddings_layernorm\.weight",
        ),
        presets=PRESETS,
        hub_ids=((r"bigscience/bloom-560m", "bloom-560m"),),
        to_hf_config=to_hf_config,
    ),
)
