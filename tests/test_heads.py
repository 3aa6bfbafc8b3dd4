"""Task heads against transformers: `*ForSequenceClassification` (padded batches, single-label, regression,
multi-label) and `*ForTokenClassification` checkpoints built here with `save_pretrained` must give transformers'
logits and losses; spec-file heads (mean / first pooling, MLP classifiers) against numpy written from their
definition; compile round trips, LoRA, quantization, and the refusals (generation, bad labels, a mismatched head).
"""

from __future__ import annotations

import json
import math
import shutil
from pathlib import Path

import mlx.core as mx
import numpy as np
import pytest
import torch
import yaml
from parity import max_diff, save_checkpoint

import mlxc
from mlxc.cli import main
from mlxc.ir.errors import MlxcError

VOCAB, SEQ, PAD, TOL = 96, 20, 0, 1e-4
SMALL = dict(vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
             num_key_value_heads=2, max_position_embeddings=64, pad_token_id=PAD, bos_token_id=1, eos_token_id=2)


def _family(name: str):
    """(config class, sequence-classification class, token-classification class, extra config) of a family."""
    import transformers as tf

    if name == "llama":
        return tf.LlamaConfig, tf.LlamaForSequenceClassification, tf.LlamaForTokenClassification, {}
    if name == "mistral":  # a window shorter than the sequence, so sliding attention is exercised under the head
        return tf.MistralConfig, tf.MistralForSequenceClassification, tf.MistralForTokenClassification, \
            dict(sliding_window=8, head_dim=8)
    if name == "qwen2":  # QKV biases
        return tf.Qwen2Config, tf.Qwen2ForSequenceClassification, tf.Qwen2ForTokenClassification, {}
    if name == "gemma":  # ties embeddings by default (a classifier must not), (1 + w) norms, scaled embeddings
        return tf.GemmaConfig, tf.GemmaForSequenceClassification, tf.GemmaForTokenClassification, dict(head_dim=8)
    raise AssertionError(name)


FAMILIES = ["llama", "mistral", "qwen2", "gemma"]


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    """`ckpt(family, task, **config)`: a saved random-weight checkpoint (built once) and its transformers model."""
    made: dict = {}

    def get(family: str, task: str, **config):
        from mlxc.frontends.families import all_families

        if family not in {f.name for f in all_families()}:
            pytest.skip(f"the {family} family is not in mlxc yet")
        key = (family, task, tuple(sorted(config.items())))
        if key not in made:
            cfg_cls, seq_cls, tok_cls, extra = _family(family)
            cfg = cfg_cls(**{**SMALL, **extra, **config})
            path = tmp_path_factory.mktemp(f"{family}-{task}")
            hf = save_checkpoint(seq_cls if task == "seq" else tok_cls, cfg, path, seed=len(made))
            made[key] = (path, hf)
        return made[key]

    return get


def _tokens(rows: list[int], seed: int = 1, left: bool = False) -> np.ndarray:
    """A batch of SEQ columns: row i holds rows[i] real tokens (never the pad id), padded with PAD."""
    rng = np.random.default_rng(seed)
    out = np.full((len(rows), SEQ), PAD, np.int64)
    for i, n in enumerate(rows):
        toks = rng.integers(3, VOCAB, size=n)
        if left:
            out[i, SEQ - n:] = toks
        else:
            out[i, :n] = toks
    return out


def _hf(hf, tokens, mask: bool = True, **kwargs):
    """transformers' output, given the attention mask a tokenizer would give (unless `mask=False`)."""
    t = torch.tensor(tokens)
    if mask:
        kwargs["attention_mask"] = (t != PAD).long()
    for k, v in list(kwargs.items()):
        if isinstance(v, np.ndarray):
            kwargs[k] = torch.tensor(v)
    problem = hf.config.problem_type  # transformers' loss writes the inferred problem type into the config
    with torch.no_grad():
        out = hf(t, **kwargs)
    hf.config.problem_type = problem
    return out


def _close(ours, ref, tol=TOL) -> float:
    ref = ref.float().numpy() if isinstance(ref, torch.Tensor) else ref
    err = max_diff(np.array(ours), ref)
    assert err <= tol, f"max |diff| = {err:.2e}"
    return err


