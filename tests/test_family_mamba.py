"""Mamba (transformers' MambaForCausalLM) and Jamba (JambaForCausalLM: attention, Mamba and mixture-of-experts
layers) against transformers (torch, CPU) on random-weight checkpoints built with save_pretrained, through the shared
parity harness (tests/parity.py); the selective scan's chunked prefill against the sequential recurrence and a
float64 numpy one.

The Mamba mixers get realistic dynamics on top of the harness's random weights: A_log = log(1..N) plus noise and
dt biases spread from slow (dt ~ 1e-3: decays near 1) to fast (dt ~ 2: a state mostly forgotten each step).
"""

from __future__ import annotations

import json
import sys
from math import prod

import numpy as np
import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

import mlx.core as mx  # noqa: E402

import mlxc  # noqa: E402
from mlxc.codegen.module import helper_namespace  # noqa: E402
from mlxc.frontends.hf import detect_family, hf_config_from_spec, hf_to_ir_name, spec_from_hf_config  # noqa: E402
from mlxc.frontends.presets import PRESETS as ALL_PRESETS, match_hub_id  # noqa: E402
from mlxc.frontends.spec import BlockKind, FFNType  # noqa: E402
from mlxc.ir.errors import MlxcError  # noqa: E402
from mamba_ref import mamba_dynamics, numpy_scan  # noqa: E402
from parity import (check_artifact, check_fusion, check_greedy, check_logits, check_lora, check_quantize,  # noqa: E402
                    check_stepwise, hf_logits, ids, max_diff, randomize)

VOCAB = 256
_MAMBA = dict(vocab_size=VOCAB, hidden_size=64, state_size=8, expand=2, conv_kernel=4, num_hidden_layers=2,
              bos_token_id=1, eos_token_id=2, pad_token_id=0)
_JAMBA = dict(vocab_size=VOCAB, hidden_size=64, intermediate_size=96, num_attention_heads=4, num_key_value_heads=2,
              num_experts=4, num_experts_per_tok=2, mamba_d_state=8, mamba_d_conv=4, mamba_expand=2,
              max_position_embeddings=256, bos_token_id=1, eos_token_id=2, pad_token_id=0)

CASES = {
    # biases on in_proj and out_proj, an explicit dt rank, a tied head (MambaConfig's default)
    "mamba-bias": (transformers.MambaForCausalLM, transformers.MambaConfig,
                   dict(_MAMBA, use_bias=True, time_step_rank=6)),
    # no conv bias, rank "auto" (ceil(64 / 16) = 4), an untied head, three layers
    "mamba-untied": (transformers.MambaForCausalLM, transformers.MambaConfig,
                     dict(_MAMBA, use_conv_bias=False, tie_word_embeddings=False, num_hidden_layers=3)),
    # six layers: attention at 1 and 4, mixtures at 0, 2 and 4, so both mixers come with both FFNs
    "jamba": (transformers.JambaForCausalLM, transformers.JambaConfig,
              dict(_JAMBA, num_hidden_layers=6, attn_layer_period=3, attn_layer_offset=1, expert_layer_period=2,
                   expert_layer_offset=0, mamba_dt_rank=8)),
    # attention at layer 2 of 4, mixtures at JambaConfig's default places (1 and 3), biased Mamba projections and
    # a tied head (transformers cannot run a Jamba without attention layers: its cache asks one for the length)
    "jamba-tied": (transformers.JambaForCausalLM, transformers.JambaConfig,
                   dict(_JAMBA, num_hidden_layers=4, attn_layer_period=4, attn_layer_offset=2, mamba_proj_bias=True,
                        tie_word_embeddings=True)),
}

_built: dict[str, tuple] = {}


def _case(name: str, tmp_path_factory):
    """One case's (transformers model, checkpoint path), built once per module."""
    if name not in _built:
        cls, config_cls, fields = CASES[name]
        path = tmp_path_factory.mktemp(name)
        torch.manual_seed(len(name))
        model = cls(config_cls(**fields)).eval()
        randomize(model, len(name))
        mamba_dynamics(model, len(name), dt_max=2.0, d_noise=0.2)  # dt up to 2, D around 1
        model.save_pretrained(path, safe_serialization=True)
        _built[name] = model, path
    return _built[name]


