"""Recurrent layers (LSTM, GRU, minGRU) and hybrid stacks from spec files.

References are independent of mlxc: torch.nn.LSTM / torch.nn.GRU with the weights copied over, and the minGRU
paper's equations ("Were RNNs All We Needed?", Feng et al. 2024) written out in numpy, step by step in float64.
"""

from __future__ import annotations

from pathlib import Path

import mlx.core as mx
import numpy as np
import pytest

import mlxc
from mlxc.frontends.spec import ModelSpec, RecurrentSpec
from mlxc.frontends.spec_file import dump_spec_file, load_spec_file
from mlxc.ir import parse_program, verify
from mlxc.ir.errors import MlxcError
from mlxc.passes import LoRAConfig
from mlxc.runtime import weights as W

torch = pytest.importorskip("torch")

TOL = 1e-5
VOCAB, HIDDEN = 48, 16


def _max_diff(a, b) -> float:
    return float(np.max(np.abs(np.asarray(a, np.float64) - np.asarray(b, np.float64))))


def _bind(model, tensors: dict) -> None:
    """Give a loaded model these checkpoint tensors (IR names), through its load-time transforms."""
    model.net.load_weights(W.bind(model.program, {k: mx.array(np.asarray(v, np.float32)) for k, v in tensors.items()}))


# ------------------------------------------------------------------------------------------------ LSTM and GRU


class _TorchStack(torch.nn.Module):
    """The same model written with torch modules: embedding, then per layer x + out(cell(rms_norm(x))), final norm,
    LM head."""

    def __init__(self, kind: str, cell: int, bias: bool, layers: int):
        super().__init__()
        rnn = {"lstm": torch.nn.LSTM, "gru": torch.nn.GRU}[kind]
        self.embed = torch.nn.Embedding(VOCAB, HIDDEN)
        self.norms = torch.nn.ModuleList(torch.nn.RMSNorm(HIDDEN, eps=1e-5) for _ in range(layers))
        self.cells = torch.nn.ModuleList(rnn(HIDDEN, cell, bias=bias, batch_first=True) for _ in range(layers))
        self.outs = torch.nn.ModuleList(torch.nn.Linear(cell, HIDDEN, bias=False) if cell != HIDDEN
                                        else torch.nn.Identity() for _ in range(layers))
        self.norm = torch.nn.RMSNorm(HIDDEN, eps=1e-5)
        self.head = torch.nn.Linear(HIDDEN, VOCAB, bias=False)
        g = torch.Generator().manual_seed(0)
        with torch.no_grad():
            for n in [*self.norms, self.norm]:
                n.weight.copy_(1.0 + 0.1 * torch.randn(HIDDEN, generator=g))

    def forward(self, ids):
        x = self.embed(ids)
        states = []
        for norm, cell, out in zip(self.norms, self.cells, self.outs):
            y, state = cell(norm(x))
            states.append(state)
            x = x + out(y)
        return self.head(self.norm(x)), states

    def tensors(self) -> dict:
        """The weights under mlxc's IR names: torch's layouts, copied as they are."""
        t = {"embed_tokens.weight": self.embed.weight, "norm.weight": self.norm.weight,
             "lm_head.weight": self.head.weight}
        for i, (norm, cell, out) in enumerate(zip(self.norms, self.cells, self.outs)):
            p = f"layers.{i}."
            t[p + "input_norm.weight"] = norm.weight
            t[p + "rnn.in_proj.weight"], t[p + "rnn.hh.weight"] = cell.weight_ih_l0, cell.weight_hh_l0
            if cell.bias:
                t[p + "rnn.in_proj.bias"], t[p + "rnn.hh.bias"] = cell.bias_ih_l0, cell.bias_hh_l0
            if isinstance(out, torch.nn.Linear):
                t[p + "rnn.out_proj.weight"] = out.weight
        return {k: v.detach().numpy() for k, v in t.items()}


