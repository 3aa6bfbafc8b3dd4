"""mlxc's native quantized kernels (mlxc.kernels.native) against MLX's own kernels, on SmolLM2-135M's shapes.

Per call, ms, best of --repeats rounds (each round times --calls evaluated calls; the range printed is best .. median
of the rounds, as the machine may be shared):
  native int8     4-bit g32 (Q4_1's layout), activations quantized to int8 per 32-block, the best ISA
  native float    the same weights, activations in float
  mx.qmm          mx.quantized_matmul on the same codes (4-bit g32)
  mx fp32         the dequantized weight, float32 matmul in MLX (OpenBLAS when `import mlxc` preloaded it)
  numpy fp32      numpy's own BLAS on the same float32 weight
Then a whole decode step's 211 matrix-vector products (30 layers x q, k, v, o, gate, up, down, plus the tied LM
head), evaluated as one graph, and the embedding lookup.

    python benchmarks/bench_native_kernels.py [--repeats 7] [--threads N] [--scales f32|f16] [--only-batch 1]
"""

from __future__ import annotations

import argparse
import os
import statistics
import time

# shapes: (name, K, N)
SHAPES = [("q/o 576->576", 576, 576), ("k/v 576->192", 576, 192), ("gate+up 576->3072", 576, 3072),
          ("down 1536->576", 1536, 576), ("lm head 576->49152", 576, 49152)]
LAYER = [(576, 576), (576, 192), (576, 192), (576, 576), (576, 1536), (576, 1536), (1536, 576)]  # q k v o g u d


def timed(fn, calls: int, repeats: int) -> tuple[float, float]:
    """(best, median) ms per call over rounds of `calls` calls; fn() must evaluate its result."""
    fn()
    rounds = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        for _ in range(calls):
            fn()
        rounds.append((time.perf_counter() - t0) / calls * 1e3)
    return min(rounds), statistics.median(rounds)


