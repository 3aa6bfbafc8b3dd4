"""Naming and detection (issue 13): which family a checkpoint is, from its config metadata and else its tensor names
(checked against transformers' own class names and the tensor names of transformers models on the meta device);
hub ids resolving to presets offline; and what `mlxc inspect` shows (family and evidence, head, sliding/global
layers, per-layer rope and FFN, parameter counts)."""

from __future__ import annotations

import contextlib
import io
import json
import os
import re
import subprocess
import sys
import textwrap
from functools import lru_cache
from itertools import product
from typing import Any, Optional

import pytest

import mlxc
from mlxc.api import SourceKind, resolve
from mlxc.cli import main
from mlxc.frontends import families as fam_pkg
from mlxc.frontends.families import Family, all_families, family
from mlxc.frontends.families import llama as llama_family
from mlxc.frontends.hf import Detection, detect_architecture, detect_family
from mlxc.frontends.presets import PRESETS, match_hub_id, normalize_hub_id, preset_for_hub_id
from mlxc.frontends.spec import AttentionType, FFNType, LayerSpec, ModelSpec, MoESpec, RopeSpec
from mlxc.ir.errors import MlxcError

transformers = pytest.importorskip("transformers")
torch = pytest.importorskip("torch")
from transformers import AutoConfig, AutoModel, AutoModelForCausalLM  # noqa: E402
from transformers.models.auto.modeling_auto import (  # noqa: E402
    MODEL_FOR_CAUSAL_LM_MAPPING_NAMES,
    MODEL_FOR_SEQUENCE_CLASSIFICATION_MAPPING_NAMES,
)

# The model types issue 13 adds families for; a type no family declares yet is skipped (and so reported).
MODEL_TYPES = ("llama", "mistral", "qwen2", "qwen3", "gemma", "gemma2", "gemma3_text", "phi", "phi3", "mixtral",
               "qwen2_moe", "qwen3_moe", "olmoe")


def _family_of_type(model_type: str) -> Optional[Family]:
    return next((f for f in all_families() if model_type in f.model_types), None)


def _need_family(model_type: str) -> Family:
    f = _family_of_type(model_type)
    if f is None:
        pytest.skip(f"no family declares model_type {model_type!r} yet")
    return f


# ------------------------------------------------------------------------------------------------ metadata


@pytest.mark.parametrize("model_type", MODEL_TYPES)
def test_detect_from_transformers_class_names(model_type: str) -> None:
    """transformers' own class names for the model type (causal LM and sequence classification) detect as the
    family declaring that type, and the detection says which entry decided it."""
    f = _need_family(model_type)
    for mapping in (MODEL_FOR_CAUSAL_LM_MAPPING_NAMES, MODEL_FOR_SEQUENCE_CLASSIFICATION_MAPPING_NAMES):
        cls = mapping.get(model_type)
        if cls is None:
            continue
        d = detect_family({"architectures": [cls]})
        assert d == Detection(f.name, "architectures", (cls,))
        assert str(d) == f"{f.name} (from architectures: {cls})"
    assert detect_family({"model_type": model_type}) == Detection(f.name, "model_type", (model_type,))


def test_metadata_order() -> None:
    """`architectures` decides over `model_type`; an unknown class falls back to `model_type`; an unsupported
    declaration is refused even when the tensors look like a known family."""
    assert detect_family({"architectures": ["MistralForCausalLM"], "model_type": "llama"}).via == "architectures"
    d = detect_family({"architectures": ["SomethingElse"], "model_type": "mistral"})
    assert (d.family, d.via) == ("mistral", "model_type")
    with pytest.raises(MlxcError, match="unsupported architecture.*GPT2LMHeadModel"):
        detect_family({"architectures": ["GPT2LMHeadModel"]}, _checkpoint_names("llama"))


# ------------------------------------------------------------------------------------------------ tensor names


