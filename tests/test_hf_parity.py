"""mlxc against Hugging Face transformers (torch, CPU) on random-weight checkpoints built with save_pretrained.

Bars from the foundation issue: max |logits - HF| <= 1e-4 over a batch of 2 sequences of >= 16 tokens (fp32), and
16 greedy tokens through the KV cache equal to HF `generate` token for token.
"""

from __future__ import annotations

import numpy as np
import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

import mlx.core as mx  # noqa: E402

import mlxc  # noqa: E402

VOCAB = 320
SEQ = 24


def _llama_config(**overrides):
    base = dict(
        vocab_size=VOCAB, hidden_size=64, intermediate_size=112, num_hidden_layers=3, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=256, rms_norm_eps=1e-5, tie_word_embeddings=False,
        bos_token_id=1, eos_token_id=2, pad_token_id=0,
    )
    base.update(overrides)
    return transformers.LlamaConfig(**base)


def _mistral_config(**overrides):
    base = dict(
        vocab_size=VOCAB, hidden_size=64, intermediate_size=112, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=1, max_position_embeddings=256, rms_norm_eps=1e-6, sliding_window=7,
        tie_word_embeddings=False, bos_token_id=1, eos_token_id=2,
    )
    base.update(overrides)
    return transformers.MistralConfig(**base)


CASES = {
    "llama-gqa": lambda: (transformers.LlamaForCausalLM, _llama_config()),
    "llama-tied": lambda: (transformers.LlamaForCausalLM, _llama_config(tie_word_embeddings=True)),
    "llama-mha-bias": lambda: (
        transformers.LlamaForCausalLM,
        _llama_config(num_key_value_heads=4, attention_bias=True, mlp_bias=True),
    ),
    "llama-mqa-head-dim": lambda: (transformers.LlamaForCausalLM, _llama_config(num_key_value_heads=1, head_dim=32)),
    "llama3-rope": lambda: (
        transformers.LlamaForCausalLM,
        _llama_config(rope_theta=500000.0, max_position_embeddings=64, rope_scaling=dict(
            rope_type="llama3", factor=8.0, low_freq_factor=1.0, high_freq_factor=4.0,
            original_max_position_embeddings=16)),
    ),
    "llama-linear-rope": lambda: (
        transformers.LlamaForCausalLM, _llama_config(rope_scaling=dict(rope_type="linear", factor=4.0))
    ),
    "llama-dynamic-rope": lambda: (
        transformers.LlamaForCausalLM,
        _llama_config(max_position_embeddings=20, rope_scaling=dict(rope_type="dynamic", factor=2.0)),
    ),
    "llama-yarn-rope": lambda: (
        transformers.LlamaForCausalLM,
        _llama_config(max_position_embeddings=64, rope_scaling=dict(
            rope_type="yarn", factor=4.0, original_max_position_embeddings=16)),
    ),
    "llama-yarn-mscale-rope": lambda: (
        transformers.LlamaForCausalLM,
        _llama_config(max_position_embeddings=64, rope_scaling=dict(
            rope_type="yarn", factor=4.0, original_max_position_embeddings=16, mscale=1.2, mscale_all_dim=0.8,
            beta_fast=16.0, beta_slow=2.0)),
    ),
    "llama-yarn-attention-factor": lambda: (
        transformers.LlamaForCausalLM,
        _llama_config(max_position_embeddings=64, rope_scaling=dict(
            rope_type="yarn", factor=4.0, original_max_position_embeddings=16, attention_factor=1.3)),
    ),
    "mistral-sliding": lambda: (transformers.MistralForCausalLM, _mistral_config()),
}