def fmt(t: tuple[float, float] | None) -> str:
    if t is None:
        return "-"
    best, med = t
    return f"{best:.3f} ({best:.3f}..{med:.3f})" if best < 1 else f"{best:.2f} ({best:.2f}..{med:.2f})"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--repeats", type=int, default=7)
    ap.add_argument("--threads", type=int, default=0, help="native kernel threads (0: default)")
    ap.add_argument("--scales", choices=["f32", "f16"], default="f32",
                    help="dtype of scales/biases given to the native kernel (mlxc binds f32; GGUF stores f16)")
    ap.add_argument("--only-batch", type=int, default=0, help="1 or 128: skip the other")
    ap.add_argument("--skip-step", action="store_true", help="skip the 211-matvec decode step")
    args = ap.parse_args()

    import numpy as np

    import mlxc  # noqa: F401  (preloads OpenBLAS before MLX)
    import mlx.core as mx
    from mlxc.blas import active_blas
    from mlxc.kernels import native

    if not native.available():
        raise SystemExit(f"native kernels unavailable: {native.reason()}")
    if args.threads:
        native.set_threads(args.threads)
    sdt = mx.float16 if args.scales == "f16" else mx.float32
    print(f"MLX {mx.__version__}, BLAS {active_blas().name}, {native.describe()}, scales {args.scales}, "
          f"OPENBLAS_NUM_THREADS={os.environ.get('OPENBLAS_NUM_THREADS', 'unset')}")
    rng = np.random.default_rng(0)

    def quantized(n: int, k: int):
        w = mx.array(rng.standard_normal((n, k)).astype(np.float32) * 0.05)
        c, s, b = mx.quantize(w, group_size=32, bits=4)
        wf = mx.dequantize(c, s, b, group_size=32, bits=4)
        mx.eval(c, s, b, wf)
        return c, s, b, wf

    batches = [b for b in (1, 128) if args.only_batch in (0, b)]
    cols = ["native int8", "native float", "mx.qmm", "mx fp32", "numpy fp32"]
    print(f"\nms per call, best (best..median) of {args.repeats} rounds")
    print(f"| shape | batch | {' | '.join(cols)} | int8 speed-up vs mx fp32 |")
    print("|---|---|" + "---|" * (len(cols) + 1))
    for name, k, n in SHAPES:
        c, s, b, wf = quantized(n, k)
        cs, bs = s.astype(sdt), b.astype(sdt)
        wn = np.array(wf)
        for m in batches:
            x = mx.array(rng.standard_normal((m, k)).astype(np.float32))
            xn = np.array(x)
            work = m * n * k
            calls = max(3, min(2000, int(3e8 / max(work, 1) / (8 if m > 1 else 1))))
            res = {
                "native int8": timed(lambda: mx.eval(native.qmatmul(x, c, cs, bs, bits=4, group_size=32)),
                                     calls, args.repeats),
                "native float": timed(lambda: mx.eval(native.qmatmul(x, c, cs, bs, bits=4, group_size=32,
                                                                     int8_activations=False)), calls, args.repeats),
                "mx.qmm": timed(lambda: mx.eval(mx.quantized_matmul(x, c, s, b, transpose=True, group_size=32,
                                                                    bits=4)), max(3, calls // 20), args.repeats),
                "mx fp32": timed(lambda: mx.eval(x @ wf.T), calls, args.repeats),
                "numpy fp32": timed(lambda: xn @ wn.T, calls, args.repeats),
            }
            ratio = res["mx fp32"][0] / res["native int8"][0]
            print(f"| {name} | {m} | {' | '.join(fmt(res[c_]) for c_ in cols)} | {ratio:.1f}x |", flush=True)
        del c, s, b, wf, wn

    # embedding rows from the tied 49152 x 576 table
    c, s, b, _ = quantized(49152, 576)
    cs, bs = s.astype(sdt), b.astype(sdt)
    print("\n| embedding lookup (49152 x 576, 4-bit) | ids | native qembed | mx.dequantize(codes[ids], ...) |")
    print("|---|---|---|---|")
    for m in batches:
        ids = mx.array(rng.integers(0, 49152, size=(1, m)).astype(np.int32))
        t_nat = timed(lambda: mx.eval(native.qembed(ids, c, cs, bs, bits=4, group_size=32, dtype=mx.float32)),
                      200, args.repeats)
        t_mx = timed(lambda: mx.eval(mx.dequantize(c[ids], s[ids], b[ids], group_size=32, bits=4)), 200,
                     args.repeats)
        print(f"| | {m} | {fmt(t_nat)} | {fmt(t_mx)} |")

    if args.skip_step:
        return
    # one decode step's matrix-vector products, as one graph
    print("\n| 211 matvecs of a decode step (30 layers + LM head), one graph | ms per step |")
    print("|---|---|")
    layers = [[quantized(n, k) for k, n in LAYER] for _ in range(30)]
    head = (c, s, b, _)
    x576 = mx.array(rng.standard_normal((1, 576)).astype(np.float32))
    x1536 = mx.array(rng.standard_normal((1, 1536)).astype(np.float32))

    def step(mm):
        outs = []
        for layer in layers:
            for (k, n), w in zip(LAYER, layer):
                outs.append(mm(x1536 if k == 1536 else x576, w))
        outs.append(mm(x576, head))
        mx.eval(outs)

    def nat(x, w):
        return native.qmatmul(x, w[0], w[1].astype(sdt) if sdt != mx.float32 else w[1],
                              w[2].astype(sdt) if sdt != mx.float32 else w[2], bits=4, group_size=32)

    if sdt != mx.float32:  # convert once, outside the timing
        layers = [[(w[0], w[1].astype(sdt), w[2].astype(sdt), w[3]) for w in layer] for layer in layers]
        head = (head[0], head[1].astype(sdt), head[2].astype(sdt), head[3])
        mx.eval([w[1:3] for layer in layers for w in layer], head[1:3])

        def nat(x, w):  # noqa: F811
            return native.qmatmul(x, w[0], w[1], w[2], bits=4, group_size=32)

    rows = [("native int8", nat),
            ("native float", lambda x, w: native.qmatmul(x, w[0], w[1], w[2], bits=4, group_size=32,
                                                        int8_activations=False)),
            ("mx.quantized_matmul", lambda x, w: mx.quantized_matmul(x, w[0], w[1].astype(mx.float32),
                                                                    w[2].astype(mx.float32), transpose=True,
                                                                    group_size=32, bits=4)),
            ("mx fp32 matmul", lambda x, w: x @ w[3].T)]
    for label, mm in rows:
        print(f"| {label} | {fmt(timed(lambda: step(mm), 3, args.repeats))} |", flush=True)


if __name__ == "__main__":
    main()