def _small_config(model_type: str):
    """A tiny transformers config of the type: every size that the config class has set small, experts included."""
    probe = AutoConfig.for_model(model_type)
    kw: dict[str, Any] = dict(vocab_size=128, hidden_size=32, intermediate_size=64, num_hidden_layers=4,
                              num_attention_heads=4)
    optional = dict(num_key_value_heads=2, head_dim=8, num_experts=4, num_local_experts=4, num_experts_per_tok=2,
                    moe_intermediate_size=16, shared_expert_intermediate_size=32, pad_token_id=None,
                    bos_token_id=1, eos_token_id=2)
    kw.update({k: v for k, v in optional.items() if hasattr(probe, k)})
    return AutoConfig.for_model(model_type, **kw)


@lru_cache(maxsize=None)
def _checkpoint_names(model_type: str, backbone: bool = False) -> tuple[str, ...]:
    """The tensor names `save_pretrained` writes for a transformers model of this type (built on the meta device):
    the state dict in the checkpoint layout (transformers 5 fuses experts in memory and splits them again when
    saving), less the LM head when it is tied to the embeddings."""
    from transformers.core_model_loading import revert_weight_conversion

    config = _small_config(model_type)
    with torch.device("meta"):
        model = (AutoModel if backbone else AutoModelForCausalLM).from_config(config)
    names = set(revert_weight_conversion(model, model.state_dict()))
    if getattr(config, "tie_word_embeddings", False):
        names.discard("lm_head.weight")
    return tuple(sorted(names))


def _body(names) -> set[str]:
    """Names with layer indices generalised and the LM head dropped: what tells architectures apart."""
    return {re.sub(r"\.\d+\.", ".*.", n) for n in names if n != "lm_head.weight"}


@pytest.mark.parametrize("backbone", [False, True], ids=["causal_lm", "backbone"])
@pytest.mark.parametrize("model_type", MODEL_TYPES)
def test_detect_from_transformers_tensor_names(model_type: str, backbone: bool) -> None:
    """A config with no metadata: the tensor names of a transformers model of each family detect as that family,
    never as one whose names merely overlap (Qwen2's are Llama's plus q/k/v biases).

    Some families' checkpoints carry exactly the same tensor names (Mistral's are Llama's; OLMoE's are
    Qwen3-MoE's): names cannot tell those apart, so detection may refuse as ambiguous, naming the family; a family
    without tensor markers may read as a family whose checkpoints have exactly its names, and as nothing else."""
    f = _need_family(model_type)
    names = _checkpoint_names(model_type, backbone)
    twins = {g.name for mt in MODEL_TYPES if (g := _family_of_type(mt)) is not None and g.name != f.name
             and _body(_checkpoint_names(mt, backbone)) == _body(names)}
    try:
        d = detect_family({}, names)
    except MlxcError as err:
        assert twins and "several families" in str(err), f"{model_type}: {err}"
        assert not f.tensor_markers or f"{f.name} (" in str(err)
        return
    assert d.via == "tensor names"
    if f.tensor_markers:
        assert d.family == f.name, d
        assert d.evidence and all(any(re.fullmatch(re.escape(e).replace(r"\*", r"\d+"), n) for n in names)
                                  for e in d.evidence)
    else:
        assert d.family in twins, f"{model_type} names detected as {d.family}, whose checkpoints have other tensors"


def test_qwen2_names_are_not_llama() -> None:
    """Qwen2's tensors contain all of Llama's markers; the more specific family wins."""
    _need_family("qwen2")
    assert detect_architecture({}, _checkpoint_names("qwen2")) == family("qwen2").name
    assert detect_architecture({}, _checkpoint_names("llama")) == "llama"


def _fake(name: str, markers: tuple[str, ...]) -> Family:
    return Family(name, architectures=(name.title(),), config=llama_family.config, names=llama_family.NAMES,
                  tensor_markers=markers)


def test_equal_or_incomparable_evidence_is_ambiguous(monkeypatch) -> None:
    """The rule itself, on made-up families over Llama's names: a strict superset of evidence wins; equal or
    incomparable evidence is an error naming both families and what each matched."""
    import mlxc.frontends.hf as hf

    names = _checkpoint_names("llama")
    base = llama_family.FAMILIES[0]
    q = r"(model\.)?layers\.\d+\.self_attn\.q_proj\.weight"
    o = r"(model\.)?layers\.\d+\.self_attn\.o_proj\.weight"
    wider = _fake("wider", base.tensor_markers + (o,))
    monkeypatch.setattr(hf, "all_families", lambda: (base, wider))
    assert detect_architecture({}, names) == "wider"

    monkeypatch.setattr(hf, "all_families", lambda: (base, _fake("twin", base.tensor_markers)))
    with pytest.raises(MlxcError, match=r"several families.*llama \(.*\).*twin \(.*q_proj.*\).*add one"):
        detect_architecture({}, names)

    monkeypatch.setattr(hf, "all_families", lambda: (_fake("onlyq", (q,)), _fake("onlyo", (o,))))
    with pytest.raises(MlxcError, match="several families"):
        detect_architecture({}, names)


