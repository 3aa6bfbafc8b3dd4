"""`mlxc diff` (and the `expose-hidden` pass under it) against transformers.

The hidden states mlxc's compiled program exposes are checked against transformers' own `output_hidden_states`
(independent of the forward hooks `diff` uses); a perturbed layer must be the one reported first, with per-layer
differences equal to those transformers computes between the two checkpoints.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

import mlx.core as mx  # noqa: E402

import mlxc  # noqa: E402
from mlxc.cli import main  # noqa: E402
from mlxc.frontends.presets import get_preset  # noqa: E402
from mlxc.ir import print_program, verify  # noqa: E402
from mlxc.tools.diff import diff, hidden_states  # noqa: E402
from mlxc.passes.expose_hidden import ExposeHidden  # noqa: E402

VOCAB, LAYERS = 320, 3
IDS = [1, 17, 250, 3, 99, 42, 7, 300, 12, 5, 64, 128]


def _save(path: Path, seed: int = 0):
    config = transformers.LlamaConfig(vocab_size=VOCAB, hidden_size=64, intermediate_size=112,
                                      num_hidden_layers=LAYERS, num_attention_heads=4, num_key_value_heads=2,
                                      max_position_embeddings=128, rms_norm_eps=1e-5)
    torch.manual_seed(seed)
    model = transformers.LlamaForCausalLM(config).eval()
    g = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for name, p in model.named_parameters():
            p.copy_((1.0 + 0.1 * torch.randn(p.shape, generator=g)) if name.endswith("norm.weight")
                    else 0.08 * torch.randn(p.shape, generator=g))
    model.save_pretrained(path)
    return model


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    path = tmp_path_factory.mktemp("diff") / "ckpt"
    return _save(path), path


@pytest.fixture(scope="module")
def perturbed(ckpt, tmp_path_factory):
    """A copy of the checkpoint whose layer 1 o_proj has extra noise: everything before layer 1 is unchanged."""
    from safetensors.torch import load_file, save_file

    _, path = ckpt
    out = tmp_path_factory.mktemp("diff") / "perturbed"
    shutil.copytree(path, out)
    tensors = load_file(str(out / "model.safetensors"))
    name = "model.layers.1.self_attn.o_proj.weight"
    tensors[name] = tensors[name] + 0.02 * torch.randn(tensors[name].shape, generator=torch.Generator().manual_seed(9))
    save_file(tensors, str(out / "model.safetensors"), metadata={"format": "pt"})
    model = transformers.AutoModelForCausalLM.from_pretrained(str(out), dtype=torch.float32).eval()
    return model, out


def _hf_hidden(model, ids) -> list[np.ndarray]:
    """transformers' own hidden states: embeddings, layers 0..N-2, then the final norm's output."""
    with torch.no_grad():
        return [h.numpy() for h in model(torch.tensor([ids]), output_hidden_states=True).hidden_states]


# ---------------------------------------------------------------------------------------------- the pass


def test_expose_hidden_only_adds_outputs():
    program = mlxc.lower(get_preset("tiny"))
    before = print_program(program).splitlines()
    program, report = ExposeHidden().run(program)
    verify(program)
    after = print_program(program).splitlines()
    changed = [(a, b) for a, b in zip(before, after) if a != b]
    assert len(before) == len(after) and report.changes == {"exposed": 4}
    h, kept = "f32[B, T, 64]", "f32[B, L, 64]"  # the final norm's output: at the positions logits_to_keep keeps
    inputs = "%input_ids: i32[B, T], %offset: i32[], %logits_to_keep: i32[]"
    assert changed == [
        (f"func @main({inputs}) -> f32[B, L, 256] state(kv, kv) {{",
         f"func @main({inputs}) -> (f32[B, L, 256], {h}, {h}, {h}, {kept}) state(kv, kv) {{"),
        ("  return %logits", "  return %logits, %h, %h_1, %h_2, %h_final"),
    ]


def test_exposed_states_match_transformers_hidden_states(ckpt):
    """For the default (fused) pipeline and for no passes at all."""
    hf_model, path = ckpt
    ref = _hf_hidden(hf_model, IDS)
    for passes in (None, []):
        ours = hidden_states(mlxc.load(path, passes=passes), IDS)
        assert list(ours) == ["embeddings", "layers.0", "layers.1", "layers.2", "norm", "logits"]
        for label, r in zip(["embeddings", "layers.0", "layers.1", "norm"], ref):
            assert np.abs(ours[label] - r).max() <= 1e-5, (passes, label)


# ---------------------------------------------------------------------------------------- against transformers


def test_within_tolerance_of_transformers(ckpt):
    hf_model, path = ckpt
    report = diff(path, tokens=IDS)
    assert report.ok and report.first_divergent_layer is None
    assert [r.name for r in report.rows] == ["embeddings", "layers.0", "layers.1", "layers.2", "norm", "logits"]
    with torch.no_grad():
        logits = hf_model(torch.tensor([IDS])).logits.numpy()
    ours = np.array(mlxc.load(path)(mx.array([IDS])).logits)
    assert report.rows[-1].max_abs == pytest.approx(float(np.abs(ours - logits).max()), rel=1e-3, abs=1e-7)
    assert max(r.rel for r in report.rows) < 1e-5


@pytest.mark.parametrize("cls, shape", [("LlamaForSequenceClassification", (1, 3)),
                                        ("LlamaForTokenClassification", (1, len(IDS), 3))])
def test_classifier_compares_with_transformers_own_head(tmp_path, cls, shape):
    """A classifier checkpoint is compared with transformers' model for that task, not a causal LM (whose lm_head
    would be random)."""
    config = transformers.LlamaConfig(vocab_size=VOCAB, hidden_size=64, intermediate_size=112, num_hidden_layers=2,
                                      num_attention_heads=4, num_key_value_heads=2, num_labels=3, pad_token_id=0)
    torch.manual_seed(3)
    model = getattr(transformers, cls)(config).eval()
    model.save_pretrained(tmp_path / "cls")
    report = diff(tmp_path / "cls", tokens=IDS)
    assert report.ok and [r.name for r in report.rows][-1] == "logits"
    with torch.no_grad():
        want = model(torch.tensor([IDS])).logits.numpy()
    assert want.shape == shape
    ours = np.array(mlxc.load(tmp_path / "cls")(mx.array([IDS])).logits)
    assert report.rows[-1].max_abs == pytest.approx(float(np.abs(ours - want).max()), rel=1e-3, abs=1e-7)


def test_localizes_a_perturbed_layer_against_transformers(ckpt, perturbed):
    """The reference transformers model has layer 1 perturbed: layers before it agree, layer 1 is reported."""
    _, path = ckpt
    bad_model, _ = perturbed
    report = diff(path, tokens=IDS, reference=bad_model)
    assert report.first_divergent_layer == 1 and report.first_divergent.name == "layers.1"
    assert [r.within for r in report.rows] == [True, True, False, False, False, False]


def test_tiny_gguf_against_transformers(tmp_path):
    pytest.importorskip("gguf")
    pytest.importorskip("accelerate")
    path = tmp_path / "tiny.gguf"
    write_tiny_gguf(path)
    report = diff(path)
    assert report.ok and len(report.rows) == 2 + LAYERS + 1, report.to_json()


# ------------------------------------------------------------------------------------------- two mlxc models


def test_gguf_against_the_hf_directory_of_the_same_model(tmp_path, capsys):
    """The HF directory is written by transformers from the GGUF (its loader un-permutes Q/K independently)."""
    pytest.importorskip("gguf")
    pytest.importorskip("accelerate")
    gguf_path, hf_dir = tmp_path / "tiny.gguf", tmp_path / "hf"
    write_tiny_gguf(gguf_path, seed=3)
    from safetensors.torch import save_file

    model = transformers.AutoModelForCausalLM.from_pretrained(str(tmp_path), gguf_file=gguf_path.name,
                                                              dtype=torch.float32)
    model.config.save_pretrained(hf_dir)  # save_pretrained refuses GGUF-loaded models: config and tensors by hand
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(hf_dir / "model.safetensors"),
              metadata={"format": "pt"})
    assert main(["diff", str(gguf_path), str(hf_dir), "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["ok"] and len(out["rows"]) == 2 + LAYERS + 1


def test_localizes_a_perturbed_layer_between_two_checkpoints(ckpt, perturbed, capsys):
    hf_model, path = ckpt
    bad_model, bad_path = perturbed
    assert main(["diff", str(path), str(bad_path), "--tokens", ",".join(map(str, IDS)), "--json"]) == 1
    out = json.loads(capsys.readouterr().out)
    assert out["first_divergent_layer"] == 1 and out["first_divergent"] == "layers.1" and out["ok"] is False
    rows = {r["name"]: r for r in out["rows"]}
    assert rows["embeddings"]["max_abs_diff"] == 0 and rows["layers.0"]["max_abs_diff"] == 0
    # the reported differences are the ones transformers computes between the two checkpoints
    good, bad = _hf_hidden(hf_model, IDS), _hf_hidden(bad_model, IDS)
    for label, a, b in zip(["layers.1", "norm"], good[2:3] + good[-1:], bad[2:3] + bad[-1:]):
        assert rows[label]["max_abs_diff"] == pytest.approx(float(np.abs(a - b).max()), rel=1e-3)


def test_fused_vs_unfused_agree(ckpt, capsys):
    _, path = ckpt
    assert main(["diff", str(path), str(path), "--no-opt2", "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["ok"] and out["first_divergent_layer"] is None and out["tol"] == 1e-4


def test_quantized_diverges_from_the_embeddings_on(ckpt, capsys):
    _, path = ckpt
    assert main(["diff", str(path), str(path), "--quantize2", "4", "--group-size2", "32"]) == 1
    text = capsys.readouterr().out
    assert "first divergence: embeddings" in text and "max |diff|" in text


def test_artifact_vs_its_source(ckpt, tmp_path, capsys):
    _, path = ckpt
    artifact = mlxc.compile(path, tmp_path / "artifact")
    assert main(["diff", str(artifact), str(path)]) == 0
    assert "all 6 tensors within tolerance" in capsys.readouterr().out


def test_float16_uses_a_float16_tolerance(ckpt):
    _, path = ckpt
    report = diff(path, path, options2={"dtype": "float16"}, tokens=IDS)
    assert report.tol == 1e-2 and report.ok
    assert 1e-5 < max(r.rel for r in report.rows) < 1e-2


# ------------------------------------------------------------------------------------------------ bad input


@pytest.mark.parametrize("args,message", [
    (["preset:tiny"], "transformers cannot load a preset"),
    (["{ckpt}", "--quantize2", "4"], "need a second source"),
    (["{ckpt}", "{ckpt}", "--tokens", "5,99999"], "token id 99999 out of range"),
    (["{ckpt}", "preset:tiny"], "vocabularies differ"),
    (["{ckpt}", "{ckpt}", "--no-opt2", "--passes2", "dce"], "--no-opt2 runs no passes"),
    (["{ckpt}", "--prompt", "hello"], "no tokenizer"),
])
def test_bad_input_exits_2(ckpt, capsys, args, message):
    _, path = ckpt
    assert main(["diff"] + [a.replace("{ckpt}", str(path)) for a in args]) == 2
    lines = capsys.readouterr().err.strip().splitlines()
    errors = [line for line in lines if line.startswith("error:")]
    assert len(errors) == 1 and message in errors[0]
    assert all(line.startswith("·") for line in lines if line not in errors)  # the rest is progress


def test_argparse_errors_exit_2(ckpt):
    _, path = ckpt
    with pytest.raises(SystemExit) as e:
        main(["diff", str(path), "--tokens", "1", "--prompt", "x"])
    assert e.value.code == 2
    with pytest.raises(SystemExit) as e:
        main(["diff", str(path), "--tol", "-1"])
    assert e.value.code == 2


# ------------------------------------------------------------------------------------------------ helpers


def write_tiny_gguf(path: Path, seed: int = 0, hidden: int = 32, heads: int = 4, kv: int = 2, inter: int = 48) -> None:
    """A float32 Llama GGUF with random weights and a toy GPT-2 vocabulary (enough for both loaders)."""
    import gguf

    rng = np.random.default_rng(seed)
    tokens = ["<s>", "</s>", "a", "b", "Ġ", "ab", "Ġa", "Ġab"]
    d = hidden // heads
    w = gguf.GGUFWriter(str(path), "llama")
    w.add_block_count(LAYERS)
    w.add_context_length(64)
    w.add_embedding_length(hidden)
    w.add_feed_forward_length(inter)
    w.add_head_count(heads)
    w.add_head_count_kv(kv)
    w.add_rope_freq_base(10000.0)
    w.add_layer_norm_rms_eps(1e-5)
    w.add_rope_dimension_count(d)
    w.add_tokenizer_model("gpt2")
    w.add_tokenizer_pre("gpt2")
    w.add_token_list(tokens)
    w.add_token_types([3, 3] + [1] * 6)
    w.add_token_merges(["Ġ a", "a b", "Ġa b"])
    w.add_bos_token_id(0)
    w.add_eos_token_id(1)

    def add(name: str, *shape: int, norm: bool = False) -> None:
        a = 1 + 0.1 * rng.standard_normal(shape) if norm else 0.2 * rng.standard_normal(shape)
        w.add_tensor(name, a.astype(np.float32))

    add("token_embd.weight", len(tokens), hidden)
    for i in range(LAYERS):
        add(f"blk.{i}.attn_norm.weight", hidden, norm=True)
        add(f"blk.{i}.attn_q.weight", heads * d, hidden)
        add(f"blk.{i}.attn_k.weight", kv * d, hidden)
        add(f"blk.{i}.attn_v.weight", kv * d, hidden)
        add(f"blk.{i}.attn_output.weight", hidden, heads * d)
        add(f"blk.{i}.ffn_norm.weight", hidden, norm=True)
        add(f"blk.{i}.ffn_gate.weight", inter, hidden)
        add(f"blk.{i}.ffn_up.weight", inter, hidden)
        add(f"blk.{i}.ffn_down.weight", hidden, inter)
    add("output_norm.weight", hidden, norm=True)
    add("output.weight", len(tokens), hidden)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
