"""The `mlxc` command: one module per command in this package, each with `add_parser(sub)` and `run(args)`.

Every user-facing failure is an MlxcError printed as one line on stderr with a non-zero exit; set MLXC_DEBUG=1 to
see tracebacks. Importing this package is cheap (MLX loads inside `main`), so Ctrl-C during start-up is caught too.
"""

from __future__ import annotations

import argparse
import importlib
import os
import sys

# One module per command, in the order `mlxc --help` lists them.
COMMAND_MODULES = ("compile", "dump", "run", "chat", "inspect", "bench", "train", "kernels", "diff", "perplexity",
                   "export", "plugins")


def _command(name: str):
    return importlib.import_module(f"{__name__}.{name}_cmd")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="mlxc", allow_abbrev=False,
                                     description="A graph-IR compiler for language models that targets MLX.")
    parser.add_argument("--version", action="store_true", help="print versions and the active BLAS")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name in COMMAND_MODULES:
        module = _command(name)
        module.add_parser(sub.add_parser(name, help=module.HELP, description=module.__doc__.strip().splitlines()[0],
                                         allow_abbrev=False))
    return parser


def cmd_version() -> int:
    import mlx.core as mx

    from .. import __version__
    from ..blas import active_blas
    from .common import consoles

    consoles.out.print(f"mlxc {__version__}, mlx {mx.__version__}, device {mx.default_device()}")
    consoles.out.print(f"BLAS: {active_blas()}")
    from ..kernels import native

    consoles.out.print(native.describe())
    return 0


def _error(prefix: str, message: str) -> None:
    from rich.text import Text

    from .common import consoles

    consoles.err.print(Text(prefix, style="bold red") + Text(message), soft_wrap=True)  # one line, never re-wrapped


def main(argv: list[str] | None = None) -> int:
    try:
        parser = build_parser()
        args = parser.parse_args(argv)
        from ..blas import active_blas
        from ..ir.errors import MlxcError

        warning = active_blas().warning
        if warning:
            _error("warning: ", warning)
        try:
            if args.version:
                return cmd_version()
            if args.command is None:
                parser.print_help()
                return 2
            from .common import parallel_entry

            if args.command != "plugins":  # which lists them, broken ones included
                from ..plugins import load_plugins

                load_plugins()  # a broken plugin is one line naming it, before any work
            code = parallel_entry(args, list(sys.argv[1:] if argv is None else argv))  # --ranks N: the job's code
            return code if code is not None else _command(args.command).run(args)
        except MlxcError as e:
            _error("error: ", str(e))
            return 1
        except OSError as e:  # a path the user gave cannot be read or written
            where = f": {e.filename}" if e.filename else ""
            _error("error: ", f"{e.strerror or e}{where}")
            return 1
    except KeyboardInterrupt:
        sys.stderr.write("interrupted\n")
        return 130
    except SystemExit:
        raise
    except Exception as e:  # a bug in mlxc, not in the input: still one line unless debugging
        from ..runtime.distributed import describe_failure

        lost = describe_failure(e)  # a rank whose peer died: say so, not "internal error"
        if lost is not None:
            _error("error: ", lost)
            return 1
        if os.environ.get("MLXC_DEBUG"):
            raise
        _error("internal error: ", f"{type(e).__name__}: {e} (set MLXC_DEBUG=1 for a traceback)")
        return 3


if __name__ == "__main__":
    sys.exit(main())
