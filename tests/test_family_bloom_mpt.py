"""BLOOM and MPT, the ALiBi families, against transformers (torch, CPU) on random-weight checkpoints built with
save_pretrained, through the shared parity harness (tests/parity.py).

BLOOM: the embedding LayerNorm, Q/K/V fused per head (`query_key_value`, split at load by a grouped layout rule),
biases everywhere, tanh-GELU, ALiBi with transformers' `_get_alibi_slopes`. MPT: no biases (LayerNorms without one),
`Wqkv` fused q, k, v in turn, exact GELU, clip_qkv, ALiBi with `build_mpt_alibi_tensor`'s slopes. Head counts are
not powers of two (6, 5), where ALiBi's slopes are least regular. References: transformers' logits, its `generate`,
its cached forward, its configs read back, its models on the meta device.
"""

from __future__ import annotations

import json
from math import prod

import numpy as np
import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

import mlx.core as mx  # noqa: E402

import mlxc  # noqa: E402
from mlxc.frontends.families import family as family_named  # noqa: E402
from mlxc.frontends.hf import hf_config_from_spec, hf_to_ir_name, spec_from_hf_config  # noqa: E402
from mlxc.frontends.presets import PRESETS as ALL_PRESETS, preset_for_hub_id  # noqa: E402
from mlxc.frontends.spec import PositionEmbedding  # noqa: E402
from mlxc.ir import parse_program, print_program  # noqa: E402
from mlxc.ir.errors import MlxcError  # noqa: E402
from mlxc.passes.checkpoint_layout import CheckpointLayout  # noqa: E402
from parity import (check_artifact, check_greedy, check_logits, check_lora, check_quantize,  # noqa: E402
                    check_stepwise, hf_logits, ids, max_diff, save_checkpoint)

VOCAB = 256


def _bloom(**overrides):
    base = dict(vocab_size=VOCAB, hidden_size=48, n_layer=2, n_head=6, bos_token_id=1, eos_token_id=2)
    return transformers.BloomForCausalLM, transformers.BloomConfig(**{**base, **overrides})


def _mpt(**overrides):
    base = dict(vocab_size=VOCAB, d_model=40, n_layers=2, n_heads=5, max_seq_len=64)
    return transformers.MptForCausalLM, transformers.MptConfig(**{**base, **overrides})


CASES = {
    "bloom": lambda: _bloom(),  # 6 heads: four slopes of 2^-2k and two of 2^-(2k-1); tied head
    "bloom-untied": lambda: _bloom(n_head=4, hidden_size=32, tie_word_embeddings=False),
    "mpt": lambda: _mpt(attn_config={"clip_qkv": 0.3}),  # 5 heads; clipping bites at the 0.08 weight scale
    "mpt-scaled": lambda: _mpt(d_model=48, n_heads=4, attn_config={"softmax_scale": 0.2}),
}


_built: dict[str, tuple] = {}


def _case(name: str, tmp_path_factory):
    """One case's (transformers model, checkpoint path), built once per module."""
    if name not in _built:
        cls, config = CASES[name]()
        path = tmp_path_factory.mktemp(name)
        _built[name] = save_checkpoint(cls, config, path, seed=len(name)), path
    return _built[name]


@pytest.fixture(scope="module", params=sorted(CASES))
def checkpoint(request, tmp_path_factory):
    hf, path = _case(request.param, tmp_path_factory)
    return request.param, hf, path, mlxc.load(str(path))


# ------------------------------------------------------------------------------------------ against transformers


def test_logits_match(checkpoint):
    _, hf, _, model = checkpoint
    assert model.spec.position == PositionEmbedding.ALIBI
    check_logits(hf, model, VOCAB)


def test_greedy_tokens_match_generate(checkpoint):
    _, hf, _, model = checkpoint
    check_greedy(hf, model, VOCAB)


def test_prefill_in_chunks_equals_one_prefill(checkpoint):
    check_stepwise(checkpoint[3], VOCAB)


def test_cached_decode_matches_transformers_cache(checkpoint):
    """A prefill, then single tokens through both caches: every step's logits agree (the bias at a cache offset)."""
    _, hf, _, model = checkpoint
    tokens = ids(VOCAB, (2, 14), seed=11)
    cache = model.make_cache()
    ours = [np.array(model(mx.array(tokens[:, :8]), cache=cache).logits)]
    with torch.no_grad():
        out = hf(torch.tensor(tokens[:, :8]), use_cache=True)
        theirs, past = [out.logits.numpy()], out.cache
        for t in range(8, 14):
            ours.append(np.array(model(mx.array(tokens[:, t:t + 1]), cache=cache).logits))
            out = hf(torch.tensor(tokens[:, t:t + 1]), cache=past, use_cache=True)
            theirs.append(out.logits.numpy())
            past = out.cache
    assert max_diff(np.concatenate(ours, 1), np.concatenate(theirs, 1)) <= 1e-4