@pytest.fixture(scope="module", params=sorted(CASES))
def checkpoint(request, tmp_path_factory):
    return (request.param, *_case(request.param, tmp_path_factory))


def _module(model):
    """The generated module a loaded model runs (its helpers and settings are module globals)."""
    return sys.modules[type(model.net).__module__]


# ------------------------------------------------------------------------------------------ against transformers


def test_logits_match(checkpoint):
    """Batch 2 x 20 tokens; and 37 tokens with blocks of 8 and chunks of 3, so the chunked scan runs several blocks,
    each several chunks, the last ones padded."""
    name, hf, path = checkpoint
    model = mlxc.load(str(path))
    assert model.spec.family == name.split("-")[0]
    check_logits(hf, model, VOCAB)
    mod = _module(model)
    mod.SCAN_BLOCK, mod.SCAN_CHUNK = 8, 3
    mod.SELECTIVE_SCAN = "chunked"  # the MLX scan even where the op runs the native kernel (the first check)
    check_logits(hf, model, VOCAB, seq=37)


def test_greedy_through_the_cache_matches_generate(checkpoint):
    _, hf, path = checkpoint
    check_greedy(hf, mlxc.load(str(path)), VOCAB)


def test_chunked_prefill_then_decode_matches_full_prefill(checkpoint):
    """Prefill chunks continue from the conv, SSM (and KV) states, then single steps: one full prefill's logits."""
    _, _, path = checkpoint
    check_stepwise(mlxc.load(str(path)), VOCAB)


def test_sequential_and_chunked_prefill_agree_through_the_model(tmp_path_factory):
    """The whole model with the reference recurrence (one step per token) in place of the chunked scan."""
    _, path = _case("jamba", tmp_path_factory)
    model = mlxc.load(str(path))
    tokens = mx.array(ids(VOCAB, (2, 40), seed=4))
    mod = _module(model)
    mod.SCAN_BLOCK, mod.SCAN_CHUNK = 16, 5
    mod.SELECTIVE_SCAN = "chunked"
    chunked = np.array(model(tokens).logits)
    mod.SELECTIVE_SCAN = "sequential"
    assert max_diff(np.array(model(tokens).logits), chunked) <= 1e-5


def test_spec_reads_what_transformers_builds(checkpoint):
    """Each layer's mixer and FFN as transformers built them, and every tensor with transformers' shape (the
    experts, fused in transformers' memory, hold as many numbers as mlxc's stacked gate, up and down)."""
    name, hf, path = checkpoint
    spec = mlxc.load(str(path)).spec
    c = hf.config
    if spec.family == "jamba":
        assert [spec.layers[i].block.value for i in range(spec.num_layers)] == c.layers_block_type
        assert [spec.layer(i).ffn.kind == FFNType.MOE for i in range(spec.num_layers)] == \
            [n > 1 for n in c.layers_num_experts]
        assert spec.moe.normalize is False and spec.mamba.bcdt_norm
        assert (spec.mamba.state_size, spec.mamba.rank(64)) == (c.mamba_d_state, c.mamba_dt_rank)
    else:
        assert {layer.block for layer in spec.layers} == {BlockKind.MAMBA} and spec.num_heads is None
        assert spec.residual_in_fp32 and (spec.mamba.state_size, spec.mamba.rank(64)) == \
            (c.state_size, c.time_step_rank)
    ours = {n: tuple(p.type.shape) for n, p in mlxc.lower(spec).parameters()}
    theirs = {hf_to_ir_name(n, spec.family): tuple(p.shape) for n, p in hf.named_parameters()
              if ".experts." not in n}
    assert theirs == {n: s for n, s in ours.items() if ".mlp.experts." not in n}
    assert sum(p.numel() for n, p in hf.named_parameters() if ".experts." in n) == \
        sum(prod(s) for n, s in ours.items() if ".mlp.experts." in n)


