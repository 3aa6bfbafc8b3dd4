"""The generation loop, driven by a toy bigram "model" that still goes through a real KV cache."""

from __future__ import annotations

import mlx.core as mx
import numpy as np
import pytest

from mlxc.ir.errors import MlxcError
from mlxc.runtime.cache import KVCache
from mlxc.runtime.generate import generate, generate_stream
from mlxc.runtime.sampling import SamplingParams

V = 23
TABLE = np.random.default_rng(0).standard_normal((V, V)).astype(np.float32) * 4


class Bigram:
    """Logits for the next token depend only on the current one; the cache records what was fed, like a model's."""

    def __init__(self) -> None:
        self.calls: list[int] = []  # tokens fed per call

    def __call__(self, ids: mx.array, cache: list) -> mx.array:
        self.calls.append(ids.shape[1])
        x = ids.astype(mx.float32)[:, None, :, None]  # [B, 1, t, 1] stands in for keys/values
        cache[0].update_and_fetch(x, x)
        return mx.array(TABLE)[ids]


def _reference_greedy(prompt: list[list[int]], n: int) -> np.ndarray:
    out = [list(p) for p in prompt]
    for _ in range(n):
        for row in out:
            row.append(int(np.argmax(TABLE[row[-1]])))
    return np.array(out)


def test_greedy_matches_reference_loop() -> None:
    prompt = [[1, 5, 7], [2, 2, 9]]
    model, cache = Bigram(), [KVCache()]
    out = generate(model, mx.array(prompt), cache, 10, SamplingParams(), vocab_size=V)
    np.testing.assert_array_equal(np.array(out), _reference_greedy(prompt, 10))
    assert model.calls == [3] + [1] * 9  # one prefill, then single-token decode steps
    assert cache[0].offset == 3 + 9  # the last token is never fed
    keys, _ = cache[0].state
    np.testing.assert_array_equal(np.array(keys)[:, 0, :, 0], np.array(out)[:, :-1])


def test_stream_yields_tokens_and_accepts_lists() -> None:
    toks = list(generate_stream(Bigram(), [4, 8], [KVCache()], 5, SamplingParams()))
    assert all(t.shape == (1,) and t.dtype == mx.int32 for t in toks)
    np.testing.assert_array_equal(np.concatenate([np.array(t) for t in toks]), _reference_greedy([[4, 8]], 5)[0, 2:])


@pytest.mark.parametrize("pad", [0, None])
def test_stop_tokens_end_the_batch_and_pad_finished_rows(pad: int | None) -> None:
    prompt = [[1], [2]]
    ref = _reference_greedy(prompt, 12)[:, 1:]
    stop = int(ref[0, 2])  # row 0 emits this at step 3; row 1 may or may not
    hits = [int(np.argmax(r == stop)) if stop in r else None for r in ref]
    last = max(h if h is not None else 11 for h in hits)

    spare = next(i for i in range(V) if i not in ref)  # a second stop id that never comes up
    model, cache = Bigram(), [KVCache()]
    out = np.array(generate(model, prompt, cache, 12, SamplingParams(stop_tokens=(stop, spare)), pad_token_id=pad))
    assert out.shape == (2, 1 + last + 1)
    for row, h in enumerate(hits):
        gen = out[row, 1:]
        end = len(gen) if h is None else h + 1
        np.testing.assert_array_equal(gen[:end], ref[row, :end])
        assert (gen[end:] == (stop if pad is None else pad)).all()  # padded after stopping
    assert out.shape[1] - 1 > min(hits) + 1  # one row really did keep going after the other stopped
    # The speculative step queued past the final token is undone, so the cache ends right before it.
    assert cache[0].offset == out.shape[1] - 1


def test_stop_token_single_sequence_repeats_nothing_after_stop() -> None:
    ref = _reference_greedy([[3]], 8)[0, 1:]
    stop = int(ref[4])
    first = int(np.argmax(ref == stop))
    out = np.array(generate(Bigram(), [[3]], [KVCache()], 8, SamplingParams(stop_tokens=(stop,))))
    np.testing.assert_array_equal(out[0, 1:], ref[: first + 1])


def test_consumer_can_stop_early_and_cache_stays_consistent() -> None:
    cache = [KVCache()]
    stream = generate_stream(Bigram(), [[1, 2, 3]], cache, 50, SamplingParams())
    got = [next(stream) for _ in range(4)]
    stream.close()
    assert cache[0].offset == 3 + len(got) - 1


def test_seeded_sampling_reproducible_and_penalty_changes_output() -> None:
    p = SamplingParams(temperature=1.0, top_k=5, seed=11)
    a = np.array(generate(Bigram(), [[1, 2]], [KVCache()], 15, p))
    b = np.array(generate(Bigram(), [[1, 2]], [KVCache()], 15, p))
    np.testing.assert_array_equal(a, b)
    greedy = np.array(generate(Bigram(), [[1]], [KVCache()], 15, SamplingParams()))
    penal = np.array(generate(Bigram(), [[1]], [KVCache()], 15, SamplingParams(repetition_penalty=5.0)))
    assert len(set(penal[0].tolist())) > len(set(greedy[0].tolist()))


def test_zero_new_tokens_returns_prompt() -> None:
    cache = [KVCache()]
    out = generate(Bigram(), [[1, 2]], cache, 0, SamplingParams())
    np.testing.assert_array_equal(np.array(out), [[1, 2]])
    assert cache[0].offset == 0


@pytest.mark.parametrize(
    "prompt,kwargs,match",
    [
        ([[1, V]], {"vocab_size": V}, f"token id {V} out of range for vocabulary of {V}"),
        ([[1, -1]], {"vocab_size": V}, f"token id -1 out of range for vocabulary of {V}"),
        ([[1, 30]], {}, f"token id 30 out of range for vocabulary of {V}"),  # checked against the logits
        ([[]], {}, "prompt is empty"),
        ([], {}, "prompt is empty"),
        ([[1, 2], [3]], {}, "rectangular"),
        ([[1.5]], {}, "integers"),
    ],
)
def test_bad_prompts(prompt, kwargs: dict, match: str) -> None:
    with pytest.raises(MlxcError, match=match):
        generate(Bigram(), prompt, [KVCache()], 3, SamplingParams(), **kwargs)


def test_bad_max_new_tokens() -> None:
    with pytest.raises(MlxcError, match="max_new_tokens"):
        generate(Bigram(), [[1]], [KVCache()], -1, SamplingParams())
