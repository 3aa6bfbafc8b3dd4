"""The runtime tokenizer must agree with transformers on a tokenizer that transformers itself saved."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from tokenizers import Tokenizer as HFTokenizer
from tokenizers import decoders, models, pre_tokenizers, processors, trainers
from transformers import AutoTokenizer, PreTrainedTokenizerFast

from mlxc.ir.errors import MlxcError
from mlxc.runtime.tokenizer import StreamingDecoder, Tokenizer

CHATML = (
    "{{ bos_token }}"
    "{% for m in messages %}"
    "{% if m['role'] not in ['system', 'user', 'assistant'] %}{{ raise_exception('bad role ' + m['role']) }}{% endif %}"
    "<|im_start|>{{ m['role'] }}\n"
    "{% if m.content is string %}{{ m['content'] }}{% else %}{{ m['content'] | tojson }}{% endif %}"
    "<|im_end|>\n"
    "{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)

CORPUS = [
    "The quick brown fox jumps over the lazy dog.",
    "def add(a, b):\n    return a + b  # 42\n",
    "Grüße aus Köln! Ça va? 日本語のテキストです。",
    "Numbers: 0 1 12 123 1234 3.14159 -7e10",
    "emoji 😀🎉👍🏽 and more 🚀🔥",
    "    indented\t\ttabs\n\n\nnewlines",
] * 20

STRINGS = [
    "hello world",
    "Hello, World!",
    "",
    " ",
    "   leading and trailing spaces   ",
    "multiple     spaces\tand\ttabs",
    "line1\nline2\r\nline3\n\n",
    "123 4567 89012 3.5e-3",
    "def f(x):\n    return {'a': [x, x**2]}\n",
    "for (int i = 0; i < n; ++i) { sum += a[i]; }",
    "Grüße, naïve café — déjà vu",
    "日本語のテキストです。",
    "Привет, мир!",
    "مرحبا بالعالم",
    "emoji 😀🎉 mixed 👍🏽 skin tone 👨‍👩‍👧 family",
    "🚀🔥💯",
    "special <|im_start|>user\nhi<|im_end|> inline",
    "<s>bos inside</s> text",
    "zero\u200bwidth and combining e\u0301",
    "a" * 50,
    "!@#$%^&*()_+-=[]{}|;':\",./<>?`~",
    "mixed 42apples and 7 oranges",
]


@pytest.fixture(scope="module")
def saved(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, PreTrainedTokenizerFast]:
    tok = HFTokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    specials = ["<s>", "</s>", "<|im_start|>", "<|im_end|>", "<pad>"]
    trainer = trainers.BpeTrainer(
        vocab_size=600, special_tokens=specials, initial_alphabet=pre_tokenizers.ByteLevel.alphabet()
    )
    tok.train_from_iterator(CORPUS, trainer)
    tok.post_processor = processors.TemplateProcessing(
        single="<s> $A", pair="<s> $A <s> $B", special_tokens=[("<s>", tok.token_to_id("<s>"))]
    )
    hf = PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token="<s>", eos_token="</s>", pad_token="<pad>", chat_template=CHATML
    )
    out = tmp_path_factory.mktemp("tok")
    hf.save_pretrained(out)
    return out, AutoTokenizer.from_pretrained(out)


def test_saved_layout(saved) -> None:
    path, _ = saved
    # transformers 5 writes the template to its own file, not into tokenizer_config.json
    assert (path / "chat_template.jinja").is_file()
    assert "chat_template" not in json.loads((path / "tokenizer_config.json").read_text())


def test_encode_decode_match_transformers(saved) -> None:
    path, hf = saved
    ours = Tokenizer.from_dir(path)
    assert ours.bos_token_id == hf.bos_token_id
    assert ours.eos_token_ids == [hf.eos_token_id]
    for s in STRINGS:
        for special in (True, False):
            ids = ours.encode(s, add_special_tokens=special)
            assert ids == hf.encode(s, add_special_tokens=special), s
        ids = hf.encode(s)
        for skip in (False, True):
            assert ours.decode(ids, skip_special_tokens=skip) == hf.decode(ids, skip_special_tokens=skip), s
    assert ours.decode(ours.encode("héllo 😀", add_special_tokens=False)) == "héllo 😀"


CONVERSATIONS = [
    [{"role": "user", "content": "Hi there!"}],
    [
        {"role": "system", "content": "You are terse."},
        {"role": "user", "content": "2+2?"},
        {"role": "assistant", "content": "4"},
        {"role": "user", "content": "Grüße 😀 <tag> & 'quotes'"},
    ],
    [{"role": "user", "content": [{"type": "text", "text": "<b>json</b> ü"}]}],  # goes through tojson
    [{"role": "user", "content": "x", "tool_calls": None}],  # None-valued keys are dropped
]


@pytest.mark.parametrize("messages", CONVERSATIONS)
@pytest.mark.parametrize("add_generation_prompt", [True, False])
def test_chat_template_matches_transformers(saved, messages, add_generation_prompt: bool) -> None:
    path, hf = saved
    ours = Tokenizer.from_dir(path)
    want = hf.apply_chat_template(messages, add_generation_prompt=add_generation_prompt, tokenize=False)
    assert ours.apply_chat_template(messages, add_generation_prompt=add_generation_prompt) == want


def test_chat_template_errors(saved) -> None:
    path, _ = saved
    ours = Tokenizer.from_dir(path)
    with pytest.raises(MlxcError, match="bad role tool"):
        ours.apply_chat_template([{"role": "tool", "content": "x"}])
    with pytest.raises(MlxcError, match="empty conversation"):
        ours.apply_chat_template([])
    bare = Tokenizer(ours._tok, bos_token="<s>", eos_token="</s>")
    with pytest.raises(MlxcError, match="no chat template"):
        bare.apply_chat_template([{"role": "user", "content": "x"}])


def test_template_features() -> None:
    """The sandbox extras transformers provides: generation tag, loop controls, namespace, strftime_now."""
    tok = HFTokenizer(models.BPE(vocab={"a": 0, "<s>": 1}, merges=[]))
    template = (
        "{% set ns = namespace(n=0) %}{% for m in messages %}{% if loop.index > 2 %}{% break %}{% endif %}"
        "{% set ns.n = ns.n + 1 %}{% generation %}[{{ m.content }}]{% endgeneration %}{% endfor %}"
        "{{ ns.n }}|{{ strftime_now('%Y') | length }}|{{ {'k': '<é>'} | tojson }}"
    )
    t = Tokenizer(tok, bos_token="<s>", chat_template=template)
    msgs = [{"role": "user", "content": str(i)} for i in range(4)]
    assert t.apply_chat_template(msgs) == '[0][1]2|4|{"k": "<é>"}'


def test_streaming_decoder_matches_full_decode(saved) -> None:
    path, _ = saved
    ours = Tokenizer.from_dir(path)
    text = "".join(STRINGS)
    ids = ours.encode(text, add_special_tokens=False)
    dec = ours.stream_decoder()
    deltas = [dec.add(i) for i in ids]
    deltas.append(dec.flush())
    assert "".join(deltas) == ours.decode(ids) == text
    assert not any("\ufffd" in d for d in deltas)
    # Emoji are split over several byte-level tokens here, so some steps must have held text back.
    assert deltas.count("") > 0
    assert isinstance(dec, StreamingDecoder) and dec.text == text


def test_missing_files(tmp_path: Path) -> None:
    with pytest.raises(MlxcError, match="no tokenizer.json"):
        Tokenizer.from_dir(tmp_path)
    (tmp_path / "tokenizer.json").write_text("{not json")
    with pytest.raises(MlxcError, match="could not load"):
        Tokenizer.from_dir(tmp_path)


def test_generation_config_eos_and_legacy_template(saved, tmp_path: Path) -> None:
    path, _ = saved
    for name in ("tokenizer.json", "tokenizer_config.json"):
        (tmp_path / name).write_bytes((path / name).read_bytes())
    config = json.loads((tmp_path / "tokenizer_config.json").read_text())
    config["chat_template"] = "{{ eos_token }}{{ messages[0]['content'] }}"
    config["eos_token"] = {"content": "</s>", "__type": "AddedToken"}
    (tmp_path / "tokenizer_config.json").write_text(json.dumps(config))
    im_end = Tokenizer.from_dir(path).encode("<|im_end|>", add_special_tokens=False)[0]
    (tmp_path / "generation_config.json").write_text(json.dumps({"eos_token_id": [im_end, 1]}))
    t = Tokenizer.from_dir(tmp_path)
    assert t.apply_chat_template([{"role": "user", "content": "hi"}]) == "</s>hi"
    assert t.eos_token_ids == [t.encode("</s>", add_special_tokens=False)[0], im_end]


def test_bad_special_token() -> None:
    tok = HFTokenizer(models.BPE(vocab={"a": 0}, merges=[]))
    with pytest.raises(MlxcError, match="not in the tokenizer's vocabulary"):
        Tokenizer(tok, eos_token="</s>")


def test_add_bos_token_only_without_post_processor() -> None:
    tok = HFTokenizer(models.BPE(vocab={"a": 0, "<s>": 1, "</s>": 2}, merges=[]))
    assert Tokenizer(tok, bos_token="<s>", add_bos_token=True).encode("aa") == [1, 0, 0]
    assert Tokenizer(tok, bos_token="<s>", eos_token="</s>", add_eos_token=True).encode("a") == [0, 2]
    assert Tokenizer(tok, bos_token="<s>", add_bos_token=True).encode("a", add_special_tokens=False) == [0]
    tok.post_processor = processors.TemplateProcessing(single="$A", special_tokens=[])
    assert Tokenizer(tok, bos_token="<s>", add_bos_token=True).encode("a") == [0]  # post-processor decides
