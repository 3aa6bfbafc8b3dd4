"""Llama (Llama 2, 3, 3.1, 3.2, Code Llama, TinyLlama, SmolLM2): the reference decoder — pre-norm RMSNorm blocks,
rotary attention with grouped KV heads, SwiGLU MLPs. Its checkpoint names are the table other families start from.
"""

from __future__ import annotations

from typing import Any

from ...ir.attrs import RopeKind
from ...ir.errors import MlxcError
from ..gguf import COMMON_TENSORS, GGUFArch, tensor_rules
from ..spec import AttentionType, ModelSpec, RopeSpec
from .base import HEAD_NAMES, Family, NameTable

# transformers' LlamaConfig defaults, for keys a config.json leaves out
DEFAULTS: dict[str, Any] = {
    "num_key_value_heads": None,  # None: as many as attention heads
    "head_dim": None,  # None: hidden_size // num_attention_heads
    "hidden_act": "silu",
    "max_position_embeddings": 2048,
    "rms_norm_eps": 1e-6,
    "bos_token_id": 1,
    "eos_token_id": 2,
    "pad_token_id": None,
    "tie_word_embeddings": False,
    "attention_bias": False,
    "mlp_bias": False,
    "sliding_window": None,
    "rope_theta": 10000.0,
}

# (Hugging Face name, IR name); `model.` is optional on the checkpoint side (a bare LlamaModel has none).
NAMES = NameTable(
    (
        ("model.embed_tokens.weight", "embed_tokens.weight"),
        ("model.layers.{i}.input_layernorm.weight", "layers.{i}.input_norm.weight"),
        ("model.layers.{i}.self_attn.{qkvo}_proj.{kind}", "layers.{i}.attn.{qkvo}_proj.{kind}"),
        ("model.layers.{i}.post_attention_layernorm.weight", "layers.{i}.post_attention_norm.weight"),
        ("model.layers.{i}.mlp.{mlp}_proj.{kind}", "layers.{i}.mlp.{mlp}_proj.{kind}"),
        ("model.norm.weight", "norm.weight"),
    ) + HEAD_NAMES,
    # rotary tables are recomputed from the config; old checkpoints stored them
    ignored=r"(?:model\.)?(?:layers\.\d+\.self_attn\.)?rotary_emb\.inv_freq",
)


def config(c) -> dict[str, Any]:
    partial = c.get("partial_rotary_factor", 1.0)
    if partial not in (None, 1, 1.0):  # Llama's modeling code rotates whole heads
        raise c.error(f"partial_rotary_factor={partial} is not supported (rotary must cover head_dim)")
    return {**c.common(), "partial_rotary_factor": 1.0, "attention_bias": bool(c.get("attention_bias")),
            "mlp_bias": bool(c.get("mlp_bias"))}


def to_hf_config(spec: ModelSpec) -> dict[str, Any]:
    """Llama's config.json for a spec (Mistral's when every layer uses one sliding window and there are no biases)."""
    from ..hf import HF_ACTIVATION, rope_parameters

    windowed = [layer.attention == AttentionType.SLIDING_WINDOW for layer in spec.layers]
    mistral = any(windowed)
    if mistral and (spec.attention_bias or spec.mlp_bias):
        raise MlxcError(f"model {spec.name!r} has no Hugging Face equivalent: sliding-window attention together with "
                        "biases (Mistral has no biases)")
    rope = rope_parameters(spec)
    eos = list(spec.eos_token_ids)
    out: dict[str, Any] = {
        "architectures": ["MistralForCausalLM" if mistral else "LlamaForCausalLM"],
        "model_type": "mistral" if mistral else "llama",
        "vocab_size": spec.vocab_size,
        "hidden_size": spec.hidden_size,
        "intermediate_size": spec.intermediate_size,
        "num_hidden_layers": spec.num_layers,
        "num_attention_heads": spec.num_heads,
        "num_key_value_heads": spec.kv_heads,
        "head_dim": spec.dim_per_head,
        "hidden_act": HF_ACTIVATION[spec.activation],
        "max_position_embeddings": spec.max_position_embeddings,
        "rms_norm_eps": spec.norm_eps,
        "tie_word_embeddings": spec.tie_word_embeddings,
        "bos_token_id": spec.bos_token_id,
        "eos_token_id": eos[0] if len(eos) == 1 else (eos or None),
        "pad_token_id": spec.pad_token_id,
        # transformers 5 reads rope_parameters; transformers 4 and mlx-lm read rope_theta and rope_scaling
        "rope_parameters": rope,
        "rope_theta": spec.rope.theta,
        "rope_scaling": None if spec.rope.kind == RopeKind.DEFAULT else {k: v for k, v in rope.items()
                                                                         if k != "rope_theta"},
    }
    if mistral:
        out["sliding_window"] = spec.sliding_window
    else:
        out.update(attention_bias=spec.attention_bias, mlp_bias=spec.mlp_bias)
    return out


# ------------------------------------------------------------------------------------------------------ presets

_LLAMA3_BOS, _LLAMA3_EOS = 128000, 128001  # <|begin_of_text|>, <|end_of_text|> (base models)


def _llama3_rope(factor: float) -> RopeSpec:
    """Llama 3.1 / 3.2 frequency scaling, as in their `rope_scaling` blocks."""
    return RopeSpec(theta=500000.0, kind=RopeKind.LLAMA3, factor=factor, low_freq_factor=1.0, high_freq_factor=4.0,
                    original_max_position_embeddings=8192)


def preset(name: str, **fields: Any) -> ModelSpec:
    """Llama-2-style defaults (32k vocab, bos 1 / eos 2, eps 1e-5), overridden per model."""
    base: dict[str, Any] = dict(vocab_size=32000, norm_eps=1e-5, bos_token_id=1, eos_token_ids=(2,))
    return ModelSpec(name=name, **{**base, **fields})


