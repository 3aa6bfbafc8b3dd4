"""Extending mlxc from outside (plugins.py): the worked example in examples/linear_attention, installed as a package
with an entry point in a temporary directory, adds an op, a block kind, a family and a pass; each works end to end
like a built-in, and unloading it makes what needs it fail with one clear error.

The install is a copy of the package beside a dist-info folder whose METADATA and entry_points.txt come from the
example's own pyproject.toml, on sys.path: exactly what `importlib.metadata` reads after `pip install`.
"""

from __future__ import annotations

import json
import shutil
import sys
import tomllib
from pathlib import Path

import mlx.core as mx
import numpy as np
import pytest

import mlxc
from mlxc import plugins
from mlxc.cli import main
from mlxc.ir import parse_program, print_program, verify
from mlxc.ir.errors import MlxcError

EXAMPLE = Path(__file__).resolve().parent.parent / "examples" / "linear_attention"
SPEC = EXAMPLE / "hybrid.yaml"
PACKAGE = "mlxc-linear-attention"


def _install(site: Path, name: str, version: str, entry_points: dict, module_dir: Path | None = None) -> None:
    """A package as pip leaves it in site-packages: the module, and a dist-info naming its entry points."""
    if module_dir is not None:
        shutil.copytree(module_dir, site / module_dir.name, ignore=shutil.ignore_patterns("__pycache__"))
    info = site / f"{name.replace('-', '_')}-{version}.dist-info"
    info.mkdir(parents=True)
    (info / "METADATA").write_text(f"Metadata-Version: 2.1\nName: {name}\nVersion: {version}\n")
    lines = ["[mlxc.plugins]"] + [f"{k} = {v}" for k, v in entry_points.items()]
    (info / "entry_points.txt").write_text("\n".join(lines) + "\n")


@pytest.fixture
def site(tmp_path):
    """A temporary site directory on sys.path; whatever plugins it held are unloaded afterwards."""
    path = tmp_path / "site"
    path.mkdir()
    sys.path.insert(0, str(path))
    yield path
    for p in plugins.plugins():
        if p.loaded and p.top in ("mlxc_linear_attention", "mlxc_broken_plugin", "mlxc_relu2_ffn"):
            plugins.unload(p.name)
    sys.path.remove(str(path))
    plugins.load_plugins(strict=False)  # rescans: the removed entry points are forgotten


@pytest.fixture
def plugin(site):
    """The example package, installed with the entry points its pyproject declares, and loaded."""
    project = tomllib.loads((EXAMPLE / "pyproject.toml").read_text())["project"]
    _install(site, project["name"], project["version"], project["entry-points"]["mlxc.plugins"],
             EXAMPLE / "mlxc_linear_attention")
    found = {p.name: p for p in plugins.load_plugins()}
    assert found["linear-attention"].loaded and found["linear-attention"].package == PACKAGE
    return site


# ---------------------------------------------------------------------------------------------- the op's math


class _State:
    """The state protocol the op's helper uses (the generated module's ArrayState)."""

    arrays = None

    def update(self, *arrays):
        self.arrays = arrays


def _reference(q, k, v, eps=1e-6):
    """Causal linear attention in float64, one position at a time, straight from the definition."""
    phi = lambda x: np.where(x > 0, x + 1.0, np.exp(np.minimum(x, 0.0)))  # noqa: E731
    q, k, v = (np.asarray(a, np.float64) for a in (q, k, v))
    fq, fk = phi(q), phi(k)
    out = np.zeros(q.shape[:3] + (v.shape[3],))
    for t in range(q.shape[2]):
        s = np.einsum("bhud,bhue->bhde", fk[:, :, : t + 1], v[:, :, : t + 1])
        z = fk[:, :, : t + 1].sum(axis=2)
        num = np.einsum("bhd,bhde->bhe", fq[:, :, t], s)
        out[:, :, t] = num / (np.einsum("bhd,bhd->bh", fq[:, :, t], z)[..., None] + eps)
    return out


