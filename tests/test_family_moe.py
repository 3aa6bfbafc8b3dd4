"""Mixture-of-experts families (Mixtral, Qwen2-MoE, Qwen3-MoE, OLMoE) against transformers (torch, CPU) on
random-weight checkpoints built with save_pretrained, through the shared parity harness (tests/parity.py).

Every checkpoint routes each token to top_k < num_experts experts. The references are transformers' own models:
logits, greedy generation, the experts its router picks, PEFT adapters, exports read back by transformers, and
parameter counts of the presets' configs on the meta device.
"""

from __future__ import annotations

import json
import shutil
import sys
from math import prod

import numpy as np
import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

import mlx.core as mx  # noqa: E402

import mlxc  # noqa: E402
from mlxc.frontends.hf import detect_architecture, hf_config_from_spec, hf_to_ir_name, spec_from_hf_config  # noqa: E402
from mlxc.frontends.presets import PRESETS as ALL_PRESETS, preset_for_hub_id  # noqa: E402
from mlxc.frontends.spec import FFNType  # noqa: E402
from mlxc.ir.errors import MlxcError  # noqa: E402
from mlxc.passes.quantize import Quantize  # noqa: E402
from mlxc.passes.select_kernels import SelectKernels  # noqa: E402
from parity import meta_models as build_meta_models  # noqa: E402
from parity import (check_artifact, check_fusion, check_greedy, check_logits, check_lora, check_stepwise,  # noqa: E402
                    hf_logits, ids, max_diff, save_checkpoint)

VOCAB = 256
WINDOW = 7  # < the test sequences, so sliding layers run past their window
_SMALL = dict(vocab_size=VOCAB, hidden_size=64, num_attention_heads=4, num_key_value_heads=2,
              max_position_embeddings=256, num_experts_per_tok=2, bos_token_id=1, eos_token_id=2)


def _mixtral(**overrides):
    base = dict(_SMALL, intermediate_size=96, num_hidden_layers=2, num_local_experts=4)
    return transformers.MixtralForCausalLM, transformers.MixtralConfig(**{**base, **overrides})


def _qwen2_moe(**overrides):
    base = dict(_SMALL, intermediate_size=96, moe_intermediate_size=32, shared_expert_intermediate_size=48,
                num_hidden_layers=3, num_experts=6)
    return transformers.Qwen2MoeForCausalLM, transformers.Qwen2MoeConfig(**{**base, **overrides})


def _qwen3_moe(**overrides):
    base = dict(_SMALL, intermediate_size=96, moe_intermediate_size=32, num_hidden_layers=3, num_experts=6,
                head_dim=32)
    return transformers.Qwen3MoeForCausalLM, transformers.Qwen3MoeConfig(**{**base, **overrides})


def _olmoe(**overrides):
    base = dict(_SMALL, intermediate_size=48, num_hidden_layers=2, num_experts=6, pad_token_id=0)
    return transformers.OlmoeForCausalLM, transformers.OlmoeConfig(**{**base, **overrides})


CASES = {
    "mixtral": lambda: _mixtral(),
    # every layer slides (Mixtral's only window pattern)
    "mixtral-sliding": lambda: _mixtral(sliding_window=WINDOW, num_key_value_heads=1),
    # shared expert with its sigmoid gate, no renormalization, a dense middle layer (mlp_only_layers)
    "qwen2-moe": lambda: _qwen2_moe(mlp_only_layers=[1]),
    # renormalized top-k, mixtures on odd layers only (decoder_sparse_step 2), windows on even layers below 3
    "qwen2-moe-norm-step": lambda: _qwen2_moe(norm_topk_prob=True, decoder_sparse_step=2, use_sliding_window=True,
                                              sliding_window=WINDOW, max_window_layers=3),
    # per-head q/k norms, head_dim 32 != 64 / 4, renormalized, dense last layer
    "qwen3-moe": lambda: _qwen3_moe(norm_topk_prob=True, mlp_only_layers=[2]),
    # biases on all four attention projections, no renormalization, tied head
    "qwen3-moe-bias": lambda: _qwen3_moe(num_hidden_layers=2, attention_bias=True, tie_word_embeddings=True),
    # q/k norms over the whole projections and clip_qkv tight enough to clamp many values
    "olmoe-clip": lambda: _olmoe(clip_qkv=0.3),
    "olmoe-norm-bias": lambda: _olmoe(norm_topk_prob=True, attention_bias=True, num_key_value_heads=4),
}

