"""Qwen2 / Qwen2.5 / DeepSeek-R1-Distill-Qwen and Qwen3 against transformers (torch, CPU) on random-weight
checkpoints built with save_pretrained, through the shared parity harness (tests/parity.py).

The references are transformers' own models: logits, greedy generation, PEFT adapters, a GGUF written from the
checkpoint's tensors under llama.cpp's names (compared with the checkpoint's transformers logits), exports read back
by transformers, and parameter counts of the presets' configs on the meta device plus the published sizes.
"""

from __future__ import annotations

import json
import re
from math import prod
from pathlib import Path

import numpy as np
import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

import mlx.core as mx  # noqa: E402

import mlxc  # noqa: E402
from mlxc.frontends.hf import detect_architecture, hf_config_from_spec, hf_to_ir_name, spec_from_hf_config  # noqa: E402
from mlxc.frontends.presets import PRESETS as ALL_PRESETS, preset_for_hub_id  # noqa: E402
from mlxc.ir.errors import MlxcError  # noqa: E402
from parity import meta_models as build_meta_models  # noqa: E402
from parity import (check_artifact, check_fusion, check_greedy, check_logits, check_lora,  # noqa: E402
                    check_quantize, check_stepwise, hf_logits, ids, max_diff, save_checkpoint)

VOCAB = 320
WINDOW = 7  # < SEQ and < the greedy test's 9 + 16 tokens, so sliding layers run past their window


def _qwen2(**overrides):
    base = dict(vocab_size=VOCAB, hidden_size=64, intermediate_size=112, num_hidden_layers=2, num_attention_heads=4,
                num_key_value_heads=2, max_position_embeddings=256, rms_norm_eps=1e-6, rope_theta=1000000.0,
                bos_token_id=1, eos_token_id=2)
    return transformers.Qwen2ForCausalLM, transformers.Qwen2Config(**{**base, **overrides})


def _qwen3(**overrides):
    base = dict(vocab_size=VOCAB, hidden_size=64, intermediate_size=112, num_hidden_layers=2, num_attention_heads=4,
                num_key_value_heads=2, head_dim=32, max_position_embeddings=256, rms_norm_eps=1e-6,
                rope_theta=1000000.0, bos_token_id=1, eos_token_id=2)
    return transformers.Qwen3ForCausalLM, transformers.Qwen3Config(**{**base, **overrides})


CASES = {
    # Qwen2.5-0.5B's shape of things: tied head, GQA, Q/K/V biases
    "qwen2-tied": lambda: _qwen2(tie_word_embeddings=True),
    # use_sliding_window: layers from max_window_layers (1) up slide, layer 0 stays global
    "qwen2-sliding": lambda: _qwen2(num_hidden_layers=3, use_sliding_window=True, sliding_window=WINDOW,
                                    max_window_layers=1),
    # the long-context Qwen2.5 configs' yarn rope
    "qwen2-yarn": lambda: _qwen2(max_position_embeddings=64, rope_scaling=dict(
        rope_type="yarn", factor=4.0, original_max_position_embeddings=16)),
    # head_dim 32 != hidden_size / heads (16), untied
    "qwen3": lambda: _qwen3(),
    # attention_bias on all four projections, MQA, tied, windows on the upper layers
    "qwen3-bias-sliding": lambda: _qwen3(num_hidden_layers=3, num_key_value_heads=1, attention_bias=True,
                                         tie_word_embeddings=True, use_sliding_window=True, sliding_window=WINDOW,
                                         max_window_layers=1),
}


_built: dict[str, tuple] = {}


def _case(name: str, tmp_path_factory):
    """One case's (transformers model, checkpoint path), built once per session."""
    if name not in _built:
        cls, config = CASES[name]()
        path = tmp_path_factory.mktemp(name)
        _built[name] = save_checkpoint(cls, config, path, seed=len(name)), path
    return _built[name]


@pytest.fixture(params=sorted(CASES))
def checkpoint(request, tmp_path_factory):
    return (request.param, *_case(request.param, tmp_path_factory))


# ------------------------------------------------------------------------------------------ against transformers


