"""Peak memory per rank and tokens/s of the 8-layer, 1024-hidden Llama of bench_llama.py, split over local ranks.

One process, then 2 and 4 ranks with tensor and with pipeline parallelism (mlxc's launcher, loopback ring), each
configuration in fresh processes on the same random-weight safetensors checkpoint: the model loads, `bench_model`
times prefill and greedy decode (best of N rounds after a warm-up), and every rank reports its peak memory (MLX's
allocator and the resident set, which includes Python, MLX and the BLAS: ~0.1 GB before any weight).

    python benchmarks/bench_distributed.py [--prompt-len 128] [--gen-len 32] [--repeats 2] [--ranks 2,4]
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
from bench_llama import make_checkpoint  # noqa: E402

WORKER = r'''
import json, sys
import mlxc
from mlxc.runtime import distributed
from mlxc.runtime.bench import bench_model
src, parallel, prompt_len, gen_len, repeats = sys.argv[1], sys.argv[2], *map(int, sys.argv[3:6])
model = mlxc.load(src) if parallel == "none" else mlxc.load(src, parallel=parallel)
loaded = distributed.peak_memory()
r = bench_model(model, prompt_len=prompt_len, gen_len=gen_len, repeats=repeats)
peak = distributed.peak_memory()
if getattr(model, "rank", 0) == 0:
    sys.stdout.write(json.dumps({"prefill": r.prefill_tps, "decode": r.decode_tps, "loaded": loaded,
                                 "peak": peak}) + "\n")
distributed.finish()
'''


def run(ckpt: Path, ranks: int, parallel: str, args) -> dict:
    cmd = [sys.executable, "-c", WORKER, str(ckpt), parallel, str(args.prompt_len), str(args.gen_len),
           str(args.repeats)]
    if ranks == 1:
        out = subprocess.run(cmd, capture_output=True, text=True, check=True).stdout
    else:
        with tempfile.TemporaryFile("w+") as f:
            from mlxc.runtime.distributed import launch

            if launch(cmd, ranks, stdout=f, timeout=1800, rank_timeout=300) != 0:
                raise SystemExit(f"{ranks} ranks, {parallel}: the job failed")
            f.seek(0)
            out = f.read()
    return json.loads(out.strip().splitlines()[-1])


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--prompt-len", type=int, default=128)
    p.add_argument("--gen-len", type=int, default=32)
    p.add_argument("--repeats", type=int, default=2)
    p.add_argument("--ranks", default="2,4")
    p.add_argument("--checkpoint", type=Path, default=None, help="reuse (or create) the checkpoint here")
    p.add_argument("--no-single", dest="single", action="store_false", help="skip the one-process baseline")
    args = p.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        ckpt = args.checkpoint or Path(tmp) / "llama-8l"
        if not (ckpt / "config.json").exists():
            make_checkpoint(ckpt)
        configs = ([(1, "none")] if args.single else []) + \
            [(int(n), m) for n in args.ranks.split(",") for m in ("tensor", "pipeline")]
        print("| ranks | parallel | prefill tok/s | decode tok/s | MLX peak GB per rank (after load / overall) "
              "| resident peak GB per rank |")
        print("|---|---|---|---|---|---|")
        for ranks, parallel in configs:
            r = run(ckpt, ranks, parallel, args)
            mlx_mem = ", ".join(f"{a[0]:.2f} / {b[0]:.2f}" for a, b in zip(r["loaded"], r["peak"]))
            rss = ", ".join(f"{b[1]:.2f}" for b in r["peak"])
            print(f"| {ranks} | {parallel if ranks > 1 else '-'} | {r['prefill']:.1f} | {r['decode']:.1f} | "
                  f"{mlx_mem} | {rss} |", flush=True)


if __name__ == "__main__":
    main()
