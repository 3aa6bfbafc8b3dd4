"""Hostile input and interrupted work: a model too large for the machine is refused before anything is allocated,
an artifact whose files were changed is refused unless trusted (API and CLI), chat templates cannot reach Python
or run away, interrupted writes leave the old file or the new one, and nothing mlxc reads is ever unpickled.

The fuzzers (tests/test_fuzz_*.py) throw thousands of damaged inputs at the readers; these are the named cases."""

from __future__ import annotations

import json
import random
import re
import shutil
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

import mlxc
from mlxc import MlxcError
from mlxc.cli import main as cli_main

ROOT = Path(__file__).resolve().parents[1]


def _python(code: str, *args: str, timeout: float = 120) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", textwrap.dedent(code), *args], capture_output=True, text=True,
                          timeout=timeout, cwd=ROOT.parent)


# ---------------------------------------------------------------------------------------------- absurd configs

HUGE = dict(vocab_size=128_000, hidden_size=32_768, intermediate_size=131_072, num_layers=66, num_heads=256,
            num_kv_heads=32)


def _llama_parameters(vocab_size, hidden_size, intermediate_size, num_layers, num_heads, num_kv_heads) -> int:
    """A Llama's parameter count by its definition (untied embedding and head, no biases)."""
    head_dim = hidden_size // num_heads
    attention = 2 * hidden_size * num_heads * head_dim + 2 * hidden_size * num_kv_heads * head_dim
    layer = attention + 3 * hidden_size * intermediate_size + 2 * hidden_size
    return 2 * vocab_size * hidden_size + num_layers * layer + hidden_size


def test_an_absurd_config_is_refused_before_allocation(tmp_path):
    """A spec file asking for ~1e12 parameters: one MlxcError giving the parameter count and the memory needed,
    in a process whose address space is capped at 6 GiB and whose resident peak stays small (nothing allocated)."""
    n = _llama_parameters(**HUGE)
    assert 0.9e12 < n < 1.2e12
    spec = tmp_path / "huge.json"
    spec.write_text(json.dumps({"name": "huge", **HUGE}))
    out = _python("""
        import resource, sys
        resource.setrlimit(resource.RLIMIT_AS, (6 << 30, 6 << 30))
        import mlxc
        try:
            mlxc.load(sys.argv[1])
        except mlxc.MlxcError as e:
            print("refused:", e)
        # VmHWM: this process image's resident peak (ru_maxrss keeps the forking pytest's across exec)
        hwm = [l for l in open("/proc/self/status") if l.startswith("VmHWM:")][0].split()[1]
        print("peak MiB:", int(hwm) // 1024)
    """, str(spec))
    assert out.returncode == 0, out.stderr[-3000:]
    refused = re.search(r"refused: (.*)", out.stdout)
    assert refused, out.stdout + out.stderr[-2000:]
    message = refused.group(1)
    assert f"{n:,} parameters" in message, (n, message)
    assert re.search(r"need \d+(\.\d+)? TiB", message) and "nothing was allocated" in message
    peak = int(re.search(r"peak MiB: (\d+)", out.stdout).group(1))
    assert peak < 1500, f"refusing the model took {peak} MiB resident"


def test_a_model_past_the_address_space_limit_is_refused(tmp_path):
    """Under `ulimit -v` (RLIMIT_AS 3 GiB) a model whose weights fit the machine but not the limit (4.1 GiB) is
    refused by the same check, naming the limit, rather than failing in an allocation (found by hypothesis drawing
    specs in the fuzz worker, which runs under such a limit)."""
    from mlxc.runtime.budget import physical_memory

    if (physical_memory() or 0) < 5 << 30:
        pytest.skip("this machine has too little memory for the address-space limit to be the smaller bound")
    spec = tmp_path / "big.json"
    spec.write_text(json.dumps({"name": "big", "vocab_size": 262_144, "hidden_size": 2048, "intermediate_size": 64,
                                "num_layers": 1, "num_heads": 16}))
    out = _python("""
        import resource, sys
        resource.setrlimit(resource.RLIMIT_AS, (3 << 30, 3 << 30))
        import mlxc
        try:
            mlxc.load(sys.argv[1])
        except mlxc.MlxcError as e:
            print("refused:", e)
    """, str(spec))
    assert out.returncode == 0, out.stderr[-3000:]
    n = _llama_parameters(262_144, 2048, 64, 1, 16, 16)
    want = f"{n:,} parameters ({n:.3g}): its weights need {n * 4 / 2**30:.1f} GiB, more than the 3.0 GiB this " \
           "process may address (ulimit -v); nothing was allocated"
    assert want in out.stdout, out.stdout + out.stderr[-2000:]


