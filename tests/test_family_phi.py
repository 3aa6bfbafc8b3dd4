"""Phi-2 and Phi-3 against transformers (torch, CPU) on random-weight checkpoints built with save_pretrained, through
the shared parity harness (tests/parity.py).

Phi-2: LayerNorm with bias, partial rotary, attention and MLP in parallel off one norm, biases everywhere, GELU.
Phi-3: the checkpoint's fused `qkv_proj` / `gate_up_proj` (split at load by the layout rules), LongRoPE with short
factors within `original_max_position_embeddings` (16 here) and long ones beyond, and sliding windows. The references
are transformers' own models: their logits, their `generate` (which recomputes the cache when a LongRoPE sequence
crosses the original context), their cached forward, peft adapters, exports read back by transformers, and the
presets' configs counted on the meta device.
"""

from __future__ import annotations

import json
from math import prod
from pathlib import Path

import numpy as np
import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

import mlx.core as mx  # noqa: E402

import mlxc  # noqa: E402
from mlxc.frontends.families import family as family_named  # noqa: E402
from mlxc.frontends.hf import hf_config_from_spec, hf_to_ir_name, spec_from_hf_config  # noqa: E402
from mlxc.frontends.presets import PRESETS as ALL_PRESETS, preset_for_hub_id  # noqa: E402
from mlxc.ir import parse_program, print_program  # noqa: E402
from mlxc.ir.attrs import RopeKind  # noqa: E402
from mlxc.ir.errors import MlxcError  # noqa: E402
from mlxc.passes.checkpoint_layout import CheckpointLayout  # noqa: E402
from parity import meta_models as build_meta_models  # noqa: E402
from parity import (check_artifact, check_fusion, check_greedy, check_logits, check_lora, check_quantize,  # noqa: E402
                    check_stepwise, hf_logits, ids, max_diff, save_checkpoint)

VOCAB = 256
ORIGINAL = 16  # the LongRoPE cases' original context: SEQ (20) and the greedy test's 9 + 16 tokens cross it
WINDOW = 7


def _phi(**overrides):
    base = dict(vocab_size=VOCAB, hidden_size=64, intermediate_size=112, num_hidden_layers=2, num_attention_heads=4,
                max_position_embeddings=128, bos_token_id=1, eos_token_id=2, pad_token_id=0)
    return transformers.PhiForCausalLM, transformers.PhiConfig(**{**base, **overrides})


def _longrope(n: int, **extra) -> dict:
    """Distinct per-frequency factors, far apart for short and long, so choosing the wrong set shows."""
    return dict(type="longrope", short_factor=[1.0 + 0.25 * i for i in range(n)],
                long_factor=[2.0 + 1.5 * i for i in range(n)], **extra)


def _phi3(**overrides):
    base = dict(vocab_size=VOCAB, hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
                num_key_value_heads=2, max_position_embeddings=256, original_max_position_embeddings=256,
                bos_token_id=1, eos_token_id=2, pad_token_id=0)
    return transformers.Phi3ForCausalLM, transformers.Phi3Config(**{**base, **overrides})


CASES = {
    # 40% of each 16-feature head rotates (6 features), MHA, untied head with its bias
    "phi2": lambda: _phi(partial_rotary_factor=0.4),
    # PhiConfig's default partial rotary (0.5), GQA, tied embeddings (the head keeps its bias)
    "phi2-tied-gqa": lambda: _phi(num_key_value_heads=2, tie_word_embeddings=True),
    # LayerNorm (with bias) over each head's queries and keys
    "phi2-qk-layernorm": lambda: _phi(qk_layernorm=True),
    # Phi-3-mini-128k's shape of things: LongRoPE past a 16-token original context (4x extension)
    "phi3-longrope": lambda: _phi3(max_position_embeddings=4 * ORIGINAL, original_max_position_embeddings=ORIGINAL,
                                   rope_scaling=_longrope(8)),
    # Phi-4-mini-like: partial rotary with LongRoPE given an explicit attention factor; Phi-3-mini-4k-like windows
    "phi3-partial-sliding": lambda: _phi3(max_position_embeddings=4 * ORIGINAL,
                                          original_max_position_embeddings=ORIGINAL, partial_rotary_factor=0.75,
                                          sliding_window=WINDOW, rope_scaling=_longrope(6, attention_factor=1.25)),
}
LONGROPE = ("phi3-longrope", "phi3-partial-sliding")


