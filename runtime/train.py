"""LoRA fine-tuning of any MLX module that carries adapter parameters.

The only contract with the model: `net(ids [B, T] int32, 0) -> logits [B, T, V]` (tokens from position 0, no cache), and its adapter parameters are
the leaves whose dotted names contain a `lora_A` or `lora_B` component (`layers.0.attn.q_proj.lora_A.weight`).
Everything else is frozen; only the adapters get gradients and optimizer updates, so every other parameter is
left bitwise unchanged.

Data: `load_jsonl` turns a JSONL file into `Example`s (token ids + a per-token loss mask); `train_lora` packs them
(or pads them, one per row) into `[batch_size, seq_len]` batches with `pack_sequences` and minimises
`causal_lm_loss`. Runs are deterministic for a given `TrainConfig.seed` (batch order and dropout).
"""

from __future__ import annotations

import json
import math
import re
import time
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any, Callable, Optional, Sequence, Union

import mlx.core as mx
import mlx.nn as nn
import mlx.optimizers as optim
import numpy as np
from mlx.utils import tree_flatten

from mlxc.files import replacing_file
from mlxc.ir.errors import MlxcError
from mlxc.runtime.loss import causal_lm_loss, pack_sequences

_ADAPTER = re.compile(r"(^|\.)lora_[AB](\.|$)")
OPTIMIZERS = ("adamw", "adam", "sgd")


# ------------------------------------------------------------------------------------------------------ config

@dataclass(frozen=True)
class TrainConfig:
    """Hyper-parameters of a LoRA run. Checked on construction; bad values raise `MlxcError`."""

    steps: int = 100
    batch_size: int = 4
    seq_len: int = 512
    learning_rate: float = 1e-4
    weight_decay: float = 0.0  # decoupled for adamw, L2 for sgd; adam takes none
    warmup_steps: int = 0  # linear warmup, then cosine decay to 0 over the remaining steps
    optimizer: str = "adamw"
    grad_clip: Optional[float] = 1.0  # max global gradient norm; None disables
    label_smoothing: float = 0.0
    seed: int = 0
    log_every: int = 10
    save_every: int = 0  # 0: save only at the end
    out_dir: str = "adapters"
    pack: bool = True  # pack several examples per row; False: one example per row, right-padded

    def __post_init__(self) -> None:
        def integer(name: str, lo: int) -> None:
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int) or v < lo:
                raise MlxcError(f"train config: {name} must be an integer >= {lo}, got {v!r}")

        def number(name: str, lo: float, hi: float = math.inf, lo_open: bool = False, hi_open: bool = False):
            v = getattr(self, name)
            ok = isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)
            ok = ok and (v > lo if lo_open else v >= lo) and (v < hi if hi_open else v <= hi)
            if not ok:
                lb, rb = "(" if lo_open else "[", ")" if hi_open or hi == math.inf else "]"
                raise MlxcError(f"train config: {name} must be a number in {lb}{lo}, {hi}{rb}, got {v!r}")

        integer("steps", 1)
        integer("batch_size", 1)
        integer("seq_len", 2)
        number("learning_rate", 0.0, lo_open=True)
        number("weight_decay", 0.0)
        integer("warmup_steps", 0)
        if self.warmup_steps > self.steps:
            raise MlxcError(f"train config: warmup_steps ({self.warmup_steps}) exceeds steps ({self.steps})")
        if self.optimizer not in OPTIMIZERS:
            raise MlxcError(f"train config: optimizer must be one of {', '.join(OPTIMIZERS)}, got {self.optimizer!r}")
        if self.optimizer == "adam" and self.weight_decay > 0:
            raise MlxcError("train config: optimizer 'adam' takes no weight_decay; use 'adamw'")
        if self.grad_clip is not None:
            number("grad_clip", 0.0, lo_open=True)
        number("label_smoothing", 0.0, 1.0, hi_open=True)
        integer("seed", 0)
        integer("log_every", 1)
        integer("save_every", 0)
        if not isinstance(self.out_dir, (str, Path)) or not str(self.out_dir):
            raise MlxcError(f"train config: out_dir must be a non-empty path, got {self.out_dir!r}")
        if not isinstance(self.pack, bool):
            raise MlxcError(f"train config: pack must be true or false, got {self.pack!r}")

    @classmethod
    def from_dict(cls, d: dict) -> TrainConfig:
        """Build from e.g. a parsed YAML/JSON file; unknown keys are an error (typos shouldn't pass silently)."""
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(d) - known)
        if unknown:
            raise MlxcError(f"train config: unknown option(s) {', '.join(unknown)}; known: {', '.join(sorted(known))}")
        return cls(**d)