def test_names_a_family_table_cannot_hold_rule_it_out() -> None:
    """Llama's markers match a Gemma-2-style checkpoint, but Llama has no place for its extra norms."""
    names = list(_checkpoint_names("llama")) + ["model.layers.0.pre_feedforward_layernorm.weight"]
    with pytest.raises(MlxcError, match="fit no family"):
        detect_architecture({}, names)
    with pytest.raises(MlxcError, match="fit no family.*supported"):
        detect_architecture({}, ["transformer.h.0.attn.c_attn.weight"])


# ------------------------------------------------------------------------------------------------ hub ids

# The issue's ids, with the model type of their family and the published config.json values their preset must carry.
ISSUE_IDS: dict[str, tuple[str, dict[str, int]]] = {
    "meta-llama/Llama-3.1-8B": ("llama", dict(hidden_size=4096, num_layers=32, num_heads=32, kv_heads=8,
                                              intermediate_size=14336, vocab_size=128256,
                                              max_position_embeddings=131072)),
    "Qwen/Qwen2.5-0.5B-Instruct": ("qwen2", dict(hidden_size=896, num_layers=24, num_heads=14, kv_heads=2,
                                                 intermediate_size=4864, vocab_size=151936,
                                                 max_position_embeddings=32768)),
    "google/gemma-2-2b-it": ("gemma2", dict(hidden_size=2304, num_layers=26, num_heads=8, kv_heads=4,
                                            dim_per_head=256, intermediate_size=9216, vocab_size=256000,
                                            sliding_window=4096)),
    "deepseek-ai/DeepSeek-R1-Distill-Qwen-1.5B": ("qwen2", dict(hidden_size=1536, num_layers=28, num_heads=12,
                                                                kv_heads=2, intermediate_size=8960,
                                                                vocab_size=151936, max_position_embeddings=131072)),
    "microsoft/Phi-3-mini-4k-instruct": ("phi3", dict(hidden_size=3072, num_layers=32, num_heads=32, kv_heads=32,
                                                      intermediate_size=8192, vocab_size=32064,
                                                      max_position_embeddings=4096)),
}


@pytest.mark.parametrize("repo_id", ISSUE_IDS)
def test_issue_hub_ids_resolve_offline(repo_id: str) -> None:
    """Each id names its family's preset with the published hyperparameters, in any case and as a pasted URL."""
    model_type, published = ISSUE_IDS[repo_id]
    f = _need_family(model_type)
    match = match_hub_id(repo_id)
    assert match is not None, f"family {f.name} has no hub_ids row for {repo_id}"
    assert match.family == f.name and PRESETS[match.preset].family == f.name
    spec = PRESETS[match.preset]
    assert {k: getattr(spec, k) for k in published} == published
    for variant in (repo_id.upper(), f"https://huggingface.co/{repo_id}/"):
        again = match_hub_id(variant)
        assert again is not None and (again.family, again.preset) == (match.family, match.preset)
    source = resolve(f"https://huggingface.co/{repo_id}")
    assert (source.kind, source.location, source.preset) == (SourceKind.HUB, repo_id, match.preset)