def test_jamba_routes_without_renormalizing(tmp_path_factory):
    """transformers' Jamba keeps the top-2 softmax weights as they are: the same model renormalizing them (what
    Mixtral does) is far from transformers' logits, so the match above pins `normalize = false`."""
    hf, path = _case("jamba", tmp_path_factory)
    model = mlxc.load(str(path))
    mod = _module(model)
    route = mod.moe_route
    mod.moe_route = lambda logits, top_k, normalize: route(logits, top_k, True)
    tokens = ids(VOCAB)
    assert max_diff(np.array(model(mx.array(tokens)).logits), hf_logits(hf, tokens)) > 1e-3


@pytest.mark.parametrize("name", ["mamba-bias", "jamba"])
def test_bfloat16_matches_transformers_in_bfloat16(name, tmp_path_factory):
    """In bfloat16 Mamba's residual stream stays float32 (transformers' residual_in_fp32) and the scan computes in
    float32: within bfloat16's tolerance of transformers' bfloat16 logits, and the cache agrees with one prefill."""
    _, path = _case(name, tmp_path_factory)
    hf = transformers.AutoModelForCausalLM.from_pretrained(path, dtype=torch.bfloat16).eval()
    model = mlxc.load(str(path), dtype="bfloat16")
    if name.startswith("mamba"):
        text = str(model.program)
        assert "%out = add(%x, %attn_f32) : f32[B, T, 64]" in text and "cast(%x) {dtype = bf16}" in text
    tokens = ids(VOCAB, seed=15)
    ours = np.array(model(mx.array(tokens)).logits.astype(mx.float32))
    want = hf_logits(hf, tokens)
    assert max_diff(ours, want) <= 0.05 * np.abs(want).max()
    full = np.array(model(mx.array(tokens[:, :12])).logits.astype(mx.float32))
    cache = model.make_cache()
    steps = [model(mx.array(tokens[:, :5]), cache=cache).logits]
    steps += [model(mx.array(tokens[:, t : t + 1]), cache=cache).logits for t in range(5, 12)]
    assert max_diff(np.array(mx.concatenate(steps, axis=1).astype(mx.float32)), full) <= 0.02 * np.abs(full).max()


# ------------------------------------------------------------------------------------------ the selective scan


def _scan_inputs(seed, b=2, T=45, dm=12, n=5, fast=False):
    """Random scan inputs; `fast`: dt up to ~40 and |A| up to ~50, cumulative decays far below float32's range
    within one chunk (what a cumulative-product form would overflow on; the recurrence does not care)."""
    rng = np.random.default_rng(seed)
    f = lambda *s: rng.normal(size=s).astype(np.float32)  # noqa: E731
    A = -np.exp(f(dm, n) * (1.5 if fast else 0.5) + (2.0 if fast else 0.0))
    delta = f(b, T, dm) * (8.0 if fast else 1.0)
    return f(b, T, dm), delta, A.astype(np.float32), f(b, T, n), f(b, T, n), f(dm), f(dm) * 0.5, f(b, T, dm)


@pytest.mark.parametrize("block, chunk, fast", [(16, 4, False), (45, 45, False), (10, 3, True), (128, 16, True)])
def test_chunked_scan_equals_the_sequential_scan(block, chunk, fast):
    """`selective_scan_chunked` (blocks and chunks that divide the sequence or leave a padded tail; a chunk as long
    as the sequence) equals the step-by-step recurrence in float64 and the generated module's sequential reference,
    from zeros and from a given state, output and final state alike."""
    ns = helper_namespace(["selective_scan", "state"])
    u, delta, A, B, C, D, bias, z = args = _scan_inputs(block + chunk, fast=fast)
    h0 = np.random.default_rng(1).normal(size=(2, 12, 5)).astype(np.float32)
    for start in (None, h0):
        want, want_h = numpy_scan(u, delta, A, B, C, D, bias, z, start)
        m = [mx.array(v) for v in args]
        h = None if start is None else mx.array(start)
        y, s = ns["selective_scan_chunked"](*m[:7], m[7], h, block=block, chunk=chunk)
        ref_y, ref_s = ns["selective_scan_reference"](*m[:6], m[7], m[6], h)
        scale = np.abs(want).max()
        assert max_diff(y, want) <= 1e-5 * scale and max_diff(s, want_h) <= 1e-5 * max(np.abs(want_h).max(), 1)
        assert max_diff(y, ref_y) <= 1e-5 * scale and max_diff(s, ref_s) <= 1e-5 * max(np.abs(want_h).max(), 1)