@pytest.mark.parametrize("kind,cell,bias", [("lstm", 24, True), ("lstm", 16, False), ("gru", 24, True),
                                            ("gru", 16, False)])
def test_lstm_and_gru_layers_equal_torch(kind: str, cell: int, bias: bool) -> None:
    """Two stacked layers with torch's weights: one prefill, and a prefill in chunks then single steps through the
    cache, equal torch's logits; the cache's states are torch's final (h, c) / h."""
    torch.manual_seed(1)
    ref = _TorchStack(kind, cell, bias, layers=2).eval()
    spec = ModelSpec(name=f"{kind}-stack", vocab_size=VOCAB, hidden_size=HIDDEN, intermediate_size=32, num_layers=2,
                     ffn="none", recurrent=RecurrentSpec(hidden_size=cell, bias=bias), layer_pattern=[kind])
    model = mlxc.load(spec)
    _bind(model, ref.tensors())
    ids = np.random.default_rng(2).integers(0, VOCAB, size=(2, 13))
    with torch.no_grad():
        want, states = ref(torch.tensor(ids))
    want = want.numpy()
    assert _max_diff(model(mx.array(ids)).logits, want) <= TOL

    cache = model.make_cache()
    parts = [model(mx.array(ids[:, :5]), cache=cache).logits]
    parts += [model(mx.array(ids[:, t : t + 1]), cache=cache).logits for t in range(5, 13)]
    assert _max_diff(mx.concatenate(parts, axis=1), want) <= TOL
    for layer, state in zip(cache, states):  # torch returns [1, B, H] per state
        got = layer.arrays
        expected = state if kind == "lstm" else (state,)
        assert len(got) == len(expected)
        for g, e in zip(got, expected):
            assert _max_diff(g, e[0].numpy()) <= TOL


# ------------------------------------------------------------------------------------------------ minGRU


def _g(x):
    return np.where(x >= 0, x + 0.5, 1.0 / (1.0 + np.exp(-x)))


def _mingru_reference(k: np.ndarray, c: np.ndarray, h0: np.ndarray | None = None) -> np.ndarray:
    """The paper's sequential minGRU in float64: z = sigmoid(k), h~ = g(c), h_t = (1 - z) h_{t-1} + z h~."""
    k, c = k.astype(np.float64), c.astype(np.float64)
    h = np.zeros(k[:, 0].shape) if h0 is None else h0.astype(np.float64)
    out = []
    for t in range(k.shape[1]):
        z = 1.0 / (1.0 + np.exp(-k[:, t]))
        h = (1 - z) * h + z * _g(c[:, t])
        out.append(h)
    return np.stack(out, axis=1)


@pytest.fixture(scope="module")
def mingru_helpers():
    from mlxc.codegen.module import helper_namespace

    return helper_namespace(["recurrent"])


@pytest.mark.parametrize("with_h0", [False, True])
def test_mingru_parallel_and_sequential_agree_with_the_paper(mingru_helpers, with_h0: bool) -> None:
    """The log-space parallel scan and the sequential step both equal the paper's equations (and so each other),
    from zeros and from a carried h."""
    rng = np.random.default_rng(4)
    k, c = (2.0 * rng.normal(size=(2, 64, 8))).astype(np.float32), (2.0 * rng.normal(size=(2, 64, 8))).astype(np.float32)
    h0 = rng.uniform(0.1, 2.0, size=(2, 8)).astype(np.float32) if with_h0 else None
    want = _mingru_reference(k, c, h0)
    scan = mingru_helpers["mingru_scan"](mx.array(k), mx.array(c), None if h0 is None else mx.array(h0))
    h = mx.zeros((2, 8)) if h0 is None else mx.array(h0)
    steps = []
    for t in range(64):
        h = mingru_helpers["mingru_step"](mx.array(k[:, t]), mx.array(c[:, t]), h)
        steps.append(h)
    steps = mx.stack(steps, axis=1)
    assert _max_diff(scan, want) <= TOL
    assert _max_diff(steps, want) <= TOL
    assert _max_diff(scan, steps) <= TOL