def _language(pattern: str, limit: int = 400) -> Optional[list[str]]:
    """Every string a hub-id regex accepts when that set is finite and small (one digit or letter stands for a
    class), else None."""
    from re import _constants as c, _parser as parser

    def seq(items) -> Optional[list[str]]:
        outs = [""]
        for op, av in items:
            alts = one(op, av)
            if alts is None:
                return None
            outs = [a + b for a in outs for b in alts]
            if len(outs) > limit:
                return None
        return outs

    def one(op, av) -> Optional[list[str]]:
        if op is c.LITERAL:
            return [chr(av)]
        if op is c.SUBPATTERN:
            return seq(av[-1])
        if op is c.BRANCH:
            alts = [seq(alt) for alt in av[1]]
            return None if any(a is None for a in alts) else [s for a in alts for s in a]
        if op in (c.MAX_REPEAT, c.MIN_REPEAT):
            lo, hi, body = av
            inner = seq(body)
            if inner is None or hi > 3:
                return None
            return ["".join(p) for n in range(lo, hi + 1) for p in product(inner, repeat=n)]
        if op is c.IN:
            first_op, first_av = av[0]
            if first_op is c.LITERAL:
                return [chr(first_av)]
            if first_op is c.CATEGORY:
                return ["7" if first_av is c.CATEGORY_DIGIT else "a"]
            if first_op is c.RANGE:
                return [chr(first_av[0])]
        return None

    return seq(parser.parse(pattern))


def test_every_hub_id_row_names_a_preset_of_its_family() -> None:
    """Every id every family's `hub_ids` rows accept resolves, without ambiguity, to an existing preset of that
    family (`match_hub_id` raises on a missing preset or on two families claiming one id)."""
    checked = 0
    for f in all_families():
        for pattern, _ in f.hub_ids:
            ids = _language(pattern)
            assert ids, f"{f.name}: cannot enumerate hub-id row {pattern!r}; keep rows to literals and alternatives"
            for repo_id in ids:
                match = match_hub_id(repo_id)
                assert match is not None and match.family == f.name, (pattern, repo_id, match)
                assert PRESETS[match.preset].family == f.name
                checked += 1
    assert checked >= len(llama_family.PRESETS) - 1  # every Llama preset but `tiny` has an id


def test_hub_id_table_errors(monkeypatch) -> None:
    llama = llama_family.FAMILIES[0]
    claim = Family("other", architectures=("Other",), config=llama_family.config,
                   hub_ids=((r"meta-llama/Llama-3\.1-8B", "llama3.2-1b"),))
    monkeypatch.setattr(fam_pkg, "all_families", lambda: (llama, claim))
    with pytest.raises(MlxcError, match="claimed by several presets.*llama3.1-8b.*llama3.2-1b"):
        match_hub_id("meta-llama/Llama-3.1-8B")
    missing = Family("other", architectures=("Other",), config=llama_family.config,
                     hub_ids=((r"acme/Thing-1B", "thing-1b"),))
    monkeypatch.setattr(fam_pkg, "all_families", lambda: (llama, missing))
    with pytest.raises(MlxcError, match="'thing-1b', which no family declares"):
        match_hub_id("acme/thing-1b")


def test_unknown_ids_and_preset_names() -> None:
    assert match_hub_id("someorg/somemodel") is None and preset_for_hub_id("someorg/somemodel") is None
    assert resolve("someorg/somemodel") == mlxc.api.Source(SourceKind.HUB, "someorg/somemodel", None)
    assert normalize_hub_id(" hf.co/Qwen/Qwen3-0.6B/ ") == "Qwen/Qwen3-0.6B"
    for name in PRESETS:
        assert resolve(f"preset:{name}").kind == SourceKind.PRESET


# ------------------------------------------------------------------------------------------------ offline CLI

_OFFLINE = textwrap.dedent(
    """
    import contextlib, io, json, socket, sys

    def refuse(*args, **kwargs):
        raise RuntimeError("NETWORK TOUCHED")

    socket.socket.connect = refuse
    socket.create_connection = refuse
    from mlxc.cli import main

    results = {}
    for argv in json.loads(sys.argv[1]):
        out, err = io.StringIO(), io.StringIO()
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
            code = main(argv)
        results[" ".join(argv)] = [code, out.getvalue(), err.getvalue()]
    print("RESULTS" + json.dumps(results))
    """
)