@pytest.fixture(scope="module", params=sorted(CASES))
def checkpoint(request, tmp_path_factory):
    name = request.param
    hf, path = _case(name, tmp_path_factory)
    return name, hf, path


_built: dict[str, tuple] = {}


def _case(name: str, tmp_path_factory):
    """One case's (transformers model, checkpoint path), built once per module."""
    if name not in _built:
        cls, config = CASES[name]()
        path = tmp_path_factory.mktemp(name)
        _built[name] = save_checkpoint(cls, config, path, seed=len(name)), path
    return _built[name]


# ------------------------------------------------------------------------------------------ against transformers


def test_logits_match(checkpoint):
    _, hf, path = checkpoint
    check_logits(hf, mlxc.load(str(path)), VOCAB)


@pytest.mark.parametrize("name", LONGROPE)
@pytest.mark.parametrize("seq", [ORIGINAL - 4, ORIGINAL, ORIGINAL + 8])
def test_longrope_within_and_beyond_the_original_context(name, seq, tmp_path_factory):
    hf, path = _case(name, tmp_path_factory)
    check_logits(hf, mlxc.load(str(path)), VOCAB, seq=seq)


@pytest.mark.parametrize("name", LONGROPE)
def test_the_long_factors_matter_only_beyond_the_original_context(name, tmp_path_factory):
    """transformers with the long factors replaced by the short ones: the same logits up to the original context,
    others beyond it; so the matches above tested both sets."""
    hf, path = _case(name, tmp_path_factory)
    config = json.loads((path / "config.json").read_text())
    rope = config["rope_parameters"]
    rope["long_factor"] = rope["short_factor"]
    same = type(hf).from_pretrained(path, config=type(hf.config)(**config), dtype=torch.float32).eval()
    short, long = ids(VOCAB, (2, ORIGINAL)), ids(VOCAB, (2, ORIGINAL + 8))
    assert max_diff(hf_logits(same, short), hf_logits(hf, short)) == 0.0
    assert max_diff(hf_logits(same, long), hf_logits(hf, long)) > 1e-3


def test_greedy_through_the_cache_matches_generate(checkpoint):
    _, hf, path = checkpoint
    check_greedy(hf, mlxc.load(str(path)), VOCAB)


def _generate_without_restart(model, prompt, new: int) -> list:
    from mlxc.runtime.generate import generate

    return np.array(generate(model.step, mx.array(prompt), model.make_cache(), new)).tolist()


def test_generation_crossing_the_original_context_recomputes_like_transformers(tmp_path):
    """transformers' Phi-3 `generate` drops the cache at the step that takes the sequence past the original context
    and runs the whole sequence again with the long factors. With weights large enough for that to change the
    tokens (plain cached decoding gives others), mlxc's generate, stream and an artifact's generate equal it."""
    cls, config = CASES["phi3-longrope"]()
    hf = save_checkpoint(cls, config, tmp_path / "ckpt", seed=5, scale=0.3)
    model = mlxc.load(str(tmp_path / "ckpt"))
    artifact = mlxc.load(mlxc.compile(str(tmp_path / "ckpt"), tmp_path / "artifact"))
    new = 16
    for seed in range(3):
        prompt = ids(VOCAB, (1, 9), seed=seed)
        with torch.no_grad():
            ref = hf.generate(torch.tensor(prompt), max_new_tokens=new, min_new_tokens=new, do_sample=False,
                              eos_token_id=None, pad_token_id=0).numpy().tolist()
        assert _generate_without_restart(model, prompt, new) != ref, "this prompt does not tell the two apart"
        kw = dict(max_new_tokens=new, temperature=0.0, stop_tokens=())
        assert np.array(model.generate(mx.array(prompt), **kw)).tolist() == ref
        assert np.array(artifact.generate(mx.array(prompt), **kw)).tolist() == ref
        streamed = [t.item() for t in model.stream(mx.array(prompt), **kw)]
        assert prompt[0].tolist() + streamed == ref[0]