FAMILY = {"mixtral": "mixtral", "qwen2": "qwen2_moe", "qwen3": "qwen3_moe", "olmoe": "olmoe"}


@pytest.fixture(scope="module", params=sorted(CASES))
def checkpoint(request, tmp_path_factory):
    return (request.param, *_case(request.param, tmp_path_factory))


_built: dict[str, tuple] = {}


def _case(name: str, tmp_path_factory):
    """One case's (transformers model, checkpoint path), built once per module."""
    if name not in _built:
        cls, config = CASES[name]()
        path = tmp_path_factory.mktemp(name)
        _built[name] = save_checkpoint(cls, config, path, seed=len(name)), path
    return _built[name]


def _module(model):
    """The generated module a loaded model runs (its helpers are module globals)."""
    return sys.modules[type(model.net).__module__]


def _routes(model, tokens) -> tuple[np.ndarray, list[np.ndarray]]:
    """Logits, and the experts each mixture call ran for each token (one [B*T, top_k] array per MoE layer)."""
    mod = _module(model)
    seen, route = [], mod.moe_route

    def recording(logits, top_k, normalize):
        experts, weights = route(logits, top_k, normalize)
        seen.append(np.array(experts))
        return experts, weights

    mod.moe_route = recording
    try:
        return np.array(model(mx.array(tokens)).logits.astype(mx.float32)), seen
    finally:
        mod.moe_route = route


def _close_where_routing_agrees(out, routes, ref, ref_routes, tol: float, what: str, spread: bool = True) -> None:
    """`out` within `tol` of `ref` at every position routed as `ref` routes it, in every layer.

    A perturbation (rounding to fewer bits) moves a token that is near a tie between two experts to the other one:
    a jump in its output and, through attention, a smaller one in the later positions of its sequence, which
    `spread` counts as affected too. Such switches must be rare (<= 5% of the routing decisions), and at least a
    quarter of the positions must stay unaffected.
    """
    switched = [(a != b).any(-1).reshape(out.shape[:2]) for a, b in zip(ref_routes, routes)]
    assert sum(s.sum() for s in switched) <= 0.05 * sum(s.size for s in switched), f"{what}: routing moved"
    affected = np.logical_or.reduce(switched)
    if spread:
        affected = np.logical_or.accumulate(affected, axis=1)
    assert (~affected).sum() >= 0.25 * affected.size, f"{what}: routing moved early in the sequences"
    err = np.abs(out - ref).max(-1)[~affected].max()
    assert err <= tol, f"{what}: max |logits diff| {err:.3g} where routing agrees (bound {tol:.3g})"


# ------------------------------------------------------------------------------------------ against transformers


def test_logits_match(checkpoint):
    _, hf, path = checkpoint
    check_logits(hf, mlxc.load(str(path)), VOCAB)


def test_greedy_through_the_cache_matches_generate(checkpoint):
    _, hf, path = checkpoint
    check_greedy(hf, mlxc.load(str(path)), VOCAB)


def test_chunked_prefill_then_decode_matches_full_prefill(checkpoint):
    """The chunks (2 x 5 tokens x top-2: 20 pairs) and the steps take the per-row gather path, the full prefill
    (80 pairs) the grouped one: both paths agree through the cache."""
    _, _, path = checkpoint
    check_stepwise(mlxc.load(str(path)), VOCAB)


def test_spec_reads_what_transformers_builds(checkpoint):
    """Which layers are mixtures and which slide, as transformers built them, and every non-expert tensor with
    transformers' shape; the experts, fused in transformers' memory ([E, 2I, H] gate_up, [E, H, I] down), hold as
    many numbers as mlxc's stacked gate, up and down."""
    name, hf, path = checkpoint
    spec = mlxc.load(str(path)).spec
    assert spec.family == FAMILY[name.split("-")[0]]
    layers = hf.model.layers
    assert [spec.layer(i).ffn.kind == FFNType.MOE for i in range(spec.num_layers)] == \
        [hasattr(layer.mlp, "experts") for layer in layers]
    window = getattr(hf.config, "sliding_window", None) or None  # Mixtral, Qwen3-MoE: all layers slide
    types = getattr(hf.config, "layer_types", None) or \
        ["sliding_attention" if window else "full_attention"] * spec.num_layers
    assert [spec.window_of(i) for i in range(spec.num_layers)] == \
        [window if t == "sliding_attention" else None for t in types]
    ours = {n: tuple(p.type.shape) for n, p in mlxc.lower(spec).parameters()}
    theirs = {}
    for n, p in hf.named_parameters():
        if ".mlp.experts." in n:
            continue
        if n.endswith(".mlp.gate.weight"):  # the router, under its saved name
            n = n.replace(".mlp.gate.", ".block_sparse_moe.gate.") if spec.family == "mixtral" else n
        theirs[hf_to_ir_name(n, spec.family)] = tuple(p.shape)
    assert theirs == {n: s for n, s in ours.items() if ".mlp.experts." not in n}
    assert sum(p.numel() for n, p in hf.named_parameters() if ".mlp.experts." in n) == \
        sum(prod(s) for n, s in ours.items() if ".mlp.experts." in n)