def test_parallel_chunked_and_recurrent_forms_equal_numpy(plugin):
    from mlxc_linear_attention.kernels import linear_attention

    rng = np.random.default_rng(0)
    q, k = rng.normal(size=(2, 3, 13, 8)), rng.normal(size=(2, 3, 13, 8))
    v = rng.normal(size=(2, 3, 13, 5))
    want = _reference(q, k, v)
    args = [mx.array(a, dtype=mx.float32) for a in (q, k, v)]
    parallel = linear_attention(*args, None)
    chunked = linear_attention(*args, None, chunk_size=4)
    state = _State()
    steps = [linear_attention(*(a[:, :, t : t + 1] for a in args), state) for t in range(13)]
    split = _State()
    prefill_then_steps = [linear_attention(*(a[:, :, :7] for a in args), split)] + \
        [linear_attention(*(a[:, :, t : t + 1] for a in args), split) for t in range(7, 13)]
    for got in (parallel, chunked, mx.concatenate(steps, axis=2), mx.concatenate(prefill_then_steps, axis=2)):
        np.testing.assert_allclose(np.array(got), want, rtol=2e-5, atol=2e-5)
    np.testing.assert_allclose(np.array(state.arrays[0]), np.array(split.arrays[0]), rtol=1e-5, atol=1e-5)


# ---------------------------------------------------------------------------------------------- the op in the IR

_IR = """func @main(%q: f32[B, 4, T, 8], %k: f32[B, 4, T, 8], %v: f32[B, 4, T, 6]) -> f32[B, 4, T, 6] state(recurrent) {
  %y = linear_attention(%q, %k, %v) {chunk_size = 16} : f32[B, 4, T, 6]
  return %y
}
"""


def test_op_prints_parses_verifies_and_exports(plugin):
    from mlxc.ir.export import from_json, to_dot, to_json

    program = verify(parse_program(_IR))
    assert print_program(program) == _IR
    assert print_program(from_json(to_json(program))) == _IR
    assert "linear_attention" in to_dot(program)
    bad = _IR.replace("%k: f32[B, 4, T, 8]", "%k: f32[B, 4, T, 7]")
    with pytest.raises(MlxcError, match=r"q f32\[B, 4, T, 8\] and k f32\[B, 4, T, 7\] must have one shape"):
        verify(parse_program(bad))
    with pytest.raises(MlxcError, match="chunk_size must be positive"):
        verify(parse_program(_IR.replace("chunk_size = 16", "chunk_size = 0")))


# ---------------------------------------------------------------------------------------------- block, spec, codegen


def _greedy_without_cache(model, ids, n):
    seq = np.array(ids)
    for _ in range(n):
        nxt = np.array(mx.argmax(model(mx.array(seq)).logits[:, -1], axis=-1))
        seq = np.concatenate([seq, nxt[:, None]], axis=1)
    return seq


def test_hybrid_from_a_spec_file_compiles_generates_and_continues_its_state(plugin):
    model = mlxc.load(str(SPEC), seed=1, init_scale=0.3)
    assert [kind for kind, _ in model.module.STATES] == ["recurrent", "recurrent", "kv"] * 2
    assert "def linear_attention(" in Path(model.module_path).read_text()  # the helper travels in the module
    assert "linear_attention(%q_t, %k_t, %v_t) {chunk_size = 16}" in str(model.program)
    ids = np.random.default_rng(3).integers(3, 96, size=(2, 11))
    full = model(mx.array(ids)).logits
    cache = model.make_cache()
    parts = [model(mx.array(ids[:, :6]), cache=cache).logits]
    parts += [model(mx.array(ids[:, t : t + 1]), cache=cache).logits for t in range(6, 11)]
    np.testing.assert_allclose(np.array(mx.concatenate(parts, axis=1)), np.array(full), atol=1e-4, rtol=1e-4)
    got = np.array(model.generate(mx.array(ids), max_new_tokens=5, stop_tokens=[]))
    np.testing.assert_array_equal(got, _greedy_without_cache(model, ids, 5))


def test_spec_errors_name_the_block_kind(plugin, tmp_path):
    text = SPEC.read_text()
    missing = tmp_path / "missing.yaml"
    missing.write_text(text.split("linear_attention:\n")[0] + "bos_token_id: 1\n")
    with pytest.raises(MlxcError, match="linear_attention layers need the `linear_attention` settings"):
        mlxc.load(str(missing))
    wrong = tmp_path / "wrong.yaml"
    wrong.write_text(text.replace("chunk_size: 16", "chunk_size: -1"))
    with pytest.raises(MlxcError, match="linear_attention: chunk_size"):
        mlxc.load(str(wrong))