def test_scan_op_keeps_its_state_across_calls():
    """The op's helper: a prefill in two parts and then single steps (the decode path) give one prefill's output,
    and the state is the recurrence's final one; without a state nothing is kept."""
    ns = helper_namespace(["selective_scan", "state"])
    u, delta, A, B, C, D, bias, z = (mx.array(v) for v in _scan_inputs(7, T=30))
    want, want_h = numpy_scan(*(np.array(v) for v in (u, delta, A, B, C, D, bias, z)))
    state = ns["ArrayState"]("ssm")
    part = lambda a, b: ns["selective_scan"](u[:, a:b], delta[:, a:b], A, B[:, a:b], C[:, a:b], D, bias,  # noqa
                                             z[:, a:b], state)
    ys = [part(0, 11), part(11, 20)] + [part(t, t + 1) for t in range(20, 30)]
    assert max_diff(mx.concatenate(ys, axis=1), want) <= 1e-5 * np.abs(want).max()
    assert max_diff(state.arrays[0], want_h) <= 1e-5 * np.abs(want_h).max()
    assert ns["selective_scan"](u, delta, A, B, C, D, bias, None, None).shape == u.shape


def test_decode_step_equals_the_kernels_reference_step():
    """The decode step (exp from multiplies and adds) equals mlxc's Metal kernel reference for one token."""
    from mlxc.kernels.metal.scan import selective_state_update_reference

    ns = helper_namespace(["selective_scan"])
    u, delta, A, B, C, D, bias, z = (mx.array(v[:, 0] if v.ndim == 3 else v) for v in _scan_inputs(3, fast=True))
    h = mx.array(np.random.default_rng(2).normal(size=(2, 12, 5)).astype(np.float32))
    y, s = ns["selective_scan_step"](u, delta, A, B, C, D, bias, z, h)
    ref_y, ref_s = selective_state_update_reference(u, delta, A, B, C, D, h, z, bias)
    assert max_diff(y, ref_y) <= 1e-5 * np.abs(np.array(ref_y)).max()
    assert max_diff(s, ref_s) <= 1e-5 * np.abs(np.array(ref_s)).max()


def test_fast_elementwise_math_matches_float64():
    """The scan's exp, softplus and silu (multiplies and adds, vectorized) against float64 numpy: exp to 2e-7
    relative over [-87, 88]; softplus and silu (torch's definitions) to 3e-7 relative plus 1e-30."""
    ns = helper_namespace(["selective_scan"])
    x = np.concatenate([np.linspace(-87, 88, 200001), np.geomspace(1e-9, 1e-2, 1000), -np.geomspace(1e-9, 1e-2, 1000),
                        [0.0, 20.0, 30.0, -30.0]]).astype(np.float32)
    x64 = x.astype(np.float64)
    ours = np.array(ns["scan_exp"](mx.array(x))).astype(np.float64)
    assert np.abs(ours / np.exp(x64) - 1).max() <= 2e-7
    torch_softplus = np.where(x64 > 20, x64, np.log1p(np.exp(np.minimum(x64, 20))))
    for name, want in (("scan_softplus", torch_softplus), ("scan_silu", x64 / (1 + np.exp(-x64)))):
        ours = np.array(ns[name](mx.array(x))).astype(np.float64)
        assert np.all(np.abs(ours - want) <= 3e-7 * np.abs(want) + 1e-30), name


