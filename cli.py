"""The `mlxc` command: compile | dump | run | chat | inspect | bench | train | kernels.

Every user-facing failure is an MlxcError printed as one line on stderr with a non-zero exit; set MLXC_DEBUG=1 to
see tracebacks.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

from rich.console import Console
from rich.table import Table
from rich.text import Text

from . import __version__
from .ir.errors import MlxcError

err_console = Console(stderr=True, highlight=False)
console = Console(highlight=False)

DTYPES = ("float32", "float16", "bfloat16")


def _progress(msg: str) -> None:
    err_console.print(Text(f"· {msg}", style="dim"))


def _int_list(text: str) -> list[int]:
    try:
        return [int(t) for t in text.replace(" ", "").split(",") if t]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, got {text!r}") from None


def _positive_int(text: str) -> int:
    try:
        n = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected an integer, got {text!r}") from None
    if n <= 0:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {n}")
    return n


def _add_source(p: argparse.ArgumentParser) -> None:
    p.add_argument("src", help="HF checkpoint dir, mlxc artifact dir, preset:NAME, spec .yaml/.json, or hub id org/name")
    p.add_argument("--dtype", choices=DTYPES, default="float32", help="parameter and activation dtype")
    p.add_argument("--random-init", action="store_true",
                   help="random weights instead of the checkpoint's (presets and spec files always use them)")
    p.add_argument("--seed", type=int, default=0, help="seed for random weights")
    p.add_argument("--init-scale", type=float, default=0.02, help="std of random weights (presets and spec files)")


def _add_passes(p: argparse.ArgumentParser) -> None:
    p.add_argument("--adapter", help="a PEFT LoRA adapter folder (adapter_config.json + adapter_model.safetensors)")
    p.add_argument("--merge-lora", action="store_true", help="fold the adapter into the weights at load time")
    p.add_argument("--passes", help="comma-separated pass pipeline (default: the standard pipeline)")
    p.add_argument("--no-opt", action="store_true", help="run no passes")
    p.add_argument("--quantize", type=int, choices=(4, 8), help="store matmul and embedding weights in 4 or 8 bits")
    p.add_argument("--group-size", type=int, choices=(32, 64, 128), default=64, help="quantization group size")


def _pipeline(args) -> list:
    """The pass list the flags ask for: --passes or the default, none with --no-opt, then --quantize."""
    from .api import pipeline
    from .passes import parse_pipeline

    base = [] if args.no_opt else (parse_pipeline(args.passes) if args.passes else None)
    return pipeline(base, args.quantize, args.group_size)


def _add_sampling(p: argparse.ArgumentParser) -> None:
    p.add_argument("--max-new-tokens", type=int, default=64)
    p.add_argument("--temperature", type=float, default=0.0, help="0 means greedy")
    p.add_argument("--top-k", type=int, default=0)
    p.add_argument("--top-p", type=float, default=1.0)
    p.add_argument("--min-p", type=float, default=0.0)
    p.add_argument("--repetition-penalty", type=float, default=1.0)
    p.add_argument("--sample-seed", type=int, default=None, help="seed for sampling")
    p.add_argument("--stop", type=_int_list, default=None, help="comma-separated stop token ids (default: eos)")


def _sampling(args) -> dict:
    return dict(
        max_new_tokens=args.max_new_tokens, temperature=args.temperature, top_k=args.top_k, top_p=args.top_p,
        min_p=args.min_p, repetition_penalty=args.repetition_penalty, seed=args.sample_seed, stop_tokens=args.stop,
    )


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="mlxc", description="A graph-IR compiler for language models that targets MLX.")
    parser.add_argument("--version", action="store_true", help="print versions and the active BLAS")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")

    p = sub.add_parser("compile", help="compile a model into a self-contained artifact directory")
    _add_source(p)
    _add_passes(p)
    p.add_argument("-o", "--output", required=True, help="artifact directory to write")
    p.add_argument("--dump-dir", help="write the IR after each pass here (NN-pass.mlxc)")
    p.add_argument("--force", action="store_true", help="replace an existing artifact")

    p = sub.add_parser("dump", help="print the IR of a model")
    _add_source(p)
    _add_passes(p)
    p.add_argument("--format", choices=("text", "json", "dot", "svg"), default="text")
    p.add_argument("--after", metavar="PASS", help="stop the pipeline after this pass")
    p.add_argument("-o", "--output", help="write to a file instead of stdout")

    p = sub.add_parser("run", help="generate from a prompt or token ids")
    _add_source(p)
    _add_passes(p)
    g = p.add_mutually_exclusive_group(required=True)
    g.add_argument("--prompt", help="text prompt (needs a tokenizer)")
    g.add_argument("--tokens", type=_int_list, help="comma-separated token ids, e.g. 1,2,3")
    p.add_argument("--chat", action="store_true", help="wrap the prompt in the model's chat template")
    _add_sampling(p)

    p = sub.add_parser("chat", help="a multi-turn conversation on stdin; the KV cache carries over between turns")
    _add_source(p)
    _add_passes(p)
    _add_sampling(p)
    p.add_argument("--system", help="system prompt")

    p = sub.add_parser("inspect", help="parameters, memory per dtype, per-layer table, active BLAS")
    _add_source(p)

    p = sub.add_parser("bench", help="prefill and decode tokens/s")
    _add_source(p)
    _add_passes(p)
    p.add_argument("--prompt-len", type=_positive_int, default=128)
    p.add_argument("--gen-len", type=_positive_int, default=32)
    p.add_argument("--batch", type=_positive_int, default=1)
    p.add_argument("--repeats", type=_positive_int, default=3)

    p = sub.add_parser("train", help="LoRA fine-tune on a JSONL dataset; saves PEFT adapters")
    _add_source(p)
    p.add_argument("--data", required=True, help='JSONL: {"text": ...}, {"messages": [...]} or {"prompt", "completion"}')
    p.add_argument("-o", "--output", required=True, help="adapter folder to write (PEFT format)")
    p.add_argument("--rank", type=_positive_int, default=8)
    p.add_argument("--alpha", type=float, default=16.0)
    p.add_argument("--lora-dropout", type=float, default=0.0)
    p.add_argument("--targets", default="q_proj,v_proj", help="comma-separated projections, or a regex")
    p.add_argument("--steps", type=_positive_int, default=100)
    p.add_argument("--batch-size", type=_positive_int, default=4)
    p.add_argument("--seq-len", type=_positive_int, default=512)
    p.add_argument("--learning-rate", type=float, default=1e-4)
    p.add_argument("--warmup-steps", type=int, default=0)
    p.add_argument("--label-smoothing", type=float, default=0.0)
    p.add_argument("--log-every", type=_positive_int, default=10)
    p.add_argument("--save-every", type=int, default=0, help="also save every N steps (0: only at the end)")
    p.add_argument("--train-seed", type=int, default=0)

    sub.add_parser("kernels", help="list custom kernels and which one each target would use")
    return parser


# ---------------------------------------------------------------------------------------------- commands


def cmd_version() -> int:
    import mlx.core as mx

    from .blas import active_blas

    console.print(f"mlxc {__version__}, mlx {mx.__version__}, device {mx.default_device()}")
    console.print(f"BLAS: {active_blas()}")
    return 0


def cmd_compile(args) -> int:
    from .api import compile as compile_artifact

    reports = []
    out = compile_artifact(
        args.src, args.output, args.dtype, passes=_pipeline(args), adapter=args.adapter, merge_lora=args.merge_lora,
        seed=args.seed, init_scale=args.init_scale,
        overwrite=args.force, dump_dir=args.dump_dir, random_init=args.random_init, progress=_progress,
        on_report=reports.append,
    )
    for r in reports:
        err_console.print(f"  pass {r}")
    console.print(f"compiled {args.src} -> {out}")
    return 0


def cmd_dump(args) -> int:
    from .api import program_for
    from .ir import to_dot, to_json, to_svg

    program = program_for(args.src, args.dtype, passes=_pipeline(args), adapter=args.adapter,
                          merge_lora=args.merge_lora, stop_after=args.after,
                          on_report=lambda r: err_console.print(Text(f"pass {r}", style="dim")))
    render = {"text": str, "json": to_json, "dot": to_dot, "svg": to_svg}[args.format]
    text = render(program)
    if args.output:
        Path(args.output).write_text(text)
        err_console.print(f"wrote {args.output}")
    else:
        sys.stdout.write(text if text.endswith("\n") else text + "\n")
    return 0


def cmd_run(args) -> int:
    import mlx.core as mx

    from .api import load

    if args.chat and args.prompt is None:
        raise MlxcError("--chat needs --prompt text, not --tokens")
    model = load(args.src, args.dtype, adapter=args.adapter, merge_lora=args.merge_lora, passes=_pipeline(args),
                 random_init=args.random_init, seed=args.seed, init_scale=args.init_scale, progress=_progress)
    sampling = _sampling(args)
    start = time.perf_counter()
    count = 0
    if args.prompt is not None:
        for piece in model.generate_text(args.prompt, chat=args.chat, **sampling):
            sys.stdout.write(piece)
            sys.stdout.flush()
            count += 1
        sys.stdout.write("\n")
    else:
        ids = mx.array([args.tokens])
        first = True
        for step in model.stream(ids, **sampling):
            sys.stdout.write(("" if first else ",") + str(step[0].item()))
            sys.stdout.flush()
            first = False
            count += 1
        sys.stdout.write("\n")
    dt = time.perf_counter() - start
    err_console.print(f"[dim]{count} pieces in {dt:.2f} s[/dim]")
    return 0


def cmd_chat(args) -> int:
    from .api import load
    from .runtime.chat import ChatSession

    model = load(args.src, args.dtype, adapter=args.adapter, merge_lora=args.merge_lora, passes=_pipeline(args),
                 random_init=args.random_init, seed=args.seed, init_scale=args.init_scale, progress=_progress)
    session = ChatSession(model, system=args.system, **_sampling(args))
    interactive = sys.stdin.isatty()
    if interactive:
        err_console.print(Text("Type a message; an empty line or Ctrl-D ends the chat.", style="dim"))
    while True:
        if interactive:
            sys.stdout.write("you> ")
            sys.stdout.flush()
        line = sys.stdin.readline()
        if not line or not line.strip():
            return 0
        sys.stdout.write("assistant> " if interactive else "")
        for piece in session.send(line.rstrip("\n")):
            sys.stdout.write(piece)
            sys.stdout.flush()
        sys.stdout.write("\n")
        err_console.print(Text(f"({session.reused} prompt tokens reused from the cache)", style="dim"))


def cmd_inspect(args) -> int:
    from .api import SourceKind, read_source, resolve
    from .blas import active_blas
    from .runtime.artifact import read_manifest
    from .frontends.spec import ModelSpec

    source = resolve(args.src)
    if source.kind == SourceKind.ARTIFACT:
        manifest = read_manifest(Path(source.location))
        if not manifest.spec:
            raise MlxcError(f"{source.location}: the manifest has no spec to inspect")
        spec, what = ModelSpec.model_validate(manifest.spec), f"artifact ({manifest.source}, {manifest.dtype})"
    else:
        front = read_source(source, weights=False)
        spec, what = front.spec, front.description
    n = spec.num_parameters()
    t = Table(title=f"{spec.name} — {what}")
    t.add_column("property")
    t.add_column("value")
    rows = [
        ("family", spec.family),
        ("parameters", f"{n:,} ({n / 1e9:.2f} B)" if n > 1e9 else f"{n:,} ({n / 1e6:.1f} M)"),
        ("layers", str(spec.num_layers)),
        ("hidden / intermediate", f"{spec.hidden_size} / {spec.intermediate_size}"),
        ("heads / kv heads / head_dim", f"{spec.num_heads} / {spec.kv_heads} / {spec.dim_per_head} ({spec.attention_kind})"),
        ("vocabulary", str(spec.vocab_size)),
        ("rope", f"theta {spec.rope.theta:g}, {spec.rope.kind.value}" + (f" x{spec.rope.factor:g}" if spec.rope.factor != 1 else "")),
        ("sliding window", str(spec.sliding_window) if spec.sliding_window else "none"),
        ("tied embeddings", str(spec.tie_word_embeddings)),
        ("BLAS", f"{active_blas().name} ({active_blas().path or 'bundled'})"),
    ]
    for k, v in rows:
        t.add_row(k, v)
    console.print(t)

    mem = Table(title="memory for weights")
    mem.add_column("dtype")
    mem.add_column("bytes/param", justify="right")
    mem.add_column("size", justify="right")
    for name, bpp in (("float32", 4), ("float16 / bfloat16", 2), ("8-bit (group 64)", 1 + 4 / 64), ("4-bit (group 64)", 0.5 + 4 / 64)):
        mem.add_row(name, f"{bpp:g}", _human(n * bpp))
    console.print(mem)

    layers = Table(title="layers")
    for c in ("layer", "block", "attention", "window", "params"):
        layers.add_column(c, justify="right" if c in ("layer", "params") else "left")
    per_layer = (spec.num_parameters() - _non_layer_params(spec)) // spec.num_layers
    for i, l in enumerate(spec.layers):
        layers.add_row(str(i), l.block.value, spec.attention_kind, str(spec.window_of(i) or "-"), f"{per_layer:,}")
    console.print(layers)
    return 0


def _non_layer_params(spec) -> int:
    h = spec.hidden_size
    norm = h if spec.norm.value == "rms" else 2 * h
    return spec.vocab_size * h * (1 if spec.tie_word_embeddings else 2) + norm


def _human(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if n < 1024 or unit == "TiB":
            return f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} TiB"


def cmd_bench(args) -> int:
    from .api import load
    from .blas import active_blas
    from .runtime.bench import bench_model

    model = load(args.src, args.dtype, adapter=args.adapter, merge_lora=args.merge_lora, passes=_pipeline(args),
                 random_init=args.random_init, seed=args.seed, init_scale=args.init_scale, progress=_progress)
    result = bench_model(model, prompt_len=args.prompt_len, gen_len=args.gen_len, batch=args.batch, repeats=args.repeats,
                         progress=_progress)
    t = Table(title=f"{args.src} ({args.dtype}, BLAS: {active_blas().name})")
    for c in ("phase", "tokens", "tokens/s", "ms/token"):
        t.add_column(c, justify="right" if c != "phase" else "left")
    for phase, tokens, tps in (("prefill", result.prompt_tokens, result.prefill_tps), ("decode", result.gen_tokens, result.decode_tps)):
        t.add_row(phase, str(tokens), f"{tps:,.1f}", f"{1e3 / tps:.2f}")
    console.print(t)
    return 0


def cmd_train(args) -> int:
    import re

    from .api import load, save_adapter
    from .passes.lora import LoRAConfig
    from .runtime.train import TrainConfig, load_jsonl, train_lora

    targets = args.targets
    if re.fullmatch(r"[\w,]+", targets):
        targets = tuple(t for t in targets.split(",") if t)
    lora = LoRAConfig(rank=args.rank, alpha=args.alpha, dropout=args.lora_dropout, targets=targets)
    config = TrainConfig(steps=args.steps, batch_size=args.batch_size, seq_len=args.seq_len,
                         learning_rate=args.learning_rate, warmup_steps=args.warmup_steps,
                         label_smoothing=args.label_smoothing, seed=args.train_seed, log_every=args.log_every,
                         save_every=args.save_every, out_dir=args.output)
    if Path(args.output).exists() and not Path(args.output).is_dir():
        raise MlxcError(f"{args.output} exists and is not a directory")
    model = load(args.src, args.dtype, lora=lora, random_init=args.random_init, seed=args.seed,
                 init_scale=args.init_scale, progress=_progress)
    if model.tokenizer is None:
        raise MlxcError(f"{args.src} has no tokenizer, so the JSONL text cannot be tokenized")
    examples = load_jsonl(args.data, model.tokenizer, config.seq_len)

    def log(r: dict) -> None:
        err_console.print(f"step {r['step']:>5}  loss {r['loss']:.4f}  lr {r['lr']:.2e}  "
                          f"{r['tokens_per_sec']:,.0f} tok/s", highlight=False)

    def save(step: int, out_dir: Path) -> None:
        final = step == config.steps
        save_adapter(model, out_dir if final else out_dir / f"step-{step:06d}")

    result = train_lora(model.net, examples, config, on_log=log, save_adapter=save)
    console.print(f"trained {result.num_adapter_params:,} adapter parameters for {result.steps} steps: "
                  f"loss {result.losses[0]:.4f} -> {result.losses[-1]:.4f}; adapter in {args.output}")
    return 0


def cmd_kernels(args) -> int:
    raise MlxcError("no custom kernels are available yet: every op runs through MLX's built-in ops on all targets")


COMMANDS = {"compile": cmd_compile, "dump": cmd_dump, "run": cmd_run, "chat": cmd_chat, "inspect": cmd_inspect,
            "bench": cmd_bench, "train": cmd_train, "kernels": cmd_kernels}


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        if args.version:
            return cmd_version()
        if args.command is None:
            parser.print_help()
            return 2
        return COMMANDS[args.command](args)
    except MlxcError as e:
        err_console.print(Text("error: ", style="bold red") + Text(str(e)), soft_wrap=True)  # no re-wrapping: one line
        return 1
    except OSError as e:  # a path the user gave cannot be read or written
        where = f": {e.filename}" if e.filename else ""
        err_console.print(Text("error: ", style="bold red") + Text(f"{e.strerror or e}{where}"), soft_wrap=True)
        return 1
    except KeyboardInterrupt:
        err_console.print("interrupted")
        return 130
    except Exception as e:  # a bug in mlxc, not in the input: still one line unless debugging
        if os.environ.get("MLXC_DEBUG"):
            raise
        msg = f"{type(e).__name__}: {e} (set MLXC_DEBUG=1 for a traceback)"
        err_console.print(Text("internal error: ", style="bold red") + Text(msg), soft_wrap=True)
        return 3


if __name__ == "__main__":
    sys.exit(main())