def test_the_experts_are_the_ones_transformers_routes_to(checkpoint):
    """Each MoE layer's router logits from transformers, through its own top-k: the same experts per token as
    mlxc runs (order aside: mlxc runs them in index order, as transformers accumulates them). Routing is not
    degenerate: tokens pick different experts, and every expert gets some token."""
    _, hf, path = checkpoint
    tokens = ids(VOCAB, seed=4)
    _, ours = _routes(mlxc.load(str(path)), tokens)
    with torch.no_grad():
        out = hf(torch.tensor(tokens), output_router_logits=True)
    theirs = [torch.topk(torch.softmax(r.float(), -1), hf.config.num_experts_per_tok, -1).indices.numpy()
              for r in out.router_logits]
    assert len(ours) == len(theirs) > 0
    for mine, ref in zip(ours, theirs):
        np.testing.assert_array_equal(mine, np.sort(ref, axis=-1))
        assert len({tuple(r) for r in mine}) > 1
        experts = getattr(hf.config, "num_local_experts", None) or hf.config.num_experts
        assert set(mine.ravel()) == set(range(experts))


@pytest.mark.parametrize("name, change", [
    ("qwen2-moe", dict(norm_topk_prob=True)),
    ("qwen3-moe", dict(norm_topk_prob=False)),
    ("olmoe-clip", dict(clip_qkv=None)),
    ("qwen2-moe-norm-step", dict(use_sliding_window=False, layer_types=None)),
])
def test_the_setting_matters(name, change, tmp_path_factory):
    """transformers honours these settings (the same weights without them give other logits), so matching its
    logits above tested them."""
    hf, path = _case(name, tmp_path_factory)
    config = json.loads((path / "config.json").read_text())
    config.update(change)
    other = type(hf.config)(**{k: v for k, v in config.items() if k not in ("architectures", "model_type")})
    changed = type(hf).from_pretrained(path, config=other, dtype=torch.float32).eval()
    tokens = ids(VOCAB)
    assert max_diff(hf_logits(changed, tokens), hf_logits(hf, tokens)) > 1e-3


def test_prefill_paths_agree(tmp_path_factory):
    """Grouped (tokens sorted by expert, one product per expert) and gathered (one product per token and expert)
    prefill give the same logits, and a long prefill does take the grouped path."""
    _, path = _case("qwen2-moe", tmp_path_factory)
    model = mlxc.load(str(path))
    mod = _module(model)
    tokens = mx.array(ids(VOCAB, (2, 40), seed=5))
    calls = {"grouped": 0}
    grouped = mod.moe_grouped

    def counting(*args):
        calls["grouped"] += 1
        return grouped(*args)

    mod.moe_grouped = counting
    try:
        fast = np.array(model(tokens).logits)
    finally:
        mod.moe_grouped = grouped
    assert calls["grouped"] == 2  # both MoE layers (layer 1 is dense)
    limit = mod.MOE_GROUPED_ROWS
    mod.MOE_GROUPED_ROWS = 10**9
    try:
        reference = np.array(model(tokens).logits)
    finally:
        mod.MOE_GROUPED_ROWS = limit
    assert max_diff(fast, reference) <= 1e-5


