"""What every command shares: the consoles, argument types and the flag groups (source, passes, sampling).

Flags follow mlx-lm's names where mlx-lm has the same flag (`--seed`, `--temp`, `--max-tokens`, `--max-kv-size`,
`--system-prompt`, `--ignore-chat-template`); mlxc's longer names stay as aliases.
"""

from __future__ import annotations

import argparse
import sys

from rich.console import Console
from rich.text import Text

from ..ir.errors import MlxcError


def _console(stream) -> Console:
    """A terminal gets rich's usual layout; a pipe or file gets lines that are never wrapped."""
    tty = stream.isatty()
    return Console(file=stream, highlight=False, soft_wrap=not tty, width=None if tty else 100_000)


class _Consoles:
    """Built on first use, so tests that swap sys.stdout / sys.stderr (capsys) see the output."""

    @property
    def out(self) -> Console:
        return _console(sys.stdout)

    @property
    def err(self) -> Console:
        return _console(sys.stderr)


consoles = _Consoles()

DTYPES = ("float32", "float16", "bfloat16")


def progress(msg: str) -> None:
    consoles.err.print(Text(f"· {msg}", style="dim"))


def note(msg: str) -> None:
    """A remark on stderr (what a flag did, where a file went): never mixed into machine-readable stdout."""
    consoles.err.print(Text(msg), soft_wrap=True)


def write(text: str) -> None:
    """Machine-readable output: plain text on stdout, exactly as given."""
    sys.stdout.write(text if text.endswith("\n") else text + "\n")
    sys.stdout.flush()


# ------------------------------------------------------------------------------------------------ argument types


def int_list(text: str) -> list[int]:
    try:
        return [int(t) for t in text.replace(" ", "").split(",") if t]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, got {text!r}") from None


def _int_at_least(text: str, low: int, what: str) -> int:
    try:
        n = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected an integer, got {text!r}") from None
    if n < low:
        raise argparse.ArgumentTypeError(f"expected {what}, got {n}")
    return n


def positive_int(text: str) -> int:
    return _int_at_least(text, 1, "a positive integer")


def non_negative_int(text: str) -> int:
    return _int_at_least(text, 0, "an integer >= 0")


def positive_float(text: str) -> float:
    try:
        x = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number, got {text!r}") from None
    if not x > 0 or x == float("inf"):
        raise argparse.ArgumentTypeError(f"expected a finite positive number, got {text}")
    return x


# ------------------------------------------------------------------------------------------------ flag groups


def add_source(p: argparse.ArgumentParser, build_flags: bool = True) -> None:
    """The model source, and (unless `build_flags=False`) the flags that decide how it is built."""
    p.add_argument("src", help="HF checkpoint dir, .gguf file, mlxc artifact dir, preset:NAME, pkg:NAME, "
                               "spec .yaml/.json, or hub id org/name")
    p.add_argument("--dtype", choices=DTYPES, default=None, help="parameter and activation dtype (default float32)")
    if not build_flags:
        return
    p.add_argument("--random-init", action="store_true",
                   help="random weights instead of the checkpoint's (presets and spec files always use them)")
    p.add_argument("--init-seed", type=int, default=None, help="seed for random weights (default 0)")
    p.add_argument("--init-scale", type=float, default=None, help="std of random weights (default 0.02)")


def add_passes(p: argparse.ArgumentParser) -> None:
    p.add_argument("--adapter", help="a PEFT LoRA adapter folder (adapter_config.json + adapter_model.safetensors)")
    p.add_argument("--merge-lora", action="store_true", help="fold the adapter into the weights at load time")
    p.add_argument("--passes", help="comma-separated pass pipeline (default: the standard pipeline)")
    p.add_argument("--no-opt", action="store_true", help="run no passes")
    p.add_argument("--quantize", type=int, choices=(2, 3, 4, 5, 6, 8),
                   help="store matmul and embedding weights in this many bits")
    p.add_argument("--group-size", type=int, choices=(32, 64, 128), default=None,
                   help="quantization group size (default 64)")
    p.add_argument("--kernels", choices=("auto", "reference", "custom", "emulated"), default=None,
                   help="implementation of ops that have several (default auto: the target's best available, on the "
                        "CPU mlxc's native quantized kernels when built; reference: plain MLX ops; custom: the "
                        "target's custom kernels or an error; emulated: attention and the scans run their Metal "
                        "kernels' source in mlxc's kernel emulator, slowly, for testing)")


