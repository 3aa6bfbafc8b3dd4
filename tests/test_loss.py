"""runtime/loss.py against torch's cross_entropy and transformers' causal-LM loss; pack_sequences properties."""

import mlx.core as mx
import numpy as np
import pytest
import torch
import torch.nn.functional as F

from mlxc.ir.errors import MlxcError
from mlxc.runtime import model as model_mod
from mlxc.runtime.loss import IGNORE_INDEX, causal_lm_loss, cross_entropy, pack_sequences


def _case(seed, shape, V, ignore_frac=0.3, ignore_index=-100):
    rng = np.random.default_rng(seed)
    logits = (rng.standard_normal((*shape, V)) * 3).astype(np.float32)
    targets = rng.integers(0, V, size=shape).astype(np.int64)
    targets[rng.random(shape) < ignore_frac] = ignore_index
    mask = rng.random(shape) < 0.7
    return logits, targets, mask


def _torch_ce(logits, targets, ignore_index, label_smoothing, reduction):
    V = logits.shape[-1]
    out = F.cross_entropy(torch.from_numpy(logits).reshape(-1, V), torch.from_numpy(targets).reshape(-1),
                          ignore_index=ignore_index, label_smoothing=label_smoothing, reduction=reduction)
    return out.reshape(targets.shape).numpy() if reduction == "none" else out.item()


@pytest.mark.parametrize("V", [2, 7, 50, 257])
@pytest.mark.parametrize("label_smoothing", [0.0, 0.1, 0.5])
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
def test_cross_entropy_matches_torch(V, label_smoothing, reduction):
    logits, targets, mask = _case(V, (3, 11), V)
    ours = cross_entropy(mx.array(logits), mx.array(targets), label_smoothing=label_smoothing, reduction=reduction)
    ref = _torch_ce(logits, targets, -100, label_smoothing, reduction)
    np.testing.assert_allclose(np.array(ours), ref, rtol=1e-5, atol=1e-5)

    # mask excludes positions exactly like ignore_index does
    masked = np.where(mask, targets, -100)
    ours = cross_entropy(mx.array(logits), mx.array(targets), label_smoothing=label_smoothing, reduction=reduction,
                         mask=mx.array(mask))
    ref = _torch_ce(logits, masked, -100, label_smoothing, reduction)
    np.testing.assert_allclose(np.array(ours), ref, rtol=1e-5, atol=1e-5)
    ours01 = cross_entropy(mx.array(logits), mx.array(targets), label_smoothing=label_smoothing,
                           reduction=reduction, mask=mx.array(mask.astype(np.int32)))
    np.testing.assert_allclose(np.array(ours01), ref, rtol=1e-5, atol=1e-5)


def test_cross_entropy_custom_ignore_index_dtypes_and_grad():
    logits, targets, _ = _case(1, (4, 6), 13, ignore_index=5)  # 5 is also a valid class: it must still be ignored
    ref = _torch_ce(logits, targets, 5, 0.2, "mean")
    for ld in (mx.float32, mx.float16, mx.bfloat16):
        x = mx.array(logits).astype(ld)
        ours = cross_entropy(x, mx.array(targets.astype(np.int32)), ignore_index=5, label_smoothing=0.2)
        assert ours.dtype == mx.float32
        tol = 1e-5 if ld == mx.float32 else 3e-2
        np.testing.assert_allclose(ours.item(), ref, rtol=tol, atol=tol)

    t_logits = torch.from_numpy(logits).requires_grad_(True)
    F.cross_entropy(t_logits.reshape(-1, 13), torch.from_numpy(targets).reshape(-1), ignore_index=5,
                    label_smoothing=0.2).backward()
    g = mx.grad(lambda z: cross_entropy(z, mx.array(targets), ignore_index=5, label_smoothing=0.2))(mx.array(logits))
    np.testing.assert_allclose(np.array(g), t_logits.grad.numpy(), rtol=1e-4, atol=1e-6)