@pytest.mark.parametrize("name", ["mixtral", "qwen2-moe", "olmoe-clip"])
def test_bfloat16_matches_transformers_in_bfloat16(name, tmp_path_factory):
    """In bfloat16 (the experts then run through the CPU's batched fallback for gather_mm, which is float32-only):
    transformers' bfloat16 logits within bfloat16's tolerance at every token both route alike (a token routed
    otherwise moves by about 0.1 here, later tokens by far less), and the cache agrees with one prefill."""
    _, path = _case(name, tmp_path_factory)
    hf = transformers.AutoModelForCausalLM.from_pretrained(path, dtype=torch.bfloat16).eval()
    model = mlxc.load(str(path), dtype="bfloat16")
    tokens = ids(VOCAB, seed=15)
    ours, routes = _routes(model, tokens)
    with torch.no_grad():
        out = hf(torch.tensor(tokens), output_router_logits=True)
    theirs = [np.sort(torch.topk(torch.softmax(r.float(), -1), hf.config.num_experts_per_tok, -1).indices.numpy(), -1)
              for r in out.router_logits]
    _close_where_routing_agrees(ours, routes, out.logits.float().numpy(), theirs, 5e-2, "bfloat16", spread=False)
    full = np.array(model(mx.array(tokens[:, :12])).logits.astype(mx.float32))
    cache = model.make_cache()
    steps = [model(mx.array(tokens[:, :5]), cache=cache).logits]
    steps += [model(mx.array(tokens[:, t : t + 1]), cache=cache).logits for t in range(5, 12)]
    assert max_diff(np.array(mx.concatenate(steps, axis=1).astype(mx.float32)), full) <= 5e-2


# ------------------------------------------------------------------------------------------ numerics of mixing


@pytest.mark.parametrize("in_float32", [False, True])
def test_mixing_rounds_where_transformers_does(in_float32):
    """In bfloat16 the two mixing conventions differ. Given the expert outputs, `moe` equals: Qwen-MoE / OLMoE
    (routing weights cast to bf16, products in bf16) or Mixtral (float32 weights times bf16 outputs in float32, each
    product cast to bf16), then added in bf16 in expert order: transformers' index_add_ over ascending experts."""
    from mlxc.codegen.module import helper_namespace

    ns = helper_namespace(("moe",))
    rng = np.random.default_rng(0)
    n, h, i, e, k = 24, 32, 16, 5, 3
    bf = lambda a: mx.array(a.astype(np.float32)).astype(mx.bfloat16)  # noqa: E731
    x, logits = bf(rng.normal(size=(n, h))), bf(rng.normal(size=(n, e)))
    gate, up, down = bf(rng.normal(size=(e, i, h)) * 0.3), bf(rng.normal(size=(e, i, h)) * 0.3), \
        bf(rng.normal(size=(e, h, i)) * 0.3)
    out = ns["moe"](x, logits, gate, up, down, k, False, mx.sigmoid, weights_in_float32=in_float32)
    experts, weights = ns["moe_route"](logits, k, False)
    outs = ns["moe_gathered"](x, experts, gate, up, down, mx.sigmoid)
    assert outs.dtype == mx.bfloat16 and weights.dtype == mx.float32
    w = weights if in_float32 else weights.astype(mx.bfloat16)
    products = (outs.astype(mx.float32) * w.astype(mx.float32)[..., None]).astype(mx.bfloat16)
    want = products[:, 0]
    for j in range(1, k):
        want = (want.astype(mx.float32) + products[:, j].astype(mx.float32)).astype(mx.bfloat16)
    assert out.dtype == mx.bfloat16
    np.testing.assert_array_equal(np.array(out.astype(mx.float32)), np.array(want.astype(mx.float32)))
    other = ns["moe"](x, logits, gate, up, down, k, False, mx.sigmoid, weights_in_float32=not in_float32)
    assert not np.array_equal(np.array(other.astype(mx.float32)), np.array(out.astype(mx.float32)))


def test_ties_go_to_the_lower_expert():
    """Equal router logits: the lowest-index experts, so routing is deterministic (torch's CPU top-k breaks exact
    ties by its partial sort's order instead; only exactly tied logits can tell the two apart)."""
    from mlxc.codegen.module import helper_namespace

    route = helper_namespace(("moe",))["moe_route"]
    logits = mx.array([[0.0, 1.0, 1.0, 1.0, 1.0], [2.0, 2.0, 0.0, 2.0, 3.0]])
    experts, weights = route(logits, 3, True)
    assert np.array(experts).tolist() == [[1, 2, 3], [0, 1, 4]]
    np.testing.assert_allclose(np.array(weights).sum(-1), 1.0, rtol=1e-6)


