"""mlxc's native quantized kernels (mlxc.kernels.native) against MLX's own kernels, on SmolLM2-135M's shapes.

Each engine runs in its own process (OpenBLAS worker threads busy-wait after a call and would slow whatever runs
next on a 2-core machine), on the same seeded weights:
  native packed   the same, on weights packed once into 16-row tiles (native.pack)
  native int8     4-bit g32 (Q4_1's layout after mlxc's load), activations quantized to int8 per 32-block
  native float    the same weights, activations in float
  mx.qmm          mx.quantized_matmul on the same codes, scales and biases
  mx fp32         the dequantized weight, float32 matmul in MLX (OpenBLAS when `import mlxc` preloaded it)
  numpy fp32      numpy's own OpenBLAS on the same float32 weight
Times are ms per call: best (best..median) of --repeats rounds, each round the mean of several evaluated calls.
Then one decode step's 211 matrix-vector products (30 layers x q, k, v, o, gate, up, down, plus the tied 49152 x 576
LM head) built as one graph and evaluated together, and the embedding lookup.

    python benchmarks/bench_native_kernels.py [--repeats 7] [--threads N] [--scales f32|f16] [--batches 1,128]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time

# (name, K, N): y[M, N] = x[M, K] @ W[N, K].T
SHAPES = [("q/o 576->576", 576, 576), ("k/v 576->192", 576, 192), ("gate+up 576->3072", 576, 3072),
          ("down 1536->576", 1536, 576), ("lm head 576->49152", 576, 49152)]
LAYER = [(576, 576), (576, 192), (576, 192), (576, 576), (576, 1536), (576, 1536), (1536, 576)]  # q k v o g u d
ENGINES = ["native packed", "native int8", "native float", "mx.qmm", "mx fp32", "numpy fp32"]


def timed(fn, calls: int, repeats: int) -> list[float]:
    """(best, median) ms per call over `repeats` rounds of `calls` calls; fn() must evaluate its result."""
    fn()
    rounds = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        for _ in range(calls):
            fn()
        rounds.append((time.perf_counter() - t0) / calls * 1e3)
    return [min(rounds), statistics.median(rounds)]


def measure(engine: str, args) -> dict:
    """All measurements of one engine, in this process."""
    import numpy as np

    import mlxc  # noqa: F401  (preloads OpenBLAS before MLX)
    import mlx.core as mx
    from mlxc.kernels import native

    if engine.startswith("native") and not native.available():
        raise SystemExit(f"native kernels unavailable: {native.reason()}")
    if engine.startswith("native") and args.threads:
        native.set_threads(args.threads)
    sdt = mx.float16 if args.scales == "f16" else mx.float32
    rng = np.random.default_rng(0)

    def weight(n: int, k: int):
        w = mx.array(rng.standard_normal((n, k)).astype(np.float32) * 0.05)
        c, s, b = mx.quantize(w, group_size=32, bits=4)
        wf = mx.dequantize(c, s, b, group_size=32, bits=4)
        mx.eval(c, s, b, wf)
        w = {"c": c, "s": s, "b": b, "wf": wf, "sn": s.astype(sdt), "bn": b.astype(sdt),
             "np": np.array(wf) if engine == "numpy fp32" else None, "n": n}
        if engine == "native packed":
            w["packed"] = native.pack(c, w["sn"], w["bn"], bits=4, group_size=32)
            mx.eval(w["packed"])
        return w

    def op(w):
        """x -> y for this engine, evaluated."""
        if engine == "native packed":
            return lambda x: native.qmatmul_packed(x, *w["packed"], bits=4, group_size=32, n=w["n"])
        if engine == "native int8":
            return lambda x: native.qmatmul(x, w["c"], w["sn"], w["bn"], bits=4, group_size=32)
        if engine == "native float":
            return lambda x: native.qmatmul(x, w["c"], w["sn"], w["bn"], bits=4, group_size=32,
                                            int8_activations=False)
        if engine == "mx.qmm":
            return lambda x: mx.quantized_matmul(x, w["c"], w["s"], w["b"], transpose=True, group_size=32, bits=4)
        return lambda x: x @ w["wf"].T

    out = {"shapes": {}}
    for name, k, n in SHAPES:
        w = weight(n, k)
        for m in args.batches:
            x = mx.array(rng.standard_normal((m, k)).astype(np.float32))
            work = m * n * k
            calls = max(3, min(1000, int(2e8 / work)))
            if engine == "mx.qmm":
                calls = max(2, calls // 20)
            if engine == "numpy fp32":
                xn, wn = np.array(x), w["np"]
                t = timed(lambda: xn @ wn.T, calls, args.repeats)
            else:
                f = op(w)
                t = timed(lambda: mx.eval(f(x)), calls, args.repeats)
            out["shapes"][f"{name}|{m}"] = t
        del w
    if engine == "numpy fp32":
        return out

    if engine == "native int8":  # embedding rows from the tied 49152 x 576 table
        w = weight(49152, 576)
        out["embed"] = {}
        for m in args.batches:
            ids = mx.array(rng.integers(0, 49152, size=(1, m)).astype(np.int32))
            out["embed"][str(m)] = [
                timed(lambda: mx.eval(native.qembed(ids, w["c"], w["sn"], w["bn"], bits=4, group_size=32,
                                                    dtype=mx.float32)), 200, args.repeats),
                timed(lambda: mx.eval(mx.dequantize(w["c"][ids], w["s"][ids], w["b"][ids], group_size=32, bits=4)),
                      200, args.repeats)]
        del w

    if args.skip_step:
        return out
    layers = [[op(weight(n, k)) for k, n in LAYER] for _ in range(30)]
    head = op(weight(49152, 576))
    x576 = mx.array(rng.standard_normal((1, 576)).astype(np.float32))
    x1536 = mx.array(rng.standard_normal((1, 1536)).astype(np.float32))

    def step():
        outs = [f(x1536 if k == 1536 else x576) for layer in layers for (k, _), f in zip(LAYER, layer)]
        outs.append(head(x576))
        mx.eval(outs)

    out["step"] = timed(step, 3, args.repeats)
    if engine.startswith("native") and native.threads() > 1:
        threads = native.threads()
        native.set_threads(1)
        out["step 1 thread"] = timed(step, 3, args.repeats)
        native.set_threads(threads)
    return out


def fmt(t) -> str:
    if t is None:
        return "-"
    best, med = t
    d = 3 if best < 1 else 2
    return f"{best:.{d}f} ({best:.{d}f}..{med:.{d}f})"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--repeats", type=int, default=7)
    ap.add_argument("--threads", type=int, default=0, help="native kernel threads (0: default)")
    ap.add_argument("--scales", choices=["f32", "f16"], default="f32",
                    help="dtype of scales/biases the native kernels get (mlxc binds f32 today; GGUF stores f16)")
    ap.add_argument("--batches", default="1,128")
    ap.add_argument("--skip-step", action="store_true", help="skip the 211-matvec decode step")
    ap.add_argument("--engines", default=",".join(ENGINES))
    ap.add_argument("--engine", help=argparse.SUPPRESS)  # internal: measure one engine, print JSON
    args = ap.parse_args()
    args.batches = [int(b) for b in args.batches.split(",")]
    if args.engine:
        print(json.dumps(measure(args.engine, args)))
        return

    import mlxc  # noqa: F401
    import mlx.core as mx
    from mlxc.blas import active_blas
    from mlxc.kernels import native

    print(f"MLX {mx.__version__}, BLAS {active_blas().name}, {native.describe()}, native scales {args.scales}, "
          f"OPENBLAS_NUM_THREADS={os.environ.get('OPENBLAS_NUM_THREADS', 'unset')}, {os.cpu_count()} CPUs")
    engines = [e for e in args.engines.split(",") if e in ENGINES]
    results = {}
    for e in engines:
        cmd = [sys.executable, __file__, "--engine", e, "--repeats", str(args.repeats), "--threads", str(args.threads),
               "--scales", args.scales, "--batches", ",".join(map(str, args.batches))]
        cmd += ["--skip-step"] if args.skip_step else []
        res = subprocess.run(cmd, capture_output=True, text=True)
        if res.returncode != 0:
            print(f"{e}: failed\n{res.stderr[-2000:]}", file=sys.stderr)
            continue
        results[e] = json.loads(res.stdout.strip().splitlines()[-1])

    print(f"\nms per call, best (best..median) of {args.repeats} rounds")
    print(f"| shape | batch | {' | '.join(engines)} | native int8 vs mx fp32 |")
    print("|---|---|" + "---|" * (len(engines) + 1))
    for name, _, _ in SHAPES:
        for m in args.batches:
            key = f"{name}|{m}"
            cells = [fmt(results.get(e, {}).get("shapes", {}).get(key)) for e in engines]
            a, b = (results.get(e, {}).get("shapes", {}).get(key) for e in ("native int8", "mx fp32"))
            ratio = f"{b[0] / a[0]:.1f}x" if a and b else "-"
            print(f"| {name} | {m} | {' | '.join(cells)} | {ratio} |")
    if "embed" in results.get("native int8", {}):
        print("\n| embedding lookup, 49152 x 576 4-bit | ids | native qembed | mx.dequantize(codes[ids], ...) |")
        print("|---|---|---|---|")
        for m, (nat, ref) in results["native int8"]["embed"].items():
            print(f"| | {m} | {fmt(nat)} | {fmt(ref)} |")
    if not args.skip_step:
        print("\n| 211 matvecs of one decode step, one graph | ms per step |")
        print("|---|---|")
        for e in engines:
            for k in ("step", "step 1 thread"):
                if k in results.get(e, {}):
                    print(f"| {e}{', 1 thread' if k != 'step' else ''} | {fmt(results[e][k])} |")


if __name__ == "__main__":
    main()
