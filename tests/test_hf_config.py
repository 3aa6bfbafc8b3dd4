"""HF config.json -> ModelSpec, checked against transformers itself (its saved configs and its models' sizes)."""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

import pytest

transformers = pytest.importorskip("transformers")
torch = pytest.importorskip("torch")
from transformers import LlamaConfig, LlamaForCausalLM, MistralConfig, MistralForCausalLM  # noqa: E402

from mlxc.frontends.hf import (  # noqa: E402
    UNMAPPED,
    detect_architecture,
    hf_to_ir_name,
    load_hf_config,
    load_hf_spec,
    spec_from_hf_config,
)
from mlxc.frontends.spec import Activation, AttentionType  # noqa: E402
from mlxc.ir.attrs import RopeKind  # noqa: E402
from mlxc.ir.errors import MlxcError  # noqa: E402

logging.getLogger("transformers").setLevel(logging.ERROR)

SMALL: dict[str, Any] = dict(
    vocab_size=97, hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4,
    num_key_value_heads=2, max_position_embeddings=128,
)
LLAMA3 = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
          "original_max_position_embeddings": 64}
YARN = {"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 32, "beta_fast": 16.0,
        "beta_slow": 2.0, "mscale": 0.7, "mscale_all_dim": 0.5, "truncate": False}

CASES: dict[str, tuple[type, dict[str, Any]]] = {
    "llama": (LlamaConfig, {}),
    "llama-mha": (LlamaConfig, {"num_key_value_heads": 4}),
    "llama-mqa-tied": (LlamaConfig, {"num_key_value_heads": 1, "tie_word_embeddings": True}),
    "llama-biases": (LlamaConfig, {"attention_bias": True, "mlp_bias": True}),
    "llama-biases-tied": (LlamaConfig, {"attention_bias": True, "mlp_bias": True, "tie_word_embeddings": True}),
    "llama-head-dim": (LlamaConfig, {"head_dim": 16}),
    "llama-linear": (LlamaConfig, {"rope_parameters": {"rope_type": "linear", "factor": 2.0, "rope_theta": 5e5}}),
    "llama-dynamic": (LlamaConfig, {"rope_parameters": {"rope_type": "dynamic", "factor": 3.0}}),
    "llama-llama3": (LlamaConfig, {"rope_parameters": {**LLAMA3, "rope_theta": 5e5}}),
    "llama-yarn": (LlamaConfig, {"rope_parameters": dict(YARN)}),
    "llama-gelu": (LlamaConfig, {"hidden_act": "gelu_pytorch_tanh"}),
    "mistral": (MistralConfig, {"sliding_window": 16}),
    "mistral-full": (MistralConfig, {"sliding_window": None, "tie_word_embeddings": True}),
}


def _saved(tmp_path: Path, cls: type, extra: dict[str, Any]) -> tuple[Any, Path]:
    cfg = cls(**{**SMALL, **extra})
    cfg.save_pretrained(tmp_path)
    return cfg, tmp_path


