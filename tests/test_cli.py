"""The `mlxc` command line: in-process through `mlxc.cli.main` (fast), and through `python -m mlxc` for the entry point
and for what a user's terminal really sees (exit codes, one `error:` line, no tracebacks)."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import mlx.core as mx
import numpy as np
import pytest

import mlxc
from mlxc.cli import main
from mlxc.ir import from_json, parse_program, print_program


def _run(capsys, *argv: str) -> tuple[int, str, str]:
    code = main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


def _cli(*argv: str, timeout: int = 120) -> subprocess.CompletedProcess:
    env = {**os.environ, "COLUMNS": "200"}
    env.pop("MLXC_DEBUG", None)
    return subprocess.run([sys.executable, "-m", "mlxc", *argv], capture_output=True, text=True, env=env,
                          timeout=timeout)


@pytest.fixture(scope="module")
def artifact(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("cli") / "tiny-art"
    assert main(["compile", "preset:tiny", "-o", str(out), "--init-seed", "3"]) == 0
    return out


# ------------------------------------------------------------------------------------------------- version, inspect


def test_version_in_process(capsys):
    code, out, _ = _run(capsys, "--version")
    assert code == 0
    assert f"mlxc {mlxc.__version__}" in out and "mlx " in out
    assert "BLAS" in out


def test_console_entry_subprocess():
    proc = _cli("--version")
    assert proc.returncode == 0, proc.stderr
    assert "mlxc" in proc.stdout and "BLAS" in proc.stdout


def test_installed_console_script():
    exe = shutil.which("mlxc")
    if exe is None:
        pytest.skip("the mlxc console script is not on PATH")
    proc = subprocess.run([exe, "--version"], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert "BLAS" in proc.stdout


def test_no_command_prints_help(capsys):
    code, out, _ = _run(capsys)
    assert code == 2
    assert "compile" in out and "dump" in out and "run" in out


def test_inspect_preset(capsys):
    code, out, _ = _run(capsys, "inspect", "preset:tiny")
    assert code == 0
    spec = mlxc.frontends.presets.get_preset("tiny")
    n = spec.num_parameters()
    assert "parameters" in out and f"{n:,}" in out
    assert "layers" in out and "vocabulary" in out and "256" in out
    # the per-layer table: identical layers collapse into one row naming their range, and the counts add up
    rows = [line for line in out.splitlines() if "attention" in line and "│" in line and "GQA" in line]
    assert len(rows) == 1 and "0-1" in rows[0] and spec.num_layers == 2
    model = mlxc.load("preset:tiny")
    assert sum(p.size for _, p in mlx_params(model)) == n


def mlx_params(model):
    from mlx.utils import tree_flatten

    return tree_flatten(model.net.parameters())


def test_inspect_artifact(capsys, artifact):
    code, out, _ = _run(capsys, "inspect", str(artifact))
    assert code == 0
    assert "parameters" in out and "artifact" in out


def test_inspect_hf_dir(capsys, tmp_path):
    transformers = pytest.importorskip("transformers")
    config = transformers.LlamaConfig(vocab_size=300, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128)
    config.save_pretrained(tmp_path)  # inspect reads only the config: no weights needed
    code, out, _ = _run(capsys, "inspect", str(tmp_path))
    assert code == 0
    assert "300" in out and "parameters" in out


# ------------------------------------------------------------------------------------------------- dump


def test_dump_text_reparses(capsys):
    code, out, _ = _run(capsys, "dump", "preset:tiny")
    assert code == 0
    assert "func @main" in out
    program = parse_program(out)
    assert print_program(program).strip() == out.strip()
    assert str(program) == str(mlxc.load("preset:tiny").program)


def test_dump_json(capsys):
    code, out, _ = _run(capsys, "dump", "preset:tiny", "--format", "json")
    assert code == 0
    json.loads(out)
    program = from_json(out)
    assert program.main.name == "main"
    code, text, _ = _run(capsys, "dump", "preset:tiny", "--format", "text")
    assert print_program(program).strip() == text.strip()


def test_dump_dot(capsys):
    code, out, _ = _run(capsys, "dump", "preset:tiny", "--format", "dot")
    assert code == 0
    assert out.lstrip().startswith("digraph") and out.rstrip().endswith("}")
    assert "@main" in out


def test_dump_dtype(capsys):
    code, out, _ = _run(capsys, "dump", "preset:tiny", "--dtype", "bfloat16")
    assert code == 0
    assert "bf16[" in out and "f32[256, 64]" not in out


def test_dump_after_and_no_opt(capsys):
    code, after, _ = _run(capsys, "dump", "preset:tiny", "--after", "dce")
    assert code == 0 and "func @main" in after
    code, raw, _ = _run(capsys, "dump", "preset:tiny", "--no-opt")
    assert code == 0 and "func @main" in raw
    parse_program(raw)
    code, explicit, _ = _run(capsys, "dump", "preset:tiny", "--passes", "dce")
    assert code == 0 and explicit == after


def test_dump_to_file(capsys, tmp_path):
    target = tmp_path / "tiny.mlxc"
    code, out, err = _run(capsys, "dump", "preset:tiny", "-o", str(target))
    assert code == 0 and out == ""
    assert "wrote" in err
    parse_program(target.read_text())


def test_dump_artifact(capsys, artifact):
    code, out, _ = _run(capsys, "dump", str(artifact))
    assert code == 0
    assert out.strip() == (artifact / "program.mlxc").read_text().strip()


def test_dump_unknown_pass(capsys):
    code, out, err = _run(capsys, "dump", "preset:tiny", "--passes", "nope")
    assert code == 1 and out == ""
    assert "unknown pass" in err and "dce" in err


def test_dump_after_pass_not_in_pipeline(capsys):
    code, _, err = _run(capsys, "dump", "preset:tiny", "--no-opt", "--after", "dce")
    assert code == 1 and "--after" in err


# ------------------------------------------------------------------------------------------------- compile and run


def test_compile_and_run_artifact(capsys, artifact):
    assert {"model.py", "program.mlxc", "weights.safetensors", "manifest.json"} <= {p.name for p in artifact.iterdir()}
    code, out, _ = _run(capsys, "run", str(artifact), "--tokens", "1,2,3", "--max-new-tokens", "5")
    assert code == 0
    ids = [int(t) for t in out.strip().split(",")]
    assert len(ids) == 5
    expected = np.array(mlxc.load(artifact).generate(mx.array([[1, 2, 3]]), max_new_tokens=5))[0, 3:].tolist()
    assert ids == expected
    # the artifact holds the seed-3 random weights of the preset
    code, again, _ = _run(capsys, "run", "preset:tiny", "--init-seed", "3", "--tokens", "1,2,3", "--max-new-tokens", "5")
    assert code == 0 and again == out


def test_run_sampling_flags(capsys):
    argv = ["run", "preset:tiny", "--tokens", "4,5,6", "--max-new-tokens", "6", "--temperature", "1.0",
            "--top-k", "20", "--seed", "7", "--stop", ""]
    code, a, _ = _run(capsys, *argv)
    code2, b, _ = _run(capsys, *argv)
    assert code == code2 == 0 and a == b
    ids = [int(t) for t in a.strip().split(",")]
    expected = np.array(mlxc.load("preset:tiny").generate(
        [[4, 5, 6]], max_new_tokens=6, temperature=1.0, top_k=20, seed=7, stop_tokens=[]))[0, 3:].tolist()
    assert ids == expected


def test_run_stop_tokens(capsys):
    code, full, _ = _run(capsys, "run", "preset:tiny", "--tokens", "1,2,3", "--max-new-tokens", "8", "--stop", "")
    ids = [int(t) for t in full.strip().split(",")]
    assert code == 0 and len(ids) == 8
    stop = ids[2]
    code, short, _ = _run(capsys, "run", "preset:tiny", "--tokens", "1,2,3", "--max-new-tokens", "8",
                          "--stop", str(stop))
    assert code == 0
    assert [int(t) for t in short.strip().split(",")] == ids[: ids.index(stop) + 1]


def test_compile_dump_dir(capsys, tmp_path):
    dump = tmp_path / "stages"
    code, out, err = _run(capsys, "compile", "preset:tiny", "-o", str(tmp_path / "art"), "--dump-dir", str(dump))
    assert code == 0
    assert "compiled" in out
    names = sorted(p.name for p in dump.iterdir())
    from mlxc.passes import DEFAULT_PIPELINE

    assert names == ["00-input.mlxc"] + [f"{i:02d}-{n}.mlxc" for i, n in enumerate(DEFAULT_PIPELINE, 1)]
    for p in dump.iterdir():
        assert "func @main" in p.read_text()
        parse_program(p.read_text())
    assert parse_program((dump / "01-dce.mlxc").read_text()).main.name == "main"


def test_compile_existing_dir_needs_force(capsys, tmp_path):
    out_dir = tmp_path / "art"
    assert main(["compile", "preset:tiny", "-o", str(out_dir), "--init-seed", "1"]) == 0
    capsys.readouterr()
    code, _, err = _run(capsys, "compile", "preset:tiny", "-o", str(out_dir), "--init-seed", "2")
    assert code == 1 and "already exists" in err and "--force" in err
    code, _, _ = _run(capsys, "compile", "preset:tiny", "-o", str(out_dir), "--init-seed", "2", "--force")
    assert code == 0
    logits = mlxc.load(out_dir)([[1, 2]]).logits
    np.testing.assert_array_equal(np.array(logits), np.array(mlxc.load("tiny", seed=2)([[1, 2]]).logits))


def test_compile_half_precision(capsys, tmp_path):
    code, _, _ = _run(capsys, "compile", "preset:tiny", "-o", str(tmp_path / "h"), "--dtype", "float16")
    assert code == 0
    model = mlxc.load(tmp_path / "h")
    assert all(p.dtype == mx.float16 for _, p in mlx_params(model))


# ------------------------------------------------------------------------------------------------- bad arguments


def test_run_needs_prompt_or_tokens(capsys):
    with pytest.raises(SystemExit) as info:
        main(["run", "preset:tiny"])
    assert info.value.code == 2
    assert "--prompt" in capsys.readouterr().err


def test_run_bad_token_list(capsys):
    with pytest.raises(SystemExit) as info:
        main(["run", "preset:tiny", "--tokens", "1,x"])
    assert info.value.code == 2
    assert "comma-separated integers" in capsys.readouterr().err


def test_bad_choice_and_unknown_command(capsys):
    for argv in (["dump", "preset:tiny", "--format", "png"], ["frobnicate"], ["run", "preset:tiny", "--prompt"]):
        with pytest.raises(SystemExit) as info:
            main(argv)
        assert info.value.code == 2
        capsys.readouterr()


def test_run_prompt_without_tokenizer(capsys):
    code, _, err = _run(capsys, "run", "preset:tiny", "--prompt", "hello")
    assert code == 1 and "tokenizer" in err


def test_run_chat_with_tokens(capsys):
    code, _, err = _run(capsys, "run", "preset:tiny", "--tokens", "1,2", "--chat")
    assert code == 1 and "--chat" in err


def test_missing_source(capsys):
    code, out, err = _run(capsys, "inspect", "preset:nope")
    assert code == 1 and out == ""
    assert "unknown preset" in err


def test_kernels_clear_message(capsys):
    code, out, _ = _run(capsys, "kernels")
    assert code == 0 and "attention_decode" in out  # the kernel list (tests/test_kernels.py covers the rest)
    code, _, err = _run(capsys, "kernels", "source", "no_such_kernel")
    assert code == 1
    assert "error:" in err and "kernel" in err


def _one_error_line(proc: subprocess.CompletedProcess) -> str:
    assert "Traceback" not in proc.stderr
    lines = [line for line in proc.stderr.splitlines() if "error:" in line]
    assert len(lines) == 1, proc.stderr
    return lines[0]


def test_run_out_of_range_token_subprocess():
    proc = _cli("run", "preset:tiny", "--tokens", "9999")
    assert proc.returncode == 1
    line = _one_error_line(proc)
    assert line.startswith("error:") and "9999" in line and "256" in line
    assert proc.stdout.strip() == ""


def test_kernels_subprocess_one_line():
    proc = subprocess.run([sys.executable, "-m", "mlxc", "kernels", "source", "no_such_kernel"], capture_output=True,
                          text=True, timeout=120, env={**os.environ, "COLUMNS": "40"})
    assert proc.returncode == 1
    line = _one_error_line(proc)
    assert "kernels" in line and line.rstrip().endswith("attention_prefill")  # not re-wrapped onto a second line


def test_argparse_error_subprocess():
    proc = _cli("run", "preset:tiny", "--tokens", "1,x")
    assert proc.returncode == 2
    assert "Traceback" not in proc.stderr and "1,x" in proc.stderr


def test_bad_checkpoint_subprocess(tmp_path):
    (tmp_path / "config.json").write_text("{broken")
    proc = _cli("run", str(tmp_path), "--tokens", "1")
    assert proc.returncode == 1
    assert "config.json" in _one_error_line(proc)


def test_unwritable_outputs_fail_before_the_work(capsys, tmp_path):
    afile = tmp_path / "afile"
    afile.write_text("x")
    code, out, err = _run(capsys, "compile", "preset:tiny", "-o", str(afile), "--force")
    assert code == 1 and "not a directory" in err
    code, out, err = _run(capsys, "dump", "preset:tiny", "-o", str(tmp_path / "missing" / "x.mlxc"))
    assert code == 1 and "No such file" in err and "Traceback" not in err