def test_gradients_through_the_chunked_scan_match_the_sequential_scan():
    """What LoRA training differentiates: the chunked scan's gradients with respect to every input equal the
    sequential reference's (the fast exp's polynomial differentiates to exp within its error)."""
    ns = helper_namespace(["selective_scan"])
    u, delta, A, B, C, D, bias, z = (mx.array(v) for v in _scan_inputs(11, T=23))
    w = mx.array(np.random.default_rng(3).normal(size=(2, 23, 12)).astype(np.float32))
    chunked = lambda u, delta, B, C, z: (ns["selective_scan_chunked"](u, delta, A, B, C, D, bias, z, block=8,  # noqa
                                                                       chunk=3)[0] * w).sum()
    sequential = lambda u, delta, B, C, z: (ns["selective_scan_reference"](u, delta, A, B, C, D, z, bias)[0]  # noqa
                                            * w).sum()
    ours = mx.grad(chunked, argnums=(0, 1, 2, 3, 4))(u, delta, B, C, z)
    want = mx.grad(sequential, argnums=(0, 1, 2, 3, 4))(u, delta, B, C, z)
    for g, r in zip(ours, want):
        assert max_diff(g, r) <= 1e-5 * max(np.abs(np.array(r)).max(), 1.0)


# ------------------------------------------------------------------------------------------ runtime and passes


def test_decode_memory_stays_constant(tmp_path_factory):
    """The states hold the same bytes after 4 tokens and after 40: a conv window and an SSM state per layer."""
    _, path = _case("mamba-untied", tmp_path_factory)
    model = mlxc.load(str(path))
    cache = model.make_cache()
    model(mx.array(ids(VOCAB, (1, 4))), cache=cache)
    size = cache.nbytes
    for t in range(36):
        model(mx.array([[t + 3]]), cache=cache)
    m, inner = model.spec.mamba, 2 * model.spec.hidden_size
    assert cache.nbytes == size == 4 * ((m.conv_kernel - 1) * inner + inner * m.state_size) * model.spec.num_layers


def _word_tokenizer():
    """Words w0, w1, ... as tokens, with a ChatML-like template: enough for a chat session."""
    from tokenizers import Tokenizer as HFTokenizer, models, pre_tokenizers

    from mlxc.runtime.tokenizer import Tokenizer

    specials = ["<s>", "</s>", "<unk>", "<|im_start|>", "<|im_end|>", "user", "assistant"]
    vocab = {w: i for i, w in enumerate(specials + [f"w{i}" for i in range(VOCAB - len(specials))])}
    tok = HFTokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    template = ("{% for m in messages %}<|im_start|> {{ m['role'] }} {{ m['content'] }} <|im_end|> {% endfor %}"
                "{% if add_generation_prompt %}<|im_start|> assistant {% endif %}")
    return Tokenizer(tok, bos_token="<s>", eos_token="</s>", chat_template=template)


@pytest.mark.parametrize("name", ["mamba-bias", "jamba"])
def test_chat_reuses_the_prefix_and_equals_a_fresh_run(name, tmp_path_factory):
    """A turn whose history the cache holds continues from its states (conv, SSM and, for Jamba, KV); a turn
    after an edited history cannot rewind the recurrent states and is recomputed from scratch. Either way the
    reply is what a fresh greedy run of the whole prompt gives."""
    from mlxc.runtime.chat import ChatSession

    _, path = _case(name, tmp_path_factory)
    model = mlxc.load(str(path))
    model.tokenizer = tok = _word_tokenizer()

    def fresh(messages) -> list[int]:
        prompt = tok.encode(tok.apply_chat_template(messages, add_generation_prompt=True), add_special_tokens=False)
        return np.array(model.generate([prompt], max_new_tokens=6, stop_tokens=[]))[0, len(prompt):].tolist()

    session = ChatSession(model, max_new_tokens=6, stop_tokens=[])
    assert not session.cache.rewindable
    first = "".join(session.send("w1 w2 w3"))
    assert tok.encode(first, add_special_tokens=False) == fresh(session.messages[:-1])
    second = "".join(session.send("w4 w5 w6"))
    assert session.reused > 0
    assert tok.encode(second, add_special_tokens=False) == fresh(session.messages[:-1])
    session.messages[-2:] = []  # take the last exchange back: the cache holds tokens the new prompt does not
    third = "".join(session.send("w9 w8"))
    assert session.reused == 0
    assert tok.encode(third, add_special_tokens=False) == fresh(session.messages[:-1])


@pytest.mark.parametrize("name, targets", [("mamba-bias", ("in_proj", "out_proj")),
                                           ("jamba", ("in_proj", "out_proj", "q_proj", "gate_proj"))])