# ------------------------------------------------------------------------------------------ sequence classification


@pytest.mark.parametrize("family", FAMILIES)
def test_sequence_classification_right_padded(ckpt, family):
    """Right padding: the last non-padding token is pooled; equal to transformers given the attention mask (a causal
    model never attends to later padding, so mlxc needs none)."""
    path, hf = ckpt(family, "seq", num_labels=3)
    model = mlxc.load(str(path))
    assert model.head_kind == "sequence_classification" and model.num_labels == 3
    tokens = _tokens([SEQ, 13, 5])
    out = model(mx.array(tokens), labels=mx.array([2, 0, 1]))
    ref = _hf(hf, tokens, labels=np.array([2, 0, 1]))
    assert out.logits.shape == (3, 3)
    _close(out.logits, ref.logits)
    _close(out.loss, ref.loss)
    # a padded row scores as that sequence alone
    alone = _hf(hf, tokens[2:, :5], mask=False).logits
    _close(out.logits[2:], alone)
    # ignore_index skips a row, as transformers' cross-entropy does
    labels = np.array([2, -100, 1])
    _close(model(mx.array(tokens), labels=mx.array(labels)).loss, _hf(hf, tokens, labels=labels).loss)


@pytest.mark.parametrize("family", FAMILIES)
def test_sequence_classification_left_padded(ckpt, family):
    """Left padding: the rightmost non-padding token (the last position) is pooled, as transformers does. mlxc has no
    attention mask, so the real tokens attend to the padding before them: equal to transformers without a mask."""
    path, hf = ckpt(family, "seq", num_labels=3)
    model = mlxc.load(str(path))
    tokens = _tokens([SEQ, 11, 4], seed=2, left=True)
    labels = np.array([1, 1, 0])
    out = model(mx.array(tokens), labels=mx.array(labels))
    ref = _hf(hf, tokens, mask=False, labels=labels)
    _close(out.logits, ref.logits)
    _close(out.loss, ref.loss)


@pytest.mark.parametrize("family", FAMILIES)
def test_regression(ckpt, family):
    """num_labels = 1 is regression (MSE on squeezed logits); problem_type = regression with several labels is an
    element-wise MSE."""
    path, hf = ckpt(family, "seq", num_labels=1)
    model = mlxc.load(str(path))
    tokens = _tokens([SEQ, 9], seed=3)
    target = np.array([0.5, -1.25], np.float32)
    out = model(mx.array(tokens), labels=mx.array(target))
    ref = _hf(hf, tokens, labels=torch.tensor(target))
    assert out.logits.shape == (2, 1)
    _close(out.logits, ref.logits)
    _close(out.loss, ref.loss)
    _close(model(mx.array(tokens), labels=mx.array(target[:, None])).loss, ref.loss)  # [B, 1] labels too

    path, hf = ckpt(family, "seq", num_labels=2, problem_type="regression")
    model = mlxc.load(str(path))
    target = np.array([[0.5, 2.0], [-1.0, 0.25]], np.float32)
    out = model(mx.array(tokens), labels=mx.array(target))
    ref = _hf(hf, tokens, labels=torch.tensor(target))
    _close(out.logits, ref.logits)
    _close(out.loss, ref.loss)


@pytest.mark.parametrize("family", FAMILIES)
def test_multi_label(ckpt, family):
    """Multi-label: BCE with logits, set by problem_type or inferred (as transformers does) from float labels."""
    target = np.array([[1, 0, 1, 1], [0, 0, 1, 0]], np.float32)
    tokens = _tokens([SEQ, 14], seed=4)
    for problem in ("multi_label_classification", None):
        path, hf = ckpt(family, "seq", num_labels=4, problem_type=problem)
        model = mlxc.load(str(path))
        out = model(mx.array(tokens), labels=mx.array(target))
        ref = _hf(hf, tokens, labels=torch.tensor(target))
        _close(out.logits, ref.logits)
        _close(out.loss, ref.loss)
    # the same head with integer class ids is single-label
    ints = np.array([3, 1])
    _close(model(mx.array(tokens), labels=mx.array(ints)).loss, _hf(hf, tokens, labels=ints).loss)


