"""runtime/train.py: LoRA training on a tiny stand-in module with adapter parameters named like the lora pass's."""

import json
import math

import mlx.core as mx
import mlx.nn as nn
import numpy as np
import pytest
from mlx.utils import tree_flatten
from tokenizers import Tokenizer as HFTokenizer
from tokenizers import models, pre_tokenizers

from mlxc.ir.errors import MlxcError
from mlxc.runtime.tokenizer import Tokenizer
from mlxc.runtime.train import (
    Example,
    TrainConfig,
    adapter_parameters,
    load_jsonl,
    lr_schedule,
    save_adapter_weights,
    train_lora,
)

K = 12  # words w0..w11
WORDS = [f"w{i}" for i in range(K)]
SPECIAL = ["<s>", "</s>"]
V = K + 4  # words, user, assistant, <s>, </s>


def _tokenizer() -> Tokenizer:
    vocab = {w: i for i, w in enumerate(WORDS + ["user", "assistant"])}
    tok = HFTokenizer(models.WordLevel(vocab=vocab, unk_token="w0"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok.add_special_tokens(SPECIAL)
    template = "{% for m in messages %}<s> {{ m.role }} {{ m.content }} </s> {% endfor %}"
    return Tokenizer(tok, bos_token="<s>", eos_token="</s>", chat_template=template, add_bos_token=True)


class StandInLoRALinear(nn.Module):
    """y = x W^T + scale * (dropout(x) A^T) B^T; A, B as the lora pass names them (B starts at zero, like PEFT)."""

    def __init__(self, din, dout, r, key, as_dict=False):
        super().__init__()
        k1, k2 = mx.random.split(key)
        self.weight = mx.random.normal((dout, din), key=k1) / math.sqrt(din)
        a = mx.random.uniform(-1, 1, (r, din), key=k2) / math.sqrt(din)
        b = mx.zeros((dout, r))
        if as_dict:  # plain dict attributes: `head.lora_A.weight` without a sub-module
            self.lora_A = {"weight": a}
            self.lora_B = {"weight": b}
        else:
            self.lora_A = nn.Linear(din, r, bias=False)
            self.lora_A.weight = a
            self.lora_B = nn.Linear(r, dout, bias=False)
            self.lora_B.weight = b
        self.dropout = nn.Dropout(0.1)
        self.scale = 2.0

    def __call__(self, x):
        a, b = self.lora_A["weight"], self.lora_B["weight"]
        return x @ self.weight.T + self.scale * ((self.dropout(x) @ a.T) @ b.T)


class Block(nn.Module):
    def __init__(self, d, key):
        super().__init__()
        self.norm = nn.RMSNorm(d)
        self.proj = StandInLoRALinear(d, d, 4, key)

    def __call__(self, x):
        return x + self.proj(self.norm(x))


class StandIn(nn.Module):
    def __init__(self, seed=0, d=16, adapters=True):
        super().__init__()
        k = mx.random.split(mx.random.key(seed), 3)
        self.embed = nn.Embedding(V, d)
        self.embed.weight = mx.random.normal((V, d), key=k[0])
        self.layers = [Block(d, k[1])]
        self.head = StandInLoRALinear(d, V, 8, k[2], as_dict=True)
        if not adapters:  # the model before the lora pass
            self.head = nn.Linear(d, V)
            self.layers[0].proj = nn.Linear(d, d)

    def __call__(self, ids, offset=0, cache=None):
        assert offset == 0 and cache is None  # training runs whole sequences from position 0, without state
        x = self.embed(ids)
        for layer in self.layers:
            x = layer(x)
        return self.head(x)


def _snapshot(net):
    return {k: np.array(v).copy() for k, v in tree_flatten(net.parameters())}


@pytest.fixture(scope="module")
def tok():
    return _tokenizer()


@pytest.fixture(scope="module")
def data(tmp_path_factory, tok):
    """A learnable pattern: each word is followed by the next one (cyclically)."""
    rng = np.random.default_rng(0)
    lines = []
    for _ in range(24):
        start, n = int(rng.integers(0, K)), int(rng.integers(5, 14))
        lines.append(json.dumps({"text": " ".join(WORDS[(start + i) % K] for i in range(n))}))
    path = tmp_path_factory.mktemp("data") / "train.jsonl"
    path.write_text("\n".join(lines) + "\n")
    return load_jsonl(path, tok, 32)


CFG = dict(steps=50, batch_size=4, seq_len=32, learning_rate=1e-2, warmup_steps=5, seed=3, log_every=10)


def test_lora_training_learns_and_touches_only_adapters(data, tmp_path):
    net = StandIn()
    before = _snapshot(net)
    logs, saves = [], []
    res = train_lora(net, data, TrainConfig(**CFG, save_every=20, out_dir=str(tmp_path)), on_log=logs.append,
                     save_adapter=lambda step, out: saves.append((step, out)))
    assert len(res.losses) == 50 and all(math.isfinite(x) for x in res.losses)
    assert np.mean(res.losses[-5:]) < 0.8 * res.losses[0], res.losses
    assert res.adapter_names == ["head.lora_A.weight", "head.lora_B.weight",
                                 "layers.0.proj.lora_A.weight", "layers.0.proj.lora_B.weight"]
    assert res.num_adapter_params == 8 * 16 + V * 8 + 2 * 4 * 16
    assert res.tokens > 0 and 0 < res.trained_tokens <= res.tokens

    after = _snapshot(net)
    assert after.keys() == before.keys()
    for k in before:
        if ".lora_" in k:
            assert not np.array_equal(before[k], after[k]), k
        else:
            assert before[k].tobytes() == after[k].tobytes(), k  # bitwise unchanged

    assert [s for s, _ in saves] == [20, 40, 50] == res.saved_at
    assert all(str(out) == str(tmp_path) for _, out in saves)
    assert [r["step"] for r in logs] == [10, 20, 30, 40, 50]
    assert set(logs[0]) == {"step", "loss", "lr", "tokens_per_sec", "grad_norm", "elapsed_s"}
    np.testing.assert_allclose(logs[0]["loss"], np.mean(res.losses[:10]), rtol=1e-6)
    np.testing.assert_allclose(logs[1]["loss"], np.mean(res.losses[10:20]), rtol=1e-6)
    assert logs[0]["tokens_per_sec"] > 0 and logs[-1]["lr"] < logs[0]["lr"]
    assert net.training is True  # a fresh Module is in training mode; it is left as it was

    path = save_adapter_weights(net, tmp_path / "a" / "adapters.safetensors")
    loaded = mx.load(str(path))
    assert sorted(loaded) == res.adapter_names
    for k, v in adapter_parameters(net).items():
        assert np.array_equal(np.array(loaded[k]), np.array(v))


def test_deterministic_given_seed(data):
    runs = []
    for seed in (3, 3, 4):
        net = StandIn()
        res = train_lora(net, data, TrainConfig(**{**CFG, "steps": 15, "seed": seed}))
        runs.append((res.losses, {k: np.array(v) for k, v in adapter_parameters(net).items()}))
    assert runs[0][0] == runs[1][0]
    for k in runs[0][1]:
        assert runs[0][1][k].tobytes() == runs[1][1][k].tobytes()
    assert runs[0][0] != runs[2][0]


@pytest.mark.parametrize("optimizer", ["adam", "sgd"])
def test_other_optimizers_padding_and_token_lists(optimizer, data):
    net = StandIn()
    cfg = TrainConfig(**{**CFG, "steps": 20, "optimizer": optimizer, "pack": False, "grad_clip": None,
                         "learning_rate": 3e-2 if optimizer == "adam" else 0.5, "label_smoothing": 0.1})
    res = train_lora(net, data, cfg)
    assert res.losses[-1] < res.losses[0]
    # plain token lists: every token is a target
    res = train_lora(StandIn(), [list(e.tokens) for e in data], TrainConfig(**{**CFG, "steps": 3, "warmup_steps": 0}))
    assert len(res.losses) == 3


def test_save_schedule_and_mode_restored(data):
    net = StandIn()
    net.eval()
    saves = []
    train_lora(net, data, TrainConfig(**{**CFG, "steps": 6, "save_every": 3}),
               save_adapter=lambda s, o: saves.append(s))
    assert saves == [3, 6] and net.training is False
    saves.clear()
    train_lora(StandIn(), data, TrainConfig(**{**CFG, "steps": 4, "warmup_steps": 0}),
               save_adapter=lambda s, o: saves.append(s))
    assert saves == [4]


def test_lr_schedule():
    cfg = TrainConfig(steps=10, warmup_steps=4, learning_rate=1.0)
    lrs = [lr_schedule(cfg)(s).item() for s in range(10)]
    np.testing.assert_allclose(lrs[:5], [0.2, 0.4, 0.6, 0.8, 1.0], rtol=1e-6)
    assert all(a > b for a, b in zip(lrs[4:], lrs[5:])) and lrs[-1] > 0
    assert lr_schedule(TrainConfig(steps=3, learning_rate=2.0))(0).item() == 2.0


def test_no_adapters_is_an_error(data):
    net = StandIn(adapters=False)
    before = _snapshot(net)
    with pytest.raises(MlxcError, match="no LoRA adapter parameters; run the lora pass first"):
        train_lora(net, data, TrainConfig(**CFG))
    assert _snapshot(net).keys() == before.keys()


@pytest.mark.parametrize("bad, match", [
    (dict(steps=0), "steps"),
    (dict(steps=2.5), "steps"),
    (dict(batch_size=True), "batch_size"),
    (dict(seq_len=1), "seq_len"),
    (dict(learning_rate=0.0), "learning_rate"),
    (dict(learning_rate=float("nan")), "learning_rate"),
    (dict(weight_decay=-1.0), "weight_decay"),
    (dict(warmup_steps=200), "warmup_steps"),
    (dict(optimizer="lion"), "optimizer"),
    (dict(optimizer="adam", weight_decay=0.1), "adam"),
    (dict(grad_clip=0.0), "grad_clip"),
    (dict(label_smoothing=1.0), "label_smoothing"),
    (dict(seed=-1), "seed"),
    (dict(log_every=0), "log_every"),
    (dict(save_every=-1), "save_every"),
    (dict(out_dir=""), "out_dir"),
])
def test_bad_config(bad, match):
    with pytest.raises(MlxcError, match=match):
        TrainConfig(**bad)


def test_config_from_dict():
    assert TrainConfig.from_dict({"steps": 5}).steps == 5
    with pytest.raises(MlxcError, match="unknown option.*stpes"):
        TrainConfig.from_dict({"stpes": 5})
    with pytest.raises(Exception):
        TrainConfig().steps = 3  # frozen


def test_load_jsonl_formats(tmp_path, tok):
    p = tmp_path / "d.jsonl"
    p.write_text("\n".join([
        json.dumps({"text": "w1 w2 w3"}),
        "",
        json.dumps({"prompt": "w4 w5", "completion": "w6 w7"}),
        json.dumps({"messages": [{"role": "user", "content": "w1"}, {"role": "assistant", "content": "w2"}]}),
    ]))
    ex = load_jsonl(p, tok, 32)
    bos, eos = tok.bos_token_id, tok.eos_token_ids[0]
    assert ex[0] == Example((bos, 1, 2, 3, eos))
    assert ex[1].tokens == (bos, 4, 5, 6, 7, eos)
    assert ex[1].loss_mask == (False, False, False, True, True, True)
    u, a = 12, 13
    assert ex[2].tokens == (bos, u, 1, eos, bos, a, 2, eos)  # template's </s> is already a stop id: no extra EOS
    assert all(ex[2].loss_mask)
    p.write_text(json.dumps({"text": "w1 w2 w3"}))
    assert load_jsonl(p, tok, 3)[0].tokens == (bos, 1, 2)  # truncated


@pytest.mark.parametrize("content, match", [
    ('{"text": "w1"}\n{"text": "w2"\n', r"d\.jsonl:2: invalid JSON"),
    ('{"text": "w1"}\n\n[1, 2]\n', r"d\.jsonl:3: expected a JSON object"),
    ('{"txt": "w1"}\n', r"d\.jsonl:1: expected a 'text', 'messages' or 'prompt'/'completion'"),
    ('{"text": 5}\n', r"d\.jsonl:1: 'text' must be a string"),
    ('{"prompt": "w1"}\n', r"d\.jsonl:1: 'prompt' and 'completion'"),
    ('{"messages": []}\n', r"d\.jsonl:1: 'messages' must be"),
    ('{"messages": ["hi"]}\n', r"d\.jsonl:1: chat messages must be dicts"),
    ('{"prompt": "w1 w2 w3 w4", "completion": "w5"}\n', r"d\.jsonl:1: no trainable token within seq_len=4"),
    ("\n  \n", r"d\.jsonl has no examples"),
])
def test_load_jsonl_errors(tmp_path, tok, content, match):
    p = tmp_path / "d.jsonl"
    p.write_text(content)
    with pytest.raises(MlxcError, match=match):
        load_jsonl(p, tok, 4)


def test_load_jsonl_missing_file_and_empty_examples(tmp_path, tok):
    with pytest.raises(MlxcError, match="cannot read dataset"):
        load_jsonl(tmp_path / "nope.jsonl", tok, 8)
    with pytest.raises(MlxcError, match="no training examples"):
        train_lora(StandIn(), [], TrainConfig(**CFG))
    with pytest.raises(MlxcError, match="no target tokens"):
        train_lora(StandIn(), [Example((1, 2), (False, False))], TrainConfig(**CFG))
    with pytest.raises(MlxcError, match=f"token id {V}, out of range for the model's vocabulary of {V}"):
        train_lora(StandIn(), [Example((1, 2, V))], TrainConfig(**CFG))