# ------------------------------------------------------------------------------------------ passes and artifacts


@pytest.mark.parametrize("name", ["mixtral-sliding", "qwen2-moe"])
def test_fusion_changes_nothing(name, tmp_path_factory):
    _, path = _case(name, tmp_path_factory)
    check_fusion(path, VOCAB, fused_names=("qkv_proj",) + (("gate_up_proj",) if name == "qwen2-moe" else ()))


@pytest.mark.parametrize("name", ["mixtral", "qwen2-moe", "qwen3-moe", "olmoe-clip"])
def test_quantized_experts_run_and_stay_close(name, tmp_path_factory, tmp_path):
    """`quantize` stores expert weights quantized (the router stays float) and the quantized kernels run: per-row
    `gather_qmm` and grouped `quantized_matmul` agree through the cache, and an artifact keeps them quantized.

    8-bit is within 5% of the logits' scale wherever routing agrees with float (`_close_where_routing_agrees`)."""
    _, path = _case(name, tmp_path_factory)
    tokens = ids(VOCAB, seed=7)
    ref, ref_routes = _routes(mlxc.load(str(path)), tokens)
    scale = np.abs(ref).max()
    for bits in (8, 4):
        # the reference kernels: this is about MLX's gather_qmm and grouped quantized_matmul (the native CPU kernels,
        # which `auto` picks for the dense layers, round activations: their cached steps differ by ~1e-4)
        model = mlxc.load(str(path), quantize=bits, group_size=32, kernels="reference")
        text = str(model.program)
        assert f"experts.gate_proj_q.weight = quantize(%experts.gate_proj.weight) {{bits = {bits}" in text
        assert "router_q" not in text and "%router.weight) :" in text
        out, routes = _routes(model, tokens)
        assert np.isfinite(out).all()
        check_stepwise(model, VOCAB)
        if bits == 8:
            _close_where_routing_agrees(out, routes, ref, ref_routes, 0.05 * scale, "8-bit")
    check_artifact_quantized(path, tmp_path)


def check_artifact_quantized(path, tmp_path):
    direct = mlxc.load(str(path), quantize=4, group_size=32)
    loaded = mlxc.load(mlxc.compile(str(path), tmp_path / "q4", quantize=4, group_size=32))
    assert "q4g32" in str(loaded.program)
    tokens = mx.array(ids(VOCAB, seed=10))
    assert max_diff(np.array(loaded(tokens).logits), np.array(direct(tokens).logits)) <= 1e-6


def test_cpu_kernel_selection_dequantizes_experts(tmp_path_factory):
    """On the CPU target quantized expert weights get a load-time `dequantize`, as other weights do: the float
    kernels then compute what the quantized ones do."""
    _, path = _case("qwen3-moe", tmp_path_factory)
    quantized = mlxc.load(str(path), passes=["dce", Quantize(bits=8, group_size=32)])
    # kernels="reference": the pipeline's select-kernels takes the load's family (auto: native on the CPU, whose
    # dense layers round activations); this is about the reference path's load-time dequantize
    selected = mlxc.load(str(path), passes=["dce", Quantize(bits=8, group_size=32), SelectKernels(target="cpu")],
                         kernels="reference")
    text = str(selected.program)
    for w in ("gate_proj", "up_proj", "down_proj"):
        assert f"%experts.{w}_q_f.weight = dequantize(%experts.{w}_q.weight)" in text
    assert "moe(%x, %router_logits, %experts.gate_proj_q_f.weight" in text
    tokens = mx.array(ids(VOCAB, seed=9))
    assert max_diff(np.array(selected(tokens).logits), np.array(quantized(tokens).logits)) <= 1e-4


@pytest.mark.parametrize("name, targets", [
    ("mixtral", ("q_proj", "v_proj")),
    # dense layer and shared expert projections alike (PEFT targets name the last segment)
    ("qwen2-moe", ("q_proj", "v_proj", "gate_proj", "up_proj", "down_proj")),
])
def test_lora_fresh_and_merged(name, targets, tmp_path_factory):
    _, path = _case(name, tmp_path_factory)
    check_lora(path, VOCAB, targets)


