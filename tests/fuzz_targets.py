"""The fuzz targets the worker (tests/fuzzlib.py) runs: each builds one input from its payload (a seeded mutation of
a real file, or text a test generated) and passes it to the entry point a user would hit. Imported in the worker
process only."""

from __future__ import annotations

import json
import os
import re
import shutil
import struct
from functools import lru_cache
from typing import Callable
from pathlib import Path

import mlx.core as mx

import mlxc
from mlxc import api
from mlxc.api import Source, SourceKind
from fuzzlib import case_rng, flip, gguf_fields, json_text, mutate_gguf, mutate_json, new_int, target

IDS = [[1, 2, 3]]


@lru_cache(maxsize=8)
def _bytes(path: str) -> bytes:
    return Path(path).read_bytes()


@lru_cache(maxsize=8)
def _fields(path: str):
    return gguf_fields(_bytes(path))


def _fresh(name: str) -> Path:
    """An empty scratch directory for one case (the worker runs in its own temporary directory)."""
    d = Path(name)
    shutil.rmtree(d, ignore_errors=True)
    d.mkdir()
    return d


def _evaluate(tensors) -> None:
    """Read every tensor's bytes: a lazily loaded array whose header lied fails here, not at first use."""
    arrays = []
    for t in (tensors or {}).values():
        arrays += [t.codes, t.scales, t.biases] if hasattr(t, "codes") else [t]
    mx.eval(*arrays)


def _forward(model) -> None:
    ids = [[i % model.vocab_size for i in IDS[0]]]
    mx.eval(model(ids).logits)


# ----------------------------------------------------------------------------------------------------------- GGUF


@target("gguf")
def _gguf(p: dict, note) -> None:
    """A whole small GGUF file (SmolLM2's metadata and tensor types, shrunk), mutated; read with its weights, and
    every `load_every`-th case that reads compiled and run."""
    data = bytearray(_bytes(p["base"]))
    fields, end = _fields(p["base"])
    note(mutate_gguf(case_rng(p, "gguf"), data, fields, end))
    path = Path("case.gguf")
    path.write_bytes(data)
    front = api.read_gguf_source(path, weights=True)
    _evaluate(front.tensors)
    if p["case"] % p.get("load_every", 4) == 0:
        _forward(mlxc.load(str(path)))


@target("gguf_header")
def _gguf_header(p: dict, note) -> None:
    """SmolLM2's real header, mutated, in front of its data region (zeros here: a sparse file of the real size);
    read as `mlxc inspect` does: metadata, tensor table, spec and tokenizer."""
    full = _bytes(p["header"])
    fields, end = _fields(p["header"])
    data = bytearray(full[:end])
    note(mutate_gguf(case_rng(p, "gguf_header"), data, [f for f in fields if f.offset < end], end))
    path = Path("case.gguf")
    with open(path, "wb") as f:
        f.write(data)
        f.truncate(max(len(data), p["size"] + len(data) - end))
    api.read_source(Source(SourceKind.GGUF, str(path)), weights=False)


# ---------------------------------------------------------------------------------------------------- safetensors