def test_llama_with_longrope_keeps_its_cache_as_transformers_does(tmp_path):
    """The restart is Phi-3's generation, not LongRoPE's: transformers' Llama with longrope scaling keeps its cache
    across the boundary, and so does mlxc for it (the restart would give other tokens here)."""
    config = transformers.LlamaConfig(vocab_size=VOCAB, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
                                      rope_scaling={**_longrope(8, original_max_position_embeddings=ORIGINAL),
                                                    "rope_type": "longrope"})
    hf = save_checkpoint(transformers.LlamaForCausalLM, config, tmp_path / "ckpt", seed=5, scale=0.3)
    model = mlxc.load(str(tmp_path / "ckpt"))
    assert model.spec.rope.kind == RopeKind.LONGROPE and not model.spec.longrope_cache_restart
    for seq in (ORIGINAL, ORIGINAL + 8):
        check_logits(hf, model, VOCAB, seq=seq)
    from mlxc.runtime.generate import generate

    differs = 0
    for seed in range(3):
        prompt = ids(VOCAB, (1, 9), seed=seed)
        with torch.no_grad():
            ref = hf.generate(torch.tensor(prompt), max_new_tokens=16, min_new_tokens=16, do_sample=False,
                              eos_token_id=None, pad_token_id=0).numpy().tolist()
        assert np.array(model.generate(mx.array(prompt), max_new_tokens=16, temperature=0.0,
                                       stop_tokens=())).tolist() == ref
        restarted = generate(model.step, mx.array(prompt), model.make_cache(), 16, recompute_at=ORIGINAL)
        differs += np.array(restarted).tolist() != ref
    assert differs


def test_a_continued_cache_recomputes_from_its_context(tmp_path):
    """A cache that already holds tokens (a chat's earlier turns) continues across the boundary when the stream is
    told what it holds (`context=`), and is refused a silent wrong answer when it is not."""
    cls, config = CASES["phi3-longrope"]()
    hf = save_checkpoint(cls, config, tmp_path / "ckpt", seed=5, scale=0.3)
    model = mlxc.load(str(tmp_path / "ckpt"))
    tokens = ids(VOCAB, (1, 13), seed=4)
    with torch.no_grad():
        ref = hf.generate(torch.tensor(tokens), max_new_tokens=8, min_new_tokens=8, do_sample=False,
                          eos_token_id=None, pad_token_id=0).numpy().tolist()[0][13:]
    kw = dict(max_new_tokens=8, temperature=0.0, stop_tokens=())
    cache = model.make_cache()
    model(mx.array(tokens[:, :10]), cache=cache)
    got = [t.item() for t in model.stream(mx.array(tokens[:, 10:]), cache=cache, context=tokens[:, :10], **kw)]
    assert got == ref
    cache = model.make_cache()
    model(mx.array(tokens[:, :10]), cache=cache)
    with pytest.raises(MlxcError, match="original context.*context="):
        list(model.stream(mx.array(tokens[:, 10:]), cache=cache, **kw))


def test_chunked_prefill_then_decode_matches_full_prefill(checkpoint):
    name, _, path = checkpoint
    model = mlxc.load(str(path))
    if name in LONGROPE:  # both sides within the original context, then both beyond it from the first chunk on
        check_stepwise(model, VOCAB, seq=ORIGINAL, chunks=(5, 4))
        check_stepwise(model, VOCAB, seq=ORIGINAL + 8, chunks=(ORIGINAL + 1, 3))
    else:
        check_stepwise(model, VOCAB)


@pytest.mark.parametrize("name", LONGROPE)
def test_cached_forward_across_the_boundary_matches_transformers(name, tmp_path_factory):
    """Chunks through the cache that cross the original context inside a chunk and at a single step: each call picks
    the factors for the length it reaches and earlier keys keep theirs, as transformers' forward with a cache does."""
    hf, path = _case(name, tmp_path_factory)
    model = mlxc.load(str(path))
    tokens = ids(VOCAB, (2, ORIGINAL + 6), seed=12)
    ours, theirs = [], []
    cache, past = model.make_cache(), transformers.DynamicCache(config=hf.config)
    for start, stop in ((0, 10), (10, ORIGINAL), (ORIGINAL, ORIGINAL + 1), (ORIGINAL + 1, ORIGINAL + 4),
                        (ORIGINAL + 4, ORIGINAL + 6)):
        ours.append(np.array(model(mx.array(tokens[:, start:stop]), cache=cache).logits))
        with torch.no_grad():
            theirs.append(hf(torch.tensor(tokens[:, start:stop]), cache=past, use_cache=True).logits.numpy())
    assert max_diff(np.concatenate(ours, 1), np.concatenate(theirs, 1)) <= 1e-4