def test_quantized_hybrid_computes_its_rounded_weights(plugin):
    """`quantize=8` quantizes the plugin block's projections like attention's (fused q/k/v included); the model
    computes what the float model computes with those weights replaced by their 8-bit round trip."""
    from mlxc.runtime import weights as W

    q8 = mlxc.load(str(SPEC), quantize=8, kernels="reference")
    fn = q8.program["linear_attention"]
    assert {p.name: str(p.type).split()[-1] for p in fn.runtime_params()} == {"qkv_proj_q.weight": "q8g64",
                                                                               "o_proj_q.weight": "q8g64"}
    tensors = W.random_weights(mlxc.lower(q8.spec), seed=1, scale=0.3)
    rounded = {n: mx.dequantize(*mx.quantize(w, group_size=64, bits=8), group_size=64, bits=8) if w.ndim == 2 else w
               for n, w in tensors.items()}
    q8.net.load_weights(W.bind(q8.program, tensors))
    model = mlxc.load(str(SPEC))
    model.net.load_weights(W.bind(model.program, rounded))
    ids = mx.array(np.random.default_rng(8).integers(3, 96, size=(2, 12)))
    want = np.array(model(ids).logits)
    assert np.max(np.abs(np.array(q8(ids).logits) - want)) <= 1e-4 * np.max(np.abs(want))


def test_lora_trains_the_hybrid(plugin):
    from mlxc.runtime.train import TrainConfig, train_lora

    model = mlxc.load(str(SPEC), lora=mlxc.LoRAConfig(rank=4, alpha=8, targets=("q_proj", "v_proj")), seed=1,
                      init_scale=0.3)
    pattern = [5, 9, 17, 33, 65, 12] * 6
    result = train_lora(model.net, [pattern] * 4, TrainConfig(steps=12, batch_size=2, seq_len=32,
                                                              learning_rate=2e-2))
    assert np.mean(result.losses[-3:]) < 0.7 * np.mean(result.losses[:3])
    linear_layers = [n for n in result.adapter_names if ".linear_attn." in n]
    assert linear_layers  # the plugin block's projections took adapters like attention's


# ---------------------------------------------------------------------------------------------- pass, dumps, explorer


def test_pass_runs_by_name_and_shows_in_dumps_and_the_explorer(plugin, tmp_path):
    from mlxc.tools.explorer import explore, page_data

    text = SPEC.read_text().replace("  chunk_size: 16\n", "")
    spec = tmp_path / "unchunked.yaml"
    spec.write_text(text)
    passes = ["dce", "chunk-linear-attention", "fuse-qkv", "lift-params", "cse", "dce"]
    mlxc.api.program_for(str(spec), passes=passes, dump_dir=tmp_path / "dumps")
    dumped = (tmp_path / "dumps" / "02-chunk-linear-attention.mlxc").read_text()
    assert dumped.startswith("// after chunk-linear-attention: chunked: 1")
    assert "{chunk_size = 64}" in dumped
    page = page_data(explore(str(spec), passes=passes))
    assert "chunk-linear-attention" in [s["name"] for s in page["stages"]]
    ops = {n.get("op") for f in page["functions"] for n in f["nodes"]}
    assert "linear_attention" in ops
    ids = mx.array(np.random.default_rng(4).integers(3, 96, size=(1, 150)))  # > 64: two blocks and a part
    plain = mlxc.load(str(spec), seed=2)(ids).logits
    chunked = mlxc.load(str(spec), seed=2, passes=passes)(ids).logits
    np.testing.assert_allclose(np.array(chunked), np.array(plain), atol=1e-4, rtol=1e-4)
    assert main(["dump", str(spec), "--passes", "dce,chunk-linear-attention"]) == 0


# ---------------------------------------------------------------------------------------------- family