def test_fused_qkv_is_split_at_load(checkpoint):
    """The checkpoint's fused tensor is the program's parameter; load-time ops give the body q, k and v."""
    name, _, _, model = checkpoint
    text = print_program(model.program)
    stored = "query_key_value" if name.startswith("bloom") else "Wqkv"
    assert f"param %{stored}.weight" in text
    assert "param %q_proj.weight" not in text
    if name.startswith("bloom"):  # per head: [heads, 3 * head_dim, hidden], split, back to [heads * head_dim, ..]
        assert "param %query_key_value.bias" in text and "query_key_value.weight.grouped" in text
    assert print_program(parse_program(text)) == text  # the alibi slopes and the layout survive the text form


def test_quantized_artifact_and_export(tmp_path_factory, tmp_path):
    """Quantized weights run; an artifact loads back; exporting it gives transformers the fused per-head tensor
    again (the grouped split run backwards)."""
    from mlxc.tools.export import export

    hf, path = _case("bloom", tmp_path_factory)
    check_quantize(path, VOCAB)
    # whatever kernels the target picks for quantized weights (native ones where built), ALiBi stays
    tokens = mx.array(ids(VOCAB, seed=13))
    chosen, plain = (mlxc.load(str(path), quantize=8, group_size=32, kernels=k) for k in ("auto", "reference"))
    assert "alibi = [" in print_program(chosen.program)
    assert max_diff(np.array(chosen(tokens).logits), np.array(plain(tokens).logits)) <= 1e-4
    check_artifact(path, tmp_path, VOCAB)
    export(str(tmp_path / "artifact"), tmp_path / "hf")
    back = transformers.BloomForCausalLM.from_pretrained(tmp_path / "hf").eval()
    for name, p in hf.state_dict().items():
        assert torch.equal(back.state_dict()[name], p), name


def test_lora_round_trips_through_peft(tmp_path_factory):
    """Adapters on the attention output and the MLP, saved as PEFT and merged back. (The fused per-head
    `query_key_value` is no LoRA target yet: an adapter's rows would have to follow its interleaved heads.)"""
    _, path = _case("bloom", tmp_path_factory)
    check_lora(path, VOCAB, ("o_proj", "up_proj"))
    with pytest.raises(MlxcError, match="match no projection"):
        mlxc.load(str(path), lora=mlxc.LoRAConfig(rank=2, targets=("query_key_value",)))


def test_peft_adapter_on_mpt_fused_wqkv(tmp_path_factory, tmp_path):
    """PEFT's default MPT target, the fused `Wqkv` (and the MLP's up projection), with trained B: mlxc's logits,
    unmerged and merged, are peft's."""
    peft = pytest.importorskip("peft")
    _, path = _case("mpt", tmp_path_factory)
    base = transformers.MptForCausalLM.from_pretrained(path).eval()
    tuned = peft.get_peft_model(base, peft.LoraConfig(r=2, lora_alpha=4, target_modules=["Wqkv", "up_proj"]))
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for name, p in tuned.named_parameters():
            if "lora_B" in name:
                p.copy_(0.1 * torch.randn(p.shape, generator=g))
    tuned.save_pretrained(tmp_path / "adapter")
    tokens = ids(VOCAB, (2, 12), seed=15)
    ref = hf_logits(tuned.eval(), tokens)
    assert max_diff(ref, hf_logits(_case("mpt", tmp_path_factory)[0], tokens)) > 1e-3  # the adapter matters
    for merge in (False, True):
        model = mlxc.load(str(path), adapter=tmp_path / "adapter", merge_lora=merge)
        assert max_diff(np.array(model(mx.array(tokens)).logits), ref) <= 1e-4


def test_longer_prompt_than_training_context_is_bounded_by_max_kv_size(tmp_path_factory):
    """MPT's context is max_seq_len (transformers' bias table); a bounded cache generates past it."""
    _, path = _case("mpt", tmp_path_factory)
    model = mlxc.load(str(path))
    assert model.context_length == 64
    prompt = mx.array(ids(VOCAB, (1, 60), seed=4))
    assert np.array(model.generate(prompt, max_new_tokens=10, temperature=0.0, stop_tokens=())).shape[1] <= 64
    out = model.generate(prompt, max_new_tokens=10, temperature=0.0, stop_tokens=(), max_kv_size=32)
    assert np.array(out).shape[1] == 70


@pytest.mark.parametrize("family", ["bloom", "mpt"])
def test_sequence_classifier_matches(family, tmp_path):
    """*ForSequenceClassification: the same blocks and a `score` over the last non-padding token."""
    cls, config = (_bloom if family == "bloom" else _mpt)(num_labels=3, pad_token_id=0)
    cls = getattr(transformers, cls.__name__.replace("ForCausalLM", "ForSequenceClassification"))
    hf = save_checkpoint(cls, config, tmp_path, seed=7)
    tokens = ids(VOCAB, (2, 12), seed=14)
    assert max_diff(np.array(mlxc.load(str(tmp_path))(mx.array(tokens)).logits), hf_logits(hf, tokens)) <= 1e-4