def test_artifact_quantize_and_lora(name, targets, tmp_path_factory, tmp_path):
    """compile -> load gives the same logits; 4- and 8-bit weights run (8-bit close to float); LoRA on the in and
    out projections (and Jamba's attention and MLP): a fresh adapter changes nothing, a trained one merges to the
    unmerged numbers."""
    _, path = _case(name, tmp_path_factory)
    check_artifact(path, tmp_path, VOCAB)
    if name.startswith("jamba"):
        _check_quantized_jamba(path)
    else:
        check_quantize(path, VOCAB)
    check_lora(path, VOCAB, targets)


def _routes(model, tokens) -> tuple[np.ndarray, list[np.ndarray]]:
    """Logits, and the experts each mixture call ran for each token (one [B*T, top_k] array per MoE layer)."""
    mod = _module(model)
    seen, route = [], mod.moe_route

    def recording(logits, top_k, normalize):
        experts, weights = route(logits, top_k, normalize)
        seen.append(np.array(experts))
        return experts, weights

    mod.moe_route = recording
    try:
        return np.array(model(mx.array(tokens)).logits), seen
    finally:
        mod.moe_route = route


def _check_quantized_jamba(path) -> None:
    """As `check_quantize`, but 8-bit rounding may move a token near a tie between two experts to the other one (a
    jump that attention and the recurrent states carry to every later token): such switches must be rare, and with
    the float model's choice of experts (their weights from the 8-bit router logits) 8-bit stays within 5% of the
    logits' scale."""
    tokens = ids(VOCAB, seed=7)
    ref, ref_routes = _routes(mlxc.load(str(path)), tokens)
    for bits in (8, 4):
        model = mlxc.load(str(path), quantize=bits, group_size=32)
        assert f"q{bits}g32" in str(model.program)
        out, routes = _routes(model, tokens)
        assert np.isfinite(out).all()
        if bits == 8:
            assert sum((a != b).any(-1).sum() for a, b in zip(ref_routes, routes)) <= 0.05 * tokens.size * len(routes)
            mod, chosen = _module(model), iter(ref_routes)

            def as_float(logits, top_k, normalize):
                experts = mx.array(next(chosen))
                probs = mx.softmax(logits.astype(mx.float32), axis=-1)
                return experts, mx.take_along_axis(probs, experts, axis=-1)

            mod.moe_route = as_float
            out = np.array(model(mx.array(tokens)).logits)
            assert max_diff(out, ref) <= 0.05 * np.abs(ref).max()


def test_fusion_changes_nothing(tmp_path_factory):
    """Jamba's attention and dense MLPs fuse (qkv, gate-up) next to its Mamba layers with the same numbers."""
    _, path = _case("jamba", tmp_path_factory)
    check_fusion(path, VOCAB, fused_names=("qkv_proj", "gate_up_proj"))


def test_default_pipeline_changes_nothing_for_mamba(tmp_path_factory):
    """A Mamba mixer has no parallel projections to fuse: the default pipeline (fusion, CSE, lifting, DCE) keeps its
    numbers and its greedy tokens those of a DCE-only program."""
    _, path = _case("mamba-bias", tmp_path_factory)
    check_fusion(path, VOCAB, fused_names=())


@pytest.mark.parametrize("name", ["mamba-untied", "jamba"])
def test_stream_yields_generate_and_a_closed_stream_leaves_a_consistent_cache(name, tmp_path_factory):
    """`stream` yields `generate`'s tokens; closed after k tokens it takes back its speculative step (restoring the
    conv and SSM snapshots, trimming the KV), so the cache holds the prompt and k - 1 tokens and feeding the k-th
    gives the logits of one prefill of the whole sequence."""
    _, path = _case(name, tmp_path_factory)
    model = mlxc.load(str(path))
    prompt = ids(VOCAB, (1, 7), seed=21)
    want = np.array(model.generate(mx.array(prompt), max_new_tokens=6, stop_tokens=[]))[0, 7:].tolist()
    assert [int(t[0]) for t in model.stream(mx.array(prompt), max_new_tokens=6, stop_tokens=[])] == want
    cache = model.make_cache()
    stream = model.stream(mx.array(prompt), max_new_tokens=6, cache=cache, stop_tokens=[])
    got = [int(next(stream)[0]) for _ in range(3)]
    stream.close()
    assert got == want[:3] and cache.offset == 7 + 2
    seq = mx.array(np.concatenate([prompt, [got]], axis=1))
    step = model(seq[:, -1:], cache=cache).logits[:, -1]
    assert max_diff(np.array(step), np.array(model(seq).logits[:, -1])) <= 1e-4


