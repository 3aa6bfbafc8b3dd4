"""Position embeddings from a spec: ALiBi, learned absolute, sinusoidal, none (NoPE) and per-layer choices, each held
to an independent NumPy forward of the whole tiny model (embeddings, positions, every layer, head), in one prefill and
through the cache (a prefill in chunks, then single tokens), with sliding windows and bounded caches.

The ALiBi slopes the reference uses come from transformers' own functions (`_get_alibi_slopes`,
`build_mpt_alibi_tensor`), and its bias is BLOOM's (slope * key position), not mlxc's (slope * distance): the two
must agree through the softmax.
"""

from __future__ import annotations

import math

import numpy as np
import pytest

import mlx.core as mx
import mlx.utils

import mlxc
from mlxc.frontends.spec import AlibiSpec, ModelSpec, PositionEmbedding
from mlxc.ir import parse_program, print_program
from mlxc.ir.errors import MlxcError

VOCAB, SEQ = 48, 18


# ----------------------------------------------------------------------------------------------- the slopes


def _bloom_slopes(n: int) -> np.ndarray:
    torch = pytest.importorskip("torch")
    from transformers.models.bloom.modeling_bloom import _get_alibi_slopes

    return _get_alibi_slopes(n, torch.device("cpu")).numpy()


def _mpt_slopes(n: int, bias_max: float = 8) -> np.ndarray:
    """The slopes inside transformers' MPT bias table: its last column is slope * -(length - 1)."""
    pytest.importorskip("torch")
    from transformers.models.mpt.modeling_mpt import build_mpt_alibi_tensor

    return -build_mpt_alibi_tensor(n, 2, alibi_bias_max=bias_max).numpy()[:, 0, 0]


@pytest.mark.parametrize("n", list(range(1, 21)) + [24, 40, 64, 71, 112])
def test_slopes_are_transformers(n):
    assert np.allclose(AlibiSpec().values(n), _bloom_slopes(n), rtol=1e-6, atol=0)
    assert np.allclose(AlibiSpec(slopes="mpt").values(n), _mpt_slopes(n), rtol=1e-6, atol=0)
    assert np.allclose(AlibiSpec(slopes="mpt", bias_max=6).values(n), _mpt_slopes(n, 6), rtol=1e-6, atol=0)


def test_bloom_slopes_have_bias_max_8():
    with pytest.raises(ValueError, match="bias_max 8"):
        AlibiSpec(bias_max=6)


# ----------------------------------------------------------------------------------------------- NumPy reference


def _norm(x, w, b, kind, eps):
    if kind == "rms":
        return x / np.sqrt((x * x).mean(-1, keepdims=True) + eps) * w
    mu = x.mean(-1, keepdims=True)
    y = (x - mu) / np.sqrt(((x - mu) ** 2).mean(-1, keepdims=True) + eps) * w
    return y if b is None else y + b