def test_all_ignored_is_zero_not_nan():
    logits = mx.random.normal((2, 5, 9), key=mx.random.key(0))
    targets = mx.full((2, 5), -100)
    for red in ("mean", "sum"):
        assert cross_entropy(logits, targets, reduction=red).item() == 0.0
    assert cross_entropy(logits, mx.zeros((2, 5), mx.int32), mask=mx.zeros((2, 5), mx.bool_)).item() == 0.0
    g = mx.grad(lambda z: causal_lm_loss(z, targets, label_smoothing=0.1))(logits)
    assert np.all(np.array(g) == 0)
    assert causal_lm_loss(logits[:, :1], mx.zeros((2, 1), mx.int32)).item() == 0.0  # T == 1: nothing to predict


def test_errors():
    logits = mx.zeros((2, 3, 5))
    with pytest.raises(MlxcError, match="does not match"):
        cross_entropy(logits, mx.zeros((2, 4), mx.int32))
    with pytest.raises(MlxcError, match="reduction"):
        cross_entropy(logits, mx.zeros((2, 3), mx.int32), reduction="avg")
    with pytest.raises(MlxcError, match="label_smoothing"):
        cross_entropy(logits, mx.zeros((2, 3), mx.int32), label_smoothing=1.5)
    with pytest.raises(MlxcError, match="integers"):
        cross_entropy(logits, mx.zeros((2, 3)))
    with pytest.raises(MlxcError, match="mask shape"):
        cross_entropy(logits, mx.zeros((2, 3), mx.int32), mask=mx.ones((3, 2)))
    with pytest.raises(MlxcError, match="loss_mask shape"):
        causal_lm_loss(logits, mx.zeros((2, 3), mx.int32), loss_mask=mx.ones((2, 2)))
    with pytest.raises(MlxcError, match="does not match labels"):
        causal_lm_loss(logits, mx.zeros((2, 2), mx.int32))


@pytest.fixture(scope="module")
def llama_case():
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=97, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64)
    net = LlamaForCausalLM(cfg).eval()
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(0, 97, (3, 12), generator=g)
    labels = ids.clone()
    labels[0, :4] = -100  # prompt masking
    labels[2, 7:] = -100  # padding
    with torch.no_grad():
        out = net(input_ids=ids, labels=labels)
    return out.logits.float().numpy(), labels.numpy(), out.loss.item()


def test_causal_lm_loss_matches_transformers(llama_case):
    logits, labels, ref = llama_case
    ours = causal_lm_loss(mx.array(logits), mx.array(labels))
    np.testing.assert_allclose(ours.item(), ref, rtol=1e-5)
    # bf16 logits are upcast
    ours16 = causal_lm_loss(mx.array(logits).astype(mx.bfloat16), mx.array(labels))
    np.testing.assert_allclose(ours16.item(), ref, rtol=2e-2)
    # same as the simple implementation in runtime/model.py, positional ignore_index included
    old = model_mod.causal_lm_loss(mx.array(logits), mx.array(labels))
    np.testing.assert_allclose(ours.item(), old.item(), rtol=1e-6)
    np.testing.assert_allclose(causal_lm_loss(mx.array(logits), mx.array(labels), -100).item(), ref, rtol=1e-5)


def test_causal_lm_loss_mask_and_smoothing(llama_case):
    logits, labels, _ = llama_case
    rng = np.random.default_rng(3)
    loss_mask = rng.random(labels.shape) < 0.6
    ours = causal_lm_loss(mx.array(logits), mx.array(labels), loss_mask=mx.array(loss_mask), label_smoothing=0.1)
    shifted = np.where(loss_mask, labels, -100)[:, 1:]
    ref = _torch_ce(np.ascontiguousarray(logits[:, :-1]), np.ascontiguousarray(shifted), -100, 0.1, "mean")
    np.testing.assert_allclose(ours.item(), ref, rtol=1e-5)


# ---------------------------------------------------------------------------------------------- pack_sequences