def test_mingru_scan_stays_accurate_on_long_sequences(mingru_helpers) -> None:
    """The paper's log-space scan over a whole sequence loses float32 precision as sum log(1 - z) grows (relative
    1e-3 after 4096 steps); restarting it per chunk keeps 2048 steps within 1e-5 of the float64 recurrence."""
    rng = np.random.default_rng(9)
    k, c = (2.0 * rng.normal(size=(2, 2048, 16))).astype(np.float32), (2.0 * rng.normal(size=(2, 2048, 16))).astype(np.float32)
    want = _mingru_reference(k, c)
    got = np.array(mingru_helpers["mingru_scan"](mx.array(k), mx.array(c)), np.float64)
    assert np.max(np.abs(got - want) / want) <= TOL


def test_mingru_model_equals_numpy_and_its_cache_continues(tmp_path: Path) -> None:
    """A minGRU stack (cell wider than the model, so it projects back) equals the paper's equations written in
    numpy around mlxc's own weights; a prefill then single steps through the cache (the sequential form) equals
    one prefill (the parallel form)."""
    spec = ModelSpec(name="mingru-stack", vocab_size=VOCAB, hidden_size=HIDDEN, intermediate_size=32, num_layers=2,
                     ffn="none", recurrent=RecurrentSpec(hidden_size=24), layer_pattern=["mingru"])
    model = mlxc.load(spec, seed=3, init_scale=0.4)
    p = {k: np.array(v, np.float64) for k, v in W.random_weights(model.program, seed=3, scale=0.4).items()}
    rng = np.random.default_rng(5)
    for name in p:  # non-trivial norms and biases, so a dropped one cannot hide
        if name.endswith("norm.weight"):
            p[name] = 1.0 + 0.1 * rng.normal(size=p[name].shape)
        elif name.endswith(".bias"):
            p[name] = 0.3 * rng.normal(size=p[name].shape)
    _bind(model, p)

    def rms(x, w):
        return x / np.sqrt(np.mean(x * x, axis=-1, keepdims=True) + 1e-5) * w

    ids = rng.integers(0, VOCAB, size=(2, 11))
    x = p["embed_tokens.weight"][ids]
    for i in range(2):
        q = f"layers.{i}."
        h = rms(x, p[q + "input_norm.weight"])
        k = h @ p[q + "rnn.z_proj.weight"].T + p[q + "rnn.z_proj.bias"]
        c = h @ p[q + "rnn.h_proj.weight"].T + p[q + "rnn.h_proj.bias"]
        x = x + _mingru_reference(k, c) @ p[q + "rnn.out_proj.weight"].T
    want = rms(x, p["norm.weight"]) @ p["lm_head.weight"].T
    assert _max_diff(model(mx.array(ids)).logits, want) <= TOL

    cache = model.make_cache()
    parts = [model(mx.array(ids[:, :4]), cache=cache).logits]
    parts += [model(mx.array(ids[:, t : t + 1]), cache=cache).logits for t in range(4, 11)]
    assert _max_diff(mx.concatenate(parts, axis=1), want) <= TOL
    assert not cache.rewindable and cache.offset == 11


def test_recurrent_op_type_errors() -> None:
    """Mis-shaped operands fail in the type rule with a message naming the op."""
    from mlxc.ir import DType, FunctionBuilder, Program, TensorType

    def build(op, *shapes):
        b = FunctionBuilder("main", Program())
        vals = [b.input(f"a{i}", TensorType(DType.F32, s)) for i, s in enumerate(shapes)]
        b.op(op, *vals, name="h")

    with pytest.raises(MlxcError, match=r"lstm weight_hh must be \[4\*H, H\]"):
        build("lstm", ("B", "T", 32), (24, 8))
    with pytest.raises(MlxcError, match="gru gates .* do not match weight_hh"):
        build("gru", ("B", "T", 32), (24, 8))
    with pytest.raises(MlxcError, match="mingru gate .* and candidate .* disagree"):
        build("mingru", ("B", "T", 8), ("B", "T", 9))


