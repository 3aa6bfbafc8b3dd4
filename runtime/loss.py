"""Training losses for language models and task heads, and packing of short documents into fixed-length rows.

`cross_entropy` follows `torch.nn.functional.cross_entropy(logits, targets, ignore_index=, label_smoothing=)`
exactly (it is tested against it), computed in float32, plus an extra `mask` that drops positions the way
`ignore_index` does. One deliberate difference: a mean over zero counted positions is 0.0 (torch gives NaN), so a
batch whose targets are all masked out contributes a zero loss and zero gradients instead of poisoning training.

Label convention (same as transformers): `labels` are aligned with `input_ids` and `causal_lm_loss` does the shift,
so position t of the logits is scored against labels[t + 1].

Task heads follow transformers' `ForSequenceClassificationLoss` / `ForTokenClassification` (loss/loss_utils.py):
regression is the mean squared error, single-label classification cross-entropy (ignore_index -100), multi-label
classification binary cross-entropy on the logits; token classification is cross-entropy over every token.
"""

from __future__ import annotations

from typing import NamedTuple, Optional, Sequence

import mlx.core as mx
import numpy as np

from mlxc.ir.errors import MlxcError

IGNORE_INDEX = -100
_REDUCTIONS = ("mean", "sum", "none")


def _as_array(x, what: str) -> mx.array:
    if isinstance(x, mx.array):
        return x
    try:
        return mx.array(np.asarray(x))
    except Exception:
        raise MlxcError(f"{what} must be an array, got {type(x).__name__}") from None


def cross_entropy(
    logits: mx.array,
    targets: mx.array,
    *,
    ignore_index: int = IGNORE_INDEX,
    label_smoothing: float = 0.0,
    mask: Optional[mx.array] = None,
    reduction: str = "mean",
) -> mx.array:
    """Cross-entropy of `logits [..., V]` against integer `targets [...]`, in float32.

    Per position: `(1 - s) * -log p[target] + s * mean_v(-log p[v])` with `s = label_smoothing` (torch's mixing
    with the uniform distribution). A position counts when `targets != ignore_index` and `mask` (bool or 0/1,
    shaped like `targets`) is true there. `reduction`: "mean" = sum over counted positions / their number (0.0
    when none count); "sum"; "none" = per-position losses shaped like `targets`, 0.0 where not counted.
    Targets outside [0, V) at counted positions are the caller's bug and give unspecified values (not checked, so
    the function stays free of host syncs inside a training step).
    """
    logits = _as_array(logits, "logits")
    targets = _as_array(targets, "targets")
    if reduction not in _REDUCTIONS:
        raise MlxcError(f"reduction must be one of {', '.join(_REDUCTIONS)}, got {reduction!r}")
    if not 0.0 <= float(label_smoothing) <= 1.0:
        raise MlxcError(f"label_smoothing must be in [0, 1], got {label_smoothing}")
    if logits.ndim < 1 or tuple(logits.shape[:-1]) != tuple(targets.shape):
        raise MlxcError(
            f"logits shape {list(logits.shape)} does not match targets {list(targets.shape)}: "
            f"expected logits [..., vocab] with targets [...]"
        )
    if mx.issubdtype(targets.dtype, mx.floating):
        raise MlxcError(f"targets must be integers, got {targets.dtype}")

    keep = targets != ignore_index
    if mask is not None:
        mask = _as_array(mask, "mask")
        if tuple(mask.shape) != tuple(targets.shape):
            raise MlxcError(f"mask shape {list(mask.shape)} does not match targets {list(targets.shape)}")
        keep = keep & (mask != 0)

    if targets.size == 0 or logits.shape[-1] == 0:  # e.g. a length-1 sequence after the causal shift
        if logits.shape[-1] == 0 and targets.size:
            raise MlxcError("logits have an empty vocabulary axis")
        empty = mx.zeros(targets.shape, mx.float32)
        return empty if reduction == "none" else (logits.astype(mx.float32).sum() * 0.0)
    x = logits.astype(mx.float32)
    logp = x - mx.logsumexp(x, axis=-1, keepdims=True)
    safe = mx.where(keep, targets, 0).astype(mx.int32)  # ignored targets (e.g. -100) must not index
    loss = -mx.take_along_axis(logp, safe[..., None], axis=-1).squeeze(-1)
    if label_smoothing > 0:
        s = float(label_smoothing)
        loss = (1.0 - s) * loss + s * (-logp.mean(axis=-1))
    loss = mx.where(keep, loss, mx.array(0.0, mx.float32))

    if reduction == "none":
        return loss
    total = loss.sum()
    if reduction == "sum":
        return total
    count = keep.astype(mx.float32).sum()
    return total / mx.maximum(count, 1.0)  # total is 0 when count is 0, so no NaN (value or gradient)