def test_spec_reads_what_transformers_builds(checkpoint):
    """Every checkpoint tensor with transformers' shape (the fused ones as the layout stores them), the rotary
    features and windows transformers uses."""
    name, hf, path = checkpoint
    model = mlxc.load(str(path))
    spec = model.spec
    program = mlxc.lower(spec)
    family = family_named(spec.family)
    program, _ = CheckpointLayout(rules=family.checkpoint_layout(spec)).run(program)
    ours = {n: tuple(p.type.shape) for n, p in program.parameters()}
    theirs = {hf_to_ir_name(n, spec.family): tuple(p.shape) for n, p in hf.named_parameters()}
    assert theirs == ours
    attn = hf.model.layers[0].self_attn
    head_dim = attn.head_dim
    rotary = attn.rotary_ndims if hasattr(attn, "rotary_ndims") else hf.model.rotary_emb.inv_freq.shape[0] * 2
    assert spec.rope_dims == rotary
    assert spec.sliding_window == getattr(hf.config, "sliding_window", None)
    assert spec.dim_per_head == head_dim


def test_the_window_matters(tmp_path_factory):
    """transformers 5 honours Phi-3's sliding_window on every layer (the same weights without it give other
    logits), so matching its logits tested it."""
    hf, path = _case("phi3-partial-sliding", tmp_path_factory)
    config = json.loads((path / "config.json").read_text())
    config["sliding_window"] = None
    full = type(hf).from_pretrained(path, config=type(hf.config)(**config), dtype=torch.float32).eval()
    tokens = ids(VOCAB)
    assert max_diff(hf_logits(full, tokens), hf_logits(hf, tokens)) > 1e-3
    assert mlxc.load(str(path)).module.STATES == [("kv", WINDOW)] * 2


@pytest.mark.parametrize("cls, make", [
    ("PhiForSequenceClassification", _phi),
    ("Phi3ForSequenceClassification", _phi3),
    ("Phi3ForTokenClassification", _phi3),
])
def test_task_heads(cls, make, tmp_path):
    """Classification checkpoints of both families (a padded batch: the sequence head pools the last real token)."""
    _, config = make(num_labels=3)
    hf = save_checkpoint(getattr(transformers, cls), config, tmp_path / "ckpt", seed=7)
    tokens = ids(VOCAB, seed=14)
    tokens[1, -4:] = config.pad_token_id
    model = mlxc.load(str(tmp_path / "ckpt"))
    assert max_diff(np.array(model(mx.array(tokens)).logits), hf_logits(hf, tokens)) <= 1e-4


# ------------------------------------------------------------------------------------------ passes and artifacts


@pytest.mark.parametrize("name", ["phi2", "phi3-partial-sliding"])
def test_fusion_changes_nothing(name, tmp_path_factory):
    _, path = _case(name, tmp_path_factory)
    check_fusion(path, VOCAB, fused_names=("qkv_proj",))


def test_phi3_fusion_reads_the_checkpoint_tensor(tmp_path_factory):
    """The fused program's matmul reads the stored `qkv_proj` itself (the layout's split and fusion's concat
    cancel); the unfused one splits it at load and runs three matmuls."""
    _, path = _case("phi3-longrope", tmp_path_factory)
    fused = mlxc.load(str(path)).program["attention"]
    unfused = mlxc.load(str(path), passes=["dce"]).program["attention"]
    assert [o.operands[1].name for o in fused.ops if o.op == "linear"] == ["qkv_proj.weight", "o_proj.weight"]
    assert not fused.derived and [p.name for p in fused.params] == ["qkv_proj.weight", "o_proj.weight"]
    assert [o.op for o in unfused.derived] == ["split"]
    assert [o.operands[1].name for o in unfused.ops if o.op == "linear"] == ["q_proj.weight", "k_proj.weight",
                                                                             "v_proj.weight", "o_proj.weight"]