# ------------------------------------------------------------------------------------------------ hybrid spec files

HYBRID_YAML = """\
name: my-hybrid
vocab_size: 96
hidden_size: 32
intermediate_size: 64
num_layers: 8
num_heads: 4
num_kv_heads: 2
eos_token_ids: [2]
recurrent: {hidden_size: 48}
mamba2: {num_heads: 4, head_dim: 16, state_size: 8, n_groups: 2, chunk_size: 4}
moe: {num_experts: 4, top_k: 2, intermediate_size: 32}
layer_pattern:                  # repeated until num_layers
  - {block: mingru, ffn: none}
  - {block: gru, ffn: dense}
  - {block: mamba2, ffn: none}
  - {block: attention, ffn: moe}
"""


@pytest.fixture(scope="module")
def hybrid(tmp_path_factory):
    path = tmp_path_factory.mktemp("hybrid") / "hybrid.yaml"
    path.write_text(HYBRID_YAML)
    return path


def test_hybrid_spec_file_expands_its_pattern(hybrid: Path, tmp_path: Path) -> None:
    spec = load_spec_file(hybrid)
    assert [(layer.block.value, layer.ffn.value) for layer in spec.layers] == \
        [("mingru", "none"), ("gru", "dense"), ("mamba2", "none"), ("attention", "moe")] * 2
    dump_spec_file(spec, tmp_path / "again.json")  # written back expanded, read back equal
    assert load_spec_file(tmp_path / "again.json") == spec


def _greedy_without_cache(model, ids: np.ndarray, n: int) -> np.ndarray:
    """Greedy decoding that runs the whole sequence again every step: no state carried anywhere."""
    seq = ids.copy()
    for _ in range(n):
        nxt = np.array(mx.argmax(model(mx.array(seq)).logits[:, -1], axis=-1))
        seq = np.concatenate([seq, nxt[:, None]], axis=1)
    return seq


def test_hybrid_runs_generates_and_survives_an_artifact(hybrid: Path, tmp_path: Path) -> None:
    """The hybrid compiles and runs; `generate` through its states (recurrent, KV) equals greedy decoding without a
    cache; a prefill then single steps equals one prefill; `mlxc.compile` -> `mlxc.load` gives the same logits."""
    model = mlxc.load(hybrid, seed=1, init_scale=0.3)
    assert [kind for kind, _ in model.module.STATES] == ["recurrent", "recurrent", "conv", "ssm", "kv"] * 2
    ids = np.random.default_rng(6).integers(3, 96, size=(2, 9))
    full = model(mx.array(ids)).logits
    assert full.shape == (2, 9, 96) and bool(mx.all(mx.isfinite(full)))
    got = np.array(model.generate(mx.array(ids), max_new_tokens=6, stop_tokens=[]))
    np.testing.assert_array_equal(got, _greedy_without_cache(model, ids, 6))

    cache = model.make_cache()
    parts = [model(mx.array(ids[:, :6]), cache=cache).logits]
    parts += [model(mx.array(ids[:, t : t + 1]), cache=cache).logits for t in range(6, 9)]
    # Mamba-2's chunked prefill and its single steps round differently in float32 (measured 1.3e-5 here)
    assert _max_diff(mx.concatenate(parts, axis=1), full) <= 1e-4

    text = str(model.program)  # the recurrent ops and their states print and parse back
    assert "state(recurrent, recurrent, conv, ssm, kv, recurrent, recurrent, conv, ssm, kv)" in text
    assert str(verify(parse_program(text))) == text

    out = tmp_path / "artifact"
    mlxc.compile(str(hybrid), str(out), seed=1, init_scale=0.3)
    assert _max_diff(mlxc.load(str(out))(mx.array(ids)).logits, full) <= TOL