def test_an_absurd_layer_count_is_refused(tmp_path):
    spec = tmp_path / "deep.yaml"
    spec.write_text("name: deep\nvocab_size: 64\nhidden_size: 32\nintermediate_size: 64\nnum_layers: 1000000\n"
                    "num_heads: 4\n")
    with pytest.raises(MlxcError, match="num_layers.*1024"):
        mlxc.load(str(spec))


def test_an_absurd_hf_config_is_refused(tmp_path):
    """The same sizes in a transformers config.json beside a small weights file (as mx.save_safetensors writes it,
    `__metadata__: null`): refused for its size before the weights are read, naming the count."""
    import mlx.core as mx

    mx.save_safetensors(str(tmp_path / "model.safetensors"), {"model.embed_tokens.weight": mx.zeros((4, 4))})
    (tmp_path / "config.json").write_text(json.dumps({
        "architectures": ["LlamaForCausalLM"], "model_type": "llama", "vocab_size": HUGE["vocab_size"],
        "hidden_size": HUGE["hidden_size"], "intermediate_size": HUGE["intermediate_size"],
        "num_hidden_layers": HUGE["num_layers"], "num_attention_heads": HUGE["num_heads"],
        "num_key_value_heads": HUGE["num_kv_heads"], "tie_word_embeddings": False}))
    with pytest.raises(MlxcError, match=f"{_llama_parameters(**HUGE):,} parameters"):
        mlxc.load(str(tmp_path))


def test_generation_stops_at_the_context_length():
    """A model with a 32-position context generates up to position 32 and no further (the rope tables and the
    cache end there), refuses a prompt that fills it, and goes on only with a bounded cache (max_kv_size)."""
    import mlx.core as mx

    model = mlxc.load(mlxc.ModelSpec(name="short", vocab_size=64, hidden_size=32, intermediate_size=64, num_layers=1,
                                     num_heads=4, max_position_embeddings=32), seed=0)
    prompt = mx.array([[1, 2, 3, 4, 5, 6, 7, 8, 9, 10]])
    assert model.generate(prompt, max_new_tokens=100, stop_tokens=[]).shape == (1, 32)
    assert len(list(model.stream(prompt, max_new_tokens=100, stop_tokens=[]))) == 22
    with pytest.raises(MlxcError, match="fills the model's context of 32"):
        model.generate(mx.zeros((1, 32), dtype=mx.int32), max_new_tokens=1, stop_tokens=[])
    assert model.generate(prompt, max_new_tokens=40, stop_tokens=[], max_kv_size=16).shape == (1, 50)


def test_a_quantized_vector_in_a_gguf_dequantizes_as_gguf_does(tmp_path):
    """GGUF lets a 1-D tensor (a norm's weight) be stored in blocks; the fuzzer found mx.dequantize refusing one.
    Each block type MLX reads natively, against gguf's own dequantizer."""
    gguf = pytest.importorskip("gguf")
    import numpy as np
    from gguf.quants import dequantize, quantize

    from mlxc.runtime.weights import GGUF_MLX as GGUF_NATIVE, read_gguf_blocks  # the types MLX's reader keeps

    a = np.random.default_rng(0).standard_normal(96).astype(np.float32)
    types = {name: gguf.GGMLQuantizationType[name] for name in GGUF_NATIVE}
    path = tmp_path / "vectors.gguf"
    w = gguf.GGUFWriter(str(path), "llama")
    for name, qtype in types.items():
        w.add_tensor(name.lower(), quantize(a, qtype), raw_dtype=qtype)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    blocks = read_gguf_blocks(path, {name.lower(): GGUF_NATIVE[name] for name in types})
    for name, qtype in types.items():
        got = np.array(blocks[name.lower()].dequantize())
        np.testing.assert_allclose(got, dequantize(quantize(a, qtype), qtype), rtol=0, atol=1e-6, err_msg=name)