def test_family_reads_its_checkpoints(plugin, tmp_path):
    from mlxc.frontends.hf import detect_family

    model = mlxc.load("linear-hybrid-tiny", seed=5, init_scale=0.3)
    ckpt = mlxc.export("linear-hybrid-tiny", tmp_path / "ckpt", seed=5, init_scale=0.3)
    config = json.loads((ckpt / "config.json").read_text())
    assert config["architectures"] == ["LinearHybridForCausalLM"]
    back = mlxc.load(str(ckpt))
    assert back.spec.family == "linear_hybrid" and str(back.program) == str(model.program)
    ids = mx.array(np.random.default_rng(5).integers(3, 256, size=(1, 9)))
    np.testing.assert_allclose(np.array(back(ids).logits), np.array(model(ids).logits), atol=1e-5, rtol=1e-5)
    names = [n for n in json.loads((ckpt / "model.safetensors.index.json").read_text())["weight_map"]] \
        if (ckpt / "model.safetensors.index.json").exists() else list(mx.load(str(ckpt / "model.safetensors")))
    assert "model.layers.0.linear_attn.q_proj.weight" in names
    assert detect_family({}, names).family == "linear_hybrid"  # without a config, from the tensor markers


# ---------------------------------------------------------------------------------------------- listing, artifacts


def test_plugins_command_lists_origins(plugin, capsys):
    assert main(["plugins", "--json"]) == 0
    data = json.loads(capsys.readouterr().out)
    mine = next(p for p in data["plugins"] if p["name"] == "linear-attention")
    assert (mine["package"], mine["version"], mine["status"]) == (PACKAGE, "0.1.0", "loaded")
    added = {(e["kind"], e["name"]) for e in data["registered"] if e["origin"] == "plugin linear-attention"}
    assert added == {("op", "linear_attention"), ("block", "linear_attention"), ("family", "linear_hybrid"),
                     ("pass", "chunk-linear-attention")}
    builtin = {(e["kind"], e["name"]): e["module"] for e in data["registered"] if e["origin"] == "built-in"}
    assert builtin[("op", "attention")] == "mlxc.ir.ops" and builtin[("pass", "dce")] == "mlxc.passes.dce"


def test_artifact_records_the_plugin_and_fails_clearly_without_it(plugin, tmp_path, capsys):
    out = mlxc.compile(str(SPEC), tmp_path / "art", seed=1, init_scale=0.3)
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["plugins"] == [{"name": "linear-attention", "module": "mlxc_linear_attention",
                                    "package": PACKAGE, "version": "0.1.0",
                                    "uses": ["block linear_attention", "op linear_attention"]}]
    ids = mx.array(np.random.default_rng(6).integers(3, 96, size=(1, 8)))
    want = mlxc.load(str(SPEC), seed=1, init_scale=0.3)(ids).logits
    np.testing.assert_allclose(np.array(mlxc.load(str(out))(ids).logits), np.array(want), atol=1e-5)

    plugins.unload("linear-attention")  # and uninstall: its dist-info leaves sys.path
    shutil.rmtree(next(plugin.glob("mlxc_linear_attention-*.dist-info")))
    message = f"needs the mlxc plugin 'linear-attention' (Python package {PACKAGE} 0.1.0) for block " \
              f"linear_attention, op linear_attention, and it is not installed (pip install {PACKAGE})"
    with pytest.raises(MlxcError, match=re_escape(message)):
        mlxc.load(str(out))
    capsys.readouterr()
    assert main(["run", str(out), "--tokens", "1,2,3", "-m", "2"]) == 1
    err = capsys.readouterr().err
    assert message in err.replace("\n", "") and "Traceback" not in err
    with pytest.raises(MlxcError, match="unknown block kind 'linear_attention'"):
        mlxc.load(str(SPEC))


def re_escape(text: str) -> str:
    import re

    return re.escape(text)