@pytest.fixture(scope="module")
def offline(tmp_path_factory):
    """Runs `mlxc` commands in one fresh interpreter with HF_HUB_OFFLINE, sockets that refuse to connect and an
    HF_HOME whose cache holds one snapshot, a small config for meta-llama/Llama-3.2-1B (huggingface_hub reads its
    settings when imported, hence a separate process)."""
    home = tmp_path_factory.mktemp("hf_home")
    repo = home / "hub" / "models--meta-llama--Llama-3.2-1B"
    commit = "0123456789abcdef0123456789abcdef01234567"
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text(commit)
    (repo / "snapshots" / commit).mkdir(parents=True)
    transformers.LlamaConfig(vocab_size=300, hidden_size=64, intermediate_size=128, num_hidden_layers=3,
                             num_attention_heads=4, architectures=["LlamaForCausalLM"]
                             ).save_pretrained(repo / "snapshots" / commit)

    def run(*argvs: list[str]) -> dict[str, tuple[int, str, str]]:
        env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_HOME": str(home), "HF_HUB_CACHE": str(home / "hub"),
               "COLUMNS": "200"}
        for key in ("HF_ENDPOINT", "MLXC_DEBUG", "HF_TOKEN"):
            env.pop(key, None)
        proc = subprocess.run([sys.executable, "-c", _OFFLINE, json.dumps(list(argvs))], env=env,
                              capture_output=True, text=True, timeout=300)
        assert proc.returncode == 0, proc.stderr
        line = next(l for l in proc.stdout.splitlines() if l.startswith("RESULTS"))
        return {k: tuple(v) for k, v in json.loads(line[len("RESULTS"):]).items()}

    return run


def test_hub_ids_offline_in_the_cli(offline) -> None:
    """`inspect` and `dump` of the issue's ids work with no network and say they used the preset; `run` needs the
    weights and says so, pointing at the preset; an id no family knows gets no made-up suggestion."""
    ids = [r for r, (mt, _) in ISSUE_IDS.items() if _family_of_type(mt) is not None]
    assert ids
    argvs = [["inspect", r, "--json"] for r in ids]
    argvs += [["dump", ids[0]], ["run", ids[0], "--tokens", "1,2"], ["compile", ids[0], "-o", "unused-out"],
              ["inspect", "someorg/somemodel"], ["inspect", "meta-llama/Llama-3.2-1B", "--json"],
              ["run", "meta-llama/Llama-3.2-1B", "--tokens", "1"]]
    results = offline(*argvs)
    for repo_id in ids:
        code, out, err = results[f"inspect {repo_id} --json"]
        assert code == 0, err
        doc = json.loads(out)
        preset = preset_for_hub_id(repo_id)
        spec = PRESETS[preset]
        assert doc["name"] == preset and doc["family"] == spec.family
        assert doc["detected_from"] == {"via": "hub id", "evidence": [f"{repo_id} -> preset:{preset}"]}
        assert f"used preset:{preset}" in doc["notice"] and "no network" in doc["notice"]
        assert doc["parameters"] == spec.num_parameters()
    preset = preset_for_hub_id(ids[0])
    code, out, err = results[f"dump {ids[0]}"]
    assert code == 0 and out.startswith("func @") and f"used preset:{preset}" in err
    assert mlxc.ir.parse_program(out) is not None
    for cmd in (f"run {ids[0]} --tokens 1,2", f"compile {ids[0]} -o unused-out"):
        code, out, err = results[cmd]
        assert code == 1 and out == "" and "NETWORK TOUCHED" not in err
        assert ids[0] in err and "Hugging Face Hub" in err and "HF_HUB_OFFLINE is set" in err
        assert "needs the checkpoint's weights" in err and f"preset:{preset}" in err and "random weights" in err
        assert len(err.strip().splitlines()) == 1
    code, out, err = results["inspect someorg/somemodel"]
    assert code == 1 and "someorg/somemodel" in err and "preset:" not in err
    # a cached snapshot wins over the preset: its config is what the id is here (weights still missing for `run`)
    code, out, err = results["inspect meta-llama/Llama-3.2-1B --json"]
    assert code == 0, err
    doc = json.loads(out)
    assert (doc["hidden_size"], doc["num_layers"], doc["notice"]) == (64, 3, None)
    assert doc["detected_from"] == {"via": "architectures", "evidence": ["LlamaForCausalLM"]}
    assert doc["source"] == "meta-llama/Llama-3.2-1B (llama)"
    code, out, err = results["run meta-llama/Llama-3.2-1B --tokens 1"]
    assert code == 1 and "needs the checkpoint's weights" in err and "preset:llama3.2-1b" in err