@pytest.fixture(scope="module")
def hf_dir(tmp_path_factory):
    """A small transformers-format checkpoint (mlxc export of random weights)."""
    from mlxc.tools.export import export

    spec = mlxc.ModelSpec(name="small", vocab_size=64, hidden_size=32, intermediate_size=64, num_layers=1,
                          num_heads=4)
    return export(spec, tmp_path_factory.mktemp("hf") / "ckpt", random_init=True, seed=0)


DEEP = "[" * 100_000 + "]" * 100_000
FOUND = {  # config.json edits the fuzzers found crashing, and what each must give now (None: it loads)
    "architectures false": ({"architectures": False}, None),
    "architectures empty": ({"architectures": []}, None),
    "architectures a number": ({"architectures": 0.5}, "architectures should be a list"),
    "hidden_act an object": ({"hidden_act": {"type": "linear"}}, "unsupported hidden_act"),
    "nested too deep": ({"transformers_version": DEEP}, "nested too deep"),
}


@pytest.mark.parametrize("case", list(FOUND))
def test_what_the_fuzzers_found(hf_dir, tmp_path, case):
    edit, error = FOUND[case]
    d = tmp_path / "ckpt"
    shutil.copytree(hf_dir, d)
    config = json.loads((d / "config.json").read_text())
    text = json.dumps({**config, **edit})
    (d / "config.json").write_text(text.replace(json.dumps(DEEP), DEEP))
    if config.get("model_type") is None and "architectures" in edit:
        pytest.skip("the exported config names no model_type to detect the family by")
    if error is None:
        mlxc.load(str(d))
    else:
        with pytest.raises(MlxcError, match=error):
            mlxc.load(str(d))


# -------------------------------------------------------------------------------------------- tampered artifacts

MARKER = "mlxc-tamper-marker"


@pytest.fixture(scope="module")
def artifact(tmp_path_factory):
    root = tmp_path_factory.mktemp("artifact")
    return mlxc.compile("preset:tiny", root / "art", random_init=True, seed=3)


def _copy(artifact, tmp_path, name="copy") -> Path:
    d = tmp_path / name
    shutil.copytree(artifact, d)
    return d


def _plant(d: Path, marker: Path) -> None:
    """Code appended to model.py that leaves a file behind when it runs."""
    with open(d / "model.py", "a") as f:
        f.write(f"\nopen({str(marker)!r}, 'w').write('ran')\n")


def _rehash(d: Path) -> None:
    """What a careful attacker does next: make the manifest's hashes match the changed files."""
    from mlxc.runtime.artifact import file_sha256

    manifest = json.loads((d / "manifest.json").read_text())
    manifest["files"] = {name: file_sha256(d / name) for name in manifest["files"]}
    manifest["weights_bytes"] = (d / "weights.safetensors").stat().st_size
    (d / "manifest.json").write_text(json.dumps(manifest))


def test_a_tampered_module_is_refused_and_runs_only_when_trusted(artifact, tmp_path):
    marker = tmp_path / MARKER
    d = _copy(artifact, tmp_path)
    _plant(d, marker)
    with pytest.raises(MlxcError, match=r"model\.py was changed.*--trust"):
        mlxc.load(str(d))
    assert not marker.exists()
    mlxc.load(str(d), trust=True)
    assert marker.read_text() == "ran"  # trusted: the artifact's own module is what runs