def test_logits_match(checkpoint):
    _, hf, path = checkpoint
    check_logits(hf, mlxc.load(str(path)), VOCAB)


def test_greedy_through_the_cache_matches_generate(checkpoint):
    _, hf, path = checkpoint
    check_greedy(hf, mlxc.load(str(path)), VOCAB)


def test_chunked_prefill_then_decode_matches_full_prefill(checkpoint):
    _, _, path = checkpoint
    check_stepwise(mlxc.load(str(path)), VOCAB)


@pytest.mark.parametrize("name", ["qwen2-sliding", "qwen3-bias-sliding"])
def test_chunks_longer_than_the_window(name, tmp_path_factory):
    """Prompt chunks each longer than the window (7), then decode: still one full prefill's logits."""
    _, path = _case(name, tmp_path_factory)
    check_stepwise(mlxc.load(str(path)), VOCAB, chunks=(9, 8))


def test_spec_reads_what_transformers_builds(checkpoint):
    """Windows per layer as transformers resolved them, and every tensor with transformers' shape (biases included:
    Q/K/V only for Qwen2; all four projections or none for Qwen3; Q/K norms for Qwen3)."""
    _, hf, path = checkpoint
    model = mlxc.load(str(path))
    spec, cfg = model.spec, hf.config
    want = [cfg.sliding_window if t == "sliding_attention" else None for t in cfg.layer_types]
    assert [spec.window_of(i) for i in range(spec.num_layers)] == want
    ours = {n: tuple(p.type.shape) for n, p in mlxc.lower(spec).parameters()}
    theirs = {hf_to_ir_name(n, spec.family): tuple(p.shape) for n, p in hf.named_parameters()}
    assert theirs == ours


@pytest.mark.parametrize("name", ["qwen2-sliding", "qwen3-bias-sliding"])
def test_the_window_matters(name, tmp_path_factory):
    """transformers honours these windows (the same weights without them give other logits), so matching its logits
    above tested them."""
    hf, path = _case(name, tmp_path_factory)
    config = json.loads((path / "config.json").read_text())
    assert "sliding_attention" in config["layer_types"]
    config.update(use_sliding_window=False, layer_types=None)
    full_config = type(hf.config)(**{k: v for k, v in config.items() if k not in ("architectures", "model_type")})
    full = type(hf).from_pretrained(path, config=full_config, dtype=torch.float32).eval()
    assert set(full.config.layer_types) == {"full_attention"}
    tokens = ids(VOCAB)
    assert max_diff(hf_logits(full, tokens), hf_logits(hf, tokens)) > 1e-3


# ------------------------------------------------------------------------------------------ passes and artifacts


@pytest.mark.parametrize("name", ["qwen2-sliding", "qwen3-bias-sliding"])
def test_fusion_changes_nothing(name, tmp_path_factory):
    _, path = _case(name, tmp_path_factory)
    check_fusion(path, VOCAB, fused_names=("qkv_proj", "gate_up_proj"))


@pytest.mark.parametrize("name", ["qwen2-tied", "qwen3"])
def test_quantize(name, tmp_path_factory):
    _, path = _case(name, tmp_path_factory)
    check_quantize(path, VOCAB)


@pytest.mark.parametrize("name", ["qwen2-sliding", "qwen3-bias-sliding"])
def test_lora_fresh_and_merged(name, tmp_path_factory):
    _, path = _case(name, tmp_path_factory)
    check_lora(path, VOCAB, ("q_proj", "k_proj", "v_proj", "o_proj", "down_proj"))


@pytest.mark.parametrize("name", ["qwen2-tied", "qwen3"])
def test_compile_then_load(name, tmp_path_factory, tmp_path):
    _, path = _case(name, tmp_path_factory)
    check_artifact(path, tmp_path, VOCAB)


TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