def add_sampling(p: argparse.ArgumentParser) -> None:
    p.add_argument("--max-new-tokens", "--max-tokens", "-m", dest="max_new_tokens", type=non_negative_int, default=64,
                   help="at most this many new tokens")
    p.add_argument("--temperature", "--temp", dest="temperature", type=float, default=0.0, help="0 means greedy")
    p.add_argument("--top-k", type=int, default=0)
    p.add_argument("--top-p", type=float, default=1.0)
    p.add_argument("--min-p", type=float, default=0.0)
    p.add_argument("--repetition-penalty", type=float, default=1.0)
    p.add_argument("--seed", "--sample-seed", dest="seed", type=non_negative_int, default=None,
                   help="seed for sampling (same seed, same tokens)")
    p.add_argument("--stop", type=int_list, default=None,
                   help="comma-separated stop token ids (default: the end-of-sequence ids; '' for none)")
    p.add_argument("--stop-string", dest="stop_strings", action="append", default=None, metavar="TEXT",
                   help="end the text just before TEXT (repeatable; needs a text prompt)")
    p.add_argument("--max-kv-size", type=positive_int, default=None, metavar="N",
                   help="keep only the last N positions in the KV cache (every token attends to at most N), so "
                        "generation can run past the model's context")


def add_parallel(p: argparse.ArgumentParser) -> None:
    """Splitting the model over ranks (`mx.distributed`): local ranks started by mlxc, or a group mlx.launch made."""
    g = p.add_argument_group("ranks: one model split over several processes (mx.distributed)")
    g.add_argument("--ranks", type=positive_int, default=None, metavar="N",
                   help="start N local ranks on loopback (each reads only its share of the weights) and run this "
                        "command on all of them; rank 0 prints what a single process would")
    g.add_argument("--parallel", choices=("tensor", "pipeline"), default=None,
                   help="how to split the model (required with --ranks): tensor, every layer divided among the "
                        "ranks; pipeline, consecutive layers per rank. Without --ranks: join the group mlx.launch "
                        "started (MLX_RANK, MLX_HOSTFILE)")
    g.add_argument("--timeout", type=positive_float, default=None, metavar="S",
                   help="stop the job (every rank) after S seconds (under mlx.launch each rank stops itself)")
    g.add_argument("--rank-timeout", type=positive_float, default=None, metavar="S",
                   help="with --ranks: fail the job, naming the rank, when a rank stops responding or stays a step "
                        "behind the others for S seconds (default 60)")


# commands that take --ranks, and whether a rank reads this process's stdin (then every rank gets a copy)
_READS_STDIN = {"run": lambda a: a.prompt == "-", "chat": lambda a: True, "perplexity": lambda a: a.file == "-",
                "bench": lambda a: False}


