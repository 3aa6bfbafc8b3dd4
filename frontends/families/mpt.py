"""MPT (`MptForCausalLM`, MosaicML): ALiBi positions with MPT's slopes (`AlibiSpec(slopes="mpt")`), pre-norm
LayerNorms without biases, no biases anywhere, Q/K/V fused as one `Wqkv` (q, k, v in turn: a plain split at load),
an exact-GELU MLP four times the hidden size, optional clamping of q, k and v (`attn_config.clip_qkv`) and an LM
head tied to the embeddings. The attention settings live in the nested `attn_config`.

mlxc builds what transformers' MptForCausalLM builds. Where transformers ignores a setting that would make the
checkpoint mean something else (no ALiBi, an `alibi_bias_max` other than 8, query/key LayerNorms, multi-query
attention, a prefix LM, biases, another MLP ratio, a logit scale), the config is refused by name rather than read as
something it is not; a spec may still set MPT slopes with any `bias_max`. MPT's alibi bias
is measured from the last key, mlxc's from the query: the same softmax (see the `attention` op). transformers
cannot run past `max_seq_len` (its bias table's length), so that is the model's context.
"""

from __future__ import annotations

from typing import Any

from ...ir.layout import LayoutRule, SplitParam
from ..spec import Activation, AlibiSpec, FFNType, ModelSpec, NormType, PositionEmbedding, Residual
from .base import HEAD_NAMES, Family, NameTable

# transformers' MptConfig defaults, for keys a config.json leaves out
DEFAULTS: dict[str, Any] = {
    "d_model": 2048,
    "n_heads": 16,
    "n_layers": 24,
    "expansion_ratio": 4,
    "max_seq_len": 2048,
    "vocab_size": 50368,
    "layer_norm_epsilon": 1e-5,
    "no_bias": True,
    "logit_scale": None,
    "tie_word_embeddings": True,
    "bos_token_id": None,
    "eos_token_id": None,
    "pad_token_id": None,
}
# MptAttentionConfig's defaults
ATTN_DEFAULTS: dict[str, Any] = {
    "attn_type": "multihead_attention",
    "clip_qkv": None,
    "softmax_scale": None,
    "prefix_lm": False,
    "qk_ln": False,
    "alibi": True,
    "alibi_bias_max": 8,
}

NAMES = NameTable(
    (
        ("transformer.wte.weight", "embed_tokens.weight"),
        ("transformer.blocks.{i}.norm_1.weight", "layers.{i}.input_norm.weight"),
        ("transformer.blocks.{i}.attn.Wqkv.weight", "layers.{i}.attn.Wqkv.weight"),
        ("transformer.blocks.{i}.attn.out_proj.weight", "layers.{i}.attn.o_proj.weight"),
        ("transformer.blocks.{i}.norm_2.weight", "layers.{i}.post_attention_norm.weight"),
        ("transformer.blocks.{i}.ffn.{mlp}_proj.weight", "layers.{i}.mlp.{mlp}_proj.weight"),
        ("transformer.norm_f.weight", "norm.weight"),
    ) + HEAD_NAMES,
    fields={"mlp": "up|down"},
)


def layout(spec: ModelSpec) -> tuple[LayoutRule, ...]:
    """`Wqkv`: the q, k and v rows one after another (MptAttention's `chunk(3)`)."""
    return (SplitParam("Wqkv.weight", ("q_proj.weight", "k_proj.weight", "v_proj.weight")),)


# settings transformers' MPT does not implement, with the value it assumes
# (MptModel builds its bias with the default alibi_bias_max, 8, whatever the config says)
_UNSUPPORTED_ATTN = {"alibi": True, "qk_ln": False, "attn_type": "multihead_attention", "prefix_lm": False,
                     "alibi_bias_max": 8}


