"""fp32 matmul throughput of MLX on the CPU with and without mlxc's BLAS preload.

Each setting of MLXC_BLAS runs in its own child process, because the preload only works before mlx.core is loaded:

    python benchmarks/blas_matmul.py [--sizes 256 512 1024 2048] [--repeats 3]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys

SETTINGS = ("off", "auto")


def child(sizes: list[int], repeats: int) -> None:
    import mlxc  # noqa: F401  (runs the BLAS preload first)
    from mlxc.blas import active_blas, matmul_gflops

    info = active_blas()
    rates = {}
    for n in sizes:
        # The reference BLAS takes seconds per 2048^2 matmul: fewer repeats for the big sizes.
        rates[n] = matmul_gflops(n, repeats=repeats if n < 2048 else max(1, min(repeats, 2)))
    print(json.dumps({"name": info.name, "path": info.path, "reason": info.reason, "gflops": rates}))


def run_setting(setting: str, sizes: list[int], repeats: int) -> dict:
    env = dict(os.environ, MLXC_BLAS=setting)
    cmd = [sys.executable, __file__, "--child", "--repeats", str(repeats), "--sizes", *map(str, sizes)]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True)
    if proc.returncode != 0:
        raise SystemExit(f"child with MLXC_BLAS={setting} failed:\n{proc.stderr}")
    out = json.loads(proc.stdout.strip().splitlines()[-1])
    out["gflops"] = {int(k): v for k, v in out["gflops"].items()}
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--sizes", type=int, nargs="+", default=[256, 512, 1024, 2048])
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        child(args.sizes, args.repeats)
        return

    results = {s: run_setting(s, args.sizes, args.repeats) for s in SETTINGS}
    base = results["off"]["gflops"]
    header = ["MLXC_BLAS", "BLAS", "n", "GFLOP/s", "vs off"]
    rows = []
    for s in SETTINGS:
        r = results[s]
        for n in args.sizes:
            g = r["gflops"][n]
            rows.append([s, r["name"], str(n), f"{g:.1f}", f"{g / base[n]:.1f}x"])

    try:
        from rich.console import Console
        from rich.table import Table
    except ImportError:
        widths = [max(len(h), *(len(row[i]) for row in rows)) for i, h in enumerate(header)]
        print("  ".join(h.ljust(w) for h, w in zip(header, widths)))
        print("  ".join("-" * w for w in widths))
        for row in rows:
            print("  ".join(c.ljust(w) for c, w in zip(row, widths)))
    else:
        table = Table(title="MLX fp32 matmul on the CPU")
        for i, h in enumerate(header):
            table.add_column(h, justify="right" if i >= 2 else "left")
        for row in rows:
            table.add_row(*row)
        Console().print(table)
    for s in SETTINGS:
        r = results[s]
        print(f"MLXC_BLAS={s}: {r['name']}" + (f" [{r['path']}]" if r["path"] else "") + f" - {r['reason']}")


if __name__ == "__main__":
    main()