# ------------------------------------------------------------------------------------------------ inspect


def _inspect(capsys, *argv: str) -> tuple[str, dict[str, Any]]:
    """The table output and the JSON document of `mlxc inspect`."""
    assert main(["inspect", *argv]) == 0
    table = capsys.readouterr().out
    assert main(["inspect", *argv, "--json"]) == 0
    return table, json.loads(capsys.readouterr().out)


def _row(table: str, key: str) -> str:
    """The value cell of a property row."""
    line = next(l for l in table.splitlines() if re.match(rf"│ {re.escape(key)} +│", l))
    return line.split("│")[2].strip()


def _layer_rows(table: str) -> list[list[str]]:
    section = table[table.index("\nlayers\n"):]
    return [[c.strip() for c in l.split("│")[1:-1]] for l in section.splitlines() if l.startswith("│")]


def _gemma2_like() -> tuple[str, ModelSpec]:
    """The gemma2 preset of google/gemma-2-2b-it once that family exists, else a hand-made spec of its shape."""
    if _family_of_type("gemma2") is not None and preset_for_hub_id("google/gemma-2-2b-it"):
        name = preset_for_hub_id("google/gemma-2-2b-it")
        return f"preset:{name}", PRESETS[name]
    return "", ModelSpec(
        name="gemma2-like", vocab_size=1000, hidden_size=64, intermediate_size=128, num_layers=26, num_heads=4,
        num_kv_heads=2, head_dim=32, sliding_window=4096, norm_unit_offset=True, residual="sandwich",
        activation="gelu_tanh", attn_logit_softcap=50.0, final_logit_softcap=30.0, query_scale=0.0625,
        embedding_multiplier=8.0, tie_word_embeddings=True,
        layers=tuple(LayerSpec(attention=AttentionType.SLIDING_WINDOW if i % 2 == 0 else AttentionType.FULL)
                     for i in range(26)))


def _spec_file(tmp_path, spec: ModelSpec) -> str:
    path = tmp_path / f"{spec.name}.json"
    path.write_text(json.dumps(spec.model_dump(mode="json")))
    return str(path)


def test_inspect_alternating_sliding_layers(capsys, tmp_path) -> None:
    """Gemma 2's alternation: sliding layers 0, 2, ..., 24 and global 1, 3, ..., 25, two layer rows, the window;
    the per-layer counts add up to the total, and the total is `spec.num_parameters()`."""
    src, spec = _gemma2_like()
    src = src or _spec_file(tmp_path, spec)
    table, doc = _inspect(capsys, src)
    assert _row(table, "sliding layers") == "0-24 every 2nd (window 4,096)"
    assert _row(table, "global layers") == "1-25 every 2nd"
    assert doc["sliding_layers"] == list(range(0, 26, 2)) and doc["global_layers"] == list(range(1, 26, 2))
    rows = _layer_rows(table)
    assert [r[:5] for r in rows] == [["0-24 every 2nd", "13", "attention", "GQA sliding", "4,096"],
                                     ["1-25 every 2nd", "13", "attention", "GQA global", "-"]]
    assert "soft-capped at 50" in _row(table, "attention") and "soft-capped at 30" in _row(table, "head")
    assert "(1 + w)" in _row(table, "norms") and "sandwich" in _row(table, "norms")
    n = spec.num_parameters()
    assert doc["parameters"] == n and f"{n:,}" in _row(table, "parameters")
    outside = spec.vocab_size * spec.hidden_size + spec.hidden_size  # tied embeddings, final norm
    assert sum(len(g["layers"]) * g["parameters_each"] for g in doc["layer_groups"]) + outside == n
    assert "from preset" in _row(table, "family") or "from spec file" in _row(table, "family")