@pytest.mark.parametrize("case", sorted(CASES))
def test_transformers5_saved_config(tmp_path: Path, case: str) -> None:
    cls, extra = CASES[case]
    cfg, path = _saved(tmp_path, cls, extra)
    assert "rope_parameters" in load_hf_config(path)  # the transformers-5 form really is what we parse
    spec = load_hf_spec(path, name=case)
    assert spec.name == case
    assert spec.family == cfg.model_type
    assert (spec.vocab_size, spec.hidden_size, spec.intermediate_size) == (97, 32, 48)
    assert (spec.num_layers, spec.num_heads, spec.kv_heads) == (2, 4, cfg.num_key_value_heads)
    assert spec.dim_per_head == cfg.head_dim
    assert spec.max_position_embeddings == 128
    assert spec.norm_eps == cfg.rms_norm_eps
    assert spec.tie_word_embeddings == cfg.tie_word_embeddings
    assert spec.bos_token_id == cfg.bos_token_id and spec.eos_token_ids == (cfg.eos_token_id,)
    rp = cfg.rope_parameters
    assert spec.rope.kind == RopeKind(rp["rope_type"]) and spec.rope.theta == rp["rope_theta"]
    if "factor" in rp:
        assert spec.rope.factor == rp["factor"]
    if spec.rope.kind in (RopeKind.LLAMA3, RopeKind.YARN):
        assert spec.rope.original_max_position_embeddings == rp["original_max_position_embeddings"]
    if spec.rope.kind == RopeKind.LLAMA3:
        assert (spec.rope.low_freq_factor, spec.rope.high_freq_factor) == (1.0, 4.0)
    if spec.rope.kind == RopeKind.YARN:
        r = spec.rope
        assert (r.beta_fast, r.beta_slow, r.mscale, r.mscale_all_dim, r.truncate) == (16.0, 2.0, 0.7, 0.5, False)
    window = getattr(cfg, "sliding_window", None)
    assert spec.sliding_window == window
    assert all(l.attention == (AttentionType.SLIDING_WINDOW if window else AttentionType.FULL) for l in spec.layers)
    model = (MistralForCausalLM if cls is MistralConfig else LlamaForCausalLM)(cfg)
    assert spec.num_parameters() == sum(p.numel() for p in model.parameters())


def test_activation_mapping(tmp_path: Path) -> None:
    _saved(tmp_path, LlamaConfig, {"hidden_act": "gelu_pytorch_tanh"})
    assert load_hf_spec(tmp_path).activation == Activation.GELU_TANH


# transformers-4 style configs, written by hand; transformers' own reading of the same file is the reference.
V4_CASES: dict[str, dict[str, Any]] = {
    "plain": {"rope_theta": 500000.0, "rope_scaling": None},
    "linear-type": {"rope_scaling": {"type": "linear", "factor": 2.0}},
    "dynamic-rope-type": {"rope_theta": 1e6, "rope_scaling": {"rope_type": "dynamic", "factor": 2.0}},
    "llama3": {"rope_theta": 500000.0, "rope_scaling": dict(LLAMA3)},
    "yarn": {"rope_scaling": {"type": "yarn", "factor": 4.0}},  # no original_max_position_embeddings
    "no-rope-keys": {},
}


@pytest.mark.parametrize("case", sorted(V4_CASES))
def test_transformers4_config(tmp_path: Path, case: str) -> None:
    raw = {"architectures": ["LlamaForCausalLM"], "model_type": "llama", **SMALL, "rms_norm_eps": 1e-5,
           "attention_bias": False, "eos_token_id": [2, 7], **V4_CASES[case]}
    (tmp_path / "config.json").write_text(json.dumps(raw))
    spec = load_hf_spec(tmp_path)
    ref = LlamaConfig.from_pretrained(tmp_path).rope_parameters
    assert spec.rope.kind == RopeKind(ref["rope_type"])
    assert spec.rope.theta == ref["rope_theta"]
    assert spec.rope.factor == ref.get("factor", 1.0)
    if spec.rope.kind in (RopeKind.LLAMA3, RopeKind.YARN):
        assert spec.rope.original_max_position_embeddings == ref["original_max_position_embeddings"]
    assert spec.eos_token_ids == (2, 7)
    assert spec.norm_eps == 1e-5


def test_missing_keys_take_transformers_defaults() -> None:
    """A minimal config describes the same model transformers would build from it."""
    for cls in (LlamaConfig, MistralConfig):
        raw = {"model_type": cls.model_type, **{k: SMALL[k] for k in SMALL if k != "num_key_value_heads"},
               "num_attention_heads": 8}
        ref = cls(**{k: v for k, v in raw.items() if k != "model_type"})
        spec = spec_from_hf_config(raw)
        assert spec.kv_heads == ref.num_key_value_heads
        assert spec.sliding_window == getattr(ref, "sliding_window", None)
        assert spec.rope.theta == ref.rope_parameters["rope_theta"]
        assert (spec.norm_eps, spec.bos_token_id, spec.eos_token_ids) == (ref.rms_norm_eps, 1, (2,))