def lr_schedule(config: TrainConfig) -> Callable[[Any], mx.array]:
    """lr(step) for the update at step = 0, 1, ..., steps - 1: linear warmup lr * (step + 1) / (warmup_steps + 1)
    for step < warmup_steps, the peak `learning_rate` at step == warmup_steps, then half-cosine decay over the
    remaining steps (the last update's lr is small but > 0)."""
    lr, warm, steps = float(config.learning_rate), config.warmup_steps, config.steps

    def schedule(step) -> mx.array:
        s = mx.array(step).astype(mx.float32)
        warmup = lr * (s + 1.0) / (warm + 1)
        progress = mx.clip((s - warm) / max(steps - warm, 1), 0.0, 1.0)
        cosine = lr * 0.5 * (1.0 + mx.cos(math.pi * progress))
        return mx.where(s < warm, warmup, cosine)

    return schedule


def make_optimizer(config: TrainConfig) -> optim.Optimizer:
    lr = lr_schedule(config)
    if config.optimizer == "adamw":
        return optim.AdamW(learning_rate=lr, weight_decay=config.weight_decay)
    if config.optimizer == "adam":
        return optim.Adam(learning_rate=lr)
    return optim.SGD(learning_rate=lr, weight_decay=config.weight_decay)


# -------------------------------------------------------------------------------------------------------- data

@dataclass(frozen=True)
class Example:
    """One training document: token ids and, per token, whether it is a training target."""

    tokens: tuple[int, ...]
    loss_mask: tuple[bool, ...] = field(default=())  # () means every token is a target

    def __post_init__(self) -> None:
        object.__setattr__(self, "tokens", tuple(int(t) for t in self.tokens))
        mask = tuple(bool(b) for b in self.loss_mask) if self.loss_mask else (True,) * len(self.tokens)
        if len(mask) != len(self.tokens):
            raise MlxcError(f"example loss mask has {len(mask)} entries for {len(self.tokens)} tokens")
        object.__setattr__(self, "loss_mask", mask)


def _encode_line(obj: Any, tokenizer) -> Example:
    """Tokens of one parsed JSONL record; raises ValueError (turned into an MlxcError with the location)."""
    if not isinstance(obj, dict):
        raise ValueError(f"expected a JSON object, got {type(obj).__name__}")
    eos = tokenizer.eos_token_ids[0] if tokenizer.eos_token_ids else None

    def with_eos(ids: list[int]) -> list[int]:
        return ids + [eos] if eos is not None and (not ids or ids[-1] not in tokenizer.eos_token_ids) else ids

    if "messages" in obj:
        msgs = obj["messages"]
        if not isinstance(msgs, list) or not msgs:
            raise ValueError("'messages' must be a non-empty list of {role, content} objects")
        text = tokenizer.apply_chat_template(msgs, add_generation_prompt=False)
        return Example(with_eos(tokenizer.encode(text, add_special_tokens=False)))
    if "prompt" in obj or "completion" in obj:
        prompt, completion = obj.get("prompt"), obj.get("completion")
        if not isinstance(prompt, str) or not isinstance(completion, str):
            raise ValueError("'prompt' and 'completion' must both be strings")
        p = tokenizer.encode(prompt, add_special_tokens=True)
        c = with_eos(tokenizer.encode(completion, add_special_tokens=False))
        if not c:
            raise ValueError("empty completion")
        return Example(p + c, (False,) * len(p) + (True,) * len(c))
    if "text" in obj:
        if not isinstance(obj["text"], str):
            raise ValueError("'text' must be a string")
        return Example(with_eos(tokenizer.encode(obj["text"], add_special_tokens=True)))
    raise ValueError(f"expected a 'text', 'messages' or 'prompt'/'completion' record, got keys {sorted(obj)}")