@pytest.mark.parametrize("name", ["phi2", "phi3-longrope"])
def test_quantize(name, tmp_path_factory):
    _, path = _case(name, tmp_path_factory)
    check_quantize(path, VOCAB)


@pytest.mark.parametrize("name, targets", [
    ("phi2", ("q_proj", "v_proj", "o_proj", "up_proj", "down_proj")),
    ("phi3-longrope", ("qkv_proj", "o_proj", "gate_up_proj", "down_proj")),
])
def test_lora_fresh_and_merged(name, targets, tmp_path_factory):
    _, path = _case(name, tmp_path_factory)
    check_lora(path, VOCAB, targets)


def test_lora_on_the_parts_of_a_fused_tensor(tmp_path_factory):
    """mlxc adapters may also target q_proj / v_proj inside Phi-3's stored qkv_proj (merged == unmerged), but not
    both a fused tensor and one of its parts; peft has no module for the parts, so saving them is refused."""
    import mlx.utils

    _, path = _case("phi3-longrope", tmp_path_factory)
    tokens = mx.array(ids(VOCAB, seed=8))
    for passes in (None, ["dce"]):
        model = mlxc.load(str(path), lora=mlxc.LoRAConfig(rank=2, targets=("q_proj", "v_proj")), passes=passes)
        params = dict(mlx.utils.tree_flatten(model.net.parameters()))
        assert {n.split(".")[-3] for n in params if ".lora_B." in n} == {"q_proj", "v_proj"}
        rng = np.random.default_rng(3)
        model.net.load_weights([(n, mx.array(rng.normal(0, 0.05, a.shape).astype(np.float32)))
                                for n, a in params.items() if ".lora_B." in n], strict=False)
        changed = np.array(model(tokens).logits)
        assert max_diff(changed, np.array(mlxc.load(str(path))(tokens).logits)) > 1e-4
        with pytest.raises(MlxcError, match="q_proj.*no Hugging Face name|Hugging Face"):
            mlxc.save_adapter(model, path.parent / "never")
    with pytest.raises(MlxcError, match="both qkv_proj and its part q_proj"):
        mlxc.load(str(path), lora=mlxc.LoRAConfig(rank=2, targets=("qkv_proj", "q_proj")))


PEFT_TARGETS = {
    "phi2": ["q_proj", "k_proj", "v_proj", "dense", "fc1", "fc2"],
    "phi3-longrope": ["qkv_proj", "o_proj", "gate_up_proj", "down_proj"],
}


@pytest.mark.parametrize("name", sorted(PEFT_TARGETS))
def test_peft_adapter_round_trip(name, tmp_path_factory, tmp_path):
    """A transformers + peft adapter (on Phi-3's fused qkv_proj and gate_up_proj: whole matmuls) gives peft's logits
    in mlxc, fused and unfused, unmerged and merged; the adapter mlxc saves loads back in peft to the same logits."""
    peft = pytest.importorskip("peft")
    _, path = _case(name, tmp_path_factory)
    cls = transformers.AutoModelForCausalLM
    torch.manual_seed(0)
    lora = peft.LoraConfig(r=4, lora_alpha=8, target_modules=PEFT_TARGETS[name], lora_dropout=0.0,
                           init_lora_weights=False, task_type="CAUSAL_LM")
    ref = peft.get_peft_model(cls.from_pretrained(path, dtype=torch.float32), lora).eval()
    with torch.no_grad():  # B clearly non-zero, so a dropped adapter cannot pass
        for n, p in ref.named_parameters():
            if "lora_B" in n:
                p.copy_(0.05 * torch.randn(p.shape))
    ref.save_pretrained(tmp_path / "adapter")
    tokens = ids(VOCAB, seed=11)
    want = hf_logits(ref, tokens)
    assert max_diff(want, np.array(mlxc.load(str(path))(mx.array(tokens)).logits)) > 1e-2
    for passes in (None, ["dce"]):
        for merge in (False, True):
            model = mlxc.load(str(path), adapter=tmp_path / "adapter", merge_lora=merge, passes=passes)
            err = max_diff(np.array(model(mx.array(tokens)).logits), want)
            assert err <= 1e-4, f"passes={passes} merge_lora={merge}: {err:.2e}"
    saved = mlxc.save_adapter(mlxc.load(str(path), adapter=tmp_path / "adapter"), tmp_path / "saved")
    assert sorted(json.loads((saved / "adapter_config.json").read_text())["target_modules"]) == \
        sorted(PEFT_TARGETS[name])
    back = peft.PeftModel.from_pretrained(cls.from_pretrained(path, dtype=torch.float32), saved).eval()
    assert max_diff(hf_logits(back, tokens), want) <= 1e-5


