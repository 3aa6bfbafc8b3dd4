"""One rank of a tests/test_distributed.py job (started by `mlxc.runtime.distributed.launch`).

`cases` (JSON): [name, source, parallel] triples; rank 0 writes each case's prefill logits, one decode step's
logits and greedy tokens to OUT/name.npz. `--die SIGNAL` makes rank 1 send itself SIGNAL a few model steps into an
endless generation (the failure tests); `--die hang` makes it sleep there instead, alive (its heartbeat goes on).
"""

import json
import os
import signal
import sys
import time
from pathlib import Path

import mlxc  # noqa: F401  (before mlx.core: the BLAS preload)
import mlx.core as mx
import numpy as np

from mlxc.parallel import load_parallel
from mlxc.runtime import distributed

PROMPT = [[3, 17, 250, 9, 42, 7, 101, 64, 5, 200]]


def run_cases(cases, out: Path) -> None:
    for name, src, parallel in cases:
        model = load_parallel(src, parallel)
        cache = model.make_cache()
        prefill = model(mx.array(PROMPT), cache=cache).logits
        step = model(mx.array([[11]]), cache=cache).logits
        tokens = model.generate(mx.array(PROMPT), max_new_tokens=6)
        mx.eval(prefill, step, tokens)  # on every rank: each result needs every rank's collectives
        if model.rank == 0:
            np.savez(out / f"{name}.npz", prefill=np.array(prefill), step=np.array(step), tokens=np.array(tokens))


def die(src: str, parallel: str, how: str) -> None:
    model = load_parallel(src, parallel)
    cache = model.make_cache()
    for i in range(10_000):
        mx.eval(model(mx.array([[1 + i % 50]]), cache=cache).logits)
        if i == 3 and model.rank == 1:
            if how == "hang":
                time.sleep(3600)
            os.kill(os.getpid(), getattr(signal, how))


if __name__ == "__main__":
    if sys.argv[1] == "--die":
        die(sys.argv[3], sys.argv[4], sys.argv[2])
    else:
        run_cases(json.loads(sys.argv[1]), Path(sys.argv[2]))
    distributed.finish()
