"""List installed plugins and everything registered (ops, block kinds, families, passes), built-in or not.

  mlxc plugins                    the plugins (entry point group `mlxc.plugins`): package, version, module, status;
                                  then every op, block kind, family and pass with the module that declared it
  mlxc plugins --plugins-only     only what plugins added
  mlxc plugins --json             the same as JSON on stdout

A plugin that fails to import is listed with the reason, and the command exits 1.
"""

from __future__ import annotations

import json

from rich.table import Table

from .common import consoles, note, write

HELP = "list installed plugins and every registered op, block and FFN kind, family and pass with where it came from"


def add_parser(p) -> None:
    p.add_argument("--plugins-only", action="store_true", help="list only what plugins added, not mlxc's own")
    p.add_argument("--json", action="store_true", help="JSON on stdout instead of tables")


def run(args) -> int:
    from ..plugins import DISABLE_ENV, load_plugins, owner, plugins, registered

    load_plugins(strict=False)
    found = plugins()
    entries = [e for e in registered() if not (args.plugins_only and e.builtin)]
    origin = {}
    for e in entries:
        p = owner(e)
        origin[e] = "built-in" if p is None else f"plugin {p.name}"
    broken = [p for p in found if p.error is not None and not p.disabled]
    if args.json:
        write(json.dumps({
            "plugins": [{"name": p.name, "package": p.package, "version": p.version, "module": p.module,
                         "status": _status(p), "error": p.error} for p in found],
            "registered": [{"kind": e.kind, "name": e.name, "origin": origin[e], "module": e.module,
                            "detail": e.detail} for e in entries],
        }, indent=2))
        return 1 if broken else 0
    table = Table(title="plugins (entry point group mlxc.plugins)", title_justify="left")
    for col in ("name", "package", "version", "module", "status"):
        table.add_column(col)
    for p in found:
        table.add_row(p.name, p.package or "-", p.version or "-", p.module, _status(p))
    if found:
        consoles.out.print(table)
    else:
        consoles.out.print("no plugins installed (a package declares one in the `mlxc.plugins` entry point group)")
    reg = Table(title="registered", title_justify="left")
    for col in ("kind", "name", "origin", "module", "detail"):
        reg.add_column(col)
    for e in sorted(entries, key=lambda e: ("op block ffn family pass".split().index(e.kind), not e.builtin, e.name)):
        reg.add_row(e.kind, e.name, origin[e], e.module, e.detail)
    consoles.out.print(reg)
    for p in broken:
        note(f"error: {p.describe()} failed to load: {p.error} (set {DISABLE_ENV}={p.name} to run without it)")
    return 1 if broken else 0


def _status(p) -> str:
    if p.disabled:
        return "disabled"
    if p.error is not None:
        return f"failed: {p.error}"
    return "loaded" if p.loaded else "not loaded"