def mutate_safetensors(rng, data: bytes) -> tuple[bytes, str]:
    """A safetensors file with its header edited as JSON (a tensor's dtype, shape or offsets; entries removed,
    duplicated or added; metadata), its length field changed, bytes flipped, or the file cut short."""
    n = int.from_bytes(data[:8], "little")
    header, body = json.loads(data[8:8 + n]), data[8 + n:]
    names = [k for k in header if k != "__metadata__"]
    r = rng.random()
    what = ""
    if r < 0.6:
        name = rng.choice(names)
        entry = header[name]
        field = rng.choice(["dtype", "shape", "data_offsets", "entry", "delete", "copy", "metadata"])
        if field == "dtype":
            entry["dtype"] = rng.choice(["F32", "F16", "BF16", "I64", "U8", "BOOL", "F64", "C64", "F8_E4M3", "Q4",
                                         "", 7, None])
        elif field == "shape" and entry["shape"]:
            i = rng.randrange(len(entry["shape"]))
            entry["shape"][i] = rng.choice([0, 1, -1, new_int(rng, entry["shape"][i], 64), 2**40, 1.5, "3", None])
            if rng.random() < 0.2:
                entry["shape"] = rng.choice([[], entry["shape"] * 2, [2**32, 2**32], [1] * 40])
        elif field == "data_offsets":
            begin, stop = entry["data_offsets"]
            entry["data_offsets"] = rng.choice([
                [begin, stop + rng.choice([1, 4, -4])], [stop, begin], [begin + 4, stop + 4], [0, stop - begin],
                [begin, len(body) + rng.choice([0, 1, 1 << 20])], [-4, stop], [begin, 2**64], [begin], "x",
                [begin, stop, 0], [float(begin), stop]])
        elif field == "entry":
            header[name] = rng.choice([None, [], "x", 1, {"dtype": "F32"}])
        elif field == "delete":
            del header[name]
        elif field == "copy":
            header[name + ".copy"] = dict(entry)
        else:
            header["__metadata__"] = rng.choice([{"format": 1}, [], "pt", {"a": {"b": 1}}, {"format": "x" * 100}])
        what = f"header: {field} of {name}"
        raw = json.dumps(header).encode()
        length = len(raw)
        if rng.random() < 0.1:
            length = new_int(rng, length, 64)
            what += f"; header length {length}"
        return length.to_bytes(8, "little") + raw + body, what
    out = bytearray(data)
    if r < 0.75:
        new = new_int(rng, n, 64)
        out[:8] = new.to_bytes(8, "little")
        return bytes(out), f"header length {n} -> {new}"
    if r < 0.9:
        return bytes(out), flip(rng, out, 8, 8 + n)
    cut = rng.randrange(len(out))
    return bytes(out[:cut]), f"cut at {cut}"


@target("safetensors")
def _safetensors(p: dict, note) -> None:
    """A tiny transformers checkpoint whose model.safetensors is mutated; read (every tensor evaluated) and, every
    `load_every`-th case that reads, loaded and run."""
    data, what = mutate_safetensors(case_rng(p, "safetensors"), _bytes(str(Path(p["ckpt"]) / "model.safetensors")))
    note(what)
    d = _fresh("ckpt")
    shutil.copy(Path(p["ckpt"]) / "config.json", d / "config.json")
    (d / "model.safetensors").write_bytes(data)
    front = api.read_source(Source(SourceKind.HF_DIR, str(d)))
    _evaluate(front.tensors)
    if p["case"] % p.get("load_every", 4) == 0:
        _forward(mlxc.load(str(d)))


# -------------------------------------------------------------------------------------------------- configs, specs


@target("hf_config")
def _hf_config(p: dict, note) -> None:
    """config.json with odd values (wrong types, huge, negative, NaN, missing keys) beside real weights: the spec and
    program as `mlxc inspect` / `mlxc dump` build them, and a full load for every `load_every`-th case."""
    rng = case_rng(p, "hf_config")
    config = json.loads(_bytes(str(Path(p["ckpt"]) / "config.json")))
    doc, what = mutate_json(rng, config, ("rope_scaling", "sliding_window", "head_dim", "num_key_value_heads",
                                          "tie_word_embeddings", "architectures", "model_type", "layer_types"))
    text, damage = json_text(rng, doc)
    note("; ".join(filter(None, [what, damage])))
    d = _fresh("ckpt")
    (d / "config.json").write_text(text)
    os.symlink(Path(p["ckpt"]).resolve() / "model.safetensors", d / "model.safetensors")
    api.read_source(Source(SourceKind.HF_DIR, str(d)), weights=False)
    api.program_for(str(d))
    if p["case"] % p.get("load_every", 4) == 0:
        _forward(mlxc.load(str(d)))


SPEC_KEYS = ("vocab_size", "hidden_size", "intermediate_size", "num_layers", "num_heads", "num_kv_heads", "head_dim",
             "max_position_embeddings", "norm_eps", "rope", "sliding_window", "layers", "moe", "head", "ffn",
             "activation", "residual", "partial_rotary_factor", "query_scale", "tie_word_embeddings", "eos_token_ids",
             "layer_pattern", "embedding_multiplier", "attn_logit_softcap")