# ------------------------------------------------------------------------------------------ configs


@pytest.mark.parametrize("name", sorted(CASES))
def test_written_config_reads_back_in_transformers(name, tmp_path_factory):
    """mlxc's config.json for the spec, read by transformers, builds the checkpoint's model: its weights load
    strictly and give the same logits."""
    hf, path = _case(name, tmp_path_factory)
    spec = mlxc.load(str(path)).spec
    data = hf_config_from_spec(spec)
    assert spec_from_hf_config(data, name=spec.name) == spec
    config = transformers.AutoConfig.for_model(data.pop("model_type"), **data)
    twin = transformers.AutoModelForCausalLM.from_config(config).eval()
    twin.load_state_dict(hf.state_dict(), strict=True)
    tokens = ids(VOCAB, (1, 10), seed=12)
    assert max_diff(hf_logits(twin, tokens), hf_logits(hf, tokens)) == 0.0


@pytest.mark.parametrize("family, extra, message", [
    ("bloom", {"apply_residual_connection_post_layernorm": True}, "apply_residual_connection_post_layernorm"),
    ("bloom", {"n_head": 5}, "not divisible by n_head"),
    ("mpt", {"attn_config": {"alibi": False}}, "attn_config.alibi"),
    ("mpt", {"attn_config": {"alibi_bias_max": 6}}, "alibi_bias_max"),
    ("mpt", {"attn_config": {"qk_ln": True}}, "attn_config.qk_ln"),
    ("mpt", {"attn_config": {"attn_type": "multiquery_attention"}}, "attn_type"),
    ("mpt", {"no_bias": False}, "no_bias"),
    ("mpt", {"expansion_ratio": 2}, "expansion_ratio"),
    ("mpt", {"logit_scale": 0.5}, "logit_scale"),
])
def test_configs_transformers_would_misread_are_refused(family, extra, message):
    base = {"bloom": dict(model_type="bloom", vocab_size=64, hidden_size=32, n_layer=1, n_head=4),
            "mpt": dict(model_type="mpt", vocab_size=64, d_model=32, n_layers=1, n_heads=4)}[family]
    with pytest.raises(MlxcError, match=message):
        spec_from_hf_config({**base, **extra})


def test_bloom_config_aliases_and_defaults():
    spec = spec_from_hf_config({"model_type": "bloom", "vocab_size": 64, "n_embed": 32, "num_hidden_layers": 3,
                                "num_attention_heads": 4})
    assert (spec.hidden_size, spec.num_layers, spec.num_heads, spec.intermediate_size) == (32, 3, 4, 128)
    assert spec.tie_word_embeddings and spec.embedding_norm and spec.max_position_embeddings == 2048
    mpt = spec_from_hf_config({"model_type": "mpt", "vocab_size": 64, "d_model": 32, "n_layers": 1, "n_heads": 4,
                               "attn_config": {"clip_qkv": 0.0}})
    assert mpt.clip_qkv is None and not mpt.norm_bias and mpt.alibi.slopes == "mpt"


def test_detected_from_tensor_names_without_metadata(tmp_path_factory):
    """A config without `architectures` or `model_type`: the fused tensors' names tell the family."""
    from safetensors import safe_open

    from mlxc.frontends.hf import detect_family

    for name in ("bloom", "mpt"):
        _, path = _case(name, tmp_path_factory)
        config = {k: v for k, v in json.loads((path / "config.json").read_text()).items()
                  if k not in ("architectures", "model_type")}
        with safe_open(str(path / "model.safetensors"), "np") as f:
            assert detect_family(config, list(f.keys())).family == name


# ------------------------------------------------------------------------------------------ presets

PRESETS = {name: spec for name, spec in ALL_PRESETS.items() if spec.family in ("bloom", "mpt")}


def test_presets_match_transformers_on_the_meta_device():
    """Each preset's transformers model (from the config mlxc writes) has exactly the lowered parameters."""
    assert set(PRESETS) == {"bloom-560m", "mpt-7b"}
    for name, spec in PRESETS.items():
        data = hf_config_from_spec(spec)
        config = transformers.AutoConfig.for_model(data.pop("model_type"), **data)
        with torch.device("meta"):
            model = transformers.AutoModelForCausalLM.from_config(config)
        theirs = {hf_to_ir_name(n, spec.family): tuple(p.shape) for n, p in model.named_parameters()}
        program, _ = CheckpointLayout(rules=family_named(spec.family).checkpoint_layout(spec)).run(mlxc.lower(spec))
        assert theirs == {n: tuple(p.type.shape) for n, p in program.parameters()}, name
        assert spec.num_parameters() == sum(prod(s) for s in theirs.values())


@pytest.mark.parametrize("repo, preset", [("bigscience/bloom-560m", "bloom-560m"), ("mosaicml/mpt-7b", "mpt-7b")])
def test_hub_ids_name_the_presets(repo, preset):
    assert preset_for_hub_id(repo) == preset