def test_no_pad_token(ckpt):
    """Without a pad token one sequence pools its last position; a batch is refused, as transformers refuses it."""
    path, hf = ckpt("llama", "seq", num_labels=3, pad_token_id=None)
    model = mlxc.load(str(path))
    tokens = _tokens([SEQ, SEQ], seed=5)
    _close(model(mx.array(tokens[:1])).logits, _hf(hf, tokens[:1], mask=False).logits)
    with pytest.raises(ValueError, match="no padding token"):
        _hf(hf, tokens, mask=False)
    with pytest.raises(MlxcError, match="no pad token"):
        model(mx.array(tokens))


# ------------------------------------------------------------------------------------------ token classification


@pytest.mark.parametrize("family", FAMILIES)
def test_token_classification(ckpt, family):
    """Per-token logits through the score layer (with its bias; dropout is the identity at eval) and the mean
    cross-entropy over labelled tokens (-100 skipped)."""
    path, hf = ckpt(family, "tok", num_labels=5)
    model = mlxc.load(str(path))
    assert model.head_kind == "token_classification"
    tokens = _tokens([SEQ, 12], seed=6)
    labels = np.random.default_rng(7).integers(0, 5, size=tokens.shape)
    labels[tokens == PAD] = -100
    labels[0, :3] = -100
    out = model(mx.array(tokens), labels=mx.array(labels))
    ref = _hf(hf, tokens, labels=labels)
    assert out.logits.shape == (2, SEQ, 5)
    real = tokens != PAD  # transformers' logits at masked (padding) positions attend differently; no label there
    _close(np.array(out.logits)[real], ref.logits.numpy()[real])
    _close(out.loss, ref.loss)
    _close(out.logits, _hf(hf, tokens, mask=False).logits)  # everywhere, against the same unmasked inputs


def test_token_classification_without_bias(ckpt):
    """`token_classification_bias: false` in the config: a score layer without bias, as transformers builds it."""
    path, hf = ckpt("llama", "tok", num_labels=4, token_classification_bias=False)
    assert hf.score.bias is None
    model = mlxc.load(str(path))
    tokens = _tokens([SEQ], seed=8)
    _close(model(mx.array(tokens)).logits, _hf(hf, tokens, mask=False).logits)


def test_half_precision_keeps_its_dtype(ckpt):
    """In float16 the score layer's bias is float16 too: logits stay float16 and near transformers' float32."""
    path, hf = ckpt("llama", "tok", num_labels=5)
    model = mlxc.load(str(path), dtype="float16")
    tokens = _tokens([SEQ], seed=9)
    logits = model(mx.array(tokens)).logits
    assert logits.dtype == mx.float16
    _close(logits.astype(mx.float32), _hf(hf, tokens, mask=False).logits, tol=2e-2)


# ------------------------------------------------------------------------------------------ the rest of mlxc


def test_bad_labels(ckpt):
    path, _ = ckpt("llama", "seq", num_labels=3)
    model = mlxc.load(str(path))
    tokens = mx.array(_tokens([SEQ, 10]))
    with pytest.raises(MlxcError, match="label 3 is not a class of this 3-label head"):
        model(tokens, labels=mx.array([0, 3]))
    with pytest.raises(MlxcError, match="one class id per sequence"):
        model(tokens, labels=mx.array([0, 1, 2]))
    with pytest.raises(MlxcError, match=r"multi-label classification with 3 labels takes labels \[2, 3\]"):
        model(tokens, labels=mx.array([0.0, 1.0]))
    tok, _ = ckpt("llama", "tok", num_labels=5)
    model = mlxc.load(str(tok))
    with pytest.raises(MlxcError, match="does not match input ids"):
        model(tokens, labels=mx.array([0, 1]))
    with pytest.raises(MlxcError, match="label -1 is not a class"):
        model(tokens, labels=mx.full(tokens.shape, -1))