def test_inspect_per_layer_rope_bases(capsys, tmp_path) -> None:
    """Gemma 3's pattern: five local layers (rope base 1e4) per global one (1e6, linear x8), a rope column."""
    spec = ModelSpec(
        name="gemma3-like", vocab_size=500, hidden_size=64, intermediate_size=128, num_layers=12, num_heads=4,
        num_kv_heads=1, sliding_window=512, qk_norm=True, rope=RopeSpec(theta=1e6, kind="linear", factor=8.0),
        layers=tuple(LayerSpec(attention=AttentionType.FULL) if i % 6 == 5 else
                     LayerSpec(attention=AttentionType.SLIDING_WINDOW, rope=RopeSpec(theta=10000.0))
                     for i in range(12)))
    table, doc = _inspect(capsys, _spec_file(tmp_path, spec))
    assert _row(table, "sliding layers") == "0-4, 6-10 (window 512)" and _row(table, "global layers") == "5, 11"
    assert _row(table, "rope") == "per layer (see layers)"
    rows = _layer_rows(table)
    header = [c.strip() for c in next(l for l in table[table.index("\nlayers\n"):].splitlines()
                                      if l.startswith("┃")).split("┃")[1:-1]]
    rope = header.index("rope")
    assert [(r[0], r[3], r[rope]) for r in rows] == [("0-4, 6-10", "MQA sliding", "theta 10000"),
                                                     ("5, 11", "MQA global", "theta 1000000, linear x8")]
    assert [g["rope"] for g in doc["layer_groups"]] == [{"theta": 10000.0, "kind": "default"},
                                                        {"theta": 1e6, "kind": "linear", "factor": 8.0}]
    assert "q/k RMSNorm" in _row(table, "attention")


def _moe_like() -> tuple[str, ModelSpec]:
    """A Qwen2-MoE-shaped spec: a dense first layer, then experts with a gated shared expert."""
    return "", ModelSpec(
        name="moe-like", vocab_size=300, hidden_size=32, intermediate_size=96, num_layers=4, num_heads=4,
        num_kv_heads=4, ffn=FFNType.MOE,
        moe=MoESpec(num_experts=8, top_k=2, intermediate_size=16, normalize=True,
                    shared_expert_intermediate_size=48, shared_expert_gate=True),
        layers=(LayerSpec(ffn=FFNType.GATED),) + tuple(LayerSpec() for _ in range(3)))


def test_inspect_moe(capsys, tmp_path) -> None:
    """FFN kind per layer: dense vs experts with top-k; per-layer counts checked against the formula."""
    _, spec = _moe_like()
    table, doc = _inspect(capsys, _spec_file(tmp_path, spec))
    rows = _layer_rows(table)
    assert [(r[0], r[1], r[5]) for r in rows] == [
        ("0", "1", "gated silu 96"),
        ("1-3", "3", "MoE 8 experts top-2 x 16 silu renormalized + shared 48 gated")]
    h = spec.hidden_size
    attn, norms = 4 * h * h, 2 * h
    dense, moe = 3 * h * 96, h * 8 + 8 * 3 * h * 16 + 3 * h * 48 + h  # router, experts, shared expert, its gate
    assert [g["parameters_each"] for g in doc["layer_groups"]] == [attn + norms + dense, attn + norms + moe]
    assert doc["layer_groups"][1]["ffn"] == {"kind": "moe", "activation": "silu", "num_experts": 8, "top_k": 2,
                                             "expert_intermediate_size": 16, "renormalized": True,
                                             "shared_expert_intermediate_size": 48, "shared_expert_gate": True}
    assert doc["parameters"] == spec.num_parameters() == 2 * 300 * h + h + attn * 4 + norms * 4 + dense + 3 * moe


def _transformers_layer_counts(spec: ModelSpec) -> list[int]:
    """Parameters of each decoder layer of the transformers model the spec's Hugging Face config builds (meta
    device); skips when the family cannot write a config yet."""
    from mlxc.frontends.hf import hf_config_from_spec

    try:
        cfg = hf_config_from_spec(spec)
    except MlxcError as err:
        pytest.skip(f"no Hugging Face config for {spec.name}: {err}")
    config = AutoConfig.for_model(cfg["model_type"], **{k: v for k, v in cfg.items() if k != "model_type"})
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config)
    return [sum(p.numel() for p in layer.parameters()) for layer in model.model.layers]


def _per_layer(doc: dict[str, Any]) -> list[int]:
    counts = [0] * doc["num_layers"]
    for g in doc["layer_groups"]:
        for i in g["layers"]:
            counts[i] = g["parameters_each"]
    return counts