def _llama3(name: str, **fields: Any) -> ModelSpec:
    base: dict[str, Any] = dict(vocab_size=128256, max_position_embeddings=8192, rope=RopeSpec(theta=500000.0),
                                bos_token_id=_LLAMA3_BOS, eos_token_ids=(_LLAMA3_EOS,))
    return preset(name, **{**base, **fields})


def _smollm2(name: str, **fields: Any) -> ModelSpec:
    """SmolLM2 base models: 49152-token vocab, 8k context, tied embeddings, <|endoftext|> (0) as bos and eos."""
    base: dict[str, Any] = dict(vocab_size=49152, max_position_embeddings=8192, tie_word_embeddings=True,
                                bos_token_id=0, eos_token_ids=(0,))
    return preset(name, **{**base, **fields})


PRESETS = (
    preset("tiny", vocab_size=256, hidden_size=64, intermediate_size=128, num_layers=2, num_heads=4, num_kv_heads=2,
           max_position_embeddings=256),
    # meta-llama/Llama-2-{7,13,70}b-hf
    preset("llama2-7b", hidden_size=4096, intermediate_size=11008, num_layers=32, num_heads=32,
           max_position_embeddings=4096),
    preset("llama2-13b", hidden_size=5120, intermediate_size=13824, num_layers=40, num_heads=40,
           max_position_embeddings=4096),
    preset("llama2-70b", hidden_size=8192, intermediate_size=28672, num_layers=80, num_heads=64, num_kv_heads=8,
           max_position_embeddings=4096),
    # meta-llama/Meta-Llama-3-{8,70}B
    _llama3("llama3-8b", hidden_size=4096, intermediate_size=14336, num_layers=32, num_heads=32, num_kv_heads=8),
    _llama3("llama3-70b", hidden_size=8192, intermediate_size=28672, num_layers=80, num_heads=64, num_kv_heads=8),
    # meta-llama/Llama-3.1-8B
    _llama3("llama3.1-8b", hidden_size=4096, intermediate_size=14336, num_layers=32, num_heads=32, num_kv_heads=8,
            max_position_embeddings=131072, rope=_llama3_rope(8.0)),
    # meta-llama/Llama-3.2-{1,3}B
    _llama3("llama3.2-1b", hidden_size=2048, intermediate_size=8192, num_layers=16, num_heads=32, num_kv_heads=8,
            head_dim=64, max_position_embeddings=131072, rope=_llama3_rope(32.0), tie_word_embeddings=True),
    _llama3("llama3.2-3b", hidden_size=3072, intermediate_size=8192, num_layers=28, num_heads=24, num_kv_heads=8,
            head_dim=128, max_position_embeddings=131072, rope=_llama3_rope(32.0), tie_word_embeddings=True),
    # codellama/CodeLlama-7b-hf: Llama 2 7B with 16 infilling tokens and a 1e6 rope base
    preset("codellama-7b", vocab_size=32016, hidden_size=4096, intermediate_size=11008, num_layers=32, num_heads=32,
           max_position_embeddings=16384, rope=RopeSpec(theta=1000000.0)),
    # TinyLlama/TinyLlama-1.1B-Chat-v1.0
    preset("tinyllama-1.1b", hidden_size=2048, intermediate_size=5632, num_layers=22, num_heads=32, num_kv_heads=4,
           max_position_embeddings=2048),
    # HuggingFaceTB/SmolLM2-{135M,360M,1.7B}
    _smollm2("smollm2-135m", hidden_size=576, intermediate_size=1536, num_layers=30, num_heads=9, num_kv_heads=3,
             rope=RopeSpec(theta=100000.0)),
    _smollm2("smollm2-360m", hidden_size=960, intermediate_size=2560, num_layers=32, num_heads=15, num_kv_heads=5,
             rope=RopeSpec(theta=100000.0)),
    _smollm2("smollm2-1.7b", hidden_size=2048, intermediate_size=8192, num_layers=24, num_heads=32, num_kv_heads=32,
             rope=RopeSpec(theta=130000.0)),
)

FAMILIES = (
    Family(
        "llama",
        architectures=("Llama",),
        config=config,
        model_types=("llama",),
        defaults=DEFAULTS,
        names=NAMES,
        tensor_markers=(
            r"(model\.)?layers\.\d+\.self_attn\.q_proj\.weight",
            r"(model\.)?layers\.\d+\.mlp\.gate_proj\.weight",
            r"(model\.)?layers\.\d+\.input_layernorm\.weight",
        ),
        gguf=GGUFArch("llama", "llama", tensor_rules(*COMMON_TENSORS), permute_qk=True),
        presets=PRESETS,
        hub_ids=(
            (r"meta-llama/Llama-2-(7|13|70)b(-chat)?(-hf)?", r"llama2-\1b"),
            (r"meta-llama/(Meta-)?Llama-3-(8|70)B(-Instruct)?", r"llama3-\2b"),
            (r"meta-llama/(Meta-)?Llama-3\.1-8B(-Instruct)?", "llama3.1-8b"),
            (r"meta-llama/Llama-3\.2-(1|3)B(-Instruct)?", r"llama3.2-\1b"),
            (r"codellama/CodeLlama-7b(-Instruct|-Python)?-hf", "codellama-7b"),
            (r"TinyLlama/TinyLlama-1\.1B-Chat-v1\.0", "tinyllama-1.1b"),
            (r"HuggingFaceTB/SmolLM2-(135M|360M|1\.7B)(-Instruct)?", "smollm2-\\1"),
        ),
        to_hf_config=to_hf_config,
    ),
)
