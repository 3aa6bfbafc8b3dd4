"""Presets: every preset against transformers' own model for the same config, published sizes, and name lookup.

The reference for sizes is transformers: each preset's fields become a transformers config, the model is built on
the meta device (no memory) and its parameters are counted and their shapes compared with the parameters mlxc's
lowering of the preset declares. The published checkpoints' parameter counts are a second, outside reference.
"""

from __future__ import annotations

from math import prod

import pytest

import mlxc
from mlxc.frontends.hf import hf_to_ir_name
from mlxc.frontends.presets import PRESETS as ALL_PRESETS, get_preset
from mlxc.frontends.spec import AttentionType, ModelSpec
from mlxc.ir.attrs import RopeKind
from mlxc.ir.errors import MlxcError
from parity import meta_models as build_meta_models

# The Llama-family presets (Llama, Mistral, SmolLM2, ...); other families test their presets in their own files.
PRESETS = {name: spec for name, spec in ALL_PRESETS.items() if spec.family in ("llama", "mistral")}

# Parameter counts of the published checkpoints (sum of tensor sizes in their safetensors; a tied LM head once).
PUBLISHED = {
    "llama2-7b": 6_738_415_616,
    "llama2-13b": 13_015_864_320,
    "llama2-70b": 68_976_648_192,
    "llama3-8b": 8_030_261_248,
    "llama3-70b": 70_553_706_496,
    "llama3.1-8b": 8_030_261_248,
    "llama3.2-1b": 1_235_814_400,
    "llama3.2-3b": 3_212_749_824,
    "mistral-7b": 7_241_732_096,
    "codellama-7b": 6_738_546_688,
    "tinyllama-1.1b": 1_100_048_384,
    "smollm2-135m": 134_515_008,
    "smollm2-360m": 361_821_120,
    "smollm2-1.7b": 1_711_376_384,
}


def test_every_preset_has_a_published_size() -> None:
    assert set(PRESETS) == set(PUBLISHED) | {"tiny"}
    for name, spec in PRESETS.items():
        assert isinstance(spec, ModelSpec) and spec.name == name


def _hf_config(spec: ModelSpec):
    """The transformers config a preset's fields describe, written here from the fields (not mlxc's exporter)."""
    from transformers import LlamaConfig, MistralConfig

    rope = spec.rope
    scaling = None
    if rope.kind != RopeKind.DEFAULT:
        assert rope.kind == RopeKind.LLAMA3, "extend this test for other rope kinds"
        scaling = dict(rope_type="llama3", factor=rope.factor, low_freq_factor=rope.low_freq_factor,
                       high_freq_factor=rope.high_freq_factor,
                       original_max_position_embeddings=rope.original_max_position_embeddings)
    eos = list(spec.eos_token_ids)
    fields = dict(
        vocab_size=spec.vocab_size, hidden_size=spec.hidden_size, intermediate_size=spec.intermediate_size,
        num_hidden_layers=spec.num_layers, num_attention_heads=spec.num_heads, num_key_value_heads=spec.num_kv_heads,
        head_dim=spec.head_dim, max_position_embeddings=spec.max_position_embeddings, rms_norm_eps=spec.norm_eps,
        rope_theta=rope.theta, rope_scaling=scaling, tie_word_embeddings=spec.tie_word_embeddings,
        bos_token_id=spec.bos_token_id, eos_token_id=eos[0] if len(eos) == 1 else eos,
    )
    if spec.family == "mistral":
        return MistralConfig(**fields, sliding_window=spec.sliding_window)
    assert spec.family == "llama" and spec.sliding_window is None
    return LlamaConfig(**fields, attention_bias=spec.attention_bias, mlp_bias=spec.mlp_bias)


@pytest.fixture(scope="module")
def transformers_models():
    """Each preset's transformers model, on the meta device: {name: {parameter name: shape}}."""
    pytest.importorskip("torch")
    pytest.importorskip("transformers")
    return {name: shapes for name, (_, shapes) in build_meta_models(PRESETS, _hf_config).items()}


@pytest.mark.parametrize("name", sorted(PRESETS))
def test_parameter_count_matches_transformers(name: str, transformers_models) -> None:
    """The preset's own count, and the sum over the parameters its lowered program declares, both equal what
    transformers counts for the same config."""
    want = sum(prod(shape) for shape in transformers_models[name].values())
    spec = PRESETS[name]
    declared = sum(prod(p.type.shape) for _, p in mlxc.lower(spec).parameters())
    assert declared == want
    assert spec.num_parameters() == want
    if name in PUBLISHED:
        assert want == PUBLISHED[name]


@pytest.mark.parametrize("name", sorted(PRESETS))
def test_parameter_shapes_match_transformers(name: str, transformers_models) -> None:
    """Tensor by tensor, through the name map the checkpoint loader uses: the same tensors with the same shapes (so
    a preset's K/V width, head_dim or tied head cannot be compensated elsewhere and still pass on the total)."""
    ours = {n: tuple(p.type.shape) for n, p in mlxc.lower(PRESETS[name]).parameters()}
    theirs = {hf_to_ir_name(n): shape for n, shape in transformers_models[name].items()}
    assert theirs == ours


def test_published_hyperparameters() -> None:
    l31 = PRESETS["llama3.1-8b"]
    assert l31.rope.kind == RopeKind.LLAMA3 and l31.rope.factor == 8.0 and l31.rope.theta == 500000.0
    assert l31.rope.original_max_position_embeddings == 8192 and l31.max_position_embeddings == 131072
    for name in ("llama3.2-1b", "llama3.2-3b"):
        s = PRESETS[name]
        assert s.tie_word_embeddings and s.rope.kind == RopeKind.LLAMA3 and s.rope.factor == 32.0
    assert PRESETS["llama3.2-1b"].dim_per_head == 64 and PRESETS["llama3.2-3b"].dim_per_head == 128
    m = PRESETS["mistral-7b"]
    assert m.family == "mistral" and m.sliding_window == 4096 and m.attention_kind == "GQA"
    assert {l.attention for l in m.layers} == {AttentionType.SLIDING_WINDOW}
    c = PRESETS["codellama-7b"]
    assert c.rope.theta == 1e6 and c.vocab_size == 32016
    assert PRESETS["llama2-7b"].attention_kind == "MHA" and PRESETS["llama2-70b"].kv_heads == 8
    assert PRESETS["llama3-8b"].bos_token_id == 128000 and PRESETS["llama3-8b"].eos_token_ids == (128001,)
    assert PRESETS["smollm2-1.7b"].rope.theta == 130000.0
    assert all(s.rope.kind == RopeKind.DEFAULT for n, s in PRESETS.items() if not n.startswith(("llama3.1", "llama3.2")))


@pytest.mark.parametrize("text", ["llama3-8b", "preset:llama3-8b", "LLaMA3-8B", "Preset:Llama3-8B", " llama3-8b "])
def test_get_preset_names(text: str) -> None:
    assert get_preset(text) is PRESETS["llama3-8b"]


def test_unknown_preset() -> None:
    with pytest.raises(MlxcError) as exc:
        get_preset("preset:llama3-7b")
    msg = str(exc.value)
    assert "did you mean" in msg and "'llama3-8b'" in msg and "smollm2-135m" in msg
    with pytest.raises(MlxcError, match="available: tiny"):
        get_preset("gpt2")