@pytest.mark.parametrize("name", ["mamba-untied", "jamba-tied"])
def test_cli_compiles_a_quantized_artifact_and_runs_it(name, tmp_path_factory, tmp_path, capsys):
    """`mlxc compile --quantize 8` writes an artifact whose `mlxc run --tokens` continuation is the one the API
    generates from the checkpoint quantized the same way."""
    from mlxc.cli import main

    _, path = _case(name, tmp_path_factory)
    out = tmp_path / "q8"
    assert main(["compile", str(path), "-o", str(out), "--quantize", "8", "--group-size", "32"]) == 0
    capsys.readouterr()
    assert main(["run", str(out), "--tokens", "5,9,17,33", "--max-new-tokens", "5", "--temperature", "0"]) == 0
    printed = capsys.readouterr().out
    want = np.array(mlxc.load(str(path), quantize=8, group_size=32).generate(
        mx.array([[5, 9, 17, 33]]), max_new_tokens=5, stop_tokens=()))[0, 4:].tolist()
    assert [int(t) for t in printed.replace(",", " ").split()] == want


@pytest.mark.parametrize("name, targets", [("mamba-bias", ("in_proj", "x_proj", "out_proj")),
                                           ("jamba-tied", ("in_proj", "out_proj", "q_proj", "v_proj"))])
def test_lora_training_lowers_the_loss(name, targets, tmp_path_factory):
    """A few steps of runtime/train.py through the chunked scan's gradients learn a repeating pattern; the base
    weights stay as they were."""
    from mlx.utils import tree_flatten

    from mlxc.runtime.train import Example, TrainConfig, train_lora

    _, path = _case(name, tmp_path_factory)
    model = mlxc.load(str(path), lora=mlxc.LoRAConfig(rank=4, alpha=8.0, targets=targets))
    before = {n: np.array(a) for n, a in tree_flatten(model.net.parameters()) if ".lora_" not in n}
    pattern = [5, 9, 17, 33, 65, 12] * 6
    result = train_lora(model.net, [Example(tokens=tuple(pattern))] * 4,
                        TrainConfig(steps=16, batch_size=2, seq_len=32, learning_rate=3e-2, log_every=4))
    assert np.mean(result.losses[-3:]) < 0.7 * np.mean(result.losses[:3])
    after = dict(tree_flatten(model.net.parameters()))
    assert all(np.array_equal(np.array(after[n]), a) for n, a in before.items())


@pytest.mark.parametrize("name", sorted(CASES))
def test_export_gives_transformers_the_same_logits(name, tmp_path_factory, tmp_path):
    """`mlxc export`'s config and tensors load in transformers to the same logits."""
    from mlxc.cli import main

    hf, path = _case(name, tmp_path_factory)
    out = tmp_path / "exported"
    assert main(["export", str(path), "-o", str(out)]) == 0
    config = json.loads((out / "config.json").read_text())
    assert config["architectures"] == [type(hf).__name__]
    back = transformers.AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32).eval()
    tokens = ids(VOCAB, seed=13)
    assert max_diff(hf_logits(back, tokens), hf_logits(hf, tokens)) <= 1e-6


def test_bench_runs(tmp_path_factory, capsys):
    from mlxc.cli import main

    _, path = _case("mamba-bias", tmp_path_factory)
    assert main(["bench", str(path), "--prompt-len", "20", "--gen-len", "4", "--repeats", "1"]) == 0
    out = capsys.readouterr().out
    assert "prefill" in out and "decode" in out


# ------------------------------------------------------------------------------------------ presets and detection