def _check_packed(docs, seq_len, eos, rows, masks=None, add_eos=True, pack=True):
    ids, labels, loss_mask, seg = (np.array(a) for a in rows)
    n = ids.shape[0]
    assert ids.shape == labels.shape == loss_mask.shape == seg.shape == (n, seq_len)
    assert ids.dtype == np.int32 and labels.dtype == np.int32 and loss_mask.dtype == np.bool_
    assert np.array_equal(loss_mask, labels != IGNORE_INDEX)
    # padding: segment 0, pad id, never a target
    pad = seg == 0
    assert np.all(ids[pad] == (eos if eos is not None else 0)) and not loss_mask[pad].any()
    # a target never starts a document: its predecessor is in the same document
    r, t = np.nonzero(loss_mask)
    assert np.all(t > 0) and np.all(seg[r, t] == seg[r, t - 1]) and np.all(seg[r, t] > 0)
    assert np.all(labels[loss_mask] == ids[loss_mask])
    # segments are contiguous, numbered 1, 2, ... within a row, with padding only at the end
    for row in seg:
        used = row[row > 0]
        assert np.all(np.diff(used) >= 0) and np.all(np.diff(used) <= 1) and (used.size == 0 or used[0] == 1)
        assert np.all(row[used.size:] == 0)
        if not pack:
            assert used.max() == 1
    # the token stream, in order, is the documents (+ EOS), and the targets are every token but each piece's first
    expected, expected_targets = [], []
    for i, d in enumerate(docs):
        d = list(d)
        m = list(masks[i]) if masks is not None else [True] * len(d)
        if not d:
            continue
        if add_eos and eos is not None and d[-1] != eos:
            d, m = d + [eos], m + [True]
        for s in range(0, len(d), seq_len):
            expected += d[s:s + seq_len]
            expected_targets += [False] + m[s + 1:s + seq_len]
    assert ids[~pad].tolist() == expected
    assert loss_mask[~pad].tolist() == expected_targets


@pytest.mark.parametrize("seed", range(5))
@pytest.mark.parametrize("pack", [True, False])
def test_pack_sequences_properties(seed, pack):
    rng = np.random.default_rng(seed)
    seq_len = int(rng.integers(2, 20))
    docs = [rng.integers(1, 50, size=int(rng.integers(0, 30))).tolist() for _ in range(int(rng.integers(1, 12)))]
    docs.append([7] * 3)
    masks = [(rng.random(len(d)) < 0.7).tolist() for d in docs]
    rows = pack_sequences(docs, seq_len, 0)
    _check_packed(docs, seq_len, 0, rows, pack=True)
    rows = pack_sequences(docs, seq_len, 0, loss_masks=masks, pack=pack)
    _check_packed(docs, seq_len, 0, rows, masks, pack=pack)
    rows = pack_sequences(docs, seq_len, None, add_eos=False, pack=pack)
    _check_packed(docs, seq_len, None, rows, add_eos=False, pack=pack)


def test_pack_sequences_example():
    ids, labels, mask, seg = pack_sequences([[5, 6], [7, 8, 9], [3, 2]], 6, 2)
    # [5 6 2][7 8 9 2] doesn't fit in 6 -> new row; [3 2] already ends with EOS
    assert np.array(ids).tolist() == [[5, 6, 2, 2, 2, 2], [7, 8, 9, 2, 3, 2]]
    assert np.array(seg).tolist() == [[1, 1, 1, 0, 0, 0], [1, 1, 1, 1, 2, 2]]
    assert np.array(labels).tolist() == [[-100, 6, 2, -100, -100, -100], [-100, 8, 9, 2, -100, 2]]
    assert np.array(mask).tolist() == (np.array(labels) != -100).tolist()
    # the packed labels give the same loss as scoring each document alone
    logits = mx.random.normal((2, 6, 10), key=mx.random.key(1))
    packed = causal_lm_loss(logits, labels).item() * 6
    alone = (causal_lm_loss(logits[0:1, 0:3], mx.array([[5, 6, 2]])).item() * 2
             + causal_lm_loss(logits[1:2, 0:4], mx.array([[7, 8, 9, 2]])).item() * 3
             + causal_lm_loss(logits[1:2, 4:6], mx.array([[3, 2]])).item() * 1)
    np.testing.assert_allclose(packed, alone, rtol=1e-5)


def test_pack_sequences_errors():
    with pytest.raises(MlxcError, match="seq_len"):
        pack_sequences([[1, 2]], 1, 0)
    with pytest.raises(MlxcError, match="empty"):
        pack_sequences([[], []], 4, 0)
    with pytest.raises(MlxcError, match="loss masks"):
        pack_sequences([[1, 2]], 4, 0, loss_masks=[])
    with pytest.raises(MlxcError, match="document 0"):
        pack_sequences([[1, 2]], 4, 0, loss_masks=[[True]])