@target("spec")
def _spec(p: dict, note) -> None:
    """A YAML or JSON spec file with odd values: read and lowered, and every `load_every`-th case loaded as
    `mlxc.load(spec)` does (random weights), which must refuse a model too large for the machine before allocating
    it."""
    rng = case_rng(p, "spec")
    base = rng.choice(p["specs"])
    doc, what = mutate_json(rng, json.loads(_bytes(base)), SPEC_KEYS)
    suffix = rng.choice([".json", ".yaml"])
    if suffix == ".json":
        text, damage = json_text(rng, doc)
    else:
        import yaml

        text, damage = yaml.safe_dump(doc), ""
        if rng.random() < 0.1:
            text, damage = rng.choice([("a: &a [*a, *a]\n", "a recursive alias"), (":\n - [", "broken YAML"),
                                       ("x: " + "[" * 10000, "nested 10000 deep"),
                                       ("a: !!python/object/apply:os.system ['true']\n", "a python tag")])
    note(f"{Path(base).name} as {suffix}: " + "; ".join(filter(None, [what, damage])))
    path = Path("case" + suffix)
    path.write_text(text)
    api.program_for(str(path))  # the spec read, checked and lowered (what `mlxc inspect` / `mlxc dump` do)
    if p["case"] % p.get("load_every", 4) == 0:
        _forward(mlxc.load(str(path)))


# ------------------------------------------------------------------------------------------------------- adapters


@target("peft")
def _peft(p: dict, note) -> None:
    """A PEFT LoRA folder with its adapter_config.json or adapter_model.safetensors mutated; read, and every
    `load_every`-th readable case loaded onto its base model."""
    from mlxc.frontends.peft import read_peft_adapter

    rng = case_rng(p, "peft")
    src, d = Path(p["adapter"]), _fresh("adapter")
    config = json.loads(_bytes(str(src / "adapter_config.json")))
    if rng.random() < 0.5:
        doc, what = mutate_json(rng, config, ("r", "lora_alpha", "lora_dropout", "use_rslora", "use_dora", "bias",
                                              "peft_type", "target_modules", "modules_to_save", "rank_pattern"))
        text, damage = json_text(rng, doc)
        (d / "adapter_config.json").write_text(text)
        shutil.copy(src / "adapter_model.safetensors", d / "adapter_model.safetensors")
        note("adapter_config.json: " + "; ".join(filter(None, [what, damage])))
    else:
        data, what = mutate_safetensors(rng, _bytes(str(src / "adapter_model.safetensors")))
        (d / "adapter_model.safetensors").write_bytes(data)
        shutil.copy(src / "adapter_config.json", d / "adapter_config.json")
        note("adapter_model.safetensors: " + what)
    read_peft_adapter(d, "llama")
    if p["case"] % p.get("load_every", 4) == 0:
        _forward(mlxc.load(p["base"], adapter=str(d)))


# ------------------------------------------------------------------------------------------------------ tokenizers


_TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "generation_config.json",
                    "chat_template.json")


@target("tokenizer")
def _tokenizer(p: dict, note) -> None:
    """A tokenizer folder (tokenizer.json and friends) with one file mutated as JSON or damaged, or a chat template
    replaced; loaded, then used to encode, decode and render a conversation."""
    from mlxc.runtime import tokenizer as T
    from mlxc.runtime.tokenizer import Tokenizer

    T.TEMPLATE_SECONDS = p.get("seconds", T.TEMPLATE_SECONDS)
    rng = case_rng(p, "tokenizer")
    src, d = Path(p["dir"]), _fresh("tok")
    for f in src.iterdir():
        shutil.copy(f, d / f.name)
    present = [f for f in _TOKENIZER_FILES if (d / f).exists()]
    name = rng.choice(present + ["chat_template.jinja"])
    if name == "chat_template.jinja":
        text = rng.choice(p["templates"])
        (d / name).write_text(text)
        what = f"chat_template.jinja = {text[:80]!r}"
    else:
        doc, what = mutate_json(rng, json.loads((d / name).read_text()),
                                ("bos_token", "eos_token", "chat_template", "add_bos_token", "eos_token_id",
                                 "added_tokens", "normalizer", "pre_tokenizer", "post_processor", "decoder"))
        text, damage = json_text(rng, doc)
        (d / name).write_text(text)
        what = f"{name}: " + "; ".join(filter(None, [what, damage]))
    note(what)
    tok = Tokenizer.from_dir(d)
    ids = tok.encode("Hello world 123, \u00fcber \u65e5\u672c <|im_start|>")
    tok.decode(ids)
    tok.decode(ids, skip_special_tokens=True)
    if tok.chat_template is not None:
        tok.apply_chat_template([{"role": "user", "content": "hi"}])


