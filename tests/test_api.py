"""The public API end to end: every kind of source `mlxc.load` accepts, artifacts, dtypes, loss, generation and text.

Small random-weight models throughout (hidden 64, 2 layers, vocab ~300) so the whole file runs in seconds.
"""

from __future__ import annotations

import asyncio
import json
import os
import shutil
import subprocess
import sys
import textwrap
import threading
from pathlib import Path

import numpy as np
import pytest
import yaml

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

import mlx.core as mx  # noqa: E402
from mlx.utils import tree_flatten  # noqa: E402

import mlxc  # noqa: E402

VOCAB = 300
IDS = np.random.default_rng(0).integers(3, VOCAB, size=(2, 12))
SPEC_FIELDS = dict(
    name="spec-model", vocab_size=VOCAB, hidden_size=64, intermediate_size=128, num_layers=2, num_heads=4,
    num_kv_heads=2, max_position_embeddings=128, bos_token_id=1, eos_token_ids=[2],
)


def _llama(vocab: int = VOCAB, seed: int = 0, **overrides):
    config = transformers.LlamaConfig(**{
        **dict(vocab_size=vocab, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
               num_key_value_heads=2, max_position_embeddings=128, rms_norm_eps=1e-5, tie_word_embeddings=False,
               bos_token_id=1, eos_token_id=2, pad_token_id=0),
        **overrides,
    })
    torch.manual_seed(seed)
    model = transformers.LlamaForCausalLM(config).eval()
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():  # larger weights than HF's init so logits are far from zero and differences show
        for name, p in model.named_parameters():
            if name.endswith("norm.weight"):
                p.copy_(1.0 + 0.1 * torch.randn(p.shape, generator=g))
            else:
                p.copy_(0.08 * torch.randn(p.shape, generator=g))
    return model


def _logits(model, ids=IDS) -> np.ndarray:
    return np.array(model(mx.array(ids)).logits.astype(mx.float32))


@pytest.fixture(scope="module")
def hf_model():
    return _llama()