@pytest.mark.parametrize("model_type", ["gemma2", "gemma3_text", "mixtral", "qwen2_moe", "qwen3_moe", "olmoe"])
def test_inspect_presets_per_layer_counts_match_transformers(capsys, model_type: str) -> None:
    """Where these families have landed, every preset's per-layer counts in `inspect` equal transformers' count
    of that layer, and MoE presets show their experts."""
    f = _need_family(model_type)
    if not f.presets:
        pytest.skip(f"family {f.name} has no presets")
    for spec in f.presets:
        if model_type not in ("gemma2", "gemma3_text") or spec.num_layers < 80:
            _, doc = _inspect(capsys, f"preset:{spec.name}")
            assert _per_layer(doc) == _transformers_layer_counts(spec), spec.name
            assert doc["parameters"] == spec.num_parameters()
            if spec.moe is not None:
                assert any(g["ffn"]["kind"] == "moe" and g["ffn"]["top_k"] == spec.moe.top_k
                           for g in doc["layer_groups"])


def test_inspect_heads(capsys, tmp_path) -> None:
    """The head row: sequence classification with its label count, problem type and pooling."""
    cfg = transformers.LlamaConfig(vocab_size=300, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                   num_attention_heads=4, num_key_value_heads=2, num_labels=3, pad_token_id=0,
                                   architectures=["LlamaForSequenceClassification"])
    cfg.save_pretrained(tmp_path)
    table, doc = _inspect(capsys, str(tmp_path))
    assert _row(table, "head") == "sequence classification: 3 labels (single label classification), last-token pooling"
    assert doc["head"]["kind"] == "sequence_classification" and doc["head"]["num_labels"] == 3
    assert _row(table, "family") == "llama (from architectures: LlamaForSequenceClassification)"
    with torch.device("meta"):
        reference = transformers.LlamaForSequenceClassification(cfg)
    assert doc["parameters"] == sum(p.numel() for p in reference.parameters())


def test_inspect_checkpoint_without_metadata(capsys, tmp_path) -> None:
    """A checkpoint whose config names no architecture: inspect reads the tensor names and says so."""
    pytest.importorskip("safetensors")
    from safetensors.torch import save_file

    cfg = transformers.LlamaConfig(vocab_size=64, hidden_size=16, intermediate_size=32, num_hidden_layers=2,
                                   num_attention_heads=2, max_position_embeddings=64)
    model = transformers.LlamaForCausalLM(cfg)
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(tmp_path / "model.safetensors"))
    raw = cfg.to_dict()
    for key in ("architectures", "model_type"):
        raw.pop(key, None)
    (tmp_path / "config.json").write_text(json.dumps(raw))
    table, doc = _inspect(capsys, str(tmp_path))
    assert _row(table, "family").startswith("llama (from tensor names: model.layers.*.")
    assert doc["detected_from"]["via"] == "tensor names"
    assert doc["parameters"] == sum(p.numel() for p in model.parameters())


def test_inspect_output_is_never_wrapped(capsys) -> None:
    """Piped output keeps every row on one line however long (the BLAS path, a notice), and --json is JSON."""
    table, doc = _inspect(capsys, "preset:llama3.1-8b")
    blas = doc["blas"]["path"] or "bundled"
    assert any(blas in line and line.startswith("│ BLAS") for line in table.splitlines())
    assert doc["layer_groups"][0]["ranges"] == "0-31" and doc["parameters"] == PRESETS["llama3.1-8b"].num_parameters()
    assert _row(table, "rope") == "theta 500000, llama3 x8"


def test_layer_ranges() -> None:
    from mlxc.cli.inspect_cmd import layer_ranges

    assert layer_ranges([]) == "none"
    assert layer_ranges([3]) == "3" and layer_ranges([0, 1, 2]) == "0-2"
    assert layer_ranges([5, 11, 17, 23]) == "5-23 every 6th"
    assert layer_ranges([0, 2]) == "0, 2"
    assert layer_ranges([0, 1, 2, 3, 4, 6, 7, 8, 9, 10, 12]) == "0-4, 6-10, 12"
    assert layer_ranges(range(1, 62, 21)) == "1-43 every 21st"