def load_jsonl(path: Union[str, Path], tokenizer, seq_len: int) -> list[Example]:
    """Read a JSONL dataset. Each non-blank line is one of
      {"text": str}                      - every token is a target;
      {"messages": [{role, content}...]} - rendered with the tokenizer's chat template, every token a target;
      {"prompt": str, "completion": str} - only the completion (and EOS) are targets.
    EOS (`tokenizer.eos_token_ids[0]`) is appended unless the tokens already end with a stop id. Examples are then
    truncated to `seq_len` tokens. Malformed lines, and prompts that leave no completion token within `seq_len`,
    raise `MlxcError` naming the file and line; so does a file without examples.
    """
    p = Path(path)
    if isinstance(seq_len, bool) or not isinstance(seq_len, int) or seq_len < 2:
        raise MlxcError(f"seq_len must be an integer >= 2, got {seq_len!r}")
    try:
        lines = p.read_text(encoding="utf-8").splitlines()
    except (OSError, UnicodeDecodeError) as e:
        raise MlxcError(f"cannot read dataset {p}: {e}") from None
    examples: list[Example] = []
    for n, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        try:
            ex = _encode_line(json.loads(line), tokenizer)
        except json.JSONDecodeError as e:
            raise MlxcError(f"{p}:{n}: invalid JSON: {e.msg} (column {e.colno})") from None
        except (ValueError, MlxcError) as e:
            raise MlxcError(f"{p}:{n}: {e}") from None
        ex = Example(ex.tokens[:seq_len], ex.loss_mask[:seq_len])
        if not any(ex.loss_mask[1:]):
            raise MlxcError(f"{p}:{n}: no trainable token within seq_len={seq_len} (prompt too long or text empty)")
        examples.append(ex)
    if not examples:
        raise MlxcError(f"dataset {p} has no examples")
    return examples


# ------------------------------------------------------------------------------------------------------ adapters

def adapter_parameters(net: nn.Module) -> dict[str, mx.array]:
    """The adapter leaves of `net`, by dotted name (what a saved adapter file should hold)."""
    return {k: v for k, v in tree_flatten(net.parameters()) if _ADAPTER.search(k)}


def save_adapter_weights(net: nn.Module, path: Union[str, Path]) -> Path:
    """Write the adapter parameters to a safetensors file (parent folders created), whole or not at all."""
    p = Path(path)
    p.parent.mkdir(parents=True, exist_ok=True)
    with replacing_file(p) as tmp:
        mx.save_safetensors(str(tmp), adapter_parameters(net))
    return p


def freeze_all_but_adapters(net: nn.Module) -> list[str]:
    """Freeze `net` except its adapter parameters; returns their names. MlxcError if it has none."""
    names = sorted(adapter_parameters(net))
    if not names:
        raise MlxcError("no LoRA adapter parameters; run the lora pass first")
    net.freeze()

    def unfreeze_adapters(prefix: str, m: nn.Module) -> None:
        # A module's own (non-module) leaves, by local dotted name: "weight", or "lora_A.weight" when they sit in a
        # plain dict; mlx checks the top-level key and, inside dicts and lists, the dotted one, so unfreeze both.
        own = m.filter_and_map(lambda mm, k, v: not isinstance(v, nn.Module) and mm.valid_parameter_filter(mm, k, v))
        keys = set()
        for leaf, _ in tree_flatten(own):
            parts = leaf.split(".")
            keys.update(".".join(parts[:i]) for i in range(1, len(parts) + 1))
        keys = sorted(k for k in keys if _ADAPTER.search(f"{prefix}.{k}" if prefix else k))
        if keys:
            m.unfreeze(recurse=False, keys=keys)

    net.apply_to_modules(unfreeze_adapters)
    trainable = sorted(k for k, _ in tree_flatten(net.trainable_parameters()))
    if trainable != names:
        raise MlxcError(f"could not isolate the adapter parameters: trainable {trainable[:4]}..., adapters "
                        f"{names[:4]}...")
    return names


# -------------------------------------------------------------------------------------------------------- train

@dataclass
class TrainResult:
    losses: list[float]  # training loss of every step, in order
    steps: int
    tokens: int  # non-padding input tokens processed
    trained_tokens: int  # tokens that were targets
    elapsed_s: float
    adapter_names: list[str]
    num_adapter_params: int
    saved_at: list[int]  # steps at which save_adapter was called


LogFn = Callable[[dict], None]
SaveFn = Callable[[int, Path], Any]


def _rows(examples: Sequence[Union[Example, Sequence[int]]], config: TrainConfig):
    exs = [e if isinstance(e, Example) else Example(tuple(e)) for e in examples]
    if not exs:
        raise MlxcError("no training examples")
    # Examples are complete documents already (load_jsonl adds EOS), so no EOS is added; padding uses id 0,
    # which is never a target and, right-aligned after each document, never attended to by earlier tokens.
    rows = pack_sequences([e.tokens for e in exs], config.seq_len, None, loss_masks=[e.loss_mask for e in exs],
                          add_eos=False, pack=config.pack)
    ids, labels, mask, seg = (np.array(a) for a in rows)
    if not mask.any():
        raise MlxcError("the training examples have no target tokens")
    return ids, labels, mask, seg


