"""Write a model as a Hugging Face checkpoint (config.json, safetensors, tokenizer files) that transformers loads."""

from __future__ import annotations

from .common import add_source, progress, write

HELP = "write a model as a Hugging Face checkpoint"


def add_parser(p) -> None:
    add_source(p)
    p.add_argument("-o", "--output", required=True, help="checkpoint directory to write")
    p.add_argument("--format", choices=("hf",), default="hf", help="checkpoint layout (default: hf)")
    p.add_argument("--force", action="store_true", help="replace an existing checkpoint directory")


def run(args) -> int:
    from ..tools.export import export

    out = export(args.src, args.output, args.format, dtype=args.dtype, overwrite=args.force,
                 random_init=args.random_init, seed=args.init_seed, init_scale=args.init_scale, progress=progress)
    write(f"exported {args.src} -> {out}")
    return 0
