"""Mamba-2 (transformers' Mamba2ForCausalLM) against transformers (torch, CPU) on random-weight checkpoints built with
save_pretrained, through the shared parity harness (tests/parity.py), and its SSD op against a float64 numpy
recurrence.

Every checkpoint has n_groups > 1 (heads share B and C by group; the gated norm normalizes per group) and test
sequences longer than its chunk_size and not a multiple of it, so prefills run several chunks, the last one short.
"""

from __future__ import annotations

import json
import sys

import numpy as np
import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

import mlx.core as mx  # noqa: E402

import mlxc  # noqa: E402
from mlxc.frontends.hf import detect_family, hf_config_from_spec, hf_to_ir_name, spec_from_hf_config  # noqa: E402
from mlxc.frontends.presets import PRESETS as ALL_PRESETS, match_hub_id  # noqa: E402
from mlxc.frontends.spec import BlockKind  # noqa: E402
from mlxc.ir.errors import MlxcError  # noqa: E402
from parity import (check_artifact, check_greedy, check_logits, check_lora, check_quantize, check_stepwise,  # noqa: E402
                    hf_logits, ids, max_diff, save_checkpoint)

VOCAB = 256
_SMALL = dict(vocab_size=VOCAB, hidden_size=64, num_heads=8, head_dim=16, expand=2, state_size=16, conv_kernel=4,
              num_hidden_layers=2, bos_token_id=1, eos_token_id=2, pad_token_id=0)

CASES = {
    # 2 groups, chunks of 8 (20 tokens: 8 + 8 + 4), biases on both projections, an untied head, and a dt clamp tight
    # enough to bind (softplus(dt) of these weights often exceeds 0.5)
    "groups-clamp": dict(n_groups=2, chunk_size=8, use_bias=True, time_step_limit=(0.0, 0.5)),
    # 4 groups (2 heads each), chunks of 6, no conv bias, a tied head, no clamp (transformers' default limit)
    "groups-tied": dict(n_groups=4, chunk_size=6, use_conv_bias=False, tie_word_embeddings=True, num_hidden_layers=3),
}

_built: dict[str, tuple] = {}


def _case(name: str, tmp_path_factory):
    """One case's (transformers model, checkpoint path), built once per module."""
    if name not in _built:
        config = transformers.Mamba2Config(**{**_SMALL, **CASES[name]})
        path = tmp_path_factory.mktemp(name)
        _built[name] = save_checkpoint(transformers.Mamba2ForCausalLM, config, path, seed=len(name)), path
    return _built[name]


@pytest.fixture(scope="module", params=sorted(CASES))
def checkpoint(request, tmp_path_factory):
    return (request.param, *_case(request.param, tmp_path_factory))


def _module(model):
    return sys.modules[type(model.net).__module__]


# ------------------------------------------------------------------------------------------ against transformers


def test_logits_match(checkpoint):
    """20 and 37 tokens: several chunks (8 or 6 tokens), the last one partial."""
    _, hf, path = checkpoint
    model = mlxc.load(str(path))
    assert model.spec.family == "mamba2" and model.spec.mamba2.n_groups > 1
    check_logits(hf, model, VOCAB)
    check_logits(hf, model, VOCAB, seq=37)


def test_greedy_through_the_cache_matches_generate(checkpoint):
    _, hf, path = checkpoint
    check_greedy(hf, mlxc.load(str(path)), VOCAB)


def test_stepping_through_the_cache_matches_transformers(checkpoint):
    """A prefill in two chunks (the second from the first's conv and SSM states), then one token at a time: the
    logits transformers gives through its own cache, step for step (its single steps do not clamp dt; neither do
    mlxc's, so with a binding clamp these differ from one full prefill in both)."""
    _, hf, path = checkpoint
    model = mlxc.load(str(path))
    tokens = ids(VOCAB, (2, 16), seed=3)
    cuts = [(0, 5), (5, 11)] + [(t, t + 1) for t in range(11, 16)]
    cache, ours = model.make_cache(), []
    for a, b in cuts:
        ours.append(np.array(model(mx.array(tokens[:, a:b]), cache=cache).logits))
    theirs, past = [], None
    with torch.no_grad():
        for a, b in cuts:
            out = hf(torch.tensor(tokens[:, a:b]), cache=past, use_cache=True)
            past = out.cache
            theirs.append(out.logits.float().numpy())
    assert max_diff(np.concatenate(ours, axis=1), np.concatenate(theirs, axis=1)) <= 1e-4


def test_chunked_prefill_then_decode_matches_full_prefill(tmp_path_factory):
    """Without a binding clamp, prefill chunks and single steps through the states give one full prefill's logits."""
    _, path = _case("groups-tied", tmp_path_factory)
    check_stepwise(mlxc.load(str(path)), VOCAB)