@target("template")
def _template(p: dict, note) -> None:
    """One chat template (generated by the test) rendered on a short conversation under the sandbox's limits
    (`seconds` for the time limit, so a runaway loop ends quickly)."""
    from mlxc.runtime import tokenizer as T

    T.TEMPLATE_SECONDS = p.get("seconds", T.TEMPLATE_SECONDS)
    note(repr(p["template"])[:200])
    tok = _template_tokenizer(p["dir"])
    out = tok.apply_chat_template([{"role": "system", "content": "Be brief."}, {"role": "user", "content": "hi"}],
                                  chat_template=p["template"])
    if len(out) > T.TEMPLATE_CHARS:
        raise AssertionError(f"the template rendered {len(out)} characters, past the limit")


@lru_cache(maxsize=1)
def _template_tokenizer(path: str):
    from mlxc.runtime.tokenizer import Tokenizer

    return Tokenizer.from_dir(path)


# -------------------------------------------------------------------------------------------------------------- IR


_IR_TOKEN = re.compile(r"\s+|//[^\n]*|\"(?:[^\"\\]|\\.)*\"|[()\[\]{}<>,=:]|->|[^\s()\[\]{}<>,=:\"]+")


def mutate_ir(rng, text: str) -> tuple[str, str]:
    """Token-level edits of IR text: a token removed, repeated, swapped with another, replaced by an edge number or
    by another token of the program, junk inserted, or the text cut short."""
    toks = _IR_TOKEN.findall(text)
    spots = [i for i, t in enumerate(toks) if not t.isspace()]
    done = []
    for _ in range(rng.choice([1, 1, 2, 3])):
        i = rng.choice(spots)
        r = rng.random()
        if r < 0.2:
            toks[i] = ""
            done.append(f"removed token {i}")
        elif r < 0.35:
            toks[i] = toks[i] + " " + toks[i]
            done.append(f"repeated token {i}")
        elif r < 0.5:
            j = rng.choice(spots)
            toks[i], toks[j] = toks[j], toks[i]
            done.append(f"swapped tokens {i} and {j}")
        elif r < 0.75:
            toks[i] = rng.choice(["0", "-1", "1", "2", "3", "65", "1e400", "-1e400", "nan", "inf", "1.5",
                                  str(2**31), str(2**63), str(10**40), "-0", "1e-300"])
            done.append(f"token {i} -> {toks[i]}")
        elif r < 0.9:
            toks[i] = toks[rng.choice(spots)]
            done.append(f"token {i} -> {toks[i]}")
        else:
            toks[i] += rng.choice(["@", "%", "#rope<", "\"", "\x00", "\u00e9", "{", "func @x() -> f32[] {}", "]"])
            done.append(f"junk after token {i}")
    out = "".join(toks)
    if rng.random() < 0.05:
        out = out[: rng.randrange(len(out) + 1)]
        done.append("cut short")
    return out, "; ".join(done)


def _compile_ir(program) -> None:
    """What loading an artifact does with its program: verify it, then generate (and compile) its module."""
    from mlxc.codegen import generate_module
    from mlxc.ir import verify

    verify(program)
    generate_module(program)


@target("ir_text")
def _ir_text(p: dict, note) -> None:
    from mlxc.ir import parse_program

    if "text" in p:
        text = p["text"]
        note(repr(text)[:200])
    else:
        text, what = mutate_ir(case_rng(p, "ir_text"), _bytes(p["base"]).decode())
        note(f"{Path(p['base']).name}: {what}")
    _compile_ir(parse_program(text))


@target("ir_json")
def _ir_json(p: dict, note) -> None:
    from mlxc.ir.export import from_json

    rng = case_rng(p, "ir_json")
    doc, what = mutate_json(rng, json.loads(_bytes(p["base"])), ("attrs", "type", "name", "op", "format", "version"))
    text, damage = json_text(rng, doc)
    note("; ".join(filter(None, [what, damage])))
    _compile_ir(from_json(text))