@pytest.mark.parametrize("name, targets", [
    ("mixtral", ["q_proj", "k_proj", "v_proj", "o_proj"]),
    ("qwen2-moe", ["q_proj", "o_proj", "gate_proj", "up_proj", "down_proj", "shared_expert_gate"]),
])
def test_peft_adapter_round_trip(name, targets, tmp_path_factory, tmp_path):
    """A transformers + peft adapter (on the shared expert and its gate too) gives peft's logits in mlxc, unmerged
    and merged, and the adapter mlxc saves loads back in peft to the same logits."""
    peft = pytest.importorskip("peft")
    _, path = _case(name, tmp_path_factory)
    cls = transformers.AutoModelForCausalLM
    torch.manual_seed(0)
    lora = peft.LoraConfig(r=4, lora_alpha=8, target_modules=targets, lora_dropout=0.0, init_lora_weights=False,
                           task_type="CAUSAL_LM")
    ref = peft.get_peft_model(cls.from_pretrained(path, dtype=torch.float32), lora).eval()
    with torch.no_grad():  # B clearly non-zero, so a dropped adapter cannot pass
        for n, p in ref.named_parameters():
            if "lora_B" in n:
                p.copy_(0.05 * torch.randn(p.shape))
    if name == "qwen2-moe":
        assert any("shared_expert.gate_proj.lora_A" in n for n, _ in ref.named_parameters())
    ref.save_pretrained(tmp_path / "adapter")
    tokens = ids(VOCAB, seed=11)
    want = hf_logits(ref, tokens)
    assert max_diff(want, np.array(mlxc.load(str(path))(mx.array(tokens)).logits)) > 1e-2
    for merge in (False, True):
        model = mlxc.load(str(path), adapter=tmp_path / "adapter", merge_lora=merge)
        assert max_diff(np.array(model(mx.array(tokens)).logits), want) <= 1e-4, f"merge_lora={merge}"
    saved = mlxc.save_adapter(mlxc.load(str(path), adapter=tmp_path / "adapter"), tmp_path / "saved")
    back = peft.PeftModel.from_pretrained(cls.from_pretrained(path, dtype=torch.float32), saved).eval()
    assert max_diff(hf_logits(back, tokens), want) <= 1e-5


@pytest.mark.parametrize("name", ["mixtral", "qwen3-moe", "olmoe-norm-bias"])
def test_compile_then_load(name, tmp_path_factory, tmp_path):
    _, path = _case(name, tmp_path_factory)
    check_artifact(path, tmp_path, VOCAB)


# ------------------------------------------------------------------------------------------------------ export


@pytest.mark.parametrize("name", sorted(CASES))
def test_export_gives_transformers_the_same_logits(name, tmp_path_factory, tmp_path):
    """The per-expert tensors transformers saves come back from mlxc's stacked experts, under its names."""
    hf, path = _case(name, tmp_path_factory)
    out = mlxc.export(path, tmp_path / "exported")
    config = json.loads((out / "config.json").read_text())
    assert config["architectures"] == [type(hf).__name__]
    back = transformers.AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32).eval()
    tokens = ids(VOCAB, seed=13)
    err = max_diff(hf_logits(back, tokens), hf_logits(hf, tokens))
    assert err <= 1e-6, f"{name}: max |logits diff| {err:.2e}"


def test_mixtral_cli_export_of_an_artifact(tmp_path_factory, tmp_path):
    """`mlxc export` of a compiled (fused) Mixtral artifact: the stacked experts split back into w1/w2/w3."""
    from mlxc.cli import main

    hf, path = _case("mixtral", tmp_path_factory)
    artifact = mlxc.compile(str(path), tmp_path / "artifact")
    assert main(["export", str(artifact), "-o", str(tmp_path / "hf")]) == 0
    names = json.loads((tmp_path / "hf" / "config.json").read_text())
    assert names["model_type"] == "mixtral" and names["num_local_experts"] == 4
    back = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "hf", dtype=torch.float32).eval()
    tokens = ids(VOCAB, seed=14)
    assert max_diff(hf_logits(back, tokens), hf_logits(hf, tokens)) <= 1e-6


def test_what_a_config_cannot_hold_is_refused(tmp_path_factory):
    _, path = _case("mixtral", tmp_path_factory)
    spec = mlxc.load(str(path)).spec
    with pytest.raises(MlxcError, match="moe"):
        hf_config_from_spec(spec.model_copy(update={"moe": spec.moe.model_copy(update={"normalize": False})}))