def test_broken_plugin_is_one_clear_error_and_leaves_nothing_behind(site, capsys, monkeypatch):
    broken = site / "mlxc_broken_plugin"
    broken.mkdir()
    (broken / "__init__.py").write_text(
        "from mlxc.plugins import OpGroup, op\n\n"
        "@op('half_registered', OpGroup.UNARY, ('x',))\n"
        "def _rule(x):\n    return x\n\n"
        "import mlxc_missing_dependency\n")
    _install(site, "mlxc-broken", "2.0", {"broken": "mlxc_broken_plugin"})
    with pytest.raises(MlxcError, match=r"plugin 'broken' \(Python package mlxc-broken 2\.0\) failed to load: "
                                        r"ModuleNotFoundError: No module named 'mlxc_missing_dependency'"):
        mlxc.load("preset:tiny")
    from mlxc.ir.opdef import OPS

    assert "half_registered" not in OPS  # what it registered before failing is taken back
    assert main(["inspect", "preset:tiny"]) == 1
    err = capsys.readouterr().err
    assert "plugin 'broken'" in err and "MLXC_DISABLE_PLUGINS=broken" in err and "Traceback" not in err
    assert main(["plugins"]) == 1
    assert "failed: ModuleNotFoundError" in capsys.readouterr().out
    monkeypatch.setenv("MLXC_DISABLE_PLUGINS", "broken")  # the way out the message names
    assert mlxc.load("preset:tiny")(mx.array([[1, 2]])).logits.shape == (1, 2, 256)


_RELU2 = """
from typing import Optional

from pydantic import BaseModel, ConfigDict

from mlxc.plugins import ffn


class Relu2Spec(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")
    intermediate_size: Optional[int] = None


@ffn("relu2", settings=Relu2Spec)
def build(lo, b, x, s, cfg):
    \"\"\"Primer's squared-ReLU FFN: down(relu(up(x))^2).\"\"\"
    h, i = lo.spec.hidden_size, s.intermediate_size or cfg.intermediate_size
    r = b.op("relu", lo.linear(b, x, "up_proj", i, h, cfg.bias, "up"), name="r")
    return lo.linear(b, b.op("mul", r, r, name="r2"), "down_proj", h, i, cfg.bias, "out")
"""


def test_ffn_kind_from_a_plugin(site, tmp_path, capsys):
    """A throwaway plugin adds an FFN kind; a spec uses it on some layers, the layer's FFN computes what NumPy
    computes from its weights, and artifacts record it."""
    (site / "mlxc_relu2_ffn").mkdir()
    (site / "mlxc_relu2_ffn" / "__init__.py").write_text(_RELU2)
    _install(site, "mlxc-relu2", "0.3", {"relu2": "mlxc_relu2_ffn"})
    spec = tmp_path / "relu2.yaml"
    spec.write_text("name: relu2-demo\nvocab_size: 64\nhidden_size: 32\nintermediate_size: 64\nnum_layers: 2\n"
                    "num_heads: 4\nlayer_pattern: [{ffn: relu2}, attention]\nrelu2: {intermediate_size: 48}\n")
    model = mlxc.load(str(spec), seed=3, init_scale=0.3)
    mlp = model.net.layers[0].mlp
    up, down = np.array(mlp.up_proj.weight), np.array(mlp.down_proj.weight)
    assert up.shape == (48, 32)
    x = np.random.default_rng(9).normal(size=(2, 5, 32)).astype(np.float32)
    want = (np.maximum(x @ up.T, 0) ** 2) @ down.T
    np.testing.assert_allclose(np.array(mlp(mx.array(x))), want, rtol=1e-5, atol=1e-5)
    assert model.generate(mx.array([[1, 2, 3]]), max_new_tokens=3, stop_tokens=[]).shape == (1, 6)
    out = mlxc.compile(str(spec), tmp_path / "art")
    assert json.loads((out / "manifest.json").read_text())["plugins"][0]["uses"] == ["ffn relu2"]
    assert main(["plugins", "--plugins-only", "--json"]) == 0
    assert [(e["kind"], e["name"], e["origin"]) for e in json.loads(capsys.readouterr().out)["registered"]] == \
        [("ffn", "relu2", "plugin relu2")]
    plugins.unload("relu2")
    with pytest.raises(ValueError, match="unknown FFN kind 'relu2'"):  # pydantic's ValidationError
        mlxc.lower(mlxc.ModelSpec(name="x", vocab_size=8, hidden_size=8, intermediate_size=8, num_layers=1,
                                  num_heads=2, ffn="relu2"))


def test_malformed_plugin_record_in_a_manifest(tmp_path):
    with pytest.raises(MlxcError, match="malformed plugin record"):
        plugins.check_required(["linear-attention"], str(tmp_path))
