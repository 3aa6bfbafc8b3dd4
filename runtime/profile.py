"""Where one decode step's time goes, op by op: `mlxc bench --profile`.

The model's generated module is imported again with a checkpoint after every op statement of every `__call__`: the
checkpoint evaluates what the statement made and charges the time since the previous checkpoint to the statement's
kind (native matmul, BLAS matmul, rms_norm, rope, attention, ...). Forcing an evaluation after each op adds a
synchronisation per op (MLX can no longer overlap building the graph with running it), so the profiled step is
slower than a plain one; both are reported, and the shares are what the profile is for.
"""

from __future__ import annotations

import re
import time
from collections import defaultdict
from dataclasses import dataclass, field

import mlx.core as mx
import numpy as np

# statement kinds, by the expression that computes them (the fragments of codegen/mlx_ops.py), first match wins
KINDS: tuple[tuple[str, str], ...] = (
    (r"^qlinear_packed\(", "linear: native, packed"),
    (r"^qlinear\(", "linear: native"),
    (r"^native_linear\(", "linear: native (decode) / BLAS (prefill)"),
    (r"^qembed(_packed)?\(", "embed: native"),
    (r"^native_rms_norm\(", "rms_norm: native"),
    (r"^native_rope\(", "rope: native"),
    (r"^native_attention\(", "attention: native"),
    (r"^native_qkv_attention\(", "qkv_attention: native (decode) / native rope + attention (prefill)"),
    (r"^native_glu\(", "glu: native"),
    (r"^qkv_attention\(", "qkv_attention"),
    (r"^mx\.quantized_matmul\(", "linear: MLX quantized"),
    (r"^\w+ @ [\w.]+\.T\b", "linear: float (BLAS)"),
    (r"^mx\.dequantize\(", "embed: MLX dequantize"),
    (r"^[\w.]+\[\w+\]$", "embed: float"),
    (r"^mx\.fast\.rms_norm\(", "rms_norm"),
    (r"^mx\.fast\.layer_norm\(", "layer_norm"),
    (r"^ROPE_\d+\(", "rope"),
    (r"^attention\(", "attention"),
    (r"^(mx\.split|mx\.concatenate|\w+\.reshape|\w+\.transpose|\w+\.swapaxes)\(?", "reshape / split"),
    (r"^(nn\.(silu|gelu|gelu_approx|relu)|mx\.(sigmoid|tanh))\(", "activation"),
    (r"^\w+ [+*] \w+$", "add / mul"),
)
_ASSIGN = re.compile(r"^(?P<indent>\s+)(?P<names>[A-Za-z_]\w*(?:, [A-Za-z_]\w*)*) = (?P<expr>.+)$")
_SKIP = re.compile(r"^(\w+\.shape\[\d+\]|\[None\] \* \d+ if cache is None else cache|\w+)$")


def kind_of(expr: str) -> str | None:
    """The kind of an op statement's expression; None for what is not an op (shape ints, plumbing, submodules)."""
    if _SKIP.match(expr) or re.match(r"^(self\.\w+(\[\d+\])?|layer)\(", expr):
        return None
    return next((label for pattern, label in KINDS if re.match(pattern, expr)), "other")


def instrument(source: str) -> str:
    """The generated module's source with `_checkpoint(kind, values)` after each op statement of each model class's
    `__call__` (the helpers' own lines stay as they are: their work is charged to the op that calls them)."""
    out, in_model, in_call = [], False, False
    for line in source.splitlines():
        out.append(line)
        if re.match(r"^\S", line):  # a top-level statement: the generated model classes are nn.Modules
            in_model, in_call = bool(re.match(r"^class \w+\(nn\.Module\):", line)), False
            continue
        if re.match(r"^    def ", line):
            in_call = in_model and line.startswith("    def __call__(")
            continue
        m = _ASSIGN.match(line)
        if not in_call or m is None:
            continue
        kind = kind_of(m.group("expr").strip())
        if kind is not None:
            out.append(f"{m.group('indent')}_checkpoint({kind!r}, {m.group('names')})")
    return "\n".join(out) + "\n"


