"""Presets: published sizes, published hyperparameters, and name lookup."""

from __future__ import annotations

import logging

import pytest

from mlxc.frontends.presets import PRESETS, get_preset
from mlxc.frontends.spec import AttentionType, ModelSpec
from mlxc.ir.attrs import RopeKind
from mlxc.ir.errors import MlxcError

# Parameter counts of the published checkpoints (sum of tensor sizes in their safetensors).
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


def test_every_preset_is_listed() -> None:
    assert set(PRESETS) == set(PUBLISHED) | {"tiny"}
    for name, spec in PRESETS.items():
        assert isinstance(spec, ModelSpec) and spec.name == name


@pytest.mark.parametrize("name", sorted(PUBLISHED))
def test_published_parameter_counts(name: str) -> None:
    assert PRESETS[name].num_parameters() == pytest.approx(PUBLISHED[name], rel=1e-4)


def _hf_config(spec: ModelSpec):
    """The transformers config these hyperparameters describe, to count parameters independently."""
    from transformers import LlamaConfig, MistralConfig

    cls = MistralConfig if spec.family == "mistral" else LlamaConfig
    return cls(
        vocab_size=spec.vocab_size, hidden_size=spec.hidden_size, intermediate_size=spec.intermediate_size,
        num_hidden_layers=spec.num_layers, num_attention_heads=spec.num_heads, num_key_value_heads=spec.kv_heads,
        head_dim=spec.dim_per_head, tie_word_embeddings=spec.tie_word_embeddings,
    )


@pytest.mark.parametrize("name", ["tiny", "smollm2-135m", "llama3.2-1b", "mistral-7b", "llama2-70b"])
def test_parameter_count_matches_transformers(name: str) -> None:
    torch = pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")
    logging.getLogger("transformers").setLevel(logging.ERROR)
    spec = PRESETS[name]
    with torch.device("meta"):
        model = transformers.AutoModelForCausalLM.from_config(_hf_config(spec))
    assert spec.num_parameters() == sum(p.numel() for p in model.parameters())


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