@pytest.mark.parametrize("name", ["phi2", "phi3-partial-sliding"])
def test_compile_then_load(name, tmp_path_factory, tmp_path):
    _, path = _case(name, tmp_path_factory)
    check_artifact(path, tmp_path, VOCAB)


@pytest.mark.parametrize("name", ["phi2", "phi3-longrope"])
def test_diff_finds_no_divergence(name, tmp_path_factory):
    """`mlxc diff` hooks Phi's layers and its `final_layernorm` in transformers; every row agrees."""
    _, path = _case(name, tmp_path_factory)
    report = mlxc.diff(str(path))
    assert report.first_divergent is None and len(report.rows) == 2 + 2 + 1  # embeddings, 2 layers, norm, logits


def test_longrope_survives_the_ir_text(tmp_path_factory):
    """The rope attribute with both factor lists prints, parses back and prints the same."""
    _, path = _case("phi3-longrope", tmp_path_factory)
    text = print_program(mlxc.load(str(path)).program)
    assert "kind = longrope" in text and "short_factor = [1.0, 1.25" in text
    assert print_program(parse_program(text)) == text


# -------------------------------------------------------------------------------------------------------- GGUF

# llama.cpp's `phi2` names for Hugging Face's (its tensor table), written out here for the test
_GGUF_NAMES = (
    (r"model\.embed_tokens\.weight", "token_embd.weight"),
    (r"model\.layers\.(\d+)\.input_layernorm\.(weight|bias)", r"blk.\1.attn_norm.\2"),
    (r"model\.layers\.(\d+)\.self_attn\.([qkv])_proj\.(weight|bias)", r"blk.\1.attn_\2.\3"),
    (r"model\.layers\.(\d+)\.self_attn\.dense\.(weight|bias)", r"blk.\1.attn_output.\2"),
    (r"model\.layers\.(\d+)\.mlp\.fc1\.(weight|bias)", r"blk.\1.ffn_up.\2"),
    (r"model\.layers\.(\d+)\.mlp\.fc2\.(weight|bias)", r"blk.\1.ffn_down.\2"),
    (r"model\.final_layernorm\.(weight|bias)", r"output_norm.\1"),
    (r"lm_head\.(weight|bias)", r"output.\1"),
)


def write_phi2_gguf(hf, path: Path, fuse_qkv: bool = False) -> Path:
    """The checkpoint's float32 tensors under llama.cpp's names with the metadata its converter writes (rotary
    features as `rope.dimension_count`, Q/K rows as stored), plus a small byte-level vocabulary."""
    import re

    gguf = pytest.importorskip("gguf")
    c = hf.config
    w = gguf.GGUFWriter(str(path), "phi2")
    w.add_block_count(c.num_hidden_layers)
    w.add_context_length(c.max_position_embeddings)
    w.add_embedding_length(c.hidden_size)
    w.add_feed_forward_length(c.intermediate_size)
    w.add_head_count(c.num_attention_heads)
    w.add_head_count_kv(c.num_key_value_heads)
    w.add_layer_norm_eps(c.layer_norm_eps)
    w.add_rope_dimension_count(hf.model.layers[0].self_attn.rotary_ndims)
    w.add_tokenizer_model("gpt2")
    w.add_token_list(["a", "b", "ab"] + [f"t{i}" for i in range(c.vocab_size - 3)])
    w.add_token_merges(["a b"])
    w.add_bos_token_id(c.bos_token_id)
    w.add_eos_token_id(c.eos_token_id)
    tensors = {}
    for name, p in hf.named_parameters():  # a tied head is listed once, as the embedding: no output.weight
        gguf_name = next(m.expand(t) for pat, t in _GGUF_NAMES if (m := re.fullmatch(pat, name)))
        tensors[gguf_name] = p.detach().float().numpy()
    if fuse_qkv:  # the original Phi-2 release's layout
        for i in range(c.num_hidden_layers):
            for leaf in ("weight", "bias"):
                parts = [tensors.pop(f"blk.{i}.attn_{x}.{leaf}") for x in "qkv"]
                tensors[f"blk.{i}.attn_qkv.{leaf}"] = np.concatenate(parts, axis=0)
    for name, t in tensors.items():
        w.add_tensor(name, t)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