def test_a_rehashed_tampered_module_never_runs_untrusted(artifact, tmp_path):
    """Hashes that match prove nothing about who wrote them: untrusted, mlxc runs the module it generates from the
    program, so the planted code stays inert and the model still computes what the original does."""
    import mlx.core as mx
    import numpy as np

    marker = tmp_path / MARKER
    d = _copy(artifact, tmp_path)
    _plant(d, marker)
    _rehash(d)
    model = mlxc.load(str(d))
    assert not marker.exists()
    ids = mx.array([[1, 2, 3, 4]])
    np.testing.assert_array_equal(np.array(model(ids).logits), np.array(mlxc.load(str(artifact))(ids).logits))


def test_a_manifest_spec_that_does_not_validate_is_one_line(artifact, tmp_path):
    """An artifact from another mlxc version (or an edited one) whose stored spec this version rejects: one line
    naming each bad field, and what to do."""
    d = _copy(artifact, tmp_path)
    manifest = json.loads((d / "manifest.json").read_text())
    manifest["spec"]["hidden_size"], manifest["spec"]["num_layers"] = -4, "two"
    (d / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(MlxcError) as e:
        mlxc.load(str(d))
    message = str(e.value)
    assert "\n" not in message and "hidden_size:" in message and "num_layers:" in message
    assert "recompile" in message


@pytest.mark.parametrize("change", ["append", "truncate"])
def test_a_tampered_weights_file_is_refused_unless_trusted(artifact, tmp_path, change):
    d = _copy(artifact, tmp_path)
    w = d / "weights.safetensors"
    data = w.read_bytes()
    w.write_bytes(data + b"\0" * 64 if change == "append" else data[:-64])
    with pytest.raises(MlxcError, match=r"weights\.safetensors has \d+ bytes, not the \d+.*--trust"):
        mlxc.load(str(d))
    if change == "append":  # trusted, trailing bytes are harmless: it loads
        mlxc.load(str(d), trust=True)
    else:  # trusted, the file is still checked against its own header: a clear error, nothing read past the end
        with pytest.raises(MlxcError, match="weights.safetensors"):
            mlxc.load(str(d), trust=True)


@pytest.mark.parametrize("name", ["program.mlxc", "manifest.json"])
def test_other_tampered_files_are_refused(artifact, tmp_path, name):
    d = _copy(artifact, tmp_path)
    if name == "program.mlxc":
        (d / name).write_text((d / name).read_text().replace("return", "return  ", 1))
        match = "program.mlxc was changed"
    else:
        manifest = json.loads((d / name).read_text())
        manifest["files"] = {}
        (d / name).write_text(json.dumps(manifest))
        match = "records no file hashes"
    with pytest.raises(MlxcError, match=match):
        mlxc.load(str(d))


def _cli(capsys, *argv) -> tuple[int, str]:
    try:
        code = cli_main(list(argv))
    except SystemExit as e:
        code = e.code
    captured = capsys.readouterr()
    return code, captured.out + captured.err


@pytest.mark.parametrize("command", [["run", "{d}", "--tokens", "1,2", "--max-tokens", "2"],
                                     ["diff", "{d}", "{a}", "--tokens", "1,2,3"],
                                     ["bench", "{d}", "--prompt-len", "4", "--gen-len", "2", "--repeats", "1"]])
def test_cli_trust_flag(artifact, tmp_path, capsys, command):
    """Every command that runs an artifact refuses a changed one with one clear line, and takes --trust."""
    marker = tmp_path / MARKER
    d = _copy(artifact, tmp_path)
    _plant(d, marker)
    argv = [a.format(d=d, a=artifact) for a in command]
    code, out = _cli(capsys, *argv)
    assert code not in (0, None) and "model.py was changed" in out and "--trust" in out, out
    assert "Traceback" not in out and not marker.exists()
    code, out = _cli(capsys, *argv, "--trust")
    assert code == 0, out
    assert marker.read_text() == "ran"


@pytest.mark.parametrize("argv", [["run", "preset:tiny", "--random-init", "--tokens", "1", "--trust"],
                                  ["diff", "preset:tiny", "preset:tiny", "--tokens", "1", "--trust"]])
def test_trust_is_refused_where_it_cannot_apply(capsys, argv):
    """--trust vouches for an artifact's own files; for any other source mlxc generates the code, so it is refused,
    not silently ignored."""
    code, out = _cli(capsys, *argv)
    assert code not in (0, None) and "--trust" in out and "artifact" in out and "Traceback" not in out, out


def test_cli_refuses_changed_weights_unless_trusted(artifact, tmp_path, capsys):
    d = _copy(artifact, tmp_path)
    with open(d / "weights.safetensors", "ab") as f:
        f.write(b"\0" * 64)
    code, out = _cli(capsys, "run", str(d), "--tokens", "1,2", "--max-tokens", "2")
    assert code == 1 and "weights.safetensors has" in out and "--trust" in out and "Traceback" not in out, out
    code, out = _cli(capsys, "run", str(d), "--tokens", "1,2", "--max-tokens", "2", "--trust")
    assert code == 0, out


# --------------------------------------------------------------------------------------------- chat templates


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory):
    """A small word-level tokenizer (tokenizers' own classes) with a ChatML template."""
    from tokenizers import Tokenizer as HFTokenizer, models, pre_tokenizers

    from mlxc.runtime.tokenizer import Tokenizer

    d = tmp_path_factory.mktemp("tok")
    vocab = {w: i for i, w in enumerate(["<unk>", "<s>", "</s>", "hi", "Be", "brief."])}
    hf = HFTokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    hf.pre_tokenizer = pre_tokenizers.Whitespace()
    hf.save(str(d / "tokenizer.json"))
    (d / "tokenizer_config.json").write_text(json.dumps({"bos_token": "<s>", "eos_token": "</s>"}))
    return Tokenizer.from_dir(d)