def test_the_settings_matter(tmp_path_factory):
    """transformers honours the clamp and the groups (the same weights without them give other logits), so matching
    its logits above tested them."""
    hf, path = _case("groups-clamp", tmp_path_factory)
    tokens = ids(VOCAB)
    for change in (dict(time_step_limit=(0.0, float("inf"))),):
        config = transformers.Mamba2Config(**{**_SMALL, **CASES["groups-clamp"], **change})
        other = transformers.Mamba2ForCausalLM.from_pretrained(path, config=config).eval()
        assert max_diff(hf_logits(other, tokens), hf_logits(hf, tokens)) > 1e-3


def test_spec_and_tensors_read_what_transformers_builds(checkpoint):
    name, hf, path = checkpoint
    spec = mlxc.load(str(path)).spec
    m = spec.mamba2
    c = hf.config
    assert (m.num_heads, m.head_dim, m.state_size, m.n_groups, m.chunk_size, m.conv_kernel) == \
        (c.num_heads, c.head_dim, c.state_size, c.n_groups, c.chunk_size, c.conv_kernel)
    assert {layer.block for layer in spec.layers} == {BlockKind.MAMBA2} and spec.num_heads is None
    ours = {n: tuple(p.type.shape) for n, p in mlxc.lower(spec).parameters()}
    theirs = {hf_to_ir_name(n, "mamba2"): tuple(p.shape) for n, p in hf.named_parameters()}
    assert theirs == ours


# ------------------------------------------------------------------------------------------ the SSD op