@pytest.mark.parametrize("name", ["phi2", "phi2-tied-gqa"])
def test_phi2_gguf_matches_the_checkpoint(name, tmp_path_factory, tmp_path):
    hf, path = _case(name, tmp_path_factory)
    model = mlxc.load(str(write_phi2_gguf(hf, tmp_path / f"{name}.gguf")))
    assert model.spec.family == "phi" and model.spec.tie_word_embeddings == hf.config.tie_word_embeddings
    # the same architecture as the Hugging Face config describes, parameter for parameter
    assert str(mlxc.lower(model.spec)) == str(mlxc.lower(mlxc.load(str(path)).spec))
    tokens = ids(VOCAB, seed=12)
    err = max_diff(np.array(model(mx.array(tokens)).logits), hf_logits(hf, tokens))
    assert err <= 1e-4, f"{name} GGUF: max |logits diff| = {err:.2e}"


def test_phi2_gguf_with_fused_qkv_is_refused(tmp_path_factory, tmp_path):
    hf, _ = _case("phi2", tmp_path_factory)
    with pytest.raises(MlxcError, match="fused attn_qkv"):
        mlxc.load(str(write_phi2_gguf(hf, tmp_path / "fused.gguf", fuse_qkv=True)))


# ------------------------------------------------------------------------------------------------------ export


@pytest.mark.parametrize("name", sorted(CASES))
def test_export_gives_transformers_the_same_logits(name, tmp_path_factory, tmp_path):
    """`mlxc export` of the checkpoint, and of a compiled (fused) artifact of it: Phi-3's tensors written back
    fused, the rope settings (LongRoPE's factors and original context) carried; transformers reads the same model."""
    hf, path = _case(name, tmp_path_factory)
    tokens = ids(VOCAB, seed=13)
    for src in (path, mlxc.compile(str(path), tmp_path / "artifact")):
        out = mlxc.export(src, tmp_path / "exported", overwrite=True)
        config = json.loads((out / "config.json").read_text())
        assert config["architectures"] == [type(hf).__name__]
        back = transformers.AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32).eval()
        assert {n for n, _ in back.named_parameters()} == {n for n, _ in hf.named_parameters()}
        err = max_diff(hf_logits(back, tokens), hf_logits(hf, tokens))
        assert err <= 1e-6, f"{name} from {src}: max |logits diff| {err:.2e}"


# ----------------------------------------------------------------------------------------------- config reading


def _phi3_config(**overrides) -> dict:
    _, config = _phi3(**overrides)
    return {**config.to_dict(), "architectures": ["Phi3ForCausalLM"]}


@pytest.mark.parametrize("legacy", ["su", "yarn"])
def test_legacy_rope_types_are_longrope(legacy):
    """Phi3Config reads "su" and "yarn" as longrope, and its top-level original_max_position_embeddings wins over
    the one in the rope settings."""
    data = _phi3_config(max_position_embeddings=64, original_max_position_embeddings=ORIGINAL)
    data.pop("rope_parameters")
    data["rope_scaling"] = {**_longrope(8), "type": legacy, "original_max_position_embeddings": 32}
    spec = spec_from_hf_config(data)
    ref = transformers.Phi3Config(**{k: v for k, v in data.items() if k != "architectures"})
    ref.standardize_rope_params()
    assert spec.rope.kind == RopeKind.LONGROPE and ref.rope_parameters["rope_type"] == "longrope"
    assert spec.rope.original_max_position_embeddings == ref.rope_parameters["original_max_position_embeddings"] \
        == ORIGINAL


