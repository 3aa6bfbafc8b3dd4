"""Prefill and decode tokens/s for a 1024-hidden, 8-layer Llama: mlxc with the fast BLAS on and off, mlx-lm, and
transformers in fp32 (torch's CPU kernels), when installed.

Every configuration runs in its own process (the BLAS is chosen before MLX loads), on the same random-weight
Hugging Face checkpoint, with the same measurement: best of N rounds after a warm-up, greedy decode with a KV cache.

    python benchmarks/bench_llama.py [--prompt-len 128] [--gen-len 32] [--repeats 2]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

CONFIG = dict(
    architectures=["LlamaForCausalLM"], model_type="llama", vocab_size=32000, hidden_size=1024,
    intermediate_size=2816, num_hidden_layers=8, num_attention_heads=16, num_key_value_heads=8,
    max_position_embeddings=4096, rms_norm_eps=1e-5, rope_theta=10000.0, tie_word_embeddings=False,
    bos_token_id=1, eos_token_id=2, torch_dtype="float32",
)


def make_checkpoint(path: Path) -> None:
    """Random weights in Hugging Face layout, written with safetensors (no torch needed)."""
    import numpy as np
    from safetensors.numpy import save_file

    c = CONFIG
    rng = np.random.default_rng(0)
    h, i, d = c["hidden_size"], c["intermediate_size"], c["hidden_size"] // c["num_attention_heads"]
    kv = c["num_key_value_heads"] * d
    w = lambda *s: (rng.standard_normal(s, dtype=np.float32) * 0.02)  # noqa: E731
    t = {"model.embed_tokens.weight": w(c["vocab_size"], h), "model.norm.weight": np.ones(h, np.float32),
         "lm_head.weight": w(c["vocab_size"], h)}
    for n in range(c["num_hidden_layers"]):
        p = f"model.layers.{n}."
        t.update({
            p + "input_layernorm.weight": np.ones(h, np.float32),
            p + "post_attention_layernorm.weight": np.ones(h, np.float32),
            p + "self_attn.q_proj.weight": w(h, h), p + "self_attn.k_proj.weight": w(kv, h),
            p + "self_attn.v_proj.weight": w(kv, h), p + "self_attn.o_proj.weight": w(h, h),
            p + "mlp.gate_proj.weight": w(i, h), p + "mlp.up_proj.weight": w(i, h), p + "mlp.down_proj.weight": w(h, i),
        })
    path.mkdir(parents=True, exist_ok=True)
    save_file(t, str(path / "model.safetensors"), metadata={"format": "pt"})
    (path / "config.json").write_text(json.dumps(c))


def time_rounds(forward, make_cache, vocab: int, prompt_len: int, gen_len: int, repeats: int):
    """The same loop for every implementation: prefill, then one-token greedy steps."""
    import mlx.core as mx
    import numpy as np

    ids = mx.array(np.random.default_rng(1).integers(0, vocab, size=(1, prompt_len)), dtype=mx.int32)
    best_p = best_d = float("inf")
    for r in range(repeats + 1):
        cache = make_cache()
        t0 = time.perf_counter()
        tok = mx.argmax(forward(ids, cache)[:, -1], axis=-1)
        mx.eval(tok)
        t1 = time.perf_counter()
        for _ in range(gen_len):
            tok = mx.argmax(forward(tok[:, None], cache)[:, -1], axis=-1)
            mx.async_eval(tok)
        mx.eval(tok)
        t2 = time.perf_counter()
        if r:
            best_p, best_d = min(best_p, t1 - t0), min(best_d, t2 - t1)
    return prompt_len / best_p, gen_len / best_d


def time_torch_rounds(model, vocab: int, prompt_len: int, gen_len: int, repeats: int):
    """time_rounds' loop for a transformers model (same ids), its own KV cache."""
    import numpy as np
    import torch

    ids = torch.tensor(np.random.default_rng(1).integers(0, vocab, size=(1, prompt_len)))
    best_p = best_d = float("inf")
    with torch.inference_mode():
        for r in range(repeats + 1):
            t0 = time.perf_counter()
            out = model(ids, use_cache=True, logits_to_keep=1)
            tok, past = out.logits[:, -1].argmax(-1, keepdim=True), out.past_key_values
            t1 = time.perf_counter()
            for _ in range(gen_len):
                out = model(tok, past_key_values=past, use_cache=True)
                tok, past = out.logits[:, -1].argmax(-1, keepdim=True), out.past_key_values
            t2 = time.perf_counter()
            if r:
                best_p, best_d = min(best_p, t1 - t0), min(best_d, t2 - t1)
    return prompt_len / best_p, gen_len / best_d