CONVERSATION = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "hi"}]


def test_a_plain_template_renders_as_jinja_does(tokenizer):
    import jinja2

    template = "{% for m in messages %}<|{{ m.role }}|>{{ m.content | trim }}\n{% endfor %}{{ bos_token }}"
    want = jinja2.Environment().from_string(template).render(messages=CONVERSATION, bos_token="<s>")
    assert tokenizer.apply_chat_template(CONVERSATION, chat_template=template) == want


ESCAPES = [
    "{{ ''.__class__.__mro__[1].__subclasses__() }}",
    "{{ cycler.__init__.__globals__.os.system('touch " + MARKER + "') }}",
    "{{ joiner.__init__.__globals__['__builtins__']['open']('" + MARKER + "', 'w') }}",
    "{{ lipsum.__globals__['os'].system('touch " + MARKER + "') }}",
    "{{ messages.__class__.__base__.__subclasses__() }}",
    "{{ self._TemplateReference__context }}",
    "{{ '{0.__class__.__mro__}'.format('') }}",
    "{{ messages.append(1) }}",
]


@pytest.mark.parametrize("template", ESCAPES)
def test_a_template_cannot_reach_python(tokenizer, tmp_path, monkeypatch, template):
    monkeypatch.chdir(tmp_path)
    try:
        out = tokenizer.apply_chat_template(CONVERSATION, chat_template=template)
    except MlxcError as e:
        assert "chat template" in str(e) and "Traceback" not in str(e)
    else:  # jinja's sandbox may also render an unsafe lookup as undefined (empty)
        assert "class" not in out and "function" not in out and "module" not in out, out
    assert not (tmp_path / MARKER).exists()