@pytest.mark.parametrize("name", ["qwen2-tied", "qwen3-bias-sliding"])
def test_peft_adapter_round_trip(name, tmp_path_factory, tmp_path):
    """A transformers + peft adapter gives peft's logits in mlxc (unmerged and merged), and the adapter mlxc saves
    loads back in peft to the same logits."""
    peft = pytest.importorskip("peft")
    _, path = _case(name, tmp_path_factory)
    cls = transformers.AutoModelForCausalLM
    torch.manual_seed(0)
    lora = peft.LoraConfig(r=4, lora_alpha=8, target_modules=TARGETS, lora_dropout=0.0, init_lora_weights=False,
                           task_type="CAUSAL_LM")
    ref = peft.get_peft_model(cls.from_pretrained(path, dtype=torch.float32), lora).eval()
    with torch.no_grad():  # B clearly non-zero, so a dropped adapter cannot pass
        for n, p in ref.named_parameters():
            if "lora_B" in n:
                p.copy_(0.05 * torch.randn(p.shape))
    ref.save_pretrained(tmp_path / "adapter")
    tokens = ids(VOCAB, seed=11)
    want = hf_logits(ref, tokens)
    assert max_diff(want, np.array(mlxc.load(str(path))(mx.array(tokens)).logits)) > 1e-2
    for merge in (False, True):
        model = mlxc.load(str(path), adapter=tmp_path / "adapter", merge_lora=merge)
        assert max_diff(np.array(model(mx.array(tokens)).logits), want) <= 1e-4, f"merge_lora={merge}"
    saved = mlxc.save_adapter(mlxc.load(str(path), adapter=tmp_path / "adapter"), tmp_path / "saved")
    back = peft.PeftModel.from_pretrained(cls.from_pretrained(path, dtype=torch.float32), saved).eval()
    assert max_diff(hf_logits(back, tokens), want) <= 1e-5


# -------------------------------------------------------------------------------------------------------- GGUF

# llama.cpp's tensor names for Hugging Face's (its qwen2 / qwen3 tensor tables), written out here for the test
_GGUF_NAMES = (
    (r"model\.embed_tokens\.weight", "token_embd.weight"),
    (r"model\.layers\.(\d+)\.input_layernorm\.weight", r"blk.\1.attn_norm.weight"),
    (r"model\.layers\.(\d+)\.self_attn\.([qkv])_proj\.(weight|bias)", r"blk.\1.attn_\2.\3"),
    (r"model\.layers\.(\d+)\.self_attn\.o_proj\.(weight|bias)", r"blk.\1.attn_output.\2"),
    (r"model\.layers\.(\d+)\.self_attn\.([qk])_norm\.weight", r"blk.\1.attn_\2_norm.weight"),
    (r"model\.layers\.(\d+)\.post_attention_layernorm\.weight", r"blk.\1.ffn_norm.weight"),
    (r"model\.layers\.(\d+)\.mlp\.(gate|up|down)_proj\.weight", r"blk.\1.ffn_\2.weight"),
    (r"model\.norm\.weight", "output_norm.weight"),
    (r"lm_head\.weight", "output.weight"),
)


def _gguf_name(hf_name: str) -> str:
    for pattern, template in _GGUF_NAMES:
        m = re.fullmatch(pattern, hf_name)
        if m:
            return m.expand(template)
    raise AssertionError(f"no GGUF name for {hf_name}")


def write_gguf(hf, path: Path, arch: str, skip: str = "") -> Path:
    """The checkpoint's float32 tensors under llama.cpp's names with the metadata its converter writes (Q/K rows as
    stored: llama.cpp rotates halves for Qwen), plus a small byte-level vocabulary."""
    gguf = pytest.importorskip("gguf")
    c = hf.config
    w = gguf.GGUFWriter(str(path), arch)
    w.add_block_count(c.num_hidden_layers)
    w.add_context_length(c.max_position_embeddings)
    w.add_embedding_length(c.hidden_size)
    w.add_feed_forward_length(c.intermediate_size)
    w.add_head_count(c.num_attention_heads)
    w.add_head_count_kv(c.num_key_value_heads)
    w.add_rope_freq_base(c.rope_parameters["rope_theta"])
    w.add_layer_norm_rms_eps(c.rms_norm_eps)
    if arch == "qwen3":
        w.add_key_length(c.head_dim)
        w.add_value_length(c.head_dim)
    w.add_tokenizer_model("gpt2")
    w.add_tokenizer_pre("qwen2")
    w.add_token_list(["a", "b", "ab"] + [f"t{i}" for i in range(c.vocab_size - 3)])
    w.add_token_merges(["a b"])
    w.add_bos_token_id(c.bos_token_id)
    w.add_eos_token_id(c.eos_token_id)
    for name, p in hf.named_parameters():  # a tied head is listed once, as the embedding: no output.weight
        if not (skip and re.fullmatch(skip, _gguf_name(name))):
            w.add_tensor(_gguf_name(name), p.detach().float().numpy())
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