@pytest.fixture(scope="module")
def hf_dir(hf_model, tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("hf")
    hf_model.save_pretrained(path)
    assert (path / "model.safetensors").exists() and (path / "config.json").exists()
    return path


@pytest.fixture(scope="module")
def hf_loaded(hf_dir):
    return mlxc.load(str(hf_dir))


@pytest.fixture(scope="module")
def artifact(hf_dir, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("art") / "model-artifact"
    assert mlxc.compile(str(hf_dir), out) == out
    return out


# ------------------------------------------------------------------------------------------------- sources


def test_hf_dir_matches_transformers(hf_model, hf_loaded):
    with torch.no_grad():
        ref = hf_model(torch.tensor(IDS)).logits.numpy()
    ours = _logits(hf_loaded)
    assert ours.shape == (2, 12, VOCAB)
    assert np.abs(ours - ref).max() <= 1e-4
    assert isinstance(hf_loaded, mlxc.CompiledModel)
    out = hf_loaded(mx.array(IDS))
    assert isinstance(out, mlxc.ModelOutput) and out.loss is None


def test_hf_dir_accepts_path_object_and_1d_ids(hf_dir, hf_loaded):
    model = mlxc.load(hf_dir)
    np.testing.assert_array_equal(_logits(model), _logits(hf_loaded))
    one = np.array(model(IDS[0].tolist()).logits)
    assert one.shape == (1, 12, VOCAB)
    np.testing.assert_allclose(one[0], _logits(hf_loaded)[0], atol=1e-5)


@pytest.mark.parametrize("src", ["preset:tiny", "tiny", "preset:TINY"])
def test_preset(src):
    model = mlxc.load(src)
    assert model.spec.name == "tiny"
    ids = [[1, 2, 3, 4]]
    logits = _logits(model, ids)
    assert logits.shape == (1, 4, 256)
    assert np.isfinite(logits).all()
    np.testing.assert_array_equal(logits, _logits(mlxc.load("preset:tiny"), ids))  # seed 0 both times


def test_load_gives_its_temporaries_back(artifact):
    """What a load frees (blocks read, converted, packed) goes back to the system, not into MLX's buffer cache (or
    glibc's free lists), so a loaded model's resident memory is its weights plus the runtime."""
    for src in ("tiny", artifact):
        mx.clear_cache()
        model = mlxc.load(src)
        assert mx.get_cache_memory() == 0, src
        del model


@pytest.mark.parametrize("suffix", [".yaml", ".yml", ".json"])
def test_spec_file_seeded_random_weights(tmp_path, suffix):
    path = tmp_path / f"model{suffix}"
    path.write_text(json.dumps(SPEC_FIELDS) if suffix == ".json" else yaml.safe_dump(SPEC_FIELDS))
    a = _logits(mlxc.load(path, seed=7))
    b = _logits(mlxc.load(str(path), seed=7))
    c = _logits(mlxc.load(path, seed=8))
    assert a.shape == (2, 12, VOCAB)
    np.testing.assert_array_equal(a, b)
    assert np.abs(a - c).max() > 1e-3
    # init_scale reaches the weights too
    d = _logits(mlxc.load(path, seed=7, init_scale=0.2))
    assert np.abs(a - d).max() > 1e-3


def test_yaml_and_json_spec_files_agree(tmp_path):
    (tmp_path / "m.yaml").write_text(yaml.safe_dump(SPEC_FIELDS))
    (tmp_path / "m.json").write_text(json.dumps(SPEC_FIELDS))
    np.testing.assert_array_equal(_logits(mlxc.load(tmp_path / "m.yaml")), _logits(mlxc.load(tmp_path / "m.json")))


def test_model_spec_object(tmp_path):
    spec = mlxc.ModelSpec(**SPEC_FIELDS)
    model = mlxc.load(spec, seed=3)
    assert model.spec == spec
    (tmp_path / "m.json").write_text(json.dumps(SPEC_FIELDS))
    # the same spec from a file and the same seed gives the same random weights
    np.testing.assert_array_equal(_logits(model), _logits(mlxc.load(tmp_path / "m.json", seed=3)))
    assert np.abs(_logits(model) - _logits(mlxc.load(spec, seed=4))).max() > 1e-3


def test_resolve_kinds(hf_dir, artifact, tmp_path):
    from mlxc.api import SourceKind

    (tmp_path / "s.yaml").write_text(yaml.safe_dump(SPEC_FIELDS))
    assert mlxc.resolve(str(hf_dir)).kind == SourceKind.HF_DIR
    assert mlxc.resolve(artifact).kind == SourceKind.ARTIFACT
    assert mlxc.resolve("preset:tiny").kind == SourceKind.PRESET
    assert mlxc.resolve("tiny").kind == SourceKind.PRESET
    assert mlxc.resolve(tmp_path / "s.yaml").kind == SourceKind.SPEC_FILE
    assert mlxc.resolve(mlxc.ModelSpec(**SPEC_FIELDS)).kind == SourceKind.SPEC
    assert mlxc.resolve("someorg/somemodel").kind == SourceKind.HUB


# ------------------------------------------------------------------------------------------------- artifacts


def test_artifact_contents(artifact):
    names = {p.name for p in artifact.iterdir()}
    assert {"model.py", "program.mlxc", "weights.safetensors", "manifest.json"} <= names
    manifest = json.loads((artifact / "manifest.json").read_text())
    assert manifest["format"] == "mlxc-artifact"
    assert manifest["dtype"] == "f32"  # the IR dtype name
    assert manifest["spec"]["vocab_size"] == VOCAB
    # the stored IR is the program the model runs, and it parses and verifies on its own
    text = (artifact / "program.mlxc").read_text()
    assert mlxc.ir.print_program(mlxc.ir.verify(mlxc.ir.parse_program(text))) == text
    assert text == str(mlxc.load(artifact).program)
    assert text.count("func @main(%input_ids: i32[B, T], %offset: i32[], %logits_to_keep: i32[]) -> f32[B, L, 300] "
                      "state(kv, kv") == 1
    # nothing but the artifact was left next to it (no temporary directories)
    assert [p.name for p in artifact.parent.iterdir()] == [artifact.name]


def test_artifact_loads_identically(artifact, hf_loaded):
    model = mlxc.load(artifact)
    np.testing.assert_array_equal(_logits(model), _logits(hf_loaded))
    assert model.spec == hf_loaded.spec
    assert str(model.program) == str(hf_loaded.program)
    np.testing.assert_array_equal(
        np.array(model.generate(IDS[:1], max_new_tokens=6, stop_tokens=())),
        np.array(hf_loaded.generate(IDS[:1], max_new_tokens=6, stop_tokens=())),
    )


def test_artifact_of_preset_keeps_its_random_weights(tmp_path):
    out = mlxc.compile("preset:tiny", tmp_path / "a", seed=5)
    np.testing.assert_array_equal(_logits(mlxc.load(out), [[1, 2, 3]]), _logits(mlxc.load("tiny", seed=5), [[1, 2, 3]]))


def test_artifact_overwrite(tmp_path):
    out = mlxc.compile("preset:tiny", tmp_path / "a", seed=1)
    mlxc.compile("preset:tiny", out, seed=2, overwrite=True)
    np.testing.assert_array_equal(_logits(mlxc.load(out), [[1, 2]]), _logits(mlxc.load("tiny", seed=2), [[1, 2]]))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a"]


def test_artifact_model_py_runs_standalone(artifact, tmp_path):
    """model.py needs only mlx and numpy: importing mlxc is made impossible in the child process."""
    ids_file, out_file = tmp_path / "ids.npy", tmp_path / "logits.npy"
    np.save(ids_file, IDS.astype(np.int32))
    script = textwrap.dedent(
        f"""
        import importlib.util, sys
        sys.modules["mlxc"] = None  # any `import mlxc...` now raises ImportError
        import mlx.core as mx
        import numpy as np

        spec = importlib.util.spec_from_file_location("standalone_model", {str(artifact / "model.py")!r})
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
        net = module.Model()
        net.load_weights(list(mx.load({str(artifact / "weights.safetensors")!r}).items()), strict=True)
        net.eval()
        logits = net(mx.array(np.load({str(ids_file)!r})), 0)
        np.save({str(out_file)!r}, np.array(logits))
        assert not any(m == "mlxc" or m.startswith("mlxc.") for m in sys.modules if sys.modules[m] is not None)
        """
    )
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    proc = subprocess.run([sys.executable, "-c", script], cwd=tmp_path, env=env, capture_output=True, text=True,
                          timeout=120)
    assert proc.returncode == 0, proc.stderr
    standalone = np.load(out_file)
    # the subprocess runs without mlxc, so without its BLAS preload: same math, different summation order
    np.testing.assert_allclose(standalone, _logits(mlxc.load(artifact)), atol=1e-5, rtol=0)


# ------------------------------------------------------------------------------------------------- async, dtypes, shards


def test_load_async_matches_load(hf_dir, hf_loaded):
    async def main():
        return await mlxc.load_async(str(hf_dir))

    model = asyncio.run(main())
    np.testing.assert_array_equal(_logits(model), _logits(hf_loaded))


def test_load_async_keeps_event_loop_running():
    """While the model loads, the event loop runs other tasks: the load's progress callback waits until a task on
    the loop has run. A load_async that blocked the loop (loading on the loop's own thread) would make that wait
    time out, since the task cannot run until the load returns."""
    loop_ran = threading.Event()
    seen: list[tuple[bool, bool]] = []  # (on the main thread, the loop had run by then) per progress message

    def progress(message: str) -> None:
        seen.append((threading.current_thread() is threading.main_thread(), loop_ran.wait(timeout=0 if seen else 5)))

    async def main():
        async def other_task():
            await asyncio.sleep(0)
            loop_ran.set()

        task = asyncio.create_task(other_task())
        model = await mlxc.load_async("preset:tiny", seed=2, progress=progress)
        await task
        return model

    model = asyncio.run(main())
    assert seen, "load reported no progress"
    assert all(not on_main and ran for on_main, ran in seen), seen
    np.testing.assert_array_equal(_logits(model, [[5, 6]]), _logits(mlxc.load("tiny", seed=2), [[5, 6]]))


@pytest.mark.parametrize("dtype,mx_dtype", [("float16", mx.float16), ("bfloat16", mx.bfloat16)])
def test_half_precision_loads(hf_dir, hf_loaded, dtype, mx_dtype):
    model = mlxc.load(str(hf_dir), dtype)
    params = tree_flatten(model.net.parameters())
    assert params and all(p.dtype == mx_dtype for _, p in params), {n: p.dtype for n, p in params}
    raw = model(mx.array(IDS)).logits
    assert raw.dtype == mx_dtype
    ours, ref = _logits(model), _logits(hf_loaded)
    assert np.isfinite(ours).all()
    scale = np.abs(ref).max()
    tol = 0.03 if dtype == "float16" else 0.1
    assert np.abs(ours - ref).max() <= tol * scale, (np.abs(ours - ref).max(), scale)
    # the same argmax almost everywhere
    assert (ours.argmax(-1) == ref.argmax(-1)).mean() >= 0.8


def test_half_precision_artifact(tmp_path, hf_dir):
    out = mlxc.compile(str(hf_dir), tmp_path / "half", "bfloat16")
    assert json.loads((out / "manifest.json").read_text())["dtype"] == "bf16"
    model = mlxc.load(out)
    assert all(p.dtype == mx.bfloat16 for _, p in tree_flatten(model.net.parameters()))
    np.testing.assert_array_equal(_logits(model), _logits(mlxc.load(str(hf_dir), "bfloat16")))


def test_sharded_checkpoint(hf_model, hf_loaded, tmp_path):
    hf_model.save_pretrained(tmp_path, max_shard_size="50KB")
    index = tmp_path / "model.safetensors.index.json"
    assert index.exists()
    shards = set(json.loads(index.read_text())["weight_map"].values())
    assert len(shards) > 1
    assert not (tmp_path / "model.safetensors").exists()
    np.testing.assert_array_equal(_logits(mlxc.load(str(tmp_path))), _logits(hf_loaded))


def test_tied_embeddings_checkpoint(tmp_path):
    hf = _llama(seed=3, tie_word_embeddings=True)
    hf.save_pretrained(tmp_path)
    with torch.no_grad():
        ref = hf(torch.tensor(IDS)).logits.numpy()
    assert np.abs(_logits(mlxc.load(str(tmp_path))) - ref).max() <= 1e-4


# ------------------------------------------------------------------------------------------------- loss


def _numpy_loss(logits: np.ndarray, labels: np.ndarray, ignore_index: int = -100) -> float:
    logits = logits[:, :-1].astype(np.float64)
    target = labels[:, 1:]
    m = logits.max(-1, keepdims=True)
    logp = logits - m - np.log(np.exp(logits - m).sum(-1, keepdims=True))
    total, count = 0.0, 0
    for b in range(target.shape[0]):
        for t in range(target.shape[1]):
            if target[b, t] == ignore_index:
                continue
            total -= logp[b, t, target[b, t]]
            count += 1
    return total / count


def test_loss_matches_numpy_cross_entropy(hf_loaded):
    out = hf_loaded(mx.array(IDS), labels=mx.array(IDS))
    assert out.loss is not None and out.loss.size == 1
    ref = _numpy_loss(np.array(out.logits), IDS)
    assert out.loss.item() == pytest.approx(ref, rel=1e-5)


def test_loss_ignores_minus_100(hf_loaded):
    labels = IDS.copy()
    labels[0, :5] = -100
    labels[1, 7] = -100
    out = hf_loaded(IDS, labels=labels)
    logits = np.array(out.logits)
    ref = _numpy_loss(logits, labels)
    assert out.loss.item() == pytest.approx(ref, rel=1e-5)
    assert out.loss.item() != pytest.approx(_numpy_loss(logits, IDS), rel=1e-3)  # the mask really changed it
    # labels as python lists work too
    assert hf_loaded(IDS.tolist(), labels=labels.tolist()).loss.item() == pytest.approx(ref, rel=1e-5)


def test_loss_matches_transformers(hf_model, hf_loaded):
    labels = IDS.copy()
    labels[1, :3] = -100
    with torch.no_grad():
        ref = hf_model(torch.tensor(IDS), labels=torch.tensor(labels)).loss.item()
    assert hf_loaded(IDS, labels=labels).loss.item() == pytest.approx(ref, abs=1e-4)


# ------------------------------------------------------------------------------------------------- generation


def test_greedy_generation_is_reproducible(hf_loaded):
    prompt = IDS[:1, :5]
    a = np.array(hf_loaded.generate(prompt, max_new_tokens=8, stop_tokens=()))
    b = np.array(hf_loaded.generate(mx.array(prompt), max_new_tokens=8, stop_tokens=()))
    assert a.shape == (1, 13)
    np.testing.assert_array_equal(a[:, :5], prompt)
    np.testing.assert_array_equal(a, b)
    # greedy means argmax of the full forward's last logits at every step
    seq = a[0].tolist()
    for t in range(5, 13):
        assert int(np.argmax(_logits(hf_loaded, [seq[:t]])[0, -1])) == seq[t]


def test_sampling_with_seed_is_reproducible(hf_loaded):
    prompt = IDS[:1, :5]
    kw = dict(max_new_tokens=10, temperature=1.5, seed=123, stop_tokens=())
    a = np.array(hf_loaded.generate(prompt, **kw))
    b = np.array(hf_loaded.generate(prompt, **kw))
    np.testing.assert_array_equal(a, b)
    others = [np.array(hf_loaded.generate(prompt, **{**kw, "seed": s})) for s in (1, 2, 3)]
    assert any(not np.array_equal(a, o) for o in others)
    assert (a >= 0).all() and (a < VOCAB).all()


def test_stop_tokens_stop_early(hf_loaded):
    prompt = IDS[:1, :5]
    full = np.array(hf_loaded.generate(prompt, max_new_tokens=10, stop_tokens=()))[0, 5:].tolist()
    stop = full[3]
    first = full.index(stop)
    stopped = np.array(hf_loaded.generate(prompt, max_new_tokens=10, stop_tokens=[stop]))[0, 5:].tolist()
    assert stopped == full[: first + 1]  # the stop token is emitted, nothing after it
    assert len(stopped) < 10
    streamed = [int(s[0].item()) for s in hf_loaded.stream(prompt, max_new_tokens=10, stop_tokens=[stop])]
    assert streamed == stopped


def test_default_stop_is_the_checkpoints_eos(hf_model, hf_dir, hf_loaded, tmp_path):
    """The checkpoint's eos_token_id stops generation by default, right after its first occurrence. The eos is
    chosen from an unconstrained run, so it does appear; the reference is transformers' own greedy generate with
    that eos."""
    assert hf_loaded.spec.eos_token_ids == (2,)  # read from config.json
    prompt = IDS[:1, :5]
    free = np.array(hf_loaded.generate(prompt, max_new_tokens=12, stop_tokens=()))[0, 5:].tolist()
    eos = free[4]
    first = free.index(eos)
    # the same weights, with that token declared as the end of sequence
    shutil.copytree(hf_dir, tmp_path / "m")
    config = json.loads((tmp_path / "m" / "config.json").read_text())
    config["eos_token_id"] = eos
    (tmp_path / "m" / "config.json").write_text(json.dumps(config))
    model = mlxc.load(tmp_path / "m")
    assert model.spec.eos_token_ids == (eos,)
    default = np.array(model.generate(prompt, max_new_tokens=12))[0, 5:].tolist()
    assert default == free[: first + 1] and len(default) < 12  # the eos is emitted, nothing after it
    streamed = [int(step[0].item()) for step in model.stream(prompt, max_new_tokens=12)]
    assert streamed == default
    with torch.no_grad():
        ref = hf_model.generate(torch.tensor(prompt), max_new_tokens=12, do_sample=False, eos_token_id=eos,
                                pad_token_id=0)
    assert default == ref[0, 5:].tolist()


def test_stream_yields_what_generate_returns(hf_loaded):
    """One [batch] array per step, max_new_tokens of them when nothing stops it, equal to generate's new tokens, for
    sampling with a seed as for greedy."""
    prompt = IDS[:, :4]
    for kw in (dict(), dict(temperature=0.9, top_p=0.95, seed=11)):
        steps = list(hf_loaded.stream(prompt, max_new_tokens=7, stop_tokens=(), **kw))
        assert len(steps) == 7 and all(step.shape == (2,) for step in steps)
        streamed = np.stack([np.array(step) for step in steps], axis=1)
        generated = np.array(hf_loaded.generate(prompt, max_new_tokens=7, stop_tokens=(), **kw))
        np.testing.assert_array_equal(streamed, generated[:, 4:])


def test_program_and_repr(hf_model, hf_dir, hf_loaded):
    """The program's parameters are the checkpoint's tensors (through the name map), shape for shape; its text
    round-trips; the repr names the class, the source and the generated module."""
    from mlxc.frontends.hf import ir_to_hf_name

    params = {ir_to_hf_name(name): tuple(p.type.shape) for name, p in hf_loaded.program.parameters()}
    assert params == {name: tuple(t.shape) for name, t in hf_model.state_dict().items()}
    text = str(hf_loaded.program)
    assert mlxc.ir.print_program(mlxc.ir.parse_program(text)) == text
    r = repr(hf_loaded)
    assert r.startswith("CompiledModel(") and repr(str(hf_dir)) in r and repr(hf_loaded.module_path) in r


def test_progress_callback_reports_stages():
    messages = []
    mlxc.load("preset:tiny", progress=messages.append)
    assert messages and all(isinstance(m, str) for m in messages)
    assert any("weights" in m for m in messages)


# ------------------------------------------------------------------------------------------------- tokenizer

CHAT_TEMPLATE = (
    "{{ bos_token }}{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
CORPUS = ["hi there, how are you?", "hello world", "the quick brown fox jumps over the lazy dog", "hi hi hi"] * 10


@pytest.fixture(scope="module")
def tok_dir(tmp_path_factory) -> Path:
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    specials = ["<s>", "</s>", "<|im_start|>", "<|im_end|>"]
    trainer = trainers.BpeTrainer(vocab_size=VOCAB, special_tokens=specials,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(CORPUS, trainer)
    size = tok.get_vocab_size()
    assert 260 <= size <= VOCAB
    wrapped = transformers.PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>",
                                                   chat_template=CHAT_TEMPLATE)
    path = tmp_path_factory.mktemp("hf_tok")
    # the model's vocabulary is the tokenizer's, so every sampled id decodes
    _llama(vocab=size, seed=5, eos_token_id=tok.token_to_id("</s>")).save_pretrained(path)
    wrapped.save_pretrained(path)
    assert (path / "tokenizer.json").exists()
    return path


def test_tokenizer_encode_decode(tok_dir):
    model = mlxc.load(str(tok_dir))
    tok = model.tokenizer
    assert tok is not None
    ref = transformers.AutoTokenizer.from_pretrained(tok_dir)
    for text in ("hi there", "hello world!", "unseen wörds 123"):
        ids = tok.encode(text, add_special_tokens=False)
        assert ids == ref.encode(text, add_special_tokens=False)
        assert tok.decode(ids) == text
    assert tok.eos_token_ids == [ref.eos_token_id]


def test_generate_text_chat(tok_dir):
    """The streamed text is transformers' decoding of the tokens generate() picks for the prompt transformers
    templates and encodes. This model's first tokens contain no end of sequence (asserted), so the text compared is
    never empty."""
    model = mlxc.load(str(tok_dir))
    ref = transformers.AutoTokenizer.from_pretrained(tok_dir)
    eos = ref.eos_token_id
    pieces = list(model.generate_text("hi", chat=True, max_new_tokens=5))
    assert all(isinstance(p, str) for p in pieces)
    prompt = ref.apply_chat_template([{"role": "user", "content": "hi"}], add_generation_prompt=True, tokenize=False)
    assert prompt == "<s><|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n"
    assert model.tokenizer.apply_chat_template([{"role": "user", "content": "hi"}], add_generation_prompt=True) == prompt
    ids = ref.encode(prompt, add_special_tokens=False)
    new = np.array(model.generate([ids], max_new_tokens=5))[0, len(ids):].tolist()
    assert len(new) == 5 and eos not in new
    assert "".join(pieces) == ref.decode(new) != ""
    # a raw prompt: the tokenizer's own encoding, no template
    plain = "".join(model.generate_text("hello", max_new_tokens=4))
    hello = ref.encode("hello")
    new = np.array(model.generate([hello], max_new_tokens=4))[0, len(hello):].tolist()
    assert len(new) == 4 and eos not in new
    assert plain == ref.decode(new) != ""


def test_generate_text_stops_at_eos_without_showing_it(tok_dir, tmp_path):
    """With an end-of-sequence token that does occur (chosen from an unconstrained run), the text stops right
    before it: transformers' decoding of the tokens up to it."""
    ref = transformers.AutoTokenizer.from_pretrained(tok_dir)
    model = mlxc.load(str(tok_dir))
    hello = ref.encode("hello")
    free = np.array(model.generate([hello], max_new_tokens=8, stop_tokens=()))[0, len(hello):].tolist()
    stop = free[3]
    first = free.index(stop)
    collected: list[int] = []
    text = "".join(model.stream_text(hello, generated=collected, max_new_tokens=8, stop_tokens=[stop]))
    assert collected == free[: first + 1]  # sampled up to and including the stop token, nothing after
    assert text == ref.decode(free[:first])


def test_artifact_keeps_tokenizer(tok_dir, tmp_path):
    out = mlxc.compile(str(tok_dir), tmp_path / "with-tok")
    assert (out / "tokenizer.json").exists()
    model = mlxc.load(out)
    assert model.tokenizer is not None
    assert model.tokenizer.encode("hi there") == mlxc.load(str(tok_dir)).tokenizer.encode("hi there")
    a = "".join(model.generate_text("hi", chat=True, max_new_tokens=5))
    b = "".join(mlxc.load(str(tok_dir)).generate_text("hi", chat=True, max_new_tokens=5))
    assert a == b != ""