def _rope(x, positions, theta):
    """NeoX-style rotary on the whole head: halves rotated against each other."""
    d = x.shape[-1]
    inv = 1.0 / theta ** (np.arange(0, d, 2) / d)
    ang = positions[:, None] * inv[None]
    cos, sin = np.concatenate([np.cos(ang)] * 2, -1), np.concatenate([np.sin(ang)] * 2, -1)
    rot = np.concatenate([-x[..., d // 2:], x[..., :d // 2]], -1)
    return x * cos + rot * sin


def _act(x, name):
    if name == "relu":
        return np.maximum(x, 0)
    if name == "gelu_tanh":
        return 0.5 * x * (1 + np.tanh(math.sqrt(2 / math.pi) * (x + 0.044715 * x ** 3)))
    return x / (1 + np.exp(-x))  # silu


def reference(spec: ModelSpec, W: dict, tokens: np.ndarray, window: int | None = None) -> np.ndarray:
    """Logits [B, T, vocab] of `spec` with weights `W`, in float64; `window` bounds every layer's keys (a bounded
    cache) on top of the spec's own sliding windows."""
    g = lambda n: None if n not in W else W[n].astype(np.float64)  # noqa: E731
    B, T = tokens.shape
    H = spec.hidden_size
    pos = np.arange(T, dtype=np.float64)
    h = g("embed_tokens.weight")[tokens]
    if spec.position == PositionEmbedding.LEARNED:
        h = h + g("embed_positions.weight")[:T]
    elif spec.position == PositionEmbedding.SINUSOIDAL:  # the original paper's table: sin at even, cos at odd
        table = np.zeros((T, H))
        angle = pos[:, None] / 10000 ** (np.arange(0, H, 2) / H)[None]
        table[:, 0::2], table[:, 1::2] = np.sin(angle), np.cos(angle)
        h = h + table
    kind, eps = spec.norm.value, spec.norm_eps
    if spec.embedding_norm:
        h = _norm(h, g("embed_norm.weight"), g("embed_norm.bias"), kind, eps)
    nq, nkv, d = spec.num_heads, spec.kv_heads, spec.dim_per_head
    alibi = spec.alibi or AlibiSpec()
    slopes = (_bloom_slopes if alibi.slopes == "bloom" else lambda n: _mpt_slopes(n, alibi.bias_max))(nq)
    for i, layer in enumerate(spec.layers):
        p = f"layers.{i}."
        x = _norm(h, g(p + "input_norm.weight"), g(p + "input_norm.bias"), kind, eps)
        q, k, v = ((x @ g(p + f"attn.{n}_proj.weight").T + (0 if g(p + f"attn.{n}_proj.bias") is None else
                                                             g(p + f"attn.{n}_proj.bias")))
                   .reshape(B, T, heads, d).transpose(0, 2, 1, 3)
                   for n, heads in (("q", nq), ("k", nkv), ("v", nkv)))
        position = layer.position or spec.position
        if position == PositionEmbedding.ROPE:
            q, k = _rope(q, pos, spec.rope.theta), _rope(k, pos, spec.rope.theta)
        k, v = np.repeat(k, nq // nkv, axis=1), np.repeat(v, nq // nkv, axis=1)
        scores = q @ k.transpose(0, 1, 3, 2) * (spec.query_scale or d ** -0.5)
        if position == PositionEmbedding.ALIBI:  # BLOOM's form: slope * key position
            scores = scores + slopes[None, :, None, None] * pos[None, None, None, :]
        qi, kj = np.arange(T)[:, None], np.arange(T)[None]
        visible = kj <= qi
        for w in (spec.window_of(i), window):
            if w is not None:
                visible &= qi - kj < w
        scores = np.where(visible, scores, -np.inf)
        probs = np.exp(scores - scores.max(-1, keepdims=True))
        probs /= probs.sum(-1, keepdims=True)
        o = (probs @ v).transpose(0, 2, 1, 3).reshape(B, T, nq * d)
        ob = g(p + "attn.o_proj.bias")
        h = h + o @ g(p + "attn.o_proj.weight").T + (0 if ob is None else ob)
        x = _norm(h, g(p + "post_attention_norm.weight"), g(p + "post_attention_norm.bias"), kind, eps)
        if spec.ffn.value == "gated":
            m = _act(x @ g(p + "mlp.gate_proj.weight").T, spec.activation.value) * (x @ g(p + "mlp.up_proj.weight").T)
        else:
            m = _act(x @ g(p + "mlp.up_proj.weight").T, spec.activation.value)
        h = h + m @ g(p + "mlp.down_proj.weight").T
    h = _norm(h, g("norm.weight"), g("norm.bias"), kind, eps)
    head = g("embed_tokens.weight") if spec.tie_word_embeddings else g("lm_head.weight")
    return h @ head.T


def _spec(**fields) -> ModelSpec:
    base = dict(name="positions", vocab_size=VOCAB, hidden_size=24, intermediate_size=40, num_layers=2, num_heads=6,
                num_kv_heads=3, max_position_embeddings=32, activation="relu")
    return ModelSpec(**{**base, **fields})


CASES = {
    # ALiBi with 6 heads (not a power of two) over 3 KV heads, BLOOM's slopes, LayerNorms and an embedding norm
    "alibi-bloom": _spec(position="alibi", norm="layer", embedding_norm=True, ffn="dense", activation="gelu_tanh",
                         attention_bias=True, tie_word_embeddings=True),
    # MPT's slopes with another bias_max, 5 heads, bias-free LayerNorms, a sliding window on every layer
    "alibi-mpt-window": _spec(position="alibi", alibi=AlibiSpec(slopes="mpt", bias_max=6), num_heads=5,
                              num_kv_heads=5, hidden_size=30, norm="layer", norm_bias=False, sliding_window=5),
    # a learned table, offset by the cache position
    "learned": _spec(position="learned", norm="layer"),
    # the fixed sin/cos table
    "sinusoidal": _spec(position="sinusoidal", ffn="dense"),
    # no positions at all (causal masking alone orders tokens)
    "none": _spec(position="none"),
    # NoPE layers between rotary ones, and an ALiBi layer: each layer's own positions
    "per-layer": _spec(position="rope", num_layers=3, num_heads=4, num_kv_heads=2,
                       layers=[{"position": "none"}, {}, {"position": "alibi"}]),
}


_models: dict = {}


def _model(name: str):
    if name not in _models:
        model = mlxc.load(CASES[name], passes=["dce"], seed=3, init_scale=0.3)
        rng = np.random.default_rng(4)  # non-trivial norm gains and biases, so a dropped one shows
        W = {}
        for n, a in mlx.utils.tree_flatten(model.net.parameters()):
            a = np.array(a)
            if n.endswith(".bias"):
                a = rng.normal(0, 0.2, a.shape).astype(np.float32)
            elif a.ndim == 1:
                a = (1 + rng.normal(0, 0.2, a.shape)).astype(np.float32)
            W[n] = a
        model.net.load_weights([(n, mx.array(a)) for n, a in W.items()])
        _models[name] = model, W
    return _models[name]


def _tokens(shape=(2, SEQ), seed=1):
    return np.random.default_rng(seed).integers(0, VOCAB, size=shape)


def _err(a, b) -> float:
    return float(np.abs(np.asarray(a, np.float64) - np.asarray(b, np.float64)).max())


@pytest.mark.parametrize("name", sorted(CASES))
def test_prefill_matches_numpy(name):
    model, W = _model(name)
    tokens = _tokens()
    ref = reference(model.spec, W, tokens)
    assert np.abs(ref).max() > 1.0  # logits of some size, so the tolerance below means something
    assert _err(model(mx.array(tokens)).logits, ref) <= 1e-4


@pytest.mark.parametrize("name", sorted(CASES))
def test_cached_decode_matches_numpy(name):
    """A prefill of 7, one of 4, then single tokens: each call's logits are the full sequence's rows there."""
    model, W = _model(name)
    tokens = _tokens(seed=2)
    ref = reference(model.spec, W, tokens)
    cache, at, out = model.make_cache(), 0, []
    for n in [7, 4] + [1] * (SEQ - 11):
        out.append(np.array(model(mx.array(tokens[:, at:at + n]), cache=cache).logits))
        at += n
    assert _err(np.concatenate(out, 1), ref) <= 1e-4


@pytest.mark.parametrize("name", ["alibi-bloom", "none", "per-layer"])
def test_bounded_cache_is_a_window(name):
    """max_kv_size=6: every query sees its last 6 positions, in decode as in the reference's window."""
    model, W = _model(name)
    tokens = _tokens(seed=5)
    ref = reference(model.spec, W, tokens, window=6)
    cache, out = model.make_cache(max_kv_size=6), []
    for t in range(SEQ):
        out.append(np.array(model(mx.array(tokens[:, t:t + 1]), cache=cache).logits))
    assert _err(np.concatenate(out, 1), ref) <= 1e-4


def test_learned_positions_stop_at_the_table():
    model, _ = _model("learned")  # 32 positions
    cache = model.make_cache()
    model(mx.array(_tokens((1, 30))), cache=cache)
    with pytest.raises(Exception, match="past the learned position table"):
        model(mx.array(_tokens((1, 3))), cache=cache)


def test_ir_declares_each_kind_once():
    """The ops carry what they mean: alibi slopes as an attribute, positions read from the offset input; the text
    form round-trips."""
    for name, marker in (("alibi-bloom", "alibi = [0.25, 0.0625"), ("learned", "learned_positions(%input_ids"),
                         ("sinusoidal", "sinusoidal_positions(%input_ids, %offset)")):
        text = print_program(mlxc.lower(CASES[name]))
        assert marker in text, name
        assert print_program(parse_program(text)) == text
    text = print_program(mlxc.lower(CASES["none"]))
    assert "rope(" not in text and "alibi" not in text and "positions" not in text


@pytest.mark.parametrize("fields, message", [
    (dict(layers=[{"position": "learned"}, {}]), "a layer's position may be rope, alibi or none"),
    (dict(alibi=AlibiSpec()), "no attention layer uses alibi"),
    (dict(position="sinusoidal", hidden_size=25, num_heads=5, num_kv_heads=5), "even hidden_size"),
    (dict(norm_bias=False), "RMS norms never have one"),
])
def test_bad_position_settings_are_refused(fields, message):
    with pytest.raises(ValueError, match=message):
        _spec(**fields)


def test_tensor_parallel_ranks_keep_their_heads_slopes():
    """Sharding whole heads over ranks hands each rank its heads' slopes (transformers' slopes, sliced)."""
    from mlxc.passes.pipeline import build_pipeline, run_pipeline
    from mlxc.passes.shard import Shard, head_shares, place

    spec = CASES["alibi-bloom"]
    slopes = _bloom_slopes(spec.num_heads)
    for rank, ((q0, q1), _) in enumerate(head_shares(spec.num_heads, spec.kv_heads, 3)):
        program = run_pipeline(mlxc.lower(spec), place(build_pipeline(), Shard(ranks=3, rank=rank, mode="tensor")))
        attention = [o for fn in program.functions for o in fn.ops if o.op == "attention"]
        assert attention and all(np.allclose(o.attrs["alibi"], slopes[q0:q1], rtol=1e-6) for o in attention)
        assert all(o.operands[0].type.shape[1] == q1 - q0 for o in attention)


def test_generation_stops_at_the_learned_table_even_with_a_bounded_cache():
    """A bounded cache lifts the context limit for rotary or ALiBi models, not for a learned table: generation ends
    where the table does, and a prompt that fills it is one clear error."""
    model, _ = _model("learned")  # 32 positions
    out = model.generate(mx.array(_tokens((1, 20))), max_new_tokens=40, temperature=0.0, stop_tokens=(),
                         max_kv_size=8)
    assert np.array(out).shape == (1, 32)
    with pytest.raises(MlxcError, match="learned position table"):
        model.generate(mx.array(_tokens((1, 32))), max_new_tokens=4, max_kv_size=8)
    alibi, _ = _model("alibi-bloom")  # the same max_position_embeddings, but distances only: the cache bounds it
    out = alibi.generate(mx.array(_tokens((1, 20))), max_new_tokens=20, temperature=0.0, stop_tokens=(),
                         max_kv_size=8)
    assert np.array(out).shape == (1, 40)