@pytest.mark.parametrize("name, arch", [("qwen2-tied", "qwen2"), ("qwen3", "qwen3")])
def test_gguf_matches_the_checkpoint(name, arch, tmp_path_factory, tmp_path):
    hf, path = _case(name, tmp_path_factory)
    model = mlxc.load(str(write_gguf(hf, tmp_path / f"{name}.gguf", arch)))
    assert model.spec.family == arch and model.spec.tie_word_embeddings == hf.config.tie_word_embeddings
    assert "interleaved" not in str(model.program)  # no llama.cpp Q/K un-permutation for these architectures
    # the same architecture as the Hugging Face config describes, parameter for parameter
    assert str(mlxc.lower(model.spec)) == str(mlxc.lower(mlxc.load(str(path)).spec))
    tokens = ids(VOCAB, seed=12)
    err = max_diff(np.array(model(mx.array(tokens)).logits), hf_logits(hf, tokens))
    assert err <= 1e-4, f"{name} GGUF: max |logits diff| = {err:.2e}"


def test_qwen3_gguf_without_qk_norms_is_refused(tmp_path_factory, tmp_path):
    hf, _ = _case("qwen3", tmp_path_factory)
    path = write_gguf(hf, tmp_path / "no-norms.gguf", "qwen3", skip=r"blk\.\d+\.attn_[qk]_norm\.weight")
    with pytest.raises(MlxcError, match="attn_q_norm"):
        mlxc.load(str(path))


# ------------------------------------------------------------------------------------------------------ export


@pytest.mark.parametrize("name", ["qwen2-tied", "qwen2-sliding", "qwen3-bias-sliding"])
def test_export_gives_transformers_the_same_logits(name, tmp_path_factory, tmp_path):
    hf, path = _case(name, tmp_path_factory)
    out = mlxc.export(path, tmp_path / "exported")
    config = json.loads((out / "config.json").read_text())
    assert config["architectures"] == [type(hf).__name__]
    back = transformers.AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32).eval()
    assert back.config.layer_types == hf.config.layer_types and back.config.sliding_window == hf.config.sliding_window
    tokens = ids(VOCAB, seed=13)
    err = max_diff(hf_logits(back, tokens), hf_logits(hf, tokens))
    assert err <= 1e-6, f"{name}: max |logits diff| {err:.2e}"


def test_windows_not_on_the_top_layers_export_through_layer_types(tmp_path):
    """max_window_layers can only say "from layer k up"; other patterns travel in layer_types, which transformers 5
    reads first."""
    cls, config = _qwen2(num_hidden_layers=3, use_sliding_window=True, sliding_window=WINDOW,
                         layer_types=["sliding_attention", "full_attention", "sliding_attention"])
    hf = save_checkpoint(cls, config, tmp_path / "ckpt", seed=3)
    model = mlxc.load(str(tmp_path / "ckpt"))
    assert [model.spec.window_of(i) for i in range(3)] == [WINDOW, None, WINDOW]
    check_logits(hf, model, VOCAB)
    written = hf_config_from_spec(model.spec)
    assert written["layer_types"] == ["sliding_attention", "full_attention", "sliding_attention"]
    assert written["max_window_layers"] == 3  # no "from k up" pattern: transformers 4 readers see full attention


# ----------------------------------------------------------------------------------------------- config reading


def _config(**overrides) -> dict:
    _, config = _qwen2(**overrides)
    return {**config.to_dict(), "architectures": ["Qwen2ForCausalLM"]}


