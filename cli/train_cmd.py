"""LoRA fine-tuning on a JSONL dataset; writes a PEFT adapter folder."""

from __future__ import annotations

import re
from pathlib import Path

from ..ir.errors import MlxcError
from .common import add_source, build_options, note, positive_float, positive_int, progress, write

HELP = "LoRA fine-tune on a JSONL dataset; saves PEFT adapters"


def add_parser(p) -> None:
    add_source(p)
    p.add_argument("--data", required=True, help='JSONL: {"text": ...}, {"messages": [...]} or {"prompt", "completion"}')
    p.add_argument("-o", "--output", "--adapter-path", dest="output", required=True,
                   help="adapter folder to write (PEFT format)")
    p.add_argument("--force", action="store_true", help="replace an existing adapter folder")
    p.add_argument("--rank", type=positive_int, default=8)
    p.add_argument("--alpha", type=positive_float, default=16.0)
    p.add_argument("--lora-dropout", type=float, default=0.0)
    p.add_argument("--targets", default="q_proj,v_proj", help="comma-separated projections, or a regex")
    p.add_argument("--steps", "--iters", dest="steps", type=positive_int, default=100)
    p.add_argument("--batch-size", type=positive_int, default=4)
    p.add_argument("--seq-len", "--max-seq-length", dest="seq_len", type=positive_int, default=512)
    p.add_argument("--learning-rate", type=float, default=1e-4)
    p.add_argument("--warmup-steps", type=int, default=0)
    p.add_argument("--label-smoothing", type=float, default=0.0)
    p.add_argument("--log-every", "--steps-per-report", dest="log_every", type=positive_int, default=10)
    p.add_argument("--save-every", type=int, default=0, help="also save every N steps (0: only at the end)")
    p.add_argument("--seed", "--train-seed", dest="train_seed", type=int, default=0,
                   help="seed for batch order and dropout")


def run(args) -> int:
    from ..api import load, save_adapter
    from ..passes.lora import LoRAConfig
    from ..runtime.train import TrainConfig, load_jsonl, train_lora

    out = Path(args.output)
    if out.exists() and not out.is_dir():
        raise MlxcError(f"{out} exists and is not a directory")
    if out.exists() and any(out.iterdir()) and not args.force:
        raise MlxcError(f"{out} already exists (use --force to replace the adapter in it)")
    if not Path(args.data).is_file():
        raise MlxcError(f"--data {args.data}: no such file")
    targets = args.targets
    if re.fullmatch(r"[\w,]+", targets):
        targets = tuple(t for t in targets.split(",") if t)
    lora = LoRAConfig(rank=args.rank, alpha=args.alpha, dropout=args.lora_dropout, targets=targets)
    config = TrainConfig(steps=args.steps, batch_size=args.batch_size, seq_len=args.seq_len,
                         learning_rate=args.learning_rate, warmup_steps=args.warmup_steps,
                         label_smoothing=args.label_smoothing, seed=args.train_seed, log_every=args.log_every,
                         save_every=args.save_every, out_dir=args.output)
    model = load(args.src, **build_options(args), lora=lora, progress=progress)
    model.require_causal_lm("mlxc train (next-token LoRA fine-tuning)")
    context = model.context_length
    if context is not None and config.seq_len > context:
        raise MlxcError(f"--seq-len {config.seq_len} exceeds the model's context length ({context} positions)")
    if model.tokenizer is None:
        raise MlxcError(f"{args.src} has no tokenizer, so the JSONL text cannot be tokenized")
    examples = load_jsonl(args.data, model.tokenizer, config.seq_len)

    def log(r: dict) -> None:
        note(f"step {r['step']:>5}  loss {r['loss']:.4f}  lr {r['lr']:.2e}  {r['tokens_per_sec']:,.0f} tok/s")

    def save(step: int, out_dir: Path) -> None:
        final = step == config.steps
        save_adapter(model, out_dir if final else out_dir / f"step-{step:06d}")

    result = train_lora(model.net, examples, config, on_log=log, save_adapter=save)
    write(f"trained {result.num_adapter_params:,} adapter parameters for {result.steps} steps: "
          f"loss {result.losses[0]:.4f} -> {result.losses[-1]:.4f}; adapter in {args.output}")
    return 0