def test_generation_refused(ckpt, tmp_path, capsys):
    path, _ = ckpt("llama", "seq", num_labels=3)
    model = mlxc.load(str(path))
    prompt = mx.array([[5, 6, 7]])
    for call in (lambda: model.generate(prompt, max_new_tokens=2), lambda: list(model.stream(prompt)),
                 lambda: list(model.generate_text("hi"))):
        with pytest.raises(MlxcError, match="needs a causal language-model head.*sequence-classification head"):
            call()
    with pytest.raises(MlxcError, match="cache"):
        model(prompt, cache=model.make_cache())
    with pytest.raises(MlxcError, match="perplexity needs a causal language-model head"):
        mlxc.perplexity(model, ids=list(range(3, 40)))
    tok, _ = ckpt("llama", "tok", num_labels=5)
    for argv in (["run", str(path), "--tokens", "5,6,7"], ["chat", str(tok)]):
        assert main(argv) != 0
        err = capsys.readouterr().err
        assert f"mlxc {argv[0]} needs a causal language-model head" in err and "cannot generate" in err, err


@pytest.mark.parametrize("task", ["seq", "tok"])
def test_compile_round_trip(ckpt, tmp_path, task):
    path, hf = ckpt("mistral", task, num_labels=3)
    out = mlxc.compile(str(path), tmp_path / "art")
    assert json.loads((out / "manifest.json").read_text())["spec"]["head"]["kind"].startswith(task[:3])
    loaded = mlxc.load(str(out))
    assert loaded.head_kind == mlxc.load(str(path)).head_kind and loaded.num_labels == 3
    tokens = _tokens([SEQ, 7], seed=10)
    labels = np.array([2, 0]) if task == "seq" else np.where(tokens == PAD, -100, tokens % 3)
    got = loaded(mx.array(tokens), labels=mx.array(labels))
    ref = _hf(hf, tokens, mask=False, labels=labels)
    _close(got.logits, ref.logits)
    _close(got.loss, ref.loss)
    with pytest.raises(MlxcError, match="causal language-model head"):
        loaded.generate(mx.array([[4, 5]]))


def test_quantized_classifier(ckpt):
    """--quantize quantizes the backbone; the head keeps working (8-bit stays near float)."""
    path, _ = ckpt("llama", "seq", num_labels=3)
    tokens = mx.array(_tokens([SEQ, 12], seed=11))
    ref = np.array(mlxc.load(str(path))(tokens).logits)
    for bits in (8, 4):
        model = mlxc.load(str(path), quantize=bits, group_size=32)
        assert f"q{bits}g32" in str(model.program)
        out = model(tokens, labels=mx.array([0, 2]))
        assert out.logits.shape == (2, 3) and np.isfinite(np.array(out.logits)).all()
        assert np.isfinite(out.loss.item())
        if bits == 8:
            assert max_diff(np.array(out.logits), ref) <= 0.05 * max(np.abs(ref).max(), 1e-3)