def test_a_config_json_without_window_keys_takes_transformers_defaults():
    """Qwen2Config's defaults: use_sliding_window false, so no layer slides whatever sliding_window says."""
    data = {k: v for k, v in _config().items() if k not in ("use_sliding_window", "layer_types", "max_window_layers")}
    data["sliding_window"] = 4
    spec = spec_from_hf_config(data)
    ref = transformers.Qwen2Config(**{k: v for k, v in data.items() if k != "architectures"})
    assert spec.sliding_window is None and set(ref.layer_types) == {"full_attention"}


def test_max_window_layers_without_layer_types():
    data = {k: v for k, v in _config(num_hidden_layers=4).items() if k != "layer_types"}
    data.update(use_sliding_window=True, sliding_window=5, max_window_layers=2)
    spec = spec_from_hf_config(data)
    ref = transformers.Qwen2Config(**{k: v for k, v in data.items() if k != "architectures"})
    assert [spec.window_of(i) for i in range(4)] == [5 if t == "sliding_attention" else None for t in ref.layer_types]
    assert ref.layer_types == ["full_attention"] * 2 + ["sliding_attention"] * 2


def test_partial_rotary_factor_is_ignored_by_the_default_rope(tmp_path):
    """transformers' Qwen2 default rope turns whole heads even when the config asks for a part (transformers 5 keeps
    the factor inside rope_parameters)."""
    cls, config = _qwen2(partial_rotary_factor=0.5)
    hf = save_checkpoint(cls, config, tmp_path / "ckpt", seed=4)
    written = json.loads((tmp_path / "ckpt" / "config.json").read_text())
    assert written["rope_parameters"]["partial_rotary_factor"] == 0.5
    model = mlxc.load(str(tmp_path / "ckpt"))
    assert model.spec.rope_dims == model.spec.dim_per_head
    check_logits(hf, model, VOCAB)


@pytest.mark.parametrize("overrides, message", [
    (dict(use_sliding_window=False, sliding_window=5, layer_types=["full_attention", "sliding_attention"]),
     "use_sliding_window is false"),
    (dict(use_sliding_window=True, sliding_window=5, layer_types=["full_attention"]), "one entry per layer"),
    (dict(layer_types=["full_attention", "linear_attention"]), "unsupported layer_types"),
    (dict(partial_rotary_factor=0.5, max_position_embeddings=64, rope_scaling=dict(
        rope_type="yarn", factor=4.0, original_max_position_embeddings=16)), "partial_rotary_factor=0.5 with yarn"),
])
def test_bad_configs_are_refused(overrides, message):
    data = {**_config(), **overrides}
    with pytest.raises(MlxcError, match=message):
        spec_from_hf_config(data, source="config.json")


@pytest.mark.parametrize("name, family", [("qwen2-tied", "qwen2"), ("qwen3", "qwen3")])
def test_detected_from_tensor_names_without_metadata(name, family, tmp_path_factory, tmp_path):
    """A config naming neither architecture nor model_type: Qwen2's Q/K/V biases and Qwen3's Q/K norms tell them
    from Llama."""
    import shutil

    hf, path = _case(name, tmp_path_factory)
    bare = tmp_path / "bare"
    shutil.copytree(path, bare)
    config = json.loads((bare / "config.json").read_text())
    for key in ("architectures", "model_type"):
        config.pop(key, None)
    (bare / "config.json").write_text(json.dumps(config))
    names = [n for n, _ in hf.named_parameters()]
    assert detect_architecture(config, names) == family
    check_logits(hf, mlxc.load(str(bare)), VOCAB)


# ----------------------------------------------------------------------------------------------------- presets

PRESETS = {n: s for n, s in ALL_PRESETS.items() if s.family in ("qwen2", "qwen3")}

