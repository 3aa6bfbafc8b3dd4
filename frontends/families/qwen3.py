"""Qwen3: Qwen2's blocks with an RMSNorm over each head's features on queries and keys (before rope), an explicit
head_dim (transformers' default is 128, not hidden_size // heads), and `attention_bias` switching the biases of all
four attention projections together (off in every published model). Windows are read as Qwen2 reads them.
"""

from __future__ import annotations

from typing import Any

from ..gguf import COMMON_TENSORS, GGUFArch, GGUFMetadata, tensor_rules
from ..spec import ModelSpec, RopeSpec
from . import llama, qwen2
from .base import Family, NameTable

# transformers' Qwen3Config defaults, for keys a config.json leaves out
DEFAULTS: dict[str, Any] = {**qwen2.DEFAULTS, "head_dim": 128, "attention_bias": False}

# Qwen2's names with the per-head norms, and a bias on the output projection too (`attention_bias` sets all four)
NAMES = NameTable(
    tuple(row for row in qwen2.NAMES.rows if row[0] != "model.layers.{i}.self_attn.o_proj.weight") + (
        ("model.layers.{i}.self_attn.o_proj.{kind}", "layers.{i}.attn.o_proj.{kind}"),
        ("model.layers.{i}.self_attn.{qk}_norm.weight", "layers.{i}.attn.{qk}_norm.weight"),
    ),
    fields={"qkv": "[qkv]", "qk": "[qk]"},
    ignored=r"(?:model\.)?(?:layers\.\d+\.self_attn\.)?rotary_emb\.inv_freq",  # recomputed from the config
)


def config(c) -> dict[str, Any]:
    bias = bool(c.get("attention_bias"))
    return {**qwen2.rotary(c), **qwen2.windows(c), "qk_norm": True, "attention_bias": bias,
            "attention_out_bias": bias, "mlp_bias": False}


def to_hf_config(spec: ModelSpec) -> dict[str, Any]:
    return {"architectures": ["Qwen3ForCausalLM"], "model_type": "qwen3", **qwen2.hf_fields(spec),
            "head_dim": spec.dim_per_head, "attention_bias": spec.attention_bias}


def _gguf_fields(md: GGUFMetadata, common: dict[str, Any]) -> dict[str, Any]:
    """Every qwen3 layer has Q/K norms (llama.cpp requires them); a file without them is not a Qwen3 model."""
    if not md.has_tensor(r"blk\.\d+\.attn_q_norm\.weight") or not md.has_tensor(r"blk\.\d+\.attn_k_norm\.weight"):
        raise md.error("a qwen3 file needs blk.N.attn_q_norm and blk.N.attn_k_norm tensors; this one has none")
    return {"qk_norm": True}


# ------------------------------------------------------------------------------------------------------ presets


def preset(name: str, **fields: Any) -> ModelSpec:
    """Qwen3 (post-trained, hybrid thinking) defaults: 151936-token vocabulary, head_dim 128, 40k context, rope base
    1e6, eps 1e-6, no biases, eos <|im_end|> (151645)."""
    base: dict[str, Any] = dict(family="qwen3", vocab_size=151936, head_dim=128, max_position_embeddings=40960,
                                norm_eps=1e-6, rope=RopeSpec(theta=1000000.0), qk_norm=True, bos_token_id=151643,
                                eos_token_ids=(151645,))
    return ModelSpec(name=name, **{**base, **fields})


PRESETS = (
    # Qwen/Qwen3-{0.6B,1.7B,4B,8B}
    preset("qwen3-0.6b", hidden_size=1024, intermediate_size=3072, num_layers=28, num_heads=16, num_kv_heads=8,
           tie_word_embeddings=True),
    preset("qwen3-1.7b", hidden_size=2048, intermediate_size=6144, num_layers=28, num_heads=16, num_kv_heads=8,
           tie_word_embeddings=True),
    preset("qwen3-4b", hidden_size=2560, intermediate_size=9728, num_layers=36, num_heads=32, num_kv_heads=8,
           tie_word_embeddings=True),
    preset("qwen3-8b", hidden_size=4096, intermediate_size=12288, num_layers=36, num_heads=32, num_kv_heads=8),
)

FAMILIES = (
    Family(
        "qwen3",
        architectures=("Qwen3",),
        config=config,
        model_types=("qwen3",),
        defaults=DEFAULTS,
        names=NAMES,
        # the per-head norms are what a Qwen3 checkpoint has beyond Llama's tensors
        tensor_markers=llama.FAMILIES[0].tensor_markers + (
            r"(model\.)?layers\.\d+\.self_attn\.q_norm\.weight",
            r"(model\.)?layers\.\d+\.self_attn\.k_norm\.weight",
        ),
        # llama.cpp's qwen3 rotates halves (NeoX order): Q/K rows stay as Hugging Face has them
        gguf=GGUFArch("qwen3", "qwen3", tensor_rules(
            *COMMON_TENSORS,
            (r"blk\.(\d+)\.attn_q_norm\.weight", r"layers.\1.attn.q_norm.weight"),
            (r"blk\.(\d+)\.attn_k_norm\.weight", r"layers.\1.attn.k_norm.weight"),
        ), permute_qk=False, spec_fields=_gguf_fields),
        presets=PRESETS,
        hub_ids=((r"Qwen/Qwen3-(0\.6|1\.7|4|8)B(-Base)?", r"qwen3-\1b"),),
        to_hf_config=to_hf_config,
    ),
)