RUNAWAYS = {
    "nested loops": "{% for i in range(100000) %}{% for j in range(100000) %}{{ i }}{% endfor %}{% endfor %}",
    "recursion": "{% macro f(n) %}{{ f(n) }}{% endmacro %}{{ f(1) }}",
    "doubling": "{% macro f(s) %}{{ f(s ~ s) }}{% endmacro %}{{ f('ab') }}",
    "repetition": "{{ 'x' * 1000000000 }}",
    "list repetition": "{{ ['x'] * 1000000000 }}",
    "padding": "{{ 'x' | center(2000000000) }}",
    "format width": "{{ '{:>2000000000}'.format('x') }}",
    "power": "{{ 2 ** 100000000 }}",
    "output": "{% for i in range(100000) %}{{ 'x' * 1000 }}{% endfor %}",
}


@pytest.mark.parametrize("name", list(RUNAWAYS))
def test_a_runaway_template_is_stopped(tokenizer, monkeypatch, name):
    """Loops, recursion and huge strings end in one MlxcError within the deadline (1 s here), not a hang."""
    from mlxc.runtime import tokenizer as T

    monkeypatch.setattr(T, "TEMPLATE_SECONDS", 1.0)
    monkeypatch.setattr(T, "TEMPLATE_CHARS", 1 << 20)
    start = time.monotonic()
    with pytest.raises(MlxcError, match="chat template"):
        tokenizer.apply_chat_template(CONVERSATION, chat_template=RUNAWAYS[name])
    assert time.monotonic() - start < 10


# --------------------------------------------------------------------------------------------- interrupted writes

WRITER = """
import faulthandler, os, signal, sys
from pathlib import Path
faulthandler.register(signal.SIGUSR1, all_threads=True)  # the test asks for stacks if the writer does not stop
import mlx.core as mx
from mlx.utils import tree_flatten, tree_unflatten
import mlxc
from mlxc.passes import LoRAConfig
from mlxc.tools.export import export

root = Path(sys.argv[1])
spec = mlxc.ModelSpec(name="w", vocab_size=4096, hidden_size=256, intermediate_size=512, num_layers=2, num_heads=4)
model = mlxc.load(spec, lora=LoRAConfig(rank=4, alpha=8, targets=("q_proj", "v_proj")), seed=0)
lora = [n for n, _ in tree_flatten(model.net.parameters()) if ".lora_" in n]

def adapter(v):
    model.net.update(tree_unflatten([(n, mx.full(a.shape, v + 1.0)) for n, a in tree_flatten(model.net.parameters())
                                     if n in lora]))
    return model

def write(kind, v, out):
    if kind == "compile":
        mlxc.compile(spec, out, random_init=True, seed=v, overwrite=True)
    elif kind == "export":
        export(spec, out, random_init=True, seed=v, overwrite=True)
    else:
        mlxc.save_adapter(adapter(v), out)

kinds = ("compile", "export", "adapter")
for kind in kinds:  # the two complete versions to compare against (the first writer makes them)
    for v in (0, 1):
        if not (root / f"ref-{kind}-{v}").exists():
            write(kind, v, root / f"ref-{kind}-{v}")
print("ready", flush=True)
i = 0
while True:
    for kind in kinds:
        write(kind, i % 2, root / kind)
    i += 1
"""


def _tree(d: Path) -> dict[str, bytes]:
    return {str(p.relative_to(d)): p.read_bytes() for p in sorted(d.rglob("*")) if p.is_file()}


def _state(root: Path) -> list:
    """What the destinations hold, cheaply: every file's name, size and modification time."""
    out = []
    for kind in ("compile", "export", "adapter"):
        for p in sorted((root / kind).rglob("*")):
            try:
                st = p.stat()
            except OSError:  # replaced while listed
                return [None]
            out.append((str(p), st.st_size, st.st_mtime_ns))
    return out


def _leftovers(root: Path) -> list[str]:
    return [p.name for p in root.iterdir() if ".mlxc-" in p.name]