def _randomize(model, seed: int) -> None:
    """Non-trivial norm weights and biases, so a wrong (1 + w) or a dropped bias cannot hide."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("norm.weight"):
                p.copy_(1.0 + 0.1 * torch.randn(p.shape, generator=g))
            elif name.endswith("bias"):
                p.copy_(0.05 * torch.randn(p.shape, generator=g))
            else:
                p.copy_(0.08 * torch.randn(p.shape, generator=g))


@pytest.fixture(scope="module", params=sorted(CASES))
def checkpoint(request, tmp_path_factory):
    cls, config = CASES[request.param]()
    torch.manual_seed(0)
    model = cls(config).eval()
    _randomize(model, seed=len(request.param))
    path = tmp_path_factory.mktemp(request.param)
    model.save_pretrained(path, safe_serialization=True)
    return request.param, model, path


def _hf_logits(model, ids: np.ndarray) -> np.ndarray:
    with torch.no_grad():
        return model(torch.tensor(ids, dtype=torch.long)).logits.float().numpy()


def test_prefill_logits_match(checkpoint):
    name, hf_model, path = checkpoint
    model = mlxc.load(str(path))
    ids = np.random.default_rng(1).integers(3, VOCAB, size=(2, SEQ))
    ours = np.array(model(mx.array(ids)).logits)
    ref = _hf_logits(hf_model, ids)
    assert ours.shape == ref.shape
    err = np.abs(ours - ref).max()
    assert err <= 1e-4, f"{name}: max |logits diff| = {err:.2e}"


def test_cached_greedy_generation_matches(checkpoint):
    name, hf_model, path = checkpoint
    model = mlxc.load(str(path))
    prompt = np.random.default_rng(2).integers(3, VOCAB, size=(1, 9))
    with torch.no_grad():
        ref = hf_model.generate(
            torch.tensor(prompt), max_new_tokens=16, min_new_tokens=16, do_sample=False, eos_token_id=None,
            pad_token_id=0,
        ).numpy()
    ours = np.array(model.generate(mx.array(prompt), max_new_tokens=16, temperature=0.0, stop_tokens=()))
    assert ours.tolist() == ref.tolist(), f"{name}: greedy tokens differ"


def test_cached_decode_logits_match_full_forward(checkpoint):
    """Token-by-token through the cache (past the sliding window) equals one full prefill."""
    name, _, path = checkpoint
    model = mlxc.load(str(path))
    ids = mx.array(np.random.default_rng(3).integers(3, VOCAB, size=(2, 20)))
    full = np.array(model(ids).logits)
    cache = model.make_cache()
    parts = [model(ids[:, :5], cache=cache).logits]
    for t in range(5, 20):
        parts.append(model(ids[:, t : t + 1], cache=cache).logits)
    stepped = np.array(mx.concatenate(parts, axis=1))
    assert np.abs(stepped - full).max() <= 1e-4, name


def test_loss_matches_hf(checkpoint):
    name, hf_model, path = checkpoint
    model = mlxc.load(str(path))
    ids = np.random.default_rng(4).integers(3, VOCAB, size=(2, 16))
    labels = ids.copy()
    labels[0, :4] = -100
    with torch.no_grad():
        ref = hf_model(torch.tensor(ids), labels=torch.tensor(labels)).loss.item()
    ours = model(mx.array(ids), labels=mx.array(labels)).loss.item()
    assert abs(ours - ref) <= 1e-4, name


# ---------------------------------------------------------------- fusion (fuse-qkv, fuse-gate-up) changes nothing


def _fused_and_unfused(path):
    """The default pipeline (fuse-qkv and fuse-gate-up included) and the unfused program (`dce` only)."""
    fused = mlxc.load(str(path))
    unfused = mlxc.load(str(path), passes=["dce"])
    fused_text, unfused_text = str(fused.program), str(unfused.program)
    assert "qkv_proj" in fused_text and "gate_up_proj" in fused_text, "the default pipeline did not fuse"
    assert "qkv_proj" not in unfused_text and "gate_up_proj" not in unfused_text
    return fused, unfused


def test_fused_logits_match_unfused(checkpoint):
    name, _, path = checkpoint
    fused, unfused = _fused_and_unfused(path)
    ids = mx.array(np.random.default_rng(5).integers(3, VOCAB, size=(2, SEQ)))
    a, b = np.array(fused(ids).logits), np.array(unfused(ids).logits)
    assert a.dtype == np.float32 and a.shape == b.shape
    err = np.abs(a - b).max()
    assert err <= 1e-5, f"{name}: fused vs unfused max |logits diff| = {err:.2e}"


def test_fused_cached_greedy_generation_matches_unfused(checkpoint):
    name, _, path = checkpoint
    fused, unfused = _fused_and_unfused(path)
    prompt = mx.array(np.random.default_rng(6).integers(3, VOCAB, size=(1, 9)))
    kw = dict(max_new_tokens=16, temperature=0.0, stop_tokens=())
    a = np.array(fused.generate(prompt, **kw)).tolist()
    b = np.array(unfused.generate(prompt, **kw)).tolist()
    assert len(a[0]) == 9 + 16
    assert a == b, f"{name}: fused and unfused greedy tokens differ"