def test_hybrid_stream_stopped_early_leaves_a_consistent_cache(hybrid: Path) -> None:
    """A stream that ends after k tokens takes back its speculative step by restoring the recurrent snapshots, so
    the cache holds the prompt and the first k - 1 tokens: feeding the k-th continues exactly."""
    model = mlxc.load(hybrid, seed=1, init_scale=0.3)
    ids = np.random.default_rng(7).integers(3, 96, size=(1, 7))
    cache = model.make_cache()
    stream = model.stream(mx.array(ids), max_new_tokens=10, cache=cache, stop_tokens=[])
    toks = [int(next(stream)[0]) for _ in range(3)]
    stream.close()
    assert cache.offset == 7 + 2
    seq = np.concatenate([ids, [toks]], axis=1)
    step = model(mx.array(seq[:, -1:]), cache=cache).logits[:, -1]
    assert _max_diff(step, model(mx.array(seq)).logits[:, -1]) <= 1e-4


def _word_tokenizer():
    """A whitespace word-level tokenizer with a ChatML-like template: enough to drive a chat session."""
    from tokenizers import Tokenizer as HFTokenizer, models, pre_tokenizers

    from mlxc.runtime.tokenizer import Tokenizer

    words = ["<s>", "</s>", "<|im_start|>", "<|im_end|>", "<unk>", "user", "assistant", "system"] + \
        [f"w{i}" for i in range(80)]
    tok = HFTokenizer(models.WordLevel({w: i for i, w in enumerate(words)}, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    template = ("{% for m in messages %}<|im_start|> {{ m['role'] }} {{ m['content'] }} <|im_end|> {% endfor %}"
                "{% if add_generation_prompt %}<|im_start|> assistant {% endif %}")
    return Tokenizer(tok, bos_token="<s>", eos_token="</s>", chat_template=template)


def test_hybrid_chat_reuses_or_recomputes_and_equals_a_fresh_run(hybrid: Path) -> None:
    """A chat turn whose history the cache already holds continues from it; a turn that diverges from the cache
    cannot rewind the recurrent states, so it is recomputed. Either way the reply equals a fresh greedy run."""
    from mlxc.runtime.chat import ChatSession

    model = mlxc.load(hybrid, seed=1, init_scale=0.3)
    model.tokenizer = tok = _word_tokenizer()

    def fresh(messages) -> list[int]:
        ids = tok.encode(tok.apply_chat_template(messages, add_generation_prompt=True), add_special_tokens=False)
        return np.array(model.generate([ids], max_new_tokens=5, stop_tokens=[]))[0, len(ids):].tolist()

    session = ChatSession(model, max_new_tokens=5, stop_tokens=[])
    first = "".join(session.send("w1 w2 w3"))
    assert tok.encode(first, add_special_tokens=False) == fresh(session.messages[:-1])
    second = "".join(session.send("w4 w5"))
    assert session.reused > 0  # the prefix was served from the cache, no rewind needed
    assert tok.encode(second, add_special_tokens=False) == fresh(session.messages[:-1])
    session.messages[-2:] = []  # the user edits the last turn: the cache holds tokens past the common prefix
    third = "".join(session.send("w9 w9 w9"))
    assert session.reused == 0  # recurrent states cannot forget those tokens: recomputed from the start
    assert tok.encode(third, add_special_tokens=False) == fresh(session.messages[:-1])


def test_hybrid_trains_with_lora(hybrid: Path) -> None:
    """Fresh adapters on the recurrent projections and attention: a few steps of runtime/train.py lower the loss and
    leave the base weights alone."""
    from mlx.utils import tree_flatten

    from mlxc.runtime.train import Example, TrainConfig, train_lora

    targets = ("in_proj", "z_proj", "h_proj", "out_proj", "q_proj", "v_proj")
    model = mlxc.load(hybrid, lora=LoRAConfig(rank=4, alpha=8, targets=targets), seed=1, init_scale=0.3)
    adapted = {n.split(".lora_")[0].rsplit(".", 1)[-1] for n, _ in tree_flatten(model.net.parameters())
               if ".lora_A" in n}
    assert adapted == set(targets)
    before = {n: np.array(a) for n, a in tree_flatten(model.net.parameters()) if ".lora_" not in n}
    pattern = [5, 9, 17, 33, 65, 12] * 6
    result = train_lora(model.net, [Example(tokens=tuple(pattern))] * 4,
                        TrainConfig(steps=12, batch_size=2, seq_len=32, learning_rate=2e-2, log_every=4))
    assert np.mean(result.losses[-3:]) < 0.7 * np.mean(result.losses[:3])
    after = dict(tree_flatten(model.net.parameters()))
    assert all(np.array_equal(np.array(after[n]), a) for n, a in before.items())


def test_hybrid_quantized_8_bit_computes_its_rounded_weights(hybrid: Path) -> None:
    """`--quantize 8` quantizes the recurrent layers' projections like any matmul weight and keeps the recurrent
    weights (read by the cell op, not a matmul) float; the quantized model computes what the float model computes
    with every quantized weight replaced by its 8-bit round trip, and generates."""
    import inspect

    spec = load_spec_file(hybrid)
    # MLX's quantized matmul (the reference kernels): mlxc's native CPU kernels, where they are built and chosen,
    # also round the activations, so they compute something else by design (13% of the largest logit here)
    reference = {"kernels": "reference"} if "kernels" in inspect.signature(mlxc.load).parameters else {}
    q8 = mlxc.load(spec, quantize=8, group_size=32, **reference)
    text = str(q8.program)
    for name in ("in_proj", "z_proj", "h_proj"):  # out_proj [32, 48]: 48 inputs are not whole groups of 32
        assert f"%{name}_q.weight = quantize(%{name}.weight) {{bits = 8, group_size = 32}}" in text
    assert "param %hh.weight: f32[144, 48]\n" in text and "hh_q" not in text

    tensors = W.random_weights(mlxc.lower(spec), seed=1, scale=0.3)
    rounded = dict(tensors)
    for name, w in tensors.items():  # what the quantize pass picks: matmul, embedding and expert weights, not
        leaf = name.rsplit(".", 2)[-2]  # routers, the recurrent hh weights or the conv kernels
        if w.ndim >= 2 and w.shape[-1] % 32 == 0 and leaf not in ("router", "hh", "conv1d"):
            rounded[name] = mx.dequantize(*mx.quantize(w, group_size=32, bits=8), group_size=32, bits=8)
    _bind(q8, tensors)
    model = mlxc.load(spec)
    _bind(model, rounded)
    ids = mx.array(np.random.default_rng(8).integers(3, 96, size=(2, 12)))
    want = np.array(model(ids).logits)
    assert _max_diff(q8(ids).logits, want) <= 1e-4 * np.max(np.abs(want))  # measured 2e-6
    default = mlxc.load(spec, quantize=8, group_size=32)  # whichever kernels this machine picks
    assert np.array(default.generate(ids, max_new_tokens=4, stop_tokens=[])).shape == (2, 16)


def test_inspect_describes_mixer_layers(hybrid: Path, tmp_path: Path, capsys) -> None:
    """`mlxc inspect` lists recurrent and Mamba-2 layers with their settings and FFN, and an attention-free stack."""
    import json

    from mlxc.cli import main

    assert main(["inspect", str(hybrid), "--json"]) == 0
    groups = json.loads(capsys.readouterr().out)["layer_groups"]
    assert [(g["block"], g["ffn"]["kind"], g["ranges"]) for g in groups] == [
        ("mingru", "none", "0, 4"), ("gru", "dense", "1, 5"), ("mamba2", "none", "2, 6"), ("attention", "moe", "3, 7")]
    assert groups[0]["mixer"]["hidden_size"] == 48 and groups[0]["attention"] is None
    path = tmp_path / "rnn.yaml"
    path.write_text("vocab_size: 32\nhidden_size: 16\nintermediate_size: 32\nnum_layers: 2\nffn: none\n"
                    "recurrent: {}\nlayer_pattern: [lstm]\n")
    assert main(["inspect", str(path)]) == 0
    out = capsys.readouterr().out
    assert "no attention layers" in out and "lstm" in out


# ------------------------------------------------------------------------------------------------ pattern syntax


def _spec(**fields) -> dict:
    return dict(vocab_size=32, hidden_size=16, intermediate_size=32, num_layers=6, num_heads=2,
                recurrent={}, **fields)


def test_every_nth_pattern_and_sliding_default() -> None:
    spec = ModelSpec(**_spec(layer_pattern={"every": 3, "block": "attention", "otherwise": "lstm"},
                             sliding_window=8))
    assert [layer.block.value for layer in spec.layers] == ["lstm", "lstm", "attention"] * 2
    assert spec.window_of(2) == 8  # attention the pattern makes follows `sliding_window`, as without a pattern
    spec = ModelSpec(**_spec(layer_pattern={"every": 3, "offset": 0, "block": {"block": "attention",
                                                                                "attention": "full"},
                                            "otherwise": {"block": "gru", "ffn": "none"}}, sliding_window=8))
    assert [layer.block.value for layer in spec.layers] == ["attention", "gru", "gru"] * 2
    assert spec.window_of(0) is None and spec.layer(1).ffn is None
    assert [l.block.value for l in ModelSpec(**_spec(layer_pattern=["mingru", "gru", "lstm", "attention"])).layers] \
        == ["mingru", "gru", "lstm", "attention", "mingru", "gru"]


@pytest.mark.parametrize("pattern,match", [
    (["mingru", "transformer"], r"layer_pattern\[1\]: unknown block kind 'transformer'"),
    ({"every": 0, "otherwise": "gru"}, "every must be a positive integer"),
    ({"every": 2, "offset": 2, "otherwise": "gru"}, r"offset must be an integer in 0\.\.1"),
    ({"every": 2}, "needs `otherwise`"),
    ({"every": 2, "otherwise": "gru", "each": 3}, "has no key 'each'"),
    ([], "empty list"),
    ("mingru", "must be a list of layer entries or a mapping with `every`"),
    ([{"block": "gru", "ffn": "wide"}], r"layer_pattern\[0\]: ffn"),
])
def test_bad_patterns_are_one_clear_error(tmp_path: Path, pattern, match: str) -> None:
    import yaml

    path = tmp_path / "bad.yaml"
    path.write_text(yaml.safe_dump(_spec(layer_pattern=pattern)))
    with pytest.raises(MlxcError, match=match):
        load_spec_file(path)


def test_pattern_with_layers_and_missing_settings(tmp_path: Path) -> None:
    import yaml

    path = tmp_path / "both.yaml"
    path.write_text(yaml.safe_dump(_spec(layer_pattern=["gru"], layers=[{"block": "gru"}] * 6)))
    with pytest.raises(MlxcError, match="either `layers` or `layer_pattern`"):
        load_spec_file(path)
    data = _spec(layer_pattern=["gru"])
    del data["recurrent"]
    path.write_text(yaml.safe_dump(data))
    with pytest.raises(MlxcError, match="gru layers need the `recurrent` settings"):
        load_spec_file(path)


def test_hybrid_tiny_preset(tmp_path: Path) -> None:
    from mlxc.frontends.presets import PRESETS

    dump_spec_file(PRESETS["hybrid-tiny"], tmp_path / "h.yaml")
    assert load_spec_file(tmp_path / "h.yaml") == PRESETS["hybrid-tiny"]
    model = mlxc.load("preset:hybrid-tiny")
    assert [layer.block.value for layer in model.spec.layers] == ["mingru", "mamba2", "attention"] * 2
    ids = mx.array([[1, 5, 7, 9]])
    assert model.generate(ids, max_new_tokens=3, stop_tokens=[]).shape == (1, 7)