def config(c) -> dict[str, Any]:
    """The spec fields MptConfig reads from a config.json, its nested `attn_config` included."""
    attn = c.get("attn_config") or {}
    if not isinstance(attn, dict):
        raise c.error(f"`attn_config` must be an object, got {attn!r}")
    attn = {**ATTN_DEFAULTS, **attn}
    for key, assumed in _UNSUPPORTED_ATTN.items():
        if attn[key] != assumed:
            raise c.error(f"`attn_config.{key}: {attn[key]!r}` is not supported (transformers' MPT implements "
                          f"{key} {assumed!r} only)")
    if c.get("no_bias") is False:
        raise c.error("`no_bias: false` (biased projections) is not supported: transformers' MPT has no biases")
    if c.get("expansion_ratio") != 4:
        raise c.error(f"`expansion_ratio: {c.get('expansion_ratio')}` is not supported: transformers' MPT MLP is 4x")
    if c.get("logit_scale") is not None:
        raise c.error("`logit_scale` is not supported (transformers' MPT does not scale its logits)")
    hidden, heads = c.get("d_model"), c.get("n_heads")
    if isinstance(hidden, int) and isinstance(heads, int) and heads > 0 and hidden % heads:
        raise c.error(f"d_model ({hidden}) is not divisible by n_heads ({heads})")
    head = c.head()
    return dict(
        vocab_size=c.get("vocab_size"),
        hidden_size=hidden,
        intermediate_size=4 * hidden if isinstance(hidden, int) else hidden,
        num_layers=c.get("n_layers"),
        num_heads=heads,
        max_position_embeddings=c.get("max_seq_len"),
        norm=NormType.LAYER,
        norm_bias=False,
        norm_eps=c.get("layer_norm_epsilon"),
        residual=Residual.PRE_NORM,
        ffn=FFNType.DENSE,
        activation=Activation.GELU,
        position=PositionEmbedding.ALIBI,
        alibi=AlibiSpec(slopes="mpt", bias_max=attn["alibi_bias_max"]),
        query_scale=attn["softmax_scale"],
        clip_qkv=attn["clip_qkv"] or None,  # transformers: a falsy clip_qkv does not clip
        tie_word_embeddings=bool(c.get("tie_word_embeddings")) and head.kind.value == "causal_lm",
        bos_token_id=c.get("bos_token_id"),
        eos_token_ids=c.eos_ids(),
        pad_token_id=c.get("pad_token_id"),
        head=head,
    )


def _number(x: float) -> float | int:
    """MptAttentionConfig types alibi_bias_max as an int."""
    return int(x) if float(x).is_integer() else x


def to_hf_config(spec: ModelSpec) -> dict[str, Any]:
    """MptForCausalLM's config.json for a spec (the inverse of `config`)."""
    eos = list(spec.eos_token_ids)
    alibi = spec.alibi or AlibiSpec(slopes="mpt")
    return {
        "architectures": ["MptForCausalLM"],
        "model_type": "mpt",
        "vocab_size": spec.vocab_size,
        "d_model": spec.hidden_size,
        "n_layers": spec.num_layers,
        "n_heads": spec.num_heads,
        "expansion_ratio": 4,
        "max_seq_len": spec.max_position_embeddings,
        "layer_norm_epsilon": spec.norm_eps,
        "no_bias": True,
        "attn_config": {"alibi": True, "alibi_bias_max": _number(alibi.bias_max), "clip_qkv": spec.clip_qkv,
                        "softmax_scale": spec.query_scale},
        "tie_word_embeddings": spec.tie_word_embeddings,
        "bos_token_id": spec.bos_token_id,
        "eos_token_id": eos[0] if len(eos) == 1 else (eos or None),
        "pad_token_id": spec.pad_token_id,
    }


PRESETS = (
    # mosaicml/mpt-7b
    ModelSpec(name="mpt-7b", family="mpt", vocab_size=50432, hidden_size=4096, intermediate_size=16384,
              num_layers=32, num_heads=32, max_position_embeddings=2048, norm=NormType.LAYER, norm_bias=False,
              norm_eps=1e-5, ffn=FFNType.DENSE, activation=Activation.GELU, position=PositionEmbedding.ALIBI,
              alibi=AlibiSpec(slopes="mpt", bias_max=8), tie_word_embeddings=True),
)

FAMILIES = (
    Family(
        "mpt",
        architectures=("Mpt",),
        config=config,
        model_types=("mpt",),
        defaults=DEFAULTS,
        names=NAMES,
        layout=layout,
        tensor_markers=(
            r"transformer\.blocks\.\d+\.attn\.Wqkv\.weight",
            r"transformer\.blocks\.\d+\.norm_1\.weight",
        ),
        presets=PRESETS,
        hub_ids=((r"mosaicml/mpt-7b", "mpt-7b"),),
        to_hf_config=to_hf_config,
    ),
)