def test_lora_on_a_classifier(ckpt, tmp_path):
    """A PEFT LoRA adapter trained on a sequence classifier's attention gives peft's logits, merged or not."""
    from peft import LoraConfig, get_peft_model

    path, hf = ckpt("llama", "seq", num_labels=3)
    import copy

    peft_model = get_peft_model(copy.deepcopy(hf), LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"]))
    g = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for name, p in peft_model.named_parameters():
            if "lora_B" in name:
                p.copy_(0.05 * torch.randn(p.shape, generator=g))
    peft_model.eval().save_pretrained(tmp_path / "adapter")
    tokens = _tokens([SEQ, 8], seed=12)
    with torch.no_grad():
        ref = peft_model(torch.tensor(tokens)).logits
    base = _hf(hf, tokens, mask=False).logits
    assert max_diff(ref.numpy(), base.numpy()) > 1e-3, "the adapter changes nothing: the test would be vacuous"
    for merge in (False, True):
        model = mlxc.load(str(path), adapter=tmp_path / "adapter", merge_lora=merge)
        _close(model(mx.array(tokens)).logits, ref)
    fresh = mlxc.load(str(path), lora=mlxc.LoRAConfig(rank=2, alpha=4.0, targets=("q_proj", "v_proj")))
    _close(fresh(mx.array(tokens)).logits, base)  # B = 0: no change yet
    mlxc.save_adapter(fresh, tmp_path / "saved")
    assert (tmp_path / "saved" / "adapter_model.safetensors").is_file()
    # PEFT's SEQ_CLS task also saves a retrained score layer (modules_to_save): refused, not silently dropped
    seq_cls = get_peft_model(copy.deepcopy(hf), LoraConfig(r=4, target_modules=["q_proj"], task_type="SEQ_CLS"))
    seq_cls.save_pretrained(tmp_path / "seq_cls")
    with pytest.raises(MlxcError, match="modules_to_save"):
        mlxc.load(str(path), adapter=tmp_path / "seq_cls")


def test_mismatched_score_is_refused(ckpt, tmp_path):
    """A config whose labels disagree with the checkpoint's score layer: one clear error naming the tensor."""
    path, _ = ckpt("llama", "seq", num_labels=3)
    bad = tmp_path / "bad"
    shutil.copytree(path, bad)
    cfg = json.loads((bad / "config.json").read_text())
    cfg["id2label"] = {str(i): f"L{i}" for i in range(5)}
    cfg["label2id"] = {f"L{i}": i for i in range(5)}
    (bad / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(MlxcError, match=r"score\.weight has shape \[3, 32\].*\[5, 32\]"):
        mlxc.load(str(bad))


# ------------------------------------------------------------------------------------------ spec-file heads


def _spec_file(tmp_path: Path, head: dict, name: str = "head.yaml") -> Path:
    spec = dict(name="tiny-cls", vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_layers=2, num_heads=4,
                num_kv_heads=2, max_position_embeddings=64, pad_token_id=PAD, head=head)
    p = tmp_path / name
    p.write_text(json.dumps(spec) if p.suffix == ".json" else yaml.safe_dump(spec))
    return p


def _gelu(x):
    return 0.5 * x * (1.0 + np.vectorize(math.erf)(x / math.sqrt(2.0)))


def _gelu_tanh(x):
    return 0.5 * x * (1.0 + np.tanh(math.sqrt(2.0 / math.pi) * (x + 0.044715 * x**3)))


def _relu(x):
    return np.maximum(x, 0)


INIT = dict(seed=4, init_scale=0.3)  # weights large enough that activations reach their non-linear range


def _hidden_and_logits(path: Path, tokens: np.ndarray):
    """The final hidden states and the head's logits of one forward pass, plus the weights: the backbone is not under
    test here (the checkpoint tests above hold it to transformers), the head is."""
    from mlx.utils import tree_flatten

    from mlxc.passes.expose_hidden import ExposeHidden

    model = mlxc.load(str(path), passes=["dce", ExposeHidden()], **INIT)
    outs = model.net(mx.array(tokens, dtype=mx.int32), 0)
    weights = {n: np.array(a) for n, a in tree_flatten(model.net.parameters())}
    return np.array(outs[-1]), np.array(outs[0]), weights


def _pool(h, tokens, mode):
    keep = tokens != PAD
    if mode == "mean":
        return np.stack([h[b][keep[b]].mean(axis=0) for b in range(len(h))])
    where = [np.nonzero(keep[b])[0] for b in range(len(h))]
    return np.stack([h[b][w[-1] if mode == "last" else w[0]] for b, w in enumerate(where)])


def _mlp(x, w, act):
    hid = act(x @ w["classifier.dense.weight"].T + w["classifier.dense.bias"])
    return hid @ w["classifier.out_proj.weight"].T + w["classifier.out_proj.bias"]


def _assert_head(logits, ref, *wrong):
    """`ref` within float32 rounding, and every plausible mistake (`wrong`) far outside it: a discriminating test."""
    scale = np.abs(ref).max()
    assert scale > 0.1, f"logits too small to tell heads apart ({scale:.2e})"
    assert max_diff(logits, ref) <= 1e-5 * scale, f"{max_diff(logits, ref):.2e} (scale {scale:.2e})"
    for other in wrong:
        assert max_diff(other, ref) > 1e-2 * scale


@pytest.mark.parametrize("pooling", ["last", "first", "mean"])
@pytest.mark.parametrize("mlp", [False, True])
def test_spec_file_sequence_heads(tmp_path, pooling, mlp):
    """Pooling (last / first non-padding token, mean over non-padding tokens) then a linear `score` layer or an MLP
    classifier (dense, activation, out_proj; both with bias), against numpy from those definitions."""
    head = dict(kind="sequence_classification", num_labels=3, pooling=pooling)
    act, other_act = (_relu, _gelu) if pooling == "mean" else (_gelu, _relu)
    if mlp:
        head.update(classifier_hidden_size=16, classifier_activation="relu" if pooling == "mean" else "gelu")
    else:
        head.update(bias=True)
    tokens = np.concatenate([_tokens([SEQ, 9], seed=13), _tokens([6], seed=14, left=True)])
    path = _spec_file(tmp_path, head)
    h, logits, w = _hidden_and_logits(path, tokens)

    def classify(pooled, activation=act):
        return _mlp(pooled, w, activation) if mlp else pooled @ w["score.weight"].T + w["score.bias"]

    ref = classify(_pool(h, tokens, pooling))
    assert logits.shape == (3, 3)
    wrong = [classify(_pool(h, tokens, m)) for m in ("last", "first", "mean") if m != pooling]
    _assert_head(logits, ref, *wrong, *([classify(_pool(h, tokens, pooling), other_act)] if mlp else []))
    # the plain model (default passes) computes the same, and takes labels
    model = mlxc.load(str(path), **INIT)
    out = model(mx.array(tokens), labels=mx.array([0, 1, 2]))
    _assert_head(np.array(out.logits), ref)
    z = ref - ref.max(axis=1, keepdims=True)
    ce = -(z - np.log(np.exp(z).sum(axis=1, keepdims=True)))[np.arange(3), [0, 1, 2]].mean()
    assert abs(out.loss.item() - ce) <= 1e-5


def test_spec_file_token_mlp_head(tmp_path):
    """A token-classification MLP head (gelu_tanh): the classifier applied at every position."""
    head = dict(kind="token_classification", num_labels=4, classifier_hidden_size=8, classifier_activation="gelu_tanh")
    path = _spec_file(tmp_path, head, "tok.json")
    tokens = _tokens([SEQ, 12], seed=15)
    h, logits, w = _hidden_and_logits(path, tokens)
    assert logits.shape == (2, SEQ, 4)
    _assert_head(logits, _mlp(h, w, _gelu_tanh), _mlp(h, w, _relu))


def test_spec_file_head_round_trip(tmp_path):
    """A spec-file classifier compiles to an artifact that loads with its head and weights."""
    head = dict(kind="sequence_classification", num_labels=2, pooling="mean", classifier_hidden_size=8)
    path = _spec_file(tmp_path, head)
    tokens = mx.array(_tokens([SEQ, 5], seed=16))
    direct = mlxc.load(str(path), seed=2)
    art = mlxc.compile(str(path), tmp_path / "art", seed=2)
    loaded = mlxc.load(str(art))
    assert loaded.head_kind == "sequence_classification"
    assert max_diff(np.array(loaded(tokens).logits), np.array(direct(tokens).logits)) <= 1e-6


@pytest.mark.parametrize("head, message", [
    ({"kind": "causal_lm", "pooling": "mean"}, "pooling do not apply"),
    ({"kind": "causal_lm", "bias": True}, "bias do not apply"),
    ({"kind": "token_classification", "num_labels": 3, "pooling": "mean"}, "pooling does not apply"),
    ({"kind": "sequence_classification", "num_labels": 3, "classifier_hidden_size": 8, "bias": True},
     "always has biases"),
    ({"kind": "sequence_classification", "num_labels": 3, "classifier_activation": "relu"},
     "needs an MLP classifier"),
])
def test_head_settings_that_would_be_ignored_are_refused(head, message, tmp_path):
    """A head setting the head does not use is refused by name, in a spec file as in Python."""
    spec = {"name": "t", "vocab_size": 64, "hidden_size": 32, "intermediate_size": 64, "num_layers": 1,
            "num_heads": 4, "head": head}
    path = tmp_path / "spec.json"
    path.write_text(json.dumps(spec))
    with pytest.raises(MlxcError, match=message):
        mlxc.load(str(path))