def test_interrupted_writes_leave_old_or_new(tmp_path):
    """A process compiling, exporting and saving an adapter in a loop (two alternating versions of each) is killed
    (SIGKILL or SIGINT) at random moments, half of them just after a write's temporary appeared: every destination
    then holds one complete version, byte for byte, and the next write sweeps the dead writer's temporaries."""
    rng = random.Random(7)
    seen, interrupted = set(), 0
    for round_ in range(4):
        proc = subprocess.Popen([sys.executable, "-c", WRITER, str(tmp_path)], stdout=subprocess.PIPE,
                                stderr=subprocess.PIPE, text=True, cwd=ROOT.parent)
        sig = signal.SIGKILL if round_ % 2 == 0 else signal.SIGINT
        try:
            line = proc.stdout.readline()
            assert line.strip() == "ready", proc.stderr.read()[-3000:]
            if round_ < 2:  # mid-write: as soon as a temporary sibling exists or a destination changes
                before, deadline = _state(tmp_path), time.monotonic() + 60
                while not _leftovers(tmp_path) and _state(tmp_path) == before and time.monotonic() < deadline:
                    time.sleep(0.0005)
                time.sleep(rng.uniform(0, 0.005))
            else:
                time.sleep(rng.uniform(0.05, 1.5))
            proc.send_signal(sig)
            try:
                proc.wait(timeout=60)
            except subprocess.TimeoutExpired:
                proc.send_signal(signal.SIGUSR1)
                time.sleep(2)
                proc.kill()
                pytest.fail(f"round {round_}: the writer did not stop within 60 s of {sig.name}; its threads:\n"
                            f"{proc.communicate()[1][-6000:]}")
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
        interrupted += sig == signal.SIGKILL and bool(_leftovers(tmp_path))
        for kind in ("compile", "export", "adapter"):
            dest = tmp_path / kind
            if not dest.exists():
                continue  # killed before its first write finished
            got = _tree(dest)
            versions = [v for v in (0, 1) if got == _tree(tmp_path / f"ref-{kind}-{v}")]
            assert versions, f"round {round_}: {kind} holds a mix of versions or a partial write: {sorted(got)}"
            seen.add((kind, versions[0]))
    assert len(seen) >= 2, seen  # the kills landed at different points
    assert interrupted, "no SIGKILL landed during a write (nothing was left to sweep): the test proved nothing"
    # the next write to each destination sweeps what the killed writers left behind
    from mlxc.files import write_text_atomic

    out = _python(WRITER.split("kinds = ")[0] + textwrap.dedent("""
        for kind in ("compile", "export", "adapter"):
            write(kind, 0, root / kind)
    """), str(tmp_path))
    assert out.returncode == 0, out.stderr[-3000:]
    write_text_atomic(tmp_path / "x.txt", "x")
    assert not _leftovers(tmp_path), _leftovers(tmp_path)


# -------------------------------------------------------------------------------------------------- no pickles


def test_nothing_is_unpickled():
    """No reader mlxc ships can run code stored in a file: no pickle, no torch.load without weights_only, no
    np.load that allows pickles, no unsafe YAML, and transformers (the reference of `mlxc diff`) reads safetensors
    only."""
    bad = []
    for path in ROOT.rglob("*.py"):
        rel = path.relative_to(ROOT)
        if rel.parts[0] in ("tests", "build") or ".egg-info" in str(rel):
            continue
        text = path.read_text(encoding="utf-8")
        if ".from_pretrained(" in text and "use_safetensors" not in text and rel.parts[0] != "benchmarks":
            # transformers would read a .bin pickle (the benchmarks load the models they name, not what a user gives)
            bad.append(f"{rel}: from_pretrained without use_safetensors")
        for i, line in enumerate(text.splitlines(), 1):
            code = line.split("#")[0]
            if re.search(r"\b(c?pickle|marshal|shelve|dill|joblib)\b", code) \
                    or ("torch.load(" in code and "weights_only=True" not in code) \
                    or ("np.load(" in code and "allow_pickle=False" not in code) \
                    or "allow_pickle=True" in code or "yaml.load(" in code or "yaml.unsafe_load" in code:
                bad.append(f"{rel}:{i}: {line.strip()}")
    assert not bad, "\n".join(bad)