# ------------------------------------------------------------------------------------------------------- artifacts


@target("artifact")
def _artifact(p: dict, note) -> None:
    """A compiled artifact with its manifest, program, module or tokenizer files changed; `mlxc.load` (untrusted)
    must refuse or run mlxc's own code, never the changed module."""
    rng = case_rng(p, "artifact")
    src, d = Path(p["artifact"]), _fresh("artifact")
    for f in src.iterdir():
        (os.link if f.name == "weights.safetensors" else shutil.copy)(f, d / f.name)
    choice = rng.choice(["manifest", "manifest", "program", "module", "tokenizer", "weights"])
    if choice == "manifest":
        doc, what = mutate_json(rng, json.loads((d / "manifest.json").read_text()), ("files", "weights_bytes"))
        text, damage = json_text(rng, doc)
        (d / "manifest.json").write_text(text)
        what = "manifest.json: " + "; ".join(filter(None, [what, damage]))
    elif choice == "program":
        text, what = mutate_ir(rng, (d / "program.mlxc").read_text())
        (d / "program.mlxc").write_text(text)
        what = "program.mlxc: " + what
    elif choice == "module":
        (d / "model.py").write_text((d / "model.py").read_text() + "\nraise SystemExit('the module ran')\n")
        what = "model.py: code appended"
    elif choice == "tokenizer" and (d / "tokenizer.json").exists():
        b = bytearray((d / "tokenizer.json").read_bytes())
        what = "tokenizer.json: " + flip(rng, b, 0, len(b))
        (d / "tokenizer.json").write_bytes(bytes(b))
    else:
        data, what = mutate_safetensors(rng, (src / "weights.safetensors").read_bytes())
        os.unlink(d / "weights.safetensors")
        (d / "weights.safetensors").write_bytes(data)
        what = "weights.safetensors: " + what
    trust = choice != "module" and p["case"] % 2 == 1  # trusted, the readers behind the hash check get the input
    note(what + ("; loaded with trust=True" if trust else ""))
    model = mlxc.load(str(d), trust=trust)
    _forward(model)


# ----------------------------------------------------------------------------------------- hypothesis properties
# Generated (not mutated) inputs: hypothesis draws whole structures, run here in the worker so the time limit and
# the memory ceiling bound every example. A property fails (a `crash` outcome, with hypothesis's falsifying example)
# when an example ends in anything but a load or an MlxcError.

PROPERTIES: dict[str, Callable] = {}


def _property(fn):
    PROPERTIES[fn.__name__.removeprefix("_property_")] = fn
    return fn


def _clean(fn, *args) -> None:
    try:
        fn(*args)
    except mlxc.MlxcError as e:
        if not str(e) or "Traceback" in str(e):
            raise AssertionError(f"an MlxcError without a clear message: {e!r}") from None


def _gguf_strategies(st) -> dict:
    """The strategies `_gguf_kv` draws from, built once (building `st.text()` costs far more than drawing from it)."""
    fmts = {0: "B", 1: "b", 2: "H", 3: "h", 4: "I", 5: "i", 6: "f", 7: "?", 10: "Q", 11: "q", 12: "d"}
    scalar = {v: (st.integers(0, 1) if f == "?" else st.integers(0, 127) if f in "Bb" else st.floats(width=32)
                  if f == "f" else st.floats() if f == "d" else st.integers(0, 2 ** (8 * struct.calcsize(f) - 1) - 1))
              for v, f in fmts.items()}
    return {
        "fmts": fmts, "scalar": scalar,
        "key": st.sampled_from(["general.architecture", "llama.block_count", "llama.context_length",
                                "llama.embedding_length", "llama.attention.head_count", "tokenizer.ggml.tokens",
                                "general.alignment", "x"]),
        "vtype": st.sampled_from([0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 2**31]),
        "text": st.text(max_size=20), "u64": st.integers(0, 2**64 - 1), "small": st.integers(0, 4),
        "itype": st.sampled_from([4, 8, 9, 12, 99]), "items": st.binary(max_size=64), "junk": st.binary(max_size=16),
    }