# Parameter counts of the published checkpoints, a tied head counted once: exact sums of the Qwen2.5 and
# DeepSeek-R1-Distill safetensors; Qwen3's model cards give total and non-embedding counts in billions, rounded.
PUBLISHED = {
    "qwen2.5-0.5b": 494_032_768,
    "qwen2.5-1.5b": 1_543_714_304,
    "qwen2.5-3b": 3_085_938_688,
    "qwen2.5-7b": 7_615_616_512,
    "deepseek-r1-distill-qwen-1.5b": 1_777_088_000,
    "deepseek-r1-distill-qwen-7b": 7_615_616_512,
}
QWEN3_CARDS = {"qwen3-0.6b": (0.6, 0.44), "qwen3-1.7b": (1.7, 1.4), "qwen3-4b": (4.0, 3.6), "qwen3-8b": (8.2, 6.95)}


def test_every_preset_has_a_published_size():
    assert set(PRESETS) == set(PUBLISHED) | set(QWEN3_CARDS)


@pytest.fixture(scope="module")
def meta_models():
    """Each preset's transformers model for the config mlxc writes, on the meta device: {name: {param: shape}}."""
    models = build_meta_models(PRESETS)
    for name, (cls, _) in models.items():
        assert cls == hf_config_from_spec(PRESETS[name])["architectures"][0]
    return {name: shapes for name, (_, shapes) in models.items()}


@pytest.mark.parametrize("name", sorted(PRESETS))
def test_preset_parameters_match_transformers(name, meta_models):
    spec = PRESETS[name]
    theirs = {hf_to_ir_name(n, spec.family): shape for n, shape in meta_models[name].items()}
    ours = {n: tuple(p.type.shape) for n, p in mlxc.lower(spec).parameters()}
    assert theirs == ours
    count = sum(prod(s) for s in theirs.values())
    assert spec.num_parameters() == count
    if name in PUBLISHED:
        assert count == PUBLISHED[name]
    else:
        total, body = QWEN3_CARDS[name]
        embedding = spec.vocab_size * spec.hidden_size * (1 if spec.tie_word_embeddings else 2)
        digits = len(str(total).split(".")[1])
        assert round(count / 1e9, digits) == total
        assert round((count - embedding) / 1e9, len(str(body).split(".")[1])) == body


def test_published_hyperparameters():
    assert all(s.attention_bias and not s.out_bias and not s.qk_norm for n, s in PRESETS.items() if s.family == "qwen2")
    assert all(s.qk_norm and not s.attention_bias and s.dim_per_head == 128 for s in PRESETS.values()
               if s.family == "qwen3")
    assert [n for n, s in PRESETS.items() if s.tie_word_embeddings] == [
        "qwen2.5-0.5b", "qwen2.5-1.5b", "qwen2.5-3b", "qwen3-0.6b", "qwen3-1.7b", "qwen3-4b"]
    assert all(s.sliding_window is None for s in PRESETS.values())  # use_sliding_window is false in all of them
    r1 = PRESETS["deepseek-r1-distill-qwen-1.5b"]
    assert r1.rope.theta == 10000.0 and r1.bos_token_id == 151646 and r1.max_position_embeddings == 131072
    assert PRESETS["qwen2.5-7b"].vocab_size == 152064 and PRESETS["qwen3-8b"].vocab_size == 151936


@pytest.mark.parametrize("repo, preset", [
    ("Qwen/Qwen2.5-0.5B-Instruct", "qwen2.5-0.5b"),
    ("Qwen/Qwen2.5-1.5B", "qwen2.5-1.5b"),
    ("qwen/qwen2.5-7b-instruct", "qwen2.5-7b"),
    ("Qwen/Qwen3-0.6B", "qwen3-0.6b"),
    ("Qwen/Qwen3-8B-Base", "qwen3-8b"),
    ("deepseek-ai/DeepSeek-R1-Distill-Qwen-1.5B", "deepseek-r1-distill-qwen-1.5b"),
    ("deepseek-ai/DeepSeek-R1-Distill-Qwen-7B", "deepseek-r1-distill-qwen-7b"),
    ("Qwen/Qwen2.5-14B", None),
])
def test_hub_ids_name_presets(repo, preset):
    assert preset_for_hub_id(repo) == preset
    if preset is not None:
        assert preset in ALL_PRESETS