@dataclass
class Profile:
    prompt_tokens: int
    steps: int
    step_ms: float  # one plain decode step (best of the timed steps, no checkpoints)
    profiled_ms: float  # one profiled step, summed over its checkpoints
    checkpoint_us: float  # what one checkpoint costs by itself (a trivial op evaluated alone)
    rows: list[tuple[str, int, float]] = field(default_factory=list)  # (kind, calls per step, ms per step)

    def net_ms(self, calls: int, ms: float) -> float:
        """A row's time without its checkpoints' own cost: what the ops would take in a plain step, roughly."""
        return max(0.0, ms - calls * self.checkpoint_us * 1e-3)


class _Clock:
    def __init__(self):
        self.times: dict[str, float] = defaultdict(float)
        self.calls: dict[str, int] = defaultdict(int)
        self.last = time.perf_counter()

    def __call__(self, kind: str, *values) -> None:
        mx.eval(*values)
        now = time.perf_counter()
        self.times[kind] += now - self.last
        self.calls[kind] += 1
        self.last = now

    def reset(self) -> None:
        self.times.clear()
        self.calls.clear()
        self.last = time.perf_counter()

    def calibrate(self, n: int = 300) -> float:
        """Microseconds one checkpoint costs around a trivial op (median of n)."""
        a, samples = mx.array([1.0]), []
        mx.eval(a)
        for _ in range(n):
            t0 = time.perf_counter()
            a = a + 1.0
            mx.eval(a)
            samples.append(time.perf_counter() - t0)
        self.reset()
        return float(np.median(samples)) * 1e6


def profile_decode(model, prompt_len: int = 128, steps: int = 16, seed: int = 0, prefill: bool = False) -> Profile:
    """Prefill `prompt_len` random tokens, then time `steps` greedy decode steps plainly and `steps` profiled
    (`prefill=True`: the prompt's step itself, `steps` times each way; step_ms is then the whole prompt's)."""
    import mlx.nn as nn
    from mlx.utils import tree_flatten

    from ..codegen import import_module, write_module

    with open(model.module_path) as f:
        source = f.read()
    module = import_module(write_module(instrument(source)))
    clock = _Clock()
    module._checkpoint = clock
    net: nn.Module = module.Model()
    net.load_weights(tree_flatten(model.net.parameters()), strict=True)
    net.eval()
    ids = mx.array(np.random.default_rng(seed).integers(0, model.vocab_size, size=(1, prompt_len)), dtype=mx.int32)

    def decode(run, n: int, ready=lambda: None) -> list[float]:
        cache = model.make_cache()
        logits = run(ids, cache)
        token = mx.argmax(logits[:, -1], axis=-1)
        mx.eval(token)
        ready()
        times = []
        for _ in range(n):
            t0 = time.perf_counter()
            logits = run(token[:, None], cache)
            token = mx.argmax(logits[:, -1], axis=-1)
            mx.eval(token)
            times.append(time.perf_counter() - t0)
        return times

    plain = decode(model.step, steps + 2)[2:]

    def profiled(x, cache, logits_to_keep=0):
        offset = cache.offset
        keep = {"logits_to_keep": logits_to_keep} if logits_to_keep and model.keeps_logits else {}
        logits = net(x, offset, cache, **keep)
        cache.offset = offset + x.shape[1]
        return logits

    decode(profiled, 2)  # warm-up
    overhead = clock.calibrate()
    if prefill:  # the prompt's one step instead: time it plainly, then profiled, `steps` times each
        def prompt(run) -> float:  # generation's prompt step: the head at the last position only
            cache = model.make_cache()
            t0 = time.perf_counter()
            mx.eval(run(ids, cache, logits_to_keep=1))
            return time.perf_counter() - t0

        plain = [prompt(model.step) for _ in range(steps)]
        clock.reset()
        for _ in range(steps):
            prompt(profiled)
    else:
        decode(profiled, steps, ready=clock.reset)
    total = sum(clock.times.values()) * 1e3 / steps
    rows = sorted(((k, clock.calls[k] // steps, t * 1e3 / steps) for k, t in clock.times.items()),
                  key=lambda r: -r[2])
    return Profile(prompt_len, steps, min(plain) * 1e3, total, overhead, rows)