PUBLISHED = {"mamba-130m": (768, 24), "mamba-370m": (1024, 48), "mamba-790m": (1536, 48), "mamba-1.4b": (2048, 48),
             "mamba-2.8b": (2560, 64)}


@pytest.mark.parametrize("name", sorted(PUBLISHED) + ["jamba-tiny", "jamba-v0.1"])
def test_preset_parameters_match_transformers(name):
    """Each preset's config on transformers' meta device: the same tensors, shapes and count as mlxc's lowering
    (Jamba's experts, fused there, by count)."""
    spec = ALL_PRESETS[name]
    config = hf_config_from_spec(spec)
    family = spec.family
    cls, config_cls = (transformers.MambaForCausalLM, transformers.MambaConfig) if family == "mamba" else \
        (transformers.JambaForCausalLM, transformers.JambaConfig)
    with torch.device("meta"):
        hf = cls(config_cls(**{k: v for k, v in config.items()
                               if k not in ("architectures", "model_type", "dtype", "torch_dtype")}))
    theirs = {hf_to_ir_name(n, family): tuple(p.shape) for n, p in hf.named_parameters() if ".experts." not in n}
    ours = {n: tuple(p.type.shape) for n, p in mlxc.lower(spec).parameters()}
    assert theirs == {n: s for n, s in ours.items() if ".mlp.experts." not in n}
    assert spec.num_parameters() == sum(p.numel() for p in hf.parameters())
    if name in PUBLISHED:
        assert (spec.hidden_size, spec.num_layers) == PUBLISHED[name]
        size = name.split("-")[1]  # the counts the names round to, within 3%
        nominal = float(size[:-1]) * (1e6 if size.endswith("m") else 1e9)
        assert abs(spec.num_parameters() / nominal - 1) < 0.03


@pytest.mark.parametrize("repo, preset", [("state-spaces/mamba-130m-hf", "mamba-130m"),
                                          ("state-spaces/mamba-1.4b", "mamba-1.4b"),
                                          ("https://huggingface.co/state-spaces/mamba-2.8b-hf", "mamba-2.8b"),
                                          ("ai21labs/Jamba-v0.1", "jamba-v0.1")])
def test_hub_ids(repo, preset):
    match = match_hub_id(repo)
    assert match is not None and match.preset == preset and match.family == preset.split("-")[0]


@pytest.mark.parametrize("name", ["mamba-bias", "jamba"])
def test_detection_from_config_and_tensor_names(name, tmp_path_factory):
    hf, path = _case(name, tmp_path_factory)
    family = name.split("-")[0]
    assert detect_family({"model_type": family}).family == family
    assert detect_family({"architectures": [type(hf).__name__]}).family == family
    from safetensors import safe_open

    with safe_open(str(path / "model.safetensors"), "np") as f:
        names = list(f.keys())
    assert detect_family({}, names).family == family
    if family == "mamba":
        legacy = [n.replace("embeddings.", "embedding.") for n in names]  # older checkpoints' name
        assert detect_family({}, legacy).family == "mamba"


@pytest.mark.parametrize("name, change, message", [
    ("mamba-bias", dict(hidden_act="swiglu"), "unsupported hidden_act 'swiglu'"),
    ("mamba-bias", dict(state_size=0), "state_size"),
    ("mamba-bias", dict(time_step_rank="big"), "time_step_rank"),
    ("jamba", dict(attn_layer_offset=3), "attn_layer_offset (3) must be smaller than attn_layer_period (3)"),
    ("jamba", dict(expert_layer_period=0), "`expert_layer_period` must be a positive integer"),
    ("jamba", dict(num_experts_per_tok=5), r"num_experts_per_tok (5) exceeds num_experts (4)"),
    ("jamba", dict(mamba_conv_bias="yes"), "`mamba_conv_bias` must be true or false"),
    ("jamba", dict(mamba_d_conv=0), "mamba_d_conv"),
])
def test_bad_configs_are_one_clear_error(name, change, message):
    cls, _, fields = CASES[name]
    config = {"architectures": [cls.__name__], "model_type": name.split("-")[0], **fields, **change}
    with pytest.raises(MlxcError) as err:
        spec_from_hf_config(config)
    assert message in str(err.value)
