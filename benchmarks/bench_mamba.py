"""Mamba prefill and decode on the CPU: mlxc's native, chunked and sequential reference scans and mlx-lm's Mamba
(which steps its scan in Python, one token at a time), side by side in one run, on one Mamba-130M-shaped checkpoint.

The checkpoint is random but shaped and parametrized like state-spaces/mamba-130m-hf (24 layers, hidden 768, state
16, A = -(1..16) with noise, dt from 1e-3 to 1e-1): written once as a Hugging Face directory, mlxc loads it as
it loads any checkpoint and mlx-lm gets the same tensors, so the three compute the same logits (checked first).

  native       mlxc's default on a CPU with its extension: the native scan kernel (kernels/native/src/scan.cpp) for
               prefill and decode (SELECTIVE_SCAN = "auto"); absent without the extension
  chunked      the same model with SELECTIVE_SCAN = "chunked": the selective scan in blocks of chunks of MLX ops
               (codegen/templates/selective_scan.py.j2), the default without the extension
  sequential   the same compiled model with SELECTIVE_SCAN = "sequential": the reference recurrence, a step per token
  mlx-lm       mlx_lm.models.mamba.Model (pip install mlx-lm==0.32.2)

Prefill: one forward pass over the prompt through a fresh cache, up to the last token's argmax (all three compute
the logits of every position). Decode: `--gen-len` greedy steps after a 16-token prefill. Rounds alternate the
variants; the table shows the best round of each (`--rounds`, after one untimed round at the first length) and the
ratios to mlx-lm. Decode memory: MLX's active memory and the cache's bytes after 16, 64 and 512 generated tokens (a
recurrent state does not grow with length).

    python benchmarks/bench_mamba.py [--lengths 1024,4096] [--gen-len 64] [--rounds 3] [--skip-sequential-above 1024]
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import mlxc  # noqa: F401  (first: preloads the system BLAS before mlx.core)
import mlx.core as mx  # noqa: E402
import numpy as np  # noqa: E402

from mlxc.blas import active_blas  # noqa: E402

HIDDEN, LAYERS, STATE, VOCAB, CONV = 768, 24, 16, 50280, 4
INNER, RANK = 2 * HIDDEN, -(-HIDDEN // 16)


def write_checkpoint(path: Path, seed: int = 0) -> dict[str, np.ndarray]:
    """A Mamba-130M-shaped MambaForCausalLM checkpoint with random weights (tied head); returns its tensors."""
    from safetensors.numpy import save_file

    rng = np.random.default_rng(seed)
    f = lambda *s, scale: (rng.standard_normal(s) * scale).astype(np.float32)  # noqa: E731
    t = {"backbone.embeddings.weight": f(VOCAB, HIDDEN, scale=0.02), "backbone.norm_f.weight": np.ones(HIDDEN, np.float32)}
    for i in range(LAYERS):
        p = f"backbone.layers.{i}."
        dt = np.exp(rng.uniform(np.log(1e-3), np.log(1e-1), INNER)).astype(np.float32)
        t.update({
            p + "norm.weight": np.ones(HIDDEN, np.float32),
            p + "mixer.in_proj.weight": f(2 * INNER, HIDDEN, scale=HIDDEN ** -0.5),
            p + "mixer.conv1d.weight": f(INNER, 1, CONV, scale=0.5),
            p + "mixer.conv1d.bias": f(INNER, scale=0.1),
            p + "mixer.x_proj.weight": f(RANK + 2 * STATE, INNER, scale=INNER ** -0.5),
            p + "mixer.dt_proj.weight": f(INNER, RANK, scale=RANK ** -0.5),
            p + "mixer.dt_proj.bias": (dt + np.log(-np.expm1(-dt))).astype(np.float32),  # softplus^-1(dt)
            p + "mixer.A_log": (np.log(np.arange(1, STATE + 1, dtype=np.float32))[None] + f(INNER, STATE, scale=0.1)),
            p + "mixer.D": np.ones(INNER, np.float32),
            p + "mixer.out_proj.weight": f(HIDDEN, INNER, scale=INNER ** -0.5 / LAYERS ** 0.5),
        })
    config = {"architectures": ["MambaForCausalLM"], "model_type": "mamba", "vocab_size": VOCAB,
              "hidden_size": HIDDEN, "intermediate_size": INNER, "state_size": STATE, "num_hidden_layers": LAYERS,
              "conv_kernel": CONV, "expand": 2, "time_step_rank": RANK, "use_bias": False, "use_conv_bias": True,
              "hidden_act": "silu", "layer_norm_epsilon": 1e-5, "residual_in_fp32": True,
              "tie_word_embeddings": True, "bos_token_id": 0, "eos_token_id": 0, "pad_token_id": 0}
    path.mkdir(parents=True, exist_ok=True)
    (path / "config.json").write_text(json.dumps(config))
    save_file(t, str(path / "model.safetensors"))
    return t


class MlxcVariant:
    def __init__(self, path: Path, scan: str):
        self.model = mlxc.load(str(path))
        self.module = sys.modules[type(self.model.net).__module__]
        self.scan = scan

    def cache(self):
        return self.model.make_cache()

    def __call__(self, ids, cache):
        self.module.SELECTIVE_SCAN = self.scan  # one generated module per model: set before every call
        return self.model.step(ids, cache)

    def state(self, cache):
        return [a for s in cache for a in (s.arrays or ())]


class MlxLmVariant:
    def __init__(self, tensors: dict[str, np.ndarray]):
        from mlx_lm.models import mamba

        args = mamba.ModelArgs(model_type="mamba", vocab_size=VOCAB, hidden_size=HIDDEN, intermediate_size=INNER,
                               state_size=STATE, num_hidden_layers=LAYERS, conv_kernel=CONV, use_bias=False,
                               use_conv_bias=True, time_step_rank=RANK, tie_word_embeddings=True)
        self.model = mamba.Model(args)
        weights = self.model.sanitize({k: mx.array(v) for k, v in tensors.items()})
        self.model.load_weights(list(weights.items()))
        mx.eval(self.model.parameters())

    def cache(self):
        return self.model.make_cache()

    def __call__(self, ids, cache):
        return self.model(ids, cache=cache)

    def state(self, cache):
        return [a for c in cache for a in c.cache if a is not None]


def prefill_seconds(variant, ids) -> float:
    cache = variant.cache()
    t0 = time.perf_counter()
    token = mx.argmax(variant(ids, cache)[:, -1], axis=-1)
    mx.eval(token, variant.state(cache))
    return time.perf_counter() - t0


def decode(variant, ids, steps: int, marks=()) -> tuple[float, dict[int, tuple[int, int, int]]]:
    """Seconds for `steps` greedy steps after prefilling `ids`; MLX's active memory, its peak since the prefill and
    the state bytes at each mark."""
    cache = variant.cache()
    token = mx.argmax(variant(ids, cache)[:, -1], axis=-1)
    mx.eval(token, variant.state(cache))
    mx.reset_peak_memory()
    memory = {}
    t0 = time.perf_counter()
    for n in range(1, steps + 1):
        token = mx.argmax(variant(token[:, None], cache)[:, -1], axis=-1)
        mx.async_eval(token)
        if n in marks:
            mx.eval(token, variant.state(cache))
            memory[n] = (mx.get_active_memory(), mx.get_peak_memory(), sum(a.nbytes for a in variant.state(cache)))
    mx.eval(token)
    return time.perf_counter() - t0, memory


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--lengths", default="1024,4096", help="prefill lengths (tokens)")
    ap.add_argument("--gen-len", type=int, default=64)
    ap.add_argument("--rounds", type=int, default=3, help="timed rounds per variant, after one warm-up")
    ap.add_argument("--skip-sequential-above", type=int, default=None,
                    help="time the sequential reference only up to this prefill length (it is slow)")
    ap.add_argument("--memory-steps", type=int, default=512, help="decode steps for the memory measurement")
    ap.add_argument("--checkpoint", type=Path, default=None, help="where to write the checkpoint (default: temp)")
    args = ap.parse_args()
    lengths = [int(x) for x in args.lengths.split(",")]

    with tempfile.TemporaryDirectory() as tmp:
        path = args.checkpoint or Path(tmp) / "mamba-130m-random"
        tensors = write_checkpoint(path)
        variants = {"native": MlxcVariant(path, "auto"), "chunked": MlxcVariant(path, "chunked"),
                    "sequential": MlxcVariant(path, "sequential")}
        if not variants["native"].module.NATIVE_SCAN:
            print("the native scan is unavailable (mlxc's extension is not built): its column is skipped")
            del variants["native"]
        try:
            variants["mlx-lm"] = MlxLmVariant(tensors)
        except ImportError:
            print("mlx-lm is not installed (pip install mlx-lm==0.32.2): its column is skipped")
        del tensors
        rng = np.random.default_rng(1)
        check = mx.array(rng.integers(3, VOCAB, size=(1, 64)), dtype=mx.int32)
        ref = np.array(variants["sequential"](check, variants["sequential"].cache()))
        for name, v in variants.items():
            err = float(np.abs(np.array(v(check, v.cache())) - ref).max())
            print(f"{name:10s} max |logits - sequential| over 64 tokens: {err:.2e}")

        print(f"\nMamba-130M-shaped, float32, batch 1, BLAS {active_blas().name}; best of {args.rounds} rounds")
        rows = {}
        for length in lengths:
            ids = mx.array(rng.integers(3, VOCAB, size=(1, length)), dtype=mx.int32)
            names = [n for n in variants if not (n == "sequential" and args.skip_sequential_above
                                                 and length > args.skip_sequential_above)]
            best = {n: float("inf") for n in names}
            warm = length == lengths[0]  # later lengths reuse the compiled block graphs: no untimed round there
            for r in range(args.rounds + warm):
                for n in (names if r % 2 == 0 else names[::-1]):
                    s = prefill_seconds(variants[n], ids)
                    if r or not warm:
                        best[n] = min(best[n], s)
            rows[f"prefill {length}"] = {n: length / s for n, s in best.items()}
            print(f"  prefill {length}: " + ", ".join(f"{n} {length / s:.1f} tok/s" for n, s in best.items()),
                  flush=True)
        short = mx.array(rng.integers(3, VOCAB, size=(1, 16)), dtype=mx.int32)
        best = {n: float("inf") for n in variants}
        for r in range(args.rounds + 1):
            for n in (list(variants) if r % 2 == 0 else list(variants)[::-1]):
                s, _ = decode(variants[n], short, args.gen_len)
                if r:
                    best[n] = min(best[n], s)
        rows["decode"] = {n: args.gen_len / s for n, s in best.items()}

        ours = [n for n in ("native", "chunked") if n in variants] if "mlx-lm" in variants else []
        print("\n| tokens/s | " + " | ".join(list(variants) + [f"{n} / mlx-lm" for n in ours]) + " |")
        print("|---" * (len(variants) + 1 + len(ours)) + "|")
        for row, values in rows.items():
            cells = [f"{values[n]:.1f}" if n in values else "-" for n in variants]
            cells += [f"{values[n] / values['mlx-lm']:.2f}x" for n in ours]
            print(f"| {row} | " + " | ".join(cells) + " |")

        marks = sorted({m for m in (16, 64, args.memory_steps) if m <= args.memory_steps})
        print(f"\ndecode memory after n generated tokens (MLX active / peak since the prefill / the cache's states):")
        for n, v in variants.items():
            if n == "sequential":
                continue  # decoding is the same single step in both mlxc variants
            mx.clear_cache()
            _, memory = decode(v, short, max(marks), marks)
            print(f"  {n:8s} " + ", ".join(f"n={k}: {a / 2**20:.1f} / {p / 2**20:.1f} / {b / 2**20:.2f} MiB"
                                           for k, (a, p, b) in memory.items()))
    return 0


if __name__ == "__main__":
    sys.exit(main())