def train_lora(
    net: nn.Module,
    examples: Sequence[Union[Example, Sequence[int]]],
    config: TrainConfig,
    *,
    on_log: Optional[LogFn] = None,
    save_adapter: Optional[SaveFn] = None,
) -> TrainResult:
    """Train only the adapter parameters of `net` for `config.steps` steps; returns the loss history.

    `examples`: `Example`s (from `load_jsonl`) or plain token lists (all tokens targets, used as given). Batches
    of `batch_size` rows are drawn without replacement from a seeded shuffle, reshuffled every epoch.
    `on_log(record)` gets {"step", "loss" (mean since last log), "lr", "tokens_per_sec", "grad_norm", "elapsed_s"}
    every `log_every` steps and at the last step. `save_adapter(step, Path(out_dir))` is called every `save_every`
    steps and once at the end. On return `net` is in its original train/eval mode with only the adapters
    trainable (`net.unfreeze()` undoes that); its non-adapter parameters are unchanged.
    """
    if not isinstance(config, TrainConfig):
        raise MlxcError(f"config must be a TrainConfig, got {type(config).__name__}")
    ids_np, labels_np, mask_np, seg_np = _rows(examples, config)
    names = freeze_all_but_adapters(net)
    vocab = net(mx.array(ids_np[:1, :2]), 0).shape[-1]  # one tiny forward, before seeding, to learn V
    if ids_np.min() < 0 or ids_np.max() >= vocab:
        bad = int(ids_np.min()) if ids_np.min() < 0 else int(ids_np.max())
        raise MlxcError(f"training data has token id {bad}, out of range for the model's vocabulary of {vocab}")
    n_params = sum(v.size for v in adapter_parameters(net).values())

    rng = np.random.default_rng(config.seed)
    mx.random.seed(config.seed)
    optimizer = make_optimizer(config)
    schedule = lr_schedule(config)
    out_dir = Path(config.out_dir)

    def loss_fn(ids, labels, mask):
        logits = net(ids, 0)
        return causal_lm_loss(logits, labels, label_smoothing=config.label_smoothing, loss_mask=mask)

    loss_and_grad = nn.value_and_grad(net, loss_fn)

    order: list[int] = []

    def next_batch():
        picked: list[int] = []
        while len(picked) < config.batch_size:
            if not order:
                order.extend(rng.permutation(len(ids_np)).tolist())
            picked.append(order.pop(0))
        used = seg_np[picked] > 0
        width = max(2, int(used.any(axis=0).nonzero()[0].max()) + 1)  # drop columns that are padding everywhere
        return (mx.array(ids_np[picked, :width]), mx.array(labels_np[picked, :width]),
                mx.array(mask_np[picked, :width]), int(used.sum()), int(mask_np[picked, 1:width].sum()))

    was_training = net.training
    net.train(True)
    losses: list[float] = []
    saved: list[int] = []
    tokens = trained = 0
    t0 = t_log = time.perf_counter()
    tokens_since = last_log = 0
    try:
        for step in range(1, config.steps + 1):
            ids, labels, mask, n_tok, n_trained = next_batch()
            loss, grads = loss_and_grad(ids, labels, mask)
            if config.grad_clip is not None:
                grads, grad_norm = optim.clip_grad_norm(grads, config.grad_clip)
            else:
                grad_norm = mx.sqrt(sum((g.astype(mx.float32) ** 2).sum() for _, g in tree_flatten(grads)))
            lr = schedule(step - 1)  # the lr this update uses (the optimizer's step counter starts at 0)
            optimizer.update(net, grads)
            mx.eval(loss, grad_norm, net.trainable_parameters(), optimizer.state)
            loss_value = loss.item()
            if not math.isfinite(loss_value):
                raise MlxcError(f"training diverged: loss is {loss_value} at step {step}; lower the learning rate")
            losses.append(loss_value)
            tokens += n_tok
            trained += n_trained
            tokens_since += n_tok

            if on_log is not None and (step % config.log_every == 0 or step == config.steps):
                now = time.perf_counter()
                on_log({
                    "step": step,
                    "loss": float(np.mean(losses[last_log:])),
                    "lr": lr.item(),
                    "tokens_per_sec": tokens_since / max(now - t_log, 1e-9),
                    "grad_norm": grad_norm.item(),
                    "elapsed_s": now - t0,
                })
                t_log, tokens_since, last_log = now, 0, step
            if save_adapter is not None and (
                    (config.save_every and step % config.save_every == 0) or step == config.steps):
                save_adapter(step, out_dir)
                saved.append(step)
    finally:
        net.train(was_training)

    return TrainResult(losses=losses, steps=config.steps, tokens=tokens, trained_tokens=trained,
                       elapsed_s=time.perf_counter() - t0, adapter_names=names, num_adapter_params=n_params,
                       saved_at=saved)