@pytest.mark.parametrize("overrides, message", [
    (dict(rope_scaling={"type": "longrope", "short_factor": [1.0] * 8}), "needs `rope_scaling.long_factor`"),
    (dict(rope_scaling=_longrope(5)), "short_factor` has 5 entries; the rotary embedding has 8 frequencies"),
    (dict(rope_scaling={**_longrope(8), "long_factor": [1.0, "x"] * 4}), "long_factor` must be a list of positive"),
    (dict(rope_scaling={"type": "dynamic", "factor": 2.0}), "Phi-3 supports default and longrope"),
])
def test_bad_phi3_configs_are_refused(overrides, message):
    data = _phi3_config()
    data.pop("rope_parameters")
    data.update(overrides)
    with pytest.raises(MlxcError, match=message):
        spec_from_hf_config(data)


def test_phi_qk_layernorm_with_another_head_dim_is_refused():
    """transformers sizes Phi's q/k LayerNorms by hidden_size // heads, which a different head_dim contradicts."""
    _, config = _phi(qk_layernorm=True)
    with pytest.raises(MlxcError, match="qk_layernorm with head_dim 32"):
        spec_from_hf_config({**config.to_dict(), "architectures": ["PhiForCausalLM"], "head_dim": 32})


def test_phi_partial_rotary_default_and_top_level_key():
    """PhiConfig's default share (0.5) when no key says, the top-level key when only it does."""
    _, config = _phi()
    data = {k: v for k, v in config.to_dict().items() if k != "rope_parameters"}
    assert spec_from_hf_config({**data, "model_type": "phi"}).partial_rotary_factor == 0.5
    assert spec_from_hf_config({**data, "model_type": "phi", "partial_rotary_factor": 0.25}).rope_dims == 4


# ----------------------------------------------------------------------------------------------------- presets

PRESETS = {name: spec for name, spec in ALL_PRESETS.items() if spec.family in ("phi", "phi3")}
# Parameter counts of the published checkpoints (microsoft/phi-2, microsoft/Phi-3-mini-4k-instruct)
PUBLISHED = {"phi2": 2_779_683_840, "phi3-mini": 3_821_079_552}


def test_every_preset_has_a_published_size():
    assert set(PRESETS) == set(PUBLISHED)


@pytest.fixture(scope="module")
def meta_models():
    """Each preset's transformers model for the config mlxc writes, on the meta device: {name: {param: shape}}."""
    models = build_meta_models(PRESETS)
    for name, (cls, _) in models.items():
        assert cls == hf_config_from_spec(PRESETS[name])["architectures"][0]
    return {name: shapes for name, (_, shapes) in models.items()}


@pytest.mark.parametrize("name", sorted(PUBLISHED))
def test_preset_parameters_match_transformers(name, meta_models):
    spec = PRESETS[name]
    theirs = {hf_to_ir_name(n, spec.family): shape for n, shape in meta_models[name].items()}
    family = family_named(spec.family)
    program, _ = CheckpointLayout(rules=family.checkpoint_layout(spec)).run(mlxc.lower(spec))
    assert theirs == {n: tuple(p.type.shape) for n, p in program.parameters()}
    count = sum(prod(s) for s in theirs.values())
    assert spec.num_parameters() == count == PUBLISHED[name]


@pytest.mark.parametrize("repo, preset", [("microsoft/phi-2", "phi2"),
                                          ("microsoft/Phi-3-mini-4k-instruct", "phi3-mini")])
def test_hub_ids_name_the_presets(repo, preset):
    assert preset_for_hub_id(repo) == preset


def test_detected_from_tensor_names_without_metadata(tmp_path_factory, tmp_path):
    """A config without `architectures` or `model_type` still loads as Phi-3 from its fused tensor names."""
    hf, path = _case("phi3-longrope", tmp_path_factory)
    import shutil

    shutil.copytree(path, tmp_path / "bare")
    config = json.loads((path / "config.json").read_text())
    for key in ("architectures", "model_type"):
        config.pop(key, None)
    (tmp_path / "bare" / "config.json").write_text(json.dumps(config))
    model = mlxc.load(str(tmp_path / "bare"))
    assert model.spec.family == "phi3"
