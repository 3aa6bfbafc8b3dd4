"""fuse-glu and fuse-attention (passes/fuse.py): a gated MLP's split, activation and product as one `glu`, and an
attention block's head split, rotations, attention and head merge as one `qkv_attention` — the ops a target with
kernels for the whole chain runs (select-kernels applies both where the native CPU kernels run).

The fused programs are held to transformers, which is the independent reference: logits, greedy tokens through the
cache and a chunked prefill. The patterns must back off wherever the chain is not the plain one (q/k norms, ALiBi,
LongRoPE, a value with another reader).
"""

from __future__ import annotations

import numpy as np
import pytest

import mlx.core as mx

import mlxc
from mlxc.api import program_for
from mlxc.ir import parse_program, print_program
from parity import check_greedy, check_logits, check_stepwise, ids, save_checkpoint

FUSED = "dce,fuse-qkv,fuse-gate-up,fuse-glu,fuse-attention,lift-params,cse,fold-shapes,select-kernels,dce".split(",")
VOCAB = 128


def ops(program, name: str) -> list:
    return [o for fn in program.functions for o in fn.ops if o.op == name]


@pytest.fixture(scope="module")
def llama(tmp_path_factory):
    transformers = pytest.importorskip("transformers")
    pytest.importorskip("torch")
    config = transformers.LlamaConfig(
        vocab_size=VOCAB, hidden_size=96, intermediate_size=160, num_hidden_layers=2, num_attention_heads=6,
        num_key_value_heads=2, max_position_embeddings=128, rms_norm_eps=1e-5, tie_word_embeddings=False,
        rope_theta=5000.0)
    path = tmp_path_factory.mktemp("llama")
    return save_checkpoint(transformers.LlamaForCausalLM, config, path, seed=4), path


@pytest.fixture(scope="module")
def gemma2(tmp_path_factory):
    """Gemma 2: GeGLU (gelu_tanh), soft-capped scores, a sliding-window layer shorter than the test prompts."""
    transformers = pytest.importorskip("transformers")
    pytest.importorskip("torch")
    config = transformers.Gemma2Config(
        vocab_size=VOCAB, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, head_dim=16, max_position_embeddings=128, sliding_window=6,
        attn_logit_softcapping=50.0, final_logit_softcapping=30.0, query_pre_attn_scalar=16)
    path = tmp_path_factory.mktemp("gemma2")
    hf = save_checkpoint(transformers.Gemma2ForCausalLM, config, path, seed=5)
    return hf, path


def test_llama_chain_becomes_two_ops_and_equals_transformers(llama):
    hf, path = llama
    model = mlxc.load(str(path), kernels="reference", passes=FUSED)
    attn = ops(model.program, "qkv_attention")
    assert len(attn) == 1 and len(ops(model.program, "glu")) == 1
    assert not ops(model.program, "rope") and not ops(model.program, "split") and not ops(model.program, "attention")
    assert (attn[0].attrs["heads"], attn[0].attrs["kv_heads"], attn[0].attrs["head_dim"]) == (6, 2, 16)
    text = print_program(model.program)
    assert print_program(parse_program(text)) == text
    check_logits(hf, model, VOCAB)
    check_greedy(hf, model, VOCAB)
    check_stepwise(model, VOCAB)


def test_gemma2_softcap_window_and_geglu_fuse_and_equal_transformers(gemma2):
    hf, path = gemma2
    model = mlxc.load(str(path), kernels="reference", passes=FUSED)
    attn = ops(model.program, "qkv_attention")
    assert {o.attrs["window"] for o in attn} == {None, 6} and {o.attrs["softcap"] for o in attn} == {50.0}
    assert [o.attrs["activation"] for o in ops(model.program, "glu")] == ["gelu_tanh"]
    check_logits(hf, model, VOCAB)
    check_greedy(hf, model, VOCAB)
    check_stepwise(model, VOCAB)


@pytest.mark.parametrize("preset, attention, glu", [
    ("qwen3-0.6b", 0, 1),  # q and k norms sit between the head split and the rotation
    ("gemma3-1b", 0, 1),  # the same
    ("bloom-560m", 0, 0),  # ALiBi, no rotation; a plain GELU MLP
    ("mistral-7b", 1, 1),
])
def test_patterns_back_off_where_the_chain_differs(preset, attention, glu):
    program = program_for(f"preset:{preset}", passes=FUSED, kernels="reference")
    assert len(ops(program, "qkv_attention")) == attention and len(ops(program, "glu")) == glu


def test_longrope_keeps_its_rope_op():
    from mlxc.frontends.presets import PRESETS

    spec = PRESETS["phi3-mini"]
    half = spec.hidden_size // spec.num_heads // 2
    scaled = spec.model_copy(update={"rope": spec.rope.model_copy(update={
        "kind": "longrope", "factor": 32.0, "original_max_position_embeddings": 4096, "theta": spec.rope.theta,
        "short_factor": (1.0,) * half, "long_factor": (2.0,) * half})})
    program = mlxc.api.compile_program(scaled, passes=FUSED, kernels="reference")
    assert not ops(program, "qkv_attention") and ops(program, "rope")


def test_a_value_with_another_reader_is_not_fused_away():
    """An intermediate of the chain that the function also returns must stay computed: no fusion there."""
    from mlxc.passes.fuse import AttentionFromQKV, GatedUnit
    from mlxc.passes.rewrite import apply_patterns

    program = program_for("preset:tiny", passes=["dce", "fuse-qkv", "fuse-gate-up"], kernels="reference")
    kept = [o.results[0] for fn in program.functions for o in fn.ops if o.op in ("rope", "silu")]
    assert kept
    for fn in program.functions:
        fn.outputs += [v for v in kept if any(r is v for o in fn.ops for r in o.results)]
    assert apply_patterns(program, [GatedUnit(), AttentionFromQKV()]) == 0
    assert not ops(program, "qkv_attention") and not ops(program, "glu")


def test_native_target_fuses_and_says_so():
    from mlxc.kernels import native

    if not native.available():
        pytest.skip(f"native kernels unavailable: {native.reason()}")
    program = program_for("preset:tiny", quantize=4, kernels="auto")
    assert {o.attrs["kernel"].value for o in ops(program, "qkv_attention") + ops(program, "glu")} == {"native"}
    assert "qkv_attention" in print_program(program) and "glu(" in print_program(program)