def causal_lm_loss(
    logits: mx.array,
    labels: mx.array,
    ignore_index: int = IGNORE_INDEX,
    *,
    label_smoothing: float = 0.0,
    loss_mask: Optional[mx.array] = None,
) -> mx.array:
    """Mean next-token cross-entropy, as transformers' `ForCausalLMLoss`: logits `[..., T, V]` at position t are
    scored against `labels[..., t + 1]`; labels equal to `ignore_index` don't count, nor (when given) positions
    where `loss_mask` (shaped like `labels`, aligned with labels, i.e. it says whether labels[t] is a target) is
    false. The mean is over the counted targets; when no target counts (every label ignored/masked, or T == 1) the
    result is 0.0 with zero gradients, never NaN.
    """
    logits = _as_array(logits, "logits")
    labels = _as_array(labels, "labels")
    if logits.ndim < 2 or tuple(logits.shape[:-1]) != tuple(labels.shape):
        raise MlxcError(
            f"logits shape {list(logits.shape)} does not match labels {list(labels.shape)}: "
            f"expected logits [batch, seq, vocab] with labels [batch, seq]"
        )
    mask = None
    if loss_mask is not None:
        loss_mask = _as_array(loss_mask, "loss_mask")
        if tuple(loss_mask.shape) != tuple(labels.shape):
            raise MlxcError(f"loss_mask shape {list(loss_mask.shape)} does not match labels {list(labels.shape)}")
        mask = loss_mask[..., 1:]
    return cross_entropy(
        logits[..., :-1, :],
        labels[..., 1:],
        ignore_index=ignore_index,
        label_smoothing=label_smoothing,
        mask=mask,
        reduction="mean",
    )


REGRESSION, SINGLE_LABEL, MULTI_LABEL = "regression", "single_label_classification", "multi_label_classification"
PROBLEM_TYPES = (REGRESSION, SINGLE_LABEL, MULTI_LABEL)


def problem_of(problem_type: Optional[str], num_labels: int, labels: mx.array) -> str:
    """The loss a sequence-classification head's labels mean, decided as transformers does when the config has no
    `problem_type`: one label is regression, integer labels single-label, float labels multi-label."""
    if problem_type is not None:
        if problem_type not in PROBLEM_TYPES:
            raise MlxcError(f"unknown problem_type {problem_type!r}; expected one of {', '.join(PROBLEM_TYPES)}")
        return problem_type
    if num_labels == 1:
        return REGRESSION
    return MULTI_LABEL if mx.issubdtype(labels.dtype, mx.floating) else SINGLE_LABEL


def binary_cross_entropy_with_logits(logits: mx.array, targets: mx.array) -> mx.array:
    """Mean over every element of torch's `BCEWithLogitsLoss`: max(x, 0) - x * y + log(1 + exp(-|x|)), in float32."""
    x, y = logits.astype(mx.float32), targets.astype(mx.float32)
    return (mx.maximum(x, 0) - x * y + mx.log1p(mx.exp(-mx.abs(x)))).mean()


def sequence_classification_loss(logits: mx.array, labels, problem_type: Optional[str] = None,
                                 ignore_index: int = IGNORE_INDEX) -> mx.array:
    """The loss of pooled logits `[B, num_labels]`, as transformers' `ForSequenceClassificationLoss` computes it.

    Labels: regression `[B]` (or `[B, 1]`) values for one label, `[B, num_labels]` for several; single-label `[B]`
    class ids (`ignore_index` skips a row); multi-label `[B, num_labels]` 0/1 targets (floats or integers).
    `problem_type` None infers it from the labels (see `problem_of`). Computed in float32.
    """
    logits = _as_array(logits, "logits")
    labels = _as_array(labels, "labels")
    if logits.ndim != 2:
        raise MlxcError(f"sequence-classification logits must be [batch, num_labels], got {list(logits.shape)}")
    b, n = logits.shape
    problem = problem_of(problem_type, n, labels)
    got = list(labels.shape)
    if problem == SINGLE_LABEL:
        if labels.size != b or labels.ndim > 2:
            raise MlxcError(f"single-label classification takes one class id per sequence, labels [{b}]; got {got}")
        if mx.issubdtype(labels.dtype, mx.floating):
            raise MlxcError(f"single-label classification takes integer class ids, got {labels.dtype} labels "
                            "(float labels for several classes mean multi-label: set problem_type)")
        return cross_entropy(logits, labels.reshape(b), ignore_index=ignore_index)
    if problem == REGRESSION and n == 1:
        if labels.size != b or labels.ndim > 2:
            raise MlxcError(f"regression with one label takes one value per sequence, labels [{b}]; got {got}")
        diff = logits.reshape(b).astype(mx.float32) - labels.reshape(b).astype(mx.float32)
        return (diff * diff).mean()
    if tuple(labels.shape) != (b, n):
        what = "regression" if problem == REGRESSION else "multi-label classification"
        raise MlxcError(f"{what} with {n} labels takes labels [{b}, {n}], got {got}")
    if problem == REGRESSION:
        diff = logits.astype(mx.float32) - labels.astype(mx.float32)
        return (diff * diff).mean()
    return binary_cross_entropy_with_logits(logits, labels)