# ----------------------------------------------------------------------------------------------- config reading


def _config(name: str, **overrides) -> dict:
    cls, config = CASES[name]()
    return {**config.to_dict(), "architectures": [cls.__name__], **overrides}


@pytest.mark.parametrize("name, overrides, message", [
    ("mixtral", dict(num_experts_per_tok=5), r"num_experts_per_tok \(5\) exceeds num_local_experts \(4\)"),
    ("mixtral", dict(num_local_experts=0), "num_local_experts"),
    ("qwen2-moe", dict(mlp_only_layers=[3]), "mlp_only_layers` names layer 3"),
    ("qwen2-moe", dict(decoder_sparse_step=0), "decoder_sparse_step"),
    ("qwen2-moe", dict(norm_topk_prob="yes"), "norm_topk_prob"),
    ("qwen3-moe", dict(moe_intermediate_size=-1), "moe_intermediate_size"),
    ("olmoe-clip", dict(clip_qkv=-1.0), "clip_qkv"),
    ("qwen3-moe", dict(num_experts=4, num_local_experts=6), "expert count is given twice"),
])
def test_bad_configs_are_refused(name, overrides, message):
    with pytest.raises(MlxcError, match=message):
        spec_from_hf_config(_config(name, **overrides), source="config.json")


def test_qwen2_moe_without_window_keys_takes_transformers_defaults():
    """Qwen2MoeConfig resolves windows itself: even layers below max_window_layers when use_sliding_window."""
    data = {k: v for k, v in _config("qwen2-moe").items() if k != "layer_types"}
    data.update(num_hidden_layers=4, mlp_only_layers=[], use_sliding_window=True, sliding_window=5,
                max_window_layers=3)
    spec = spec_from_hf_config(data)
    ref = transformers.Qwen2MoeConfig(**{k: v for k, v in data.items() if k != "architectures"})
    assert [spec.window_of(i) for i in range(4)] == [5 if t == "sliding_attention" else None for t in ref.layer_types]
    assert ref.layer_types == ["sliding_attention", "full_attention", "sliding_attention", "full_attention"]


@pytest.mark.parametrize("name", ["mixtral", "qwen2-moe"])
def test_detected_from_tensor_names_without_metadata(name, tmp_path_factory, tmp_path):
    hf, path = _case(name, tmp_path_factory)
    bare = tmp_path / "bare"
    shutil.copytree(path, bare)
    config = json.loads((bare / "config.json").read_text())
    for key in ("architectures", "model_type"):
        config.pop(key, None)
    (bare / "config.json").write_text(json.dumps(config))
    names = list(mx.load(str(path / "model.safetensors")))
    assert detect_architecture(config, names) == FAMILY[name.split("-")[0]]
    check_logits(hf, mlxc.load(str(bare)), VOCAB)


def test_olmoe_and_qwen3_moe_tensor_names_alone_are_ambiguous(tmp_path_factory):
    """The two families store the same tensor names; without config metadata mlxc says so instead of guessing."""
    _, path = _case("olmoe-clip", tmp_path_factory)
    names = list(mx.load(str(path / "model.safetensors")))
    with pytest.raises(MlxcError, match="olmoe.*qwen3_moe|qwen3_moe.*olmoe"):
        detect_architecture({}, names)


# ----------------------------------------------------------------------------------------------------- presets

PRESETS = {n: s for n, s in ALL_PRESETS.items() if s.family in FAMILY.values()}

# Parameter counts of the published checkpoints (sum of their safetensors' tensor sizes)
PUBLISHED = {"mixtral-8x7b": 46_702_792_704, "qwen3-30b-a3b": 30_532_122_624, "olmoe-1b-7b": 6_919_161_856}


def test_every_preset_has_a_published_size():
    assert set(PRESETS) == set(PUBLISHED)


@pytest.fixture(scope="module")
def meta_models():
    """Each preset's transformers model for the config mlxc writes, on the meta device: {name: (class, shapes)}."""
    return build_meta_models(PRESETS)