def _gguf_kv(draw, s: dict) -> bytes:
    """One GGUF metadata entry: a key, a value type (sometimes unknown) and a value, or declared lengths that lie."""
    from hypothesis import strategies as st

    key = draw(s["key"])
    vtype = draw(s["vtype"])
    raw = struct.pack("<Q", len(key)) + key.encode() + struct.pack("<I", vtype)
    fmt = s["fmts"].get(vtype)
    if fmt:
        return raw + struct.pack("<" + fmt, draw(s["scalar"][vtype]))
    if vtype == 8:
        text = draw(s["text"]).encode()
        n = draw(st.one_of(st.just(len(text)), s["u64"]))
        return raw + struct.pack("<Q", n) + text
    if vtype == 9:
        itype = draw(s["itype"])
        count = draw(st.one_of(s["small"], s["u64"]))
        return raw + struct.pack("<IQ", itype, count) + draw(s["items"])
    return raw + draw(s["junk"])


@_property
def _property_gguf_header(n: int, seed: int) -> None:
    """A GGUF file drawn field by field: version, counts, metadata entries and tensor infos (dims, types, offsets),
    then a data region; read (weights evaluated) as `mlxc.load` would."""
    from hypothesis import given, settings, strategies as st

    strategies = _gguf_strategies(st)
    u32, u64 = st.integers(0, 2**32 - 1), strategies["u64"]
    versions = st.sampled_from([3, 3, 3, 2, 1, 0, 2**32 - 1])
    names = st.sampled_from(["token_embd.weight", "output_norm.weight", "blk.0.attn_q.weight", "t"])
    dim_lists = st.lists(st.one_of(st.integers(0, 64), u64), max_size=5)
    ttypes = st.sampled_from([0, 1, 2, 3, 8, 12, 14, 30, 39, 2**31])
    offsets = st.one_of(st.sampled_from([0, 32, 64]), u64)
    data = st.binary(max_size=4096)
    arch = struct.pack("<Q", 20) + b"general.architecture" + struct.pack("<IQ", 8, 5) + b"llama"

    @st.composite
    def files(draw):
        version = draw(versions)
        entries = [_gguf_kv(draw, strategies) for _ in range(draw(st.integers(0, 5)))]
        if draw(st.booleans()):
            entries.insert(0, arch)
        tensors = []
        for i in range(draw(st.integers(0, 4))):
            name, dims = draw(names), draw(dim_lists)
            n_dims = draw(st.one_of(st.just(len(dims)), u32))
            tensors.append(struct.pack("<Q", len(name)) + name.encode() + struct.pack("<I", n_dims) +
                           b"".join(struct.pack("<Q", d) for d in dims) +
                           struct.pack("<IQ", draw(ttypes), draw(offsets)))
        n_kv = draw(st.one_of(st.just(len(entries)), u64))
        n_t = draw(st.one_of(st.just(len(tensors)), u64))
        head = b"GGUF" + struct.pack("<IQQ", version, n_t, n_kv) + b"".join(entries) + b"".join(tensors)
        return head + b"\0" * ((-len(head)) % 32) + draw(data)

    @settings(max_examples=n, database=None, deadline=None)
    @given(files())
    def prop(data):
        Path("h.gguf").write_bytes(data)

        def run():
            front = api.read_gguf_source(Path("h.gguf"), weights=True)
            _evaluate(front.tensors)

        _clean(run)

    from hypothesis import seed as hseed

    hseed(seed)(prop)()