def token_classification_loss(logits: mx.array, labels, ignore_index: int = IGNORE_INDEX) -> mx.array:
    """Mean cross-entropy of per-token logits `[B, T, num_labels]` against class ids `[B, T]` (`ignore_index`
    skipped), as transformers' `ForTokenClassification` loss; no shift, unlike the causal LM loss."""
    logits = _as_array(logits, "logits")
    labels = _as_array(labels, "labels")
    if logits.ndim != 3 or tuple(labels.shape) != tuple(logits.shape[:2]):
        raise MlxcError(f"token classification takes one label per token: logits {list(logits.shape)} need labels "
                        f"{list(logits.shape[:2])}, got {list(labels.shape)}")
    if mx.issubdtype(labels.dtype, mx.floating):
        raise MlxcError(f"token classification takes integer class ids, got {labels.dtype} labels")
    return cross_entropy(logits, labels, ignore_index=ignore_index)


class PackedRows(NamedTuple):
    """`pack_sequences`' result; unpacks as `ids, labels, loss_mask, segment_ids`. All arrays are [N, seq_len]."""

    ids: mx.array  # int32; padding is `pad_id`
    labels: mx.array  # int32, aligned with ids (causal_lm_loss shifts); ignore_index where nothing is predicted
    loss_mask: mx.array  # bool: labels[t] is a target (== labels[t] != ignore_index)
    segment_ids: mx.array  # int32: 1, 2, ... per document within a row, 0 on padding


def pack_sequences(
    token_lists: Sequence[Sequence[int]],
    seq_len: int,
    eos_id: Optional[int],
    *,
    loss_masks: Optional[Sequence[Sequence[bool]]] = None,
    ignore_index: int = IGNORE_INDEX,
    add_eos: bool = True,
    pack: bool = True,
) -> PackedRows:
    """Pack documents, in order, into rows of exactly `seq_len` tokens.

    Each document gets `eos_id` appended when `add_eos` and it doesn't already end with it. A document longer than
    `seq_len` is cut into `seq_len`-sized pieces, each treated as its own document. Rows are filled in order
    (next-fit): a document that doesn't fit in the space left in the current row starts a new row, so documents
    are never split between rows except for those longer than `seq_len`. With `pack=False` each document gets its
    own row (plain right padding). Padding uses `eos_id` (0 when None).

    Labels never cross a document boundary: the first token of every document (it would be predicted from the
    previous document) and every padding position get `ignore_index`, as do tokens whose `loss_masks` entry is
    false (e.g. the prompt of a prompt/completion pair; one bool per document token, the appended EOS counts).
    Note: this only fixes the targets; the model still attends across documents in a row unless it is given the
    `segment_ids` (which the plain `net(ids, None)` forward is not).
    """
    if isinstance(seq_len, bool) or not isinstance(seq_len, int) or seq_len < 2:
        raise MlxcError(f"seq_len must be an integer >= 2, got {seq_len!r}")
    if loss_masks is not None and len(loss_masks) != len(token_lists):
        raise MlxcError(f"got {len(loss_masks)} loss masks for {len(token_lists)} documents")
    pad_id = 0 if eos_id is None else int(eos_id)

    pieces: list[tuple[list[int], list[bool]]] = []
    for i, toks in enumerate(token_lists):
        toks = [int(t) for t in toks]
        if loss_masks is None:
            m = [True] * len(toks)
        else:
            m = [bool(b) for b in loss_masks[i]]
            if len(m) != len(toks):
                raise MlxcError(f"document {i}: loss mask has {len(m)} entries for {len(toks)} tokens")
        if not toks:
            continue
        if add_eos and eos_id is not None and toks[-1] != eos_id:
            toks.append(int(eos_id))
            m.append(True)
        for s in range(0, len(toks), seq_len):
            pieces.append((toks[s:s + seq_len], m[s:s + seq_len]))
    if not pieces:
        raise MlxcError("nothing to pack: every document is empty")

    rows: list[list[tuple[list[int], list[bool]]]] = [[]]
    used = 0
    for toks, m in pieces:
        if rows[-1] and (not pack or used + len(toks) > seq_len):
            rows.append([])
            used = 0
        rows[-1].append((toks, m))
        used += len(toks)

    n = len(rows)
    ids = np.full((n, seq_len), pad_id, np.int32)
    labels = np.full((n, seq_len), ignore_index, np.int32)
    seg = np.zeros((n, seq_len), np.int32)
    for r, row in enumerate(rows):
        pos = 0
        for d, (toks, m) in enumerate(row, start=1):
            k = len(toks)
            ids[r, pos:pos + k] = toks
            seg[r, pos:pos + k] = d
            lab = np.where(np.array(m, bool), np.array(toks, np.int32), ignore_index)
            lab[0] = ignore_index  # a document's first token is not predicted from what came before it
            labels[r, pos:pos + k] = lab
            pos += k
    loss_mask = labels != ignore_index
    return PackedRows(mx.array(ids), mx.array(labels), mx.array(loss_mask), mx.array(seg))