@pytest.mark.parametrize("name", sorted(PUBLISHED))
def test_preset_parameters_match_transformers(name, meta_models):
    """The preset's count, the lowered program's parameters and transformers' model for the written config agree,
    and equal the published size; the expert tensors too, summed per layer (transformers fuses gate and up)."""
    cls, theirs = meta_models[name]
    spec = PRESETS[name]
    ours = {n: tuple(p.type.shape) for n, p in mlxc.lower(spec).parameters()}
    total = sum(prod(s) for s in theirs.values())
    assert spec.num_parameters() == sum(prod(s) for s in ours.values()) == total == PUBLISHED[name]
    assert cls == {"mixtral": "MixtralForCausalLM", "qwen3_moe": "Qwen3MoeForCausalLM",
                   "olmoe": "OlmoeForCausalLM"}[spec.family]
    for i in range(spec.num_layers):
        mine = sum(prod(s) for n, s in ours.items() if n.startswith(f"layers.{i}.mlp.experts."))
        assert mine == sum(prod(s) for n, s in theirs.items() if n.startswith(f"model.layers.{i}.mlp.experts."))


def test_published_hyperparameters():
    m, q, o = PRESETS["mixtral-8x7b"], PRESETS["qwen3-30b-a3b"], PRESETS["olmoe-1b-7b"]
    assert (m.moe.num_experts, m.moe.top_k, m.moe.normalize, m.rope.theta) == (8, 2, True, 1e6)
    assert (q.moe.num_experts, q.moe.top_k, q.moe.intermediate_size, q.dim_per_head) == (128, 8, 768, 128)
    assert (o.moe.num_experts, o.moe.top_k, o.moe.normalize, o.qk_norm_across_heads) == (64, 8, False, True)


@pytest.mark.parametrize("repo, preset", [
    ("mistralai/Mixtral-8x7B-v0.1", "mixtral-8x7b"),
    ("mistralai/Mixtral-8x7B-Instruct-v0.1", "mixtral-8x7b"),
    ("Qwen/Qwen3-30B-A3B", "qwen3-30b-a3b"),
    ("allenai/OLMoE-1B-7B-0924", "olmoe-1b-7b"),
])
def test_hub_ids_name_presets(repo, preset):
    assert preset_for_hub_id(repo) == preset


def test_lora_training_through_the_experts(tmp_path_factory):
    """Gradients reach adapters before the mixture and on its shared expert through the grouped path (rows sorted
    by expert, counted on the host; the choice of experts gets no gradient, the routing weights do, as in
    transformers): the loss falls, every adapter's B moves and nothing else does."""
    import mlx.utils

    from mlxc.runtime.train import TrainConfig, train_lora

    _, path = _case("qwen2-moe", tmp_path_factory)
    model = mlxc.load(str(path), lora=mlxc.LoRAConfig(rank=4, alpha=8.0, targets=("q_proj", "v_proj", "gate_proj")))
    before = {n: np.array(a) for n, a in mlx.utils.tree_flatten(model.net.parameters())}
    rows = [[3 + (start + i) % 7 for i in range(n)] for start, n in ((0, 12), (3, 9), (5, 16), (1, 10))] * 4
    result = train_lora(model.net, rows, TrainConfig(steps=12, batch_size=4, seq_len=16, learning_rate=2e-2,
                                                     warmup_steps=2, seed=0, log_every=6))
    assert all(np.isfinite(result.losses)) and np.mean(result.losses[-3:]) < 0.8 * result.losses[0]
    after = {n: np.array(a) for n, a in mlx.utils.tree_flatten(model.net.parameters())}
    assert any("shared_expert.gate_proj.lora_B" in n for n in after)
    for n in before:
        if ".lora_" not in n:
            assert np.array_equal(before[n], after[n]), n
        elif ".lora_B" in n:
            assert not np.array_equal(before[n], after[n]), n


@pytest.mark.parametrize("name", ["qwen2-moe", "qwen3-moe"])
def test_no_experts_means_dense_layers(name):
    """num_experts 0: transformers builds every layer dense, and so does mlxc; the written config says the same."""
    data = {k: v for k, v in _config(name, num_experts=0).items() if k != "num_local_experts"}
    spec = spec_from_hf_config(data)
    cls, _ = CASES[name]()
    with torch.device("meta"):
        ref = cls(type(CASES[name]()[1])(**{k: v for k, v in data.items() if k != "architectures"}))
    assert not any(hasattr(layer.mlp, "experts") for layer in ref.model.layers)
    assert spec.moe is None and {spec.layer(i).ffn.kind for i in range(spec.num_layers)} == {FFNType.GATED}
    assert spec_from_hf_config(hf_config_from_spec(spec)) == spec.model_copy(update={"name": "model"})
