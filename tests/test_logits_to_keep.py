"""`logits_to_keep`: the language-model head at the last n positions only, as transformers' argument of that name.

Generation's prompt step needs one position's logits; computing the head (vocab x hidden) at every prompt position is
a fifth of a small model's prompt FLOPs. Checked against transformers' own `logits_to_keep` on a random checkpoint,
through the IR (an input of @main and a `keep_last` op), the generated signature and the runtime.
"""

from __future__ import annotations

import numpy as np
import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

import mlx.core as mx  # noqa: E402

import mlxc  # noqa: E402
from mlxc.ir import MlxcError, Program, parse_program, print_program  # noqa: E402

VOCAB = 300


@pytest.fixture(scope="module")
def llama_dir(tmp_path_factory):
    torch.manual_seed(0)
    cfg = transformers.LlamaConfig(
        vocab_size=VOCAB, hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=128, tie_word_embeddings=True, bos_token_id=1,
        eos_token_id=2)
    model = transformers.LlamaForCausalLM(cfg).eval()
    path = tmp_path_factory.mktemp("llama")
    model.save_pretrained(path)
    return path, model


IDS = np.random.default_rng(3).integers(3, VOCAB, size=(2, 11))


@pytest.mark.parametrize("kernels", ["auto", "reference"])
@pytest.mark.parametrize("keep", [1, 3, 11, 40])
def test_kept_logits_equal_transformers(llama_dir, keep, kernels):
    path, hf = llama_dir
    with torch.no_grad():
        want = hf(torch.tensor(IDS), logits_to_keep=keep).logits.numpy()
    model = mlxc.load(str(path), kernels=kernels)
    got = np.array(model.step(mx.array(IDS), model.make_cache(), logits_to_keep=keep))
    assert got.shape == want.shape == (2, min(keep, IDS.shape[1]), VOCAB)
    np.testing.assert_allclose(got, want, atol=1e-4, rtol=0)


def test_zero_keeps_every_position_and_the_cache_advances(llama_dir):
    path, _ = llama_dir
    model = mlxc.load(str(path))
    cache = model.make_cache()
    full = model.step(mx.array(IDS), cache, logits_to_keep=0)
    assert full.shape == (2, IDS.shape[1], VOCAB) and cache.offset == IDS.shape[1]
    last = model.step(mx.array(IDS[:, :1]), cache, logits_to_keep=1)  # a decode step after a kept prompt step
    assert last.shape == (2, 1, VOCAB) and cache.offset == IDS.shape[1] + 1


def test_generation_uses_the_last_position_and_matches_transformers(llama_dir):
    path, hf = llama_dir
    with torch.no_grad():
        want = hf.generate(torch.tensor(IDS[:1]), max_new_tokens=8, do_sample=False, eos_token_id=None,
                           pad_token_id=0).numpy()
    model = mlxc.load(str(path))
    calls = []
    step = model.step

    def spy(ids, cache, logits_to_keep=0):
        calls.append((ids.shape[1], logits_to_keep))
        return step(ids, cache, logits_to_keep)

    model.step = spy
    got = np.array(model.generate(mx.array(IDS[:1]), max_new_tokens=8, stop_tokens=[]))
    np.testing.assert_array_equal(got, want)
    assert calls[0] == (IDS.shape[1], 1)  # the prompt step computed one position's logits


def test_program_declares_the_input_and_round_trips(llama_dir):
    path, _ = llama_dir
    program = mlxc.load(str(path)).program
    main = program.main
    assert [v.name for v in main.inputs] == ["input_ids", "offset", Program.LOGITS_TO_KEEP]
    assert main.outputs[0].type.shape[1] == "L"
    kept = [o for o in main.ops if o.op == "keep_last"]
    assert len(kept) == 1 and kept[0].operands[1].name == Program.LOGITS_TO_KEEP
    text = print_program(program)
    assert print_program(parse_program(text)) == text


def test_a_program_without_the_input_slices_after_the_head(llama_dir):
    """An artifact compiled before @main took logits_to_keep: the runtime keeps the positions after the head (the
    same numbers, without the saving). Its program is rebuilt here without the input and the keep_last op."""
    import re

    from mlx.utils import tree_flatten

    from mlxc.codegen import generate_module, import_module, write_module
    from mlxc.ir import verify

    path, hf = llama_dir
    model = mlxc.load(str(path))
    text = print_program(model.program).replace(", %logits_to_keep: i32[]", "").replace("f32[B, L,", "f32[B, T,")
    kept, before = re.search(r"\n  (%\w+) = keep_last\((%\w+), %logits_to_keep\)[^\n]*", text).groups()
    text = re.sub(r"\n  %\w+ = keep_last\([^\n]*", "", text).replace(f"{kept},", f"{before},")
    old = verify(parse_program(text))
    module = import_module(write_module(generate_module(old)))
    net = module.Model()
    net.load_weights(tree_flatten(model.net.parameters()))
    legacy = type(model)(module, net, old, spec=model.spec)
    assert not legacy.keeps_logits and "keep_last" not in print_program(old)
    with torch.no_grad():
        want = hf(torch.tensor(IDS), logits_to_keep=2).logits.numpy()
    got = np.array(legacy.step(mx.array(IDS), legacy.make_cache(), logits_to_keep=np.int64(2)))
    np.testing.assert_allclose(got, want, atol=1e-4, rtol=0)


def test_bad_values_are_refused(llama_dir):
    path, _ = llama_dir
    model = mlxc.load(str(path))
    for bad in (-1, 1.5, True, "2"):
        with pytest.raises(MlxcError, match="logits_to_keep must be an integer >= 0"):
            model.step(mx.array(IDS), model.make_cache(), logits_to_keep=bad)


def test_a_classifier_has_no_positions_to_keep(tmp_path):
    torch.manual_seed(0)
    cfg = transformers.LlamaConfig(vocab_size=VOCAB, hidden_size=32, intermediate_size=48, num_hidden_layers=1,
                                   num_attention_heads=2, num_key_value_heads=1, num_labels=3, pad_token_id=0)
    transformers.LlamaForSequenceClassification(cfg).save_pretrained(tmp_path)
    model = mlxc.load(str(tmp_path))
    assert all(v.name != Program.LOGITS_TO_KEEP for v in model.program.main.inputs)
    with pytest.raises(MlxcError, match="language-model head"):
        model.forward(mx.array(IDS[:1]), None, logits_to_keep=1)