def test_mistral_null_window_is_full_attention() -> None:
    spec = spec_from_hf_config({"model_type": "mistral", **SMALL, "sliding_window": None})
    assert spec.sliding_window is None
    assert {l.attention for l in spec.layers} == {AttentionType.FULL}


def test_mistral_ignores_bias_keys_like_transformers() -> None:
    cfg = MistralConfig(**SMALL, sliding_window=None)
    raw = {**cfg.to_dict(), "attention_bias": True, "mlp_bias": True}
    spec = spec_from_hf_config(raw)
    assert not spec.attention_bias and not spec.mlp_bias
    assert spec.num_parameters() == sum(p.numel() for p in MistralForCausalLM(cfg).parameters())


# ------------------------------------------------------------------------------------------------ detection


def test_detect_from_metadata() -> None:
    assert detect_architecture({"architectures": ["MistralForCausalLM"], "model_type": "llama"}) == "mistral"
    assert detect_architecture({"architectures": ["SomethingElse"], "model_type": "mistral"}) == "mistral"
    assert detect_architecture({"model_type": "llama"}) == "llama"


def test_detect_from_tensor_names() -> None:
    names = [hf for hf in LlamaForCausalLM(LlamaConfig(**SMALL)).state_dict()]
    assert detect_architecture({}, names) == "llama"
    with pytest.raises(MlxcError):
        detect_architecture({}, ["transformer.h.0.attn.c_attn.weight"])


def test_family_from_tensor_names_feeds_spec() -> None:
    """A config without metadata still loads when the caller detected the family from the tensors."""
    raw = dict(SMALL)
    with pytest.raises(MlxcError, match="supported"):
        spec_from_hf_config(raw)
    assert spec_from_hf_config(raw, family="llama").family == "llama"
    with pytest.raises(MlxcError, match="unsupported architecture family 'gpt2'"):
        spec_from_hf_config(raw, family="gpt2")


def test_unknown_architecture_lists_supported() -> None:
    with pytest.raises(MlxcError) as exc:
        detect_architecture({"architectures": ["GPT2LMHeadModel"], "model_type": "gpt2"})
    msg = str(exc.value)
    assert "GPT2LMHeadModel" in msg and "LlamaForCausalLM" in msg and "MistralForCausalLM" in msg


# ------------------------------------------------------------------------------------------------ bad input


def _write(tmp_path: Path, raw: dict[str, Any]) -> Path:
    (tmp_path / "config.json").write_text(json.dumps(raw))
    return tmp_path


def test_missing_key_names_key_and_file(tmp_path: Path) -> None:
    raw = {"model_type": "llama", **SMALL}
    del raw["hidden_size"]
    with pytest.raises(MlxcError, match=r"config\.json.*hidden_size"):
        load_hf_spec(_write(tmp_path, raw))


@pytest.mark.parametrize("rope, message", [
    ({"rope_type": "longrope", "factor": 2.0}, "rope type 'longrope' needs `rope_scaling.short_factor`"),
    ({"type": "bogus"}, "unsupported rope type 'bogus'.*supported: default, linear, .*longrope"),
])
def test_bad_rope_type(tmp_path: Path, rope: dict[str, Any], message: str) -> None:
    with pytest.raises(MlxcError, match=message):
        load_hf_spec(_write(tmp_path, {"model_type": "llama", **SMALL, "rope_scaling": rope}))


def test_rope_missing_factor(tmp_path: Path) -> None:
    with pytest.raises(MlxcError, match="needs `rope_parameters.low_freq_factor`"):
        spec_from_hf_config({"model_type": "llama", **SMALL, "rope_parameters": {"rope_type": "llama3", "factor": 8}})