def parallel_entry(args, argv: list[str]) -> int | None:
    """`--ranks N`: start N local ranks of this very command and wait for them (returns the job's exit code). In a
    rank (MLX_RANK set, by mlxc or mlx.launch) with `--parallel`: join the group, then run the command (None)."""
    ranks, parallel = getattr(args, "ranks", None), getattr(args, "parallel", None)
    if args.command not in _READS_STDIN:
        return None
    timeout, rank_timeout = args.timeout, args.rank_timeout
    from ..runtime import distributed

    if distributed.launched():
        if ranks is not None:
            raise MlxcError("--ranks starts local ranks, but this process is already one rank of a group "
                            "(MLX_RANK is set, e.g. by mlx.launch): drop --ranks and give --parallel")
        if parallel is None:
            raise MlxcError("this process is one rank of a group (MLX_RANK is set): add --parallel tensor or "
                            "--parallel pipeline to say how to split the model")
        if rank_timeout is not None:
            raise MlxcError("--rank-timeout is watched by mlxc's own launcher (--ranks N); under another launcher "
                            "bound the job with --timeout")
        distributed.join(argv, timeout=timeout)
        return None
    if ranks is None:
        if parallel is not None:
            raise MlxcError("--parallel splits the model over ranks: give --ranks N for N local ranks, or start the "
                            "command under mlx.launch, which sets MLX_RANK and MLX_HOSTFILE for each rank")
        unused = [f for f, v in (("--timeout", timeout), ("--rank-timeout", rank_timeout)) if v is not None]
        if unused:
            raise MlxcError(f"{' and '.join(unused)} bound a job of several ranks: give --ranks N and --parallel")
        return None
    if parallel is None:
        raise MlxcError(f"--ranks {ranks} splits the model: say how with --parallel tensor (every layer divided "
                        "among the ranks) or --parallel pipeline (consecutive layers per rank)")
    if ranks == 1:  # one rank holds the whole model: the single process, nothing to split or watch
        unused = [f for f, v in (("--timeout", timeout), ("--rank-timeout", rank_timeout)) if v is not None]
        if unused:
            raise MlxcError(f"{' and '.join(unused)} bound a job of several ranks, and --ranks 1 runs the whole "
                            "model in this process")
        args.parallel = None
        return None
    from ..parallel import program_for_rank

    options = build_options(args)  # a split that cannot be made is refused here, before any rank starts
    program_for_rank(args.src, options.pop("parallel"), ranks, 0, **options)
    child, skip = [], False  # the launcher's own flags stay with the launcher (argparse takes unique prefixes)
    for a in argv:
        name = a.split("=", 1)[0]
        if skip:
            skip = False
        elif len(name) > 2 and name.startswith("--") and \
                any(f.startswith(name) for f in ("--ranks", "--timeout", "--rank-timeout")):
            skip = "=" not in a
        else:
            child.append(a)
    return distributed.launch([sys.executable, "-m", "mlxc", *child], ranks, timeout=timeout,
                              rank_timeout=rank_timeout or 60.0, stdin_tee=_READS_STDIN[args.command](args))


def sampling(args) -> dict:
    """The generation keyword arguments of `CompiledModel.stream_text` that the sampling flags give."""
    return dict(
        max_new_tokens=args.max_new_tokens, temperature=args.temperature, top_k=args.top_k, top_p=args.top_p,
        min_p=args.min_p, repetition_penalty=args.repetition_penalty, seed=args.seed, stop_tokens=args.stop,
        stop_strings=args.stop_strings, max_kv_size=args.max_kv_size,
    )


def build_options(args) -> dict:
    """The keyword arguments of `mlxc.load` / `mlxc.compile` that the given flags ask for, and only those, so the
    API can tell what a user set (an artifact refuses build flags it cannot honour)."""
    given = {
        "dtype": getattr(args, "dtype", None),
        "random_init": getattr(args, "random_init", False) or None,
        "seed": getattr(args, "init_seed", None),
        "init_scale": getattr(args, "init_scale", None),
        "adapter": getattr(args, "adapter", None),
        "merge_lora": getattr(args, "merge_lora", False) or None,
        "quantize": getattr(args, "quantize", None),
        "group_size": getattr(args, "group_size", None),
        "parallel": getattr(args, "parallel", None),  # set only in a rank (see parallel_entry)
        "kernels": getattr(args, "kernels", None),
    }
    no_opt, passes = getattr(args, "no_opt", False), getattr(args, "passes", None)
    if no_opt and passes is not None:
        raise MlxcError("--no-opt runs no passes and --passes names some: give one of them")
    if passes is not None:
        from ..passes import parse_pipeline

        names = parse_pipeline(passes)
        if not names:
            raise MlxcError("--passes is empty; name at least one pass, or use --no-opt to run none")
        given["passes"] = names
    elif no_opt:
        given["passes"] = []
    return {k: v for k, v in given.items() if v is not None}


def add_trust(p: argparse.ArgumentParser) -> None:
    p.add_argument("--trust", action="store_true",
                   help="run a compiled artifact's model.py as it is (by default mlxc checks the artifact against "
                        "the hashes its manifest recorded and runs only the module it generates from the program)")


def trust_option(args) -> dict:
    """`trust=True` for `mlxc.load` when `--trust` was given (not a build option: it is about loading an artifact)."""
    return {"trust": True} if getattr(args, "trust", False) else {}
