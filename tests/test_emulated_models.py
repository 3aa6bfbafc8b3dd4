"""Whole models with `kernels="emulated"`: attention and the scans run their Metal kernels' exact source in the
kernel emulator, called from the real generated module (select-kernels -> codegen -> kernels/metal -> emulator),
held to the same model with the reference ops and to transformers, for a prefill and for a cached decode.

One tiny random-weight checkpoint per family, loaded once per module (the emulator compiles each kernel
specialisation once, cached by source hash; each launch then runs in a child process): Mamba (selective scan
prefill and decode kernels), Mamba-2 (chunked SSD and state-update kernels), Gemma 2 (alternating sliding windows
shorter than the sequence, attention soft-cap, GQA) and Mistral (a sliding window, GQA 4:1).
"""

from __future__ import annotations

import shutil
import sys

import numpy as np
import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

import mlx.core as mx  # noqa: E402

import mlxc  # noqa: E402
from mlxc.ir import Kernel  # noqa: E402
from mlxc.passes.select_kernels import CUSTOM  # noqa: E402
from mamba_ref import mamba_dynamics  # noqa: E402
from parity import hf_logits, ids, max_diff, save_checkpoint  # noqa: E402

pytestmark = pytest.mark.skipif(shutil.which("g++") is None, reason="the kernel emulator compiles with g++")

VOCAB = 96
SEQ = 12  # longer than every window below, so sliding layers mask by position
TOL = 1e-4


CASES = {
    "mamba": lambda: (transformers.MambaForCausalLM, transformers.MambaConfig(
        vocab_size=VOCAB, hidden_size=32, state_size=8, expand=2, conv_kernel=4, num_hidden_layers=2,
        time_step_rank=4, bos_token_id=1, eos_token_id=2, pad_token_id=0)),
    "mamba2": lambda: (transformers.Mamba2ForCausalLM, transformers.Mamba2Config(
        vocab_size=VOCAB, hidden_size=32, num_heads=4, head_dim=16, expand=2, state_size=16, conv_kernel=4,
        n_groups=2, chunk_size=8, num_hidden_layers=2, bos_token_id=1, eos_token_id=2, pad_token_id=0)),
    "gemma2": lambda: (transformers.Gemma2ForCausalLM, transformers.Gemma2Config(
        vocab_size=VOCAB, hidden_size=64, intermediate_size=96, num_attention_heads=4, num_key_value_heads=2,
        head_dim=16, num_hidden_layers=2, query_pre_attn_scalar=24, sliding_window=5, attn_logit_softcapping=1.5,
        final_logit_softcapping=2.5, max_position_embeddings=64, bos_token_id=2, eos_token_id=1, pad_token_id=0)),
    "mistral": lambda: (transformers.MistralForCausalLM, transformers.MistralConfig(
        vocab_size=VOCAB, hidden_size=64, intermediate_size=112, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=1, max_position_embeddings=64, sliding_window=5, bos_token_id=1, eos_token_id=2)),
}
# the op each family's custom kernels implement
CUSTOM_OP = {"mamba": "selective_scan", "mamba2": "ssd", "gemma2": "attention", "mistral": "attention"}


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    """{family: (transformers model, mlxc with reference ops, mlxc with emulated kernels)}, built on first use."""
    made: dict[str, tuple] = {}

    def get(name: str):
        if name not in made:
            cls, config = CASES[name]()
            path = tmp_path_factory.mktemp(name)
            hf = save_checkpoint(cls, config, path, seed=len(name))
            if name == "mamba":
                mamba_dynamics(hf, 7, dt_max=1.0)
                hf.save_pretrained(path, safe_serialization=True)
            made[name] = hf, mlxc.load(str(path), kernels="reference"), mlxc.load(str(path), kernels="emulated")
        return made[name]

    return get


@pytest.mark.parametrize("name", sorted(CASES))
def test_emulated_kernels_are_wired_into_the_module(models, name):
    """select-kernels marked the op, codegen called the kernel helper with impl="emulated"; nothing else changed."""
    _, ref, emu = models(name)
    op = CUSTOM_OP[name]
    ops = [o for f in emu.program.functions for o in f.ops if o.op == op]
    assert ops and all(o.attrs["kernel"] == Kernel.EMULATED for o in ops)
    assert all(o.attrs.get("kernel", Kernel.REFERENCE) == Kernel.REFERENCE
               for f in ref.program.functions for o in f.ops if o.op in CUSTOM)
    code = open(sys.modules[type(emu.net).__module__].__file__).read()
    helper = {"attention": "kernel_attention(", "selective_scan": "kernel_selective_scan(", "ssd": "kernel_ssd("}[op]
    calls = [line for line in code.splitlines() if helper in line and "def " not in line]
    assert calls and all('impl="emulated"' in line for line in calls), calls
    ref_code = open(sys.modules[type(ref.net).__module__].__file__).read()
    assert "kernel_" not in ref_code


@pytest.mark.parametrize("name", sorted(CASES))
def test_emulated_prefill_equals_reference_and_transformers(models, name):
    hf, ref, emu = models(name)
    tokens = ids(VOCAB, (2, SEQ))
    ours = np.array(emu(mx.array(tokens)).logits)
    assert max_diff(ours, np.array(ref(mx.array(tokens)).logits)) <= TOL
    assert max_diff(ours, hf_logits(hf, tokens)) <= TOL


@pytest.mark.parametrize("name", sorted(CASES))
def test_emulated_cached_decode_equals_transformers(models, name):
    """A prefill of 8 tokens into the cache, then 4 single tokens (the decode kernels; past the windows, so the
    rotating caches' buffers hold the keys at an offset): transformers' logits of the whole sequence."""
    hf, ref, emu = models(name)
    tokens = ids(VOCAB, (1, SEQ), seed=5)
    want = hf_logits(hf, tokens)
    for model in (emu, ref):
        cache = model.make_cache()
        parts = [model(mx.array(tokens[:, :8]), cache=cache).logits]
        for t in range(8, SEQ):
            parts.append(model(mx.array(tokens[:, t:t + 1]), cache=cache).logits)
        got = np.array(mx.concatenate(parts, axis=1))
        assert max_diff(got, want) <= TOL, model is emu


def test_emulated_greedy_generation(models):
    """generate() through the emulated kernels picks transformers' greedy tokens."""
    hf, _, emu = models("mistral")
    prompt = ids(VOCAB, (1, 6), seed=2)
    with torch.no_grad():
        want = hf.generate(torch.tensor(prompt), max_new_tokens=4, min_new_tokens=4, do_sample=False,
                           eos_token_id=None, pad_token_id=0).numpy()
    got = np.array(emu.generate(mx.array(prompt), max_new_tokens=4, temperature=0.0, stop_tokens=()))
    assert got.tolist() == want.tolist()