def worker(impl: str, ckpt: str, prompt_len: int, gen_len: int, repeats: int) -> dict:
    if impl == "transformers fp32":
        import torch
        import transformers

        model = transformers.AutoModelForCausalLM.from_pretrained(ckpt, dtype=torch.float32).eval()
        prefill, decode = time_torch_rounds(model, CONFIG["vocab_size"], prompt_len, gen_len, repeats)
        return {"impl": impl, "blas": f"torch {torch.__version__}", "prefill": prefill, "decode": decode}
    if impl == "mlxc":
        import mlxc
        from mlxc.blas import active_blas

        model = mlxc.load(ckpt)
        step = lambda x, c: model.step(x, c, logits_to_keep=1)  # noqa: E731 - as generation (and transformers) do
        prefill, decode = time_rounds(step, model.make_cache, model.vocab_size, prompt_len, gen_len, repeats)
        blas = active_blas().name
    else:
        from mlxc.blas import active_blas  # importing mlxc applies the same BLAS preload mlx-lm then uses

        blas = active_blas().name
        from mlx_lm.models.cache import make_prompt_cache
        from mlx_lm.utils import load_model

        model, _ = load_model(Path(ckpt))
        prefill, decode = time_rounds(lambda x, c: model(x, cache=c), lambda: make_prompt_cache(model),
                                      CONFIG["vocab_size"], prompt_len, gen_len, repeats)
    return {"impl": impl, "blas": blas, "prefill": prefill, "decode": decode}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--prompt-len", type=int, default=128)
    ap.add_argument("--gen-len", type=int, default=32)
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--worker", nargs=2, metavar=("IMPL", "CKPT"), help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.worker:
        print(json.dumps(worker(*args.worker, args.prompt_len, args.gen_len, args.repeats)))
        return

    import importlib.util

    impls = ["mlxc"] + ["mlx-lm"] * bool(importlib.util.find_spec("mlx_lm"))
    torch_too = bool(importlib.util.find_spec("torch") and importlib.util.find_spec("transformers"))
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        ckpt = Path(tmp) / "llama-1024x8"
        make_checkpoint(ckpt)
        for blas in ("auto", "off"):
            for impl in impls + ["transformers fp32"] * (torch_too and blas == "auto"):
                print(f"· {impl} with MLXC_BLAS={blas} ...", file=sys.stderr, flush=True)
                env = {**os.environ, "MLXC_BLAS": blas}
                out = subprocess.run(
                    [sys.executable, __file__, "--worker", impl, str(ckpt), "--prompt-len", str(args.prompt_len),
                     "--gen-len", str(args.gen_len), "--repeats", str(args.repeats)],
                    env=env, capture_output=True, text=True,
                )
                if out.returncode:
                    print(out.stderr, file=sys.stderr)
                    raise SystemExit(f"{impl} worker failed")
                rows.append(json.loads(out.stdout.strip().splitlines()[-1]))
    base = rows[0]
    title = (f"Llama 1024 hidden x 8 layers, fp32, prompt {args.prompt_len}, {args.gen_len} decode steps; "
             f"ratios vs mlxc + {base['blas']}")
    header = ("implementation", "BLAS", "prefill tok/s", "decode tok/s", "prefill ratio", "decode ratio")
    table = [(r["impl"], r["blas"], f"{r['prefill']:.1f}", f"{r['decode']:.1f}",
              f"{r['prefill'] / base['prefill']:.2f}x", f"{r['decode'] / base['decode']:.2f}x") for r in rows]
    try:
        from rich.console import Console
        from rich.table import Table

        t = Table(title=title)
        for h in header:
            t.add_column(h, justify="left" if h in ("implementation", "BLAS") else "right")
        for row in table:
            t.add_row(*row)
        Console(width=200).print(t)
    except ImportError:
        print(title)
        for row in (header, *table):
            print(" | ".join(f"{c:>16}" for c in row))


if __name__ == "__main__":
    main()