def test_bad_activation(tmp_path: Path) -> None:
    with pytest.raises(MlxcError, match="hidden_act 'mish'.*silu"):
        load_hf_spec(_write(tmp_path, {"model_type": "llama", **SMALL, "hidden_act": "mish"}))


def test_malformed_and_missing_json(tmp_path: Path) -> None:
    (tmp_path / "config.json").write_text('{"model_type": "llama",')
    with pytest.raises(MlxcError, match=r"config\.json: malformed JSON at line 1"):
        load_hf_config(tmp_path)
    with pytest.raises(MlxcError, match="cannot read"):
        load_hf_config(tmp_path / "nope")
    (tmp_path / "config.json").write_text("[1, 2]")
    with pytest.raises(MlxcError, match="expected a JSON object"):
        load_hf_config(tmp_path)


def test_validation_error_becomes_one_mlxc_error(tmp_path: Path) -> None:
    for bad, key in (({"vocab_size": -1}, "vocab_size"), ({"num_key_value_heads": 3}, "num_key_value_heads"),
                     ({"rms_norm_eps": "tiny"}, "rms_norm_eps")):
        with pytest.raises(MlxcError) as exc:
            load_hf_spec(_write(tmp_path, {"model_type": "llama", **SMALL, **bad}))
        msg = str(exc.value)
        assert "config.json" in msg and key in msg, msg
        assert "pydantic" not in msg


def test_partial_rotary_rejected() -> None:
    with pytest.raises(MlxcError, match="partial_rotary_factor"):
        spec_from_hf_config({"model_type": "llama", **SMALL, "partial_rotary_factor": 0.5})


# ------------------------------------------------------------------------------------------------ tensor names


def test_tensor_name_table() -> None:
    expect = {
        "model.embed_tokens.weight": "embed_tokens.weight",
        "model.layers.0.input_layernorm.weight": "layers.0.input_norm.weight",
        "model.layers.11.self_attn.q_proj.weight": "layers.11.attn.q_proj.weight",
        "model.layers.3.self_attn.k_proj.bias": "layers.3.attn.k_proj.bias",
        "model.layers.3.self_attn.v_proj.weight": "layers.3.attn.v_proj.weight",
        "model.layers.3.self_attn.o_proj.bias": "layers.3.attn.o_proj.bias",
        "model.layers.2.post_attention_layernorm.weight": "layers.2.post_attention_norm.weight",
        "model.layers.2.mlp.gate_proj.weight": "layers.2.mlp.gate_proj.weight",
        "model.layers.2.mlp.up_proj.bias": "layers.2.mlp.up_proj.bias",
        "model.layers.2.mlp.down_proj.weight": "layers.2.mlp.down_proj.weight",
        "model.norm.weight": "norm.weight",
        "lm_head.weight": "lm_head.weight",
        "layers.5.self_attn.q_proj.weight": "layers.5.attn.q_proj.weight",  # bare LlamaModel checkpoint
    }
    for hf, ir in expect.items():
        assert hf_to_ir_name(hf) == ir, hf
    assert hf_to_ir_name("model.layers.0.self_attn.rotary_emb.inv_freq") is None
    assert hf_to_ir_name("model.rotary_emb.inv_freq") is None
    for junk in ("model.layers.0.self_attn.q_proj.scales", "lm_head.bias", "model.layers.x.mlp.up_proj.weight"):
        assert hf_to_ir_name(junk) == UNMAPPED


def test_every_transformers_tensor_maps() -> None:
    cfg = LlamaConfig(**SMALL, attention_bias=True, mlp_bias=True)
    model = LlamaForCausalLM(cfg)
    mapped = {hf_to_ir_name(n): p.numel() for n, p in model.state_dict().items()}
    assert UNMAPPED not in mapped and None not in mapped
    assert sum(mapped.values()) == spec_from_hf_config(cfg.to_dict()).num_parameters()