@_property
def _property_safetensors_header(n: int, seed: int) -> None:
    """A safetensors file whose header hypothesis writes: any dtypes, shapes (negative, huge, non-integer) and byte
    ranges (overlapping, reversed, past the end) over a data region of any length; checked, then read with mx.load."""
    from hypothesis import given, seed as hseed, settings, strategies as st

    from mlxc.files import check_safetensors

    dims = st.one_of(st.integers(0, 8), st.integers(-2, 2**64), st.sampled_from([1.5, "3", None]))
    entry = st.fixed_dictionaries({
        "dtype": st.sampled_from(["F32", "F16", "BF16", "I32", "I64", "U8", "BOOL", "F64", "F8_E4M3", "Q4", ""]),
        "shape": st.one_of(st.lists(dims, max_size=4), st.none(), st.just("x")),
        "data_offsets": st.one_of(st.lists(st.one_of(st.integers(0, 128), st.integers(-2, 2**64)), min_size=0,
                                           max_size=3), st.just("x")),
    })
    headers = st.dictionaries(st.sampled_from(["a", "b", "model.embed_tokens.weight", "__metadata__"]),
                              st.one_of(entry, st.none(), st.integers(), st.dictionaries(st.text(max_size=3),
                                                                                          st.text(max_size=3))),
                              max_size=4)

    @settings(max_examples=n, database=None, deadline=None)
    @given(headers, st.binary(max_size=256), st.one_of(st.none(), st.integers(0, 2**64 - 1)))
    def prop(header, body, length):
        raw = json.dumps(header).encode()
        Path("h.safetensors").write_bytes((len(raw) if length is None else length).to_bytes(8, "little") + raw
                                          + body)

        def run():
            check_safetensors(Path("h.safetensors"))
            mx.eval(*mx.load("h.safetensors").values())

        _clean(run)

    hseed(seed)(prop)()


_IR_WORDS = ["func", "@main", "@x", "%x", "%0", "%1", "(", ")", "{", "}", "[", "]", "<", ">", ",", ":", "=", "->",
             "return", "f32", "bf16", "i32", "f32[2,3]", "f32[B,T,64]", "i32[B,T]", "linear", "rms_norm", "embed",
             "attention", "add", "reshape", "param", "eps", "1e-5", "0", "-1", "64", "2", "nan", "inf", "\"s\"",
             "#rope<kind=default>", "true", "none", "q4<64>", "state(kv)", "\n", " "]


@_property
def _property_ir_text(n: int, seed: int) -> None:
    """IR text hypothesis writes from the language's own tokens (and around a valid program); parsed, verified and
    generated, as loading an artifact's program.mlxc does."""
    from hypothesis import given, seed as hseed, settings, strategies as st

    from mlxc.ir import parse_program

    valid = Path(__file__).with_name("ir_fixtures") / "llama_decoder.mlxc"
    base = valid.read_text() if valid.is_file() else ""
    soup = st.lists(st.sampled_from(_IR_WORDS), max_size=60).map(" ".join)
    spliced = st.tuples(st.integers(0, len(base)), st.integers(0, 40), soup).map(
        lambda t: base[: t[0]] + t[2] + base[t[0] + t[1]:])

    @settings(max_examples=n, database=None, deadline=None)
    @given(st.one_of(soup, spliced, st.text(max_size=200)))
    def prop(text):
        _clean(lambda: _compile_ir(parse_program(text)))

    hseed(seed)(prop)()


@_property
def _property_spec_mapping(n: int, seed: int) -> None:
    """Spec documents hypothesis writes (any JSON values under the spec's keys); validated, and the model built and
    run when it validates, refusing what would not fit in memory."""
    from hypothesis import given, seed as hseed, settings, strategies as st

    from fuzzlib import BASE_SPECS
    from mlxc.frontends.spec_file import spec_from_mapping

    values = st.recursive(st.one_of(st.none(), st.booleans(), st.integers(-2, 2**70), st.floats(),
                                    st.text(max_size=8)),
                          lambda c: st.one_of(st.lists(c, max_size=3), st.dictionaries(st.text(max_size=6), c,
                                                                                        max_size=3)), max_leaves=6)
    docs = st.tuples(st.sampled_from(BASE_SPECS), st.dictionaries(st.sampled_from(list(SPEC_KEYS)), values,
                                                                  max_size=3))

    @settings(max_examples=n, database=None, deadline=None)
    @given(docs)
    def prop(doc):
        base, changes = doc

        def run():
            spec = spec_from_mapping({**base, **changes}, "drawn spec")
            _forward(mlxc.load(spec))

        _clean(run)

    hseed(seed)(prop)()


@target("property")
def _run_property(p: dict, note) -> None:
    note(f"hypothesis property {p['property']}: {p['examples']} examples, seed {p['seed']}")
    PROPERTIES[p["property"]](p["examples"], p["seed"])