def _numpy_scan(x, dt, A, B, C, D, dt_bias, limit=None, state=None):
    """The recurrence, one step at a time in float64 numpy (softplus as torch: linear above 20)."""
    b, L, h, p = x.shape
    g = B.shape[2]
    d = dt.astype(np.float64) + dt_bias
    d = np.where(d > 20, d, np.log1p(np.exp(np.minimum(d, 20))))
    if limit is not None:
        d = np.clip(d, *limit)
    s = np.zeros((b, h, p, B.shape[3])) if state is None else state.astype(np.float64)
    ys = []
    for t in range(L):
        Bh, Ch = np.repeat(B[:, t], h // g, axis=1), np.repeat(C[:, t], h // g, axis=1)  # [b, h, n]
        s = np.exp(d[:, t] * A)[..., None, None] * s + (d[:, t, :, None] * x[:, t])[..., None] * Bh[:, :, None, :]
        ys.append((s * Ch[:, :, None, :]).sum(-1) + D[:, None] * x[:, t])
    return np.stack(ys, axis=1), s


def _ssd_inputs(seed, b=2, L=29, h=6, p=4, g=3, n=5):
    rng = np.random.default_rng(seed)
    f = lambda *s: rng.normal(size=s).astype(np.float32)  # noqa: E731
    return (f(b, L, h, p), f(b, L, h) - 1.0, -np.exp(f(h) * 0.5), f(b, L, g, n), f(b, L, g, n), f(h), f(h) * 0.5)


@pytest.mark.parametrize("chunk, limit", [(8, None), (5, (0.05, 0.4)), (64, None)])
def test_chunked_ssd_equals_the_sequential_scan(chunk, limit):
    """The generated module's `ssd`, chunked (a partial last chunk; a chunk longer than the sequence), equals the
    step-by-step recurrence in float64; so does continuing from a state, and single steps (which never clamp)."""
    ns = mlxc.codegen.module.helper_namespace(["ssd", "state"])
    x, dt, A, B, C, D, bias = args = _ssd_inputs(chunk)
    want, want_s = _numpy_scan(*args, limit=limit)
    state = ns["ArrayState"]("ssm")
    top = None if limit is None else limit
    call = lambda a, b: ns["ssd"](*(mx.array(v[:, a:b]) for v in (x, dt)), mx.array(A),  # noqa: E731
                                  *(mx.array(v[:, a:b]) for v in (B, C)), mx.array(D), mx.array(bias), state,
                                  chunk_size=chunk, dt_limit=top)
    full = np.array(call(0, 29))
    np.testing.assert_allclose(full, want, rtol=1e-4, atol=1e-4)
    np.testing.assert_allclose(np.array(state.arrays[0]), want_s, rtol=1e-4, atol=1e-4)
    state.reset()
    parts = np.concatenate([np.array(call(0, 13)), np.array(call(13, 29))], axis=1)
    np.testing.assert_allclose(parts, want, rtol=1e-4, atol=1e-4)
    state.reset()
    np.array(call(0, 20))
    steps = np.concatenate([np.array(call(t, t + 1)) for t in range(20, 29)], axis=1)
    _, s20 = _numpy_scan(*(v[:, :20] if v.ndim > 1 else v for v in args), limit=limit)
    tail, _ = _numpy_scan(*(v[:, 20:] if v.ndim > 1 else v for v in args), limit=None, state=s20)
    np.testing.assert_allclose(steps, tail, rtol=1e-4, atol=1e-4)


def test_ssd_runs_chunks_no_longer_than_ssd_chunk(monkeypatch):
    """A long prefill runs chunks of SSD_CHUNK whatever the checkpoint's chunk_size (the same recurrence)."""
    ns = mlxc.codegen.module.helper_namespace(["ssd", "state"])
    seen = []
    scan = ns["mamba2_chunk_scan_reference"]
    ns["mamba2_chunk_scan_reference"] = lambda *a: seen.append(a[-1]) or scan(*a)
    x, dt, A, B, C, D, bias = (mx.array(v) for v in _ssd_inputs(0, L=100))
    ns["ssd"](x, dt, A, B, C, D, bias, None, chunk_size=256)
    ns["ssd"](x[:, :9], dt[:, :9], A, B[:, :9], C[:, :9], D, bias, None, chunk_size=256)
    ns["ssd"](x, dt, A, B, C, D, bias, None, chunk_size=16)
    assert seen == [ns["SSD_CHUNK"], 9, 16]


# ------------------------------------------------------------------------------------------ runtime and passes


def test_decode_memory_stays_constant(tmp_path_factory):
    """The states hold the same bytes after 4 tokens and after 40: a conv window and an SSM state per layer."""
    _, path = _case("groups-tied", tmp_path_factory)
    model = mlxc.load(str(path))
    cache = model.make_cache()
    model(mx.array(ids(VOCAB, (1, 4))), cache=cache)
    size = cache.nbytes
    for t in range(36):
        model(mx.array([[t + 3]]), cache=cache)
    m = model.spec.mamba2
    per_layer = (m.conv_kernel - 1) * (m.intermediate_size + 2 * m.n_groups * m.state_size) + \
        m.num_heads * m.head_dim * m.state_size
    assert cache.nbytes == size == 4 * per_layer * model.spec.num_layers


def _word_tokenizer():
    """A whitespace word-level tokenizer with a ChatML-like template: enough to drive a chat session."""
    from tokenizers import Tokenizer as HFTokenizer, models, pre_tokenizers

    from mlxc.runtime.tokenizer import Tokenizer

    words = ["<s>", "</s>", "<|im_start|>", "<|im_end|>", "<unk>", "user", "assistant", "system"] + \
        [f"w{i}" for i in range(VOCAB - 8)]
    tok = HFTokenizer(models.WordLevel({w: i for i, w in enumerate(words)}, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    template = ("{% for m in messages %}<|im_start|> {{ m['role'] }} {{ m['content'] }} <|im_end|> {% endfor %}"
                "{% if add_generation_prompt %}<|im_start|> assistant {% endif %}")
    return Tokenizer(tok, bos_token="<s>", eos_token="</s>", chat_template=template)


def test_chat_reuses_the_prefix_and_equals_a_fresh_run(tmp_path_factory):
    """A turn whose history the cache holds continues from its states; an edited turn cannot rewind them and is
    recomputed. Either way the reply is a fresh greedy run's."""
    from mlxc.runtime.chat import ChatSession

    _, path = _case("groups-clamp", tmp_path_factory)
    model = mlxc.load(str(path))
    model.tokenizer = tok = _word_tokenizer()

    def fresh(messages) -> list[int]:
        prompt = tok.encode(tok.apply_chat_template(messages, add_generation_prompt=True), add_special_tokens=False)
        return np.array(model.generate([prompt], max_new_tokens=6, stop_tokens=[]))[0, len(prompt):].tolist()

    session = ChatSession(model, max_new_tokens=6, stop_tokens=[])
    first = "".join(session.send("w1 w2 w3"))
    assert tok.encode(first, add_special_tokens=False) == fresh(session.messages[:-1])
    second = "".join(session.send("w4 w5"))
    assert session.reused > 0
    assert tok.encode(second, add_special_tokens=False) == fresh(session.messages[:-1])
    session.messages[-2:] = []
    third = "".join(session.send("w9 w9"))
    assert session.reused == 0
    assert tok.encode(third, add_special_tokens=False) == fresh(session.messages[:-1])


def test_artifact_quantize_and_lora(tmp_path_factory, tmp_path):
    """compile -> load gives the same logits; 4- and 8-bit weights run (8-bit close to float); LoRA on the in and
    out projections: a fresh adapter changes nothing, a trained one merges to the same numbers."""
    _, path = _case("groups-clamp", tmp_path_factory)
    check_artifact(path, tmp_path, VOCAB)
    check_quantize(path, VOCAB)
    check_lora(path, VOCAB, ("in_proj", "out_proj"))


def test_export_loads_in_transformers(tmp_path_factory, tmp_path):
    """`mlxc export`'s config and tensors load in transformers to the same logits (the clamp written back too)."""
    from mlxc.cli import main

    hf, path = _case("groups-clamp", tmp_path_factory)
    out = tmp_path / "exported"
    assert main(["export", str(path), "-o", str(out)]) == 0
    config = json.loads((out / "config.json").read_text())
    assert config["model_type"] == "mamba2" and config["time_step_limit"] == [0.0, 0.5] and config["n_groups"] == 2
    back = transformers.AutoModelForCausalLM.from_pretrained(out).eval()
    tokens = ids(VOCAB)
    assert max_diff(hf_logits(back, tokens), hf_logits(hf, tokens)) <= 1e-6


def test_bench_runs(tmp_path_factory, capsys):
    from mlxc.cli import main

    _, path = _case("groups-tied", tmp_path_factory)
    assert main(["bench", str(path), "--prompt-len", "20", "--gen-len", "4", "--repeats", "1"]) == 0
    out = capsys.readouterr().out
    assert "prefill" in out and "decode" in out


# ------------------------------------------------------------------------------------------ presets and detection

PUBLISHED = {"mamba2-130m": (768, 24), "mamba2-370m": (1024, 48), "mamba2-780m": (1536, 48),
             "mamba2-1.3b": (2048, 48), "mamba2-2.7b": (2560, 64)}


@pytest.mark.parametrize("name", sorted(PUBLISHED))
def test_preset_parameters_match_transformers(name):
    """Each preset's config on transformers' meta device: the same tensors, shapes and count as mlxc's lowering."""
    spec = ALL_PRESETS[name]
    assert (spec.hidden_size, spec.num_layers) == PUBLISHED[name]
    config = transformers.Mamba2Config(**{k: v for k, v in hf_config_from_spec(spec).items()
                                          if k not in ("architectures", "model_type", "dtype", "torch_dtype")})
    with torch.device("meta"):
        hf = transformers.Mamba2ForCausalLM(config)
    theirs = {hf_to_ir_name(n, "mamba2"): tuple(p.shape) for n, p in hf.named_parameters()}
    ours = {n: tuple(p.type.shape) for n, p in mlxc.lower(spec).parameters()}
    assert theirs == ours
    assert spec.num_parameters() == sum(p.numel() for p in hf.parameters())


def test_preset_sizes_are_the_names():
    """The counts the names give (130M, 370M, 780M, 1.3B, 2.7B), within 5%."""
    for name in PUBLISHED:
        size = name.split("-")[1]
        nominal = float(size[:-1]) * (1e6 if size.endswith("m") else 1e9)
        assert abs(ALL_PRESETS[name].num_parameters() / nominal - 1) < 0.05, name


@pytest.mark.parametrize("repo, preset", [("state-spaces/mamba2-130m", "mamba2-130m"),
                                          ("AntonV/mamba2-1.3b-hf", "mamba2-1.3b"),
                                          ("https://huggingface.co/state-spaces/mamba2-2.7b", "mamba2-2.7b")])
def test_hub_ids(repo, preset):
    match = match_hub_id(repo)
    assert match is not None and (match.family, match.preset) == ("mamba2", preset)


def test_detection_from_config_and_tensor_names(tmp_path_factory):
    hf, path = _case("groups-clamp", tmp_path_factory)
    assert detect_family({"model_type": "mamba2"}).family == "mamba2"
    assert detect_family({"architectures": ["Mamba2ForCausalLM"]}).family == "mamba2"
    names = [n for n, _ in hf.named_parameters()]
    assert detect_family({}, names).family == "mamba2"
    legacy = [n.replace("embeddings.", "embedding.") for n in names]  # older checkpoints' name
    assert detect_family({}, legacy).family == "mamba2"
    assert hf_to_ir_name("backbone.embedding.weight", "mamba2") == "embed_tokens.weight"


@pytest.mark.parametrize("change, message", [
    (dict(hidden_act="gelu"), "hidden_act 'gelu' is not supported"),
    (dict(num_heads=6), "num_heads * head_dim (96) must equal expand * hidden_size (128)"),
    (dict(num_hidden_layers=0), "num_hidden_layers"),
    (dict(n_groups=3), "num_heads (8) must be a multiple of n_groups (3)"),
    (dict(time_step_limit=[0.1]), "`time_step_limit` must be a pair of numbers"),
    (dict(time_step_limit=[0.5, 0.1]), "time_step_limit [0.5, 0.1] is empty"),
])
def test_bad_configs_are_one_clear_error(change, message):
    config = {"architectures": ["Mamba2ForCausalLM"], "model_type": "mamba2", **_SMALL, "n_groups": 2, **change}
    with pytest.raises(MlxcError) as err:
        spec_from_hf_config(config)
    assert message in str(err.value)
