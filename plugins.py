"""Extending mlxc from outside: ops, mixer blocks, model families and passes declared in a plugin package.

A plugin is an installed Python package that names a module in the `mlxc.plugins` entry point group:

    [project.entry-points."mlxc.plugins"]
    linear-attention = "mlxc_linear_attention"

Importing that module declares things with the machinery mlxc's own files use, re-exported here so a plugin imports
one module: `op` (an op's operands, typed attributes, type rule and state; ir/opdef.py), `implements` and `helper`
(its MLX implementation and the helper functions it calls, carried verbatim into generated modules;
codegen/mlx_ops.py), `mixer` and `ffn` (a block or FFN kind usable per layer in spec files, with the pydantic
model of its settings; frontends/blocks/), a module-level `FAMILIES` tuple (a family file: config mapping, tensor
names, detection, presets; frontends/families/) and `register_pass` (a pass usable in `--passes`). Nothing else
needs to know: the printer, parser, verifier, dumps, explorer, passes, codegen, LoRA and quantization read the same
registries.

mlxc loads plugins when a command or `mlxc.load` / `mlxc.compile` starts (`load_plugins`). Where something came from
is read off the objects themselves (the module that defined a type rule, fragment, builder, family or pass), so a
plugin imported by hand is attributed too. A compiled artifact records the plugins whose ops and block kinds it
uses (`required_plugins`); loading it without them is an MlxcError naming the plugin and its package
(`check_required`). A plugin that fails to import is an MlxcError naming it, with the reason; MLXC_DISABLE_PLUGINS
(comma-separated names, or `all`) leaves installed plugins out.
"""

from __future__ import annotations

import importlib
import os
import sys
from dataclasses import dataclass, field
from importlib import metadata

from .codegen.mlx_ops import HELPER_SOURCES, IMPLEMENTATIONS, VARIANTS, helper, implements
from .frontends import blocks as _blocks
from .frontends import families as _families
from .frontends.blocks import ffn, mixer
from .frontends.families import Family, NameTable, register_family
from .frontends.spec import BlockKind, FFNType
from .ir.errors import MlxcError
from .ir.graph import FunctionBuilder
from .ir.opdef import OPS, AttrDef, Ints, OpGroup, Shape, op, require
from .ir.state import State, StateKind
from .ir.types import DType, TensorType
from .passes.base import Pass, PassReport
from .passes.pipeline import PASSES, register_pass

__all__ = [
    "AttrDef", "DType", "Family", "FunctionBuilder", "GROUP", "Ints", "NameTable", "OpGroup", "Pass", "PassReport", "Plugin", "Shape",
    "State", "StateKind", "TensorType", "check_required", "ffn", "helper", "implements", "load_module", "load_plugins", "mixer", "op",
    "plugins", "register_family", "register_pass", "registered", "require", "required_plugins", "unload",
]

GROUP = "mlxc.plugins"
DISABLE_ENV = "MLXC_DISABLE_PLUGINS"


@dataclass
class Plugin:
    """One entry point of the `mlxc.plugins` group, or a module that registered things without one."""

    name: str
    module: str  # what the entry point imports (`pkg.module`, or `pkg.module:function` to call after importing)
    package: str | None = None  # the Python distribution that ships it
    version: str | None = None
    loaded: bool = False
    disabled: bool = False
    error: str | None = None  # why it failed to load

    @property
    def top(self) -> str:
        return self.module.split(":")[0].split(".")[0]

    def describe(self) -> str:
        pkg = f"Python package {self.package}" + (f" {self.version}" if self.version else "") if self.package \
            else f"module {self.module}"
        return f"plugin {self.name!r} ({pkg})"


@dataclass(frozen=True)
class Entry:
    """One registered thing: an op, a block kind, a family or a pass, and the module that declared it."""

    kind: str
    name: str
    module: str
    detail: str = ""

    @property
    def builtin(self) -> bool:
        return self.module == "mlxc" or self.module.startswith("mlxc.")


_PLUGINS: dict[str, Plugin] = {}
_SCANNED_PATH: tuple | None = None


def _disabled() -> set[str]:
    return {n.strip() for n in os.environ.get(DISABLE_ENV, "").split(",") if n.strip()}


def _path_key() -> tuple:
    """sys.path and when each directory on it last changed: an install or uninstall changes one of them."""
    key = []
    for entry in sys.path:
        try:
            key.append((entry, os.stat(entry or ".").st_mtime_ns))
        except OSError:
            key.append((entry, None))
    return tuple(key)


def _scan() -> None:
    """The entry points installed on the current sys.path (scanned again when something was installed)."""
    global _SCANNED_PATH
    key = _path_key()
    if _SCANNED_PATH == key:
        return
    _SCANNED_PATH = key
    found = {}
    for ep in metadata.entry_points(group=GROUP):
        dist = getattr(ep, "dist", None)
        found[ep.name] = (ep.value, dist.metadata["Name"] if dist is not None else None,
                          dist.version if dist is not None else None)
    for name in list(_PLUGINS):  # uninstalled since the last scan, and never imported: forget it
        if name not in found and not _PLUGINS[name].loaded:
            del _PLUGINS[name]
    for name, (value, package, version) in found.items():
        known = _PLUGINS.get(name)
        if known is None or (not known.loaded and known.module != value):
            _PLUGINS[name] = Plugin(name, value, package, version)


def load_plugins(strict: bool = True) -> list[Plugin]:
    """Import every installed plugin not loaded yet; with `strict`, one that fails is an MlxcError naming it."""
    _scan()
    off = _disabled()
    for p in _PLUGINS.values():
        p.disabled = "all" in off or p.name in off
        if not p.loaded and p.error is None and not p.disabled:
            _load(p)
    if strict:
        broken = [p for p in _PLUGINS.values() if p.error is not None and not p.disabled]
        if broken:
            p = broken[0]
            fix = f"pip uninstall {p.package}" if p.package else "uninstall it"
            raise MlxcError(f"{p.describe()} failed to load: {p.error}; fix it, {fix}, or set "
                            f"{DISABLE_ENV}={p.name} to run without it")
    return list(_PLUGINS.values())


def load_module(name: str):
    """Import a plugin module by hand (one not installed with an entry point) as the loader would: its
    declarations register on import, and its `FAMILIES`, if any, join the families."""
    module_name, _, attr = name.partition(":")
    module = importlib.import_module(module_name)
    if attr:
        getattr(module, attr)()
    for fam in getattr(module, "FAMILIES", ()):  # a family file's declaration, as in frontends/families/
        if fam.name not in {f.name for f in _families.all_families()}:
            register_family(fam)
    return module


def _load(p: Plugin) -> None:
    """Import one plugin; a failure leaves nothing of it registered and records why."""
    before = set(registered())
    try:
        load_module(p.module)
    except Exception as e:  # anything a broken plugin raises is reported, never a traceback
        detail = str(e).splitlines()[0] if str(e) else "no details"
        p.error = f"{type(e).__name__}: {detail}"
        for entry in set(registered()) - before:
            _forget(entry)
        _purge_modules(p.top)
        return
    p.loaded = True


def plugins() -> list[Plugin]:
    """The plugins found so far (entry points, loaded or not, and modules that registered things without one)."""
    _scan()
    out = list(_PLUGINS.values())
    tops = {p.top for p in out}
    for e in registered():
        top = e.module.split(".")[0]
        if not e.builtin and top not in tops:
            tops.add(top)
            out.append(Plugin(top, top, *_distribution(top), loaded=True))
    return out


def _distribution(top: str) -> tuple[str | None, str | None]:
    names = metadata.packages_distributions().get(top) or []
    if not names:
        return None, None
    try:
        return names[0], metadata.version(names[0])
    except metadata.PackageNotFoundError:
        return names[0], None


def _module_of(obj) -> str:
    return getattr(obj, "__module__", None) or "?"


def registered() -> list[Entry]:
    """Everything registered now, built-in and plugin, each with the module that declared it."""
    out = []
    for name, d in OPS.items():
        impl = IMPLEMENTATIONS.get(name)
        kernels = ["reference"] * (impl is not None) + [k.value for (o, k) in VARIANTS if o == name]
        out.append(Entry("op", name, _module_of(d.infer), f"{d.group.value}; MLX: {', '.join(kernels) or 'none'}"))
    for kind, b in _blocks.registered().items():
        out.append(Entry("block", kind.value, _module_of(b.build), f"prefix {b.prefix}"))
    for kind, build in _blocks.ffn_builders().items():
        out.append(Entry("ffn", kind.value, _module_of(build), "FFN kind"))
    for f in _families.all_families():
        module = _module_of(f.config)
        out.append(Entry("family", f.name, module, f"{len(f.presets)} presets" if f.presets else ""))
    for name, cls in PASSES.items():
        out.append(Entry("pass", name, _module_of(cls), (cls.__doc__ or "").strip().splitlines()[0][:60]
                         if cls.__doc__ else ""))
    return out


def owner(entry: Entry) -> Plugin | None:
    """The plugin an entry came from (None for mlxc's own)."""
    if entry.builtin:
        return None
    top = entry.module.split(".")[0]
    return next((p for p in plugins() if p.top == top), None)


def _forget(entry: Entry) -> None:
    if entry.kind == "op":
        impls = [IMPLEMENTATIONS.pop(entry.name, None)] + [VARIANTS.pop(k) for k in list(VARIANTS)
                                                             if k[0] == entry.name]
        for impl in impls:
            for h in impl.helpers if impl is not None else ():
                HELPER_SOURCES.pop(h, None)
        OPS.pop(entry.name, None)
    elif entry.kind in ("block", "ffn"):
        _blocks.unregister(entry.name)
    elif entry.kind == "family":
        _families.unregister_family(entry.name)
    elif entry.kind == "pass":
        PASSES.pop(entry.name, None)


def _purge_modules(top: str) -> None:
    for name in [m for m in sys.modules if m == top or m.startswith(top + ".")]:
        del sys.modules[name]


def unload(name: str) -> Plugin:
    """Take a plugin's ops, block kinds, families and passes out of mlxc and forget its modules (a later
    `load_plugins` imports it again if it is still installed)."""
    p = next((q for q in plugins() if q.name == name), None)
    if p is None:
        raise MlxcError(f"no plugin {name!r} is loaded; plugins: {', '.join(q.name for q in plugins()) or 'none'}")
    for entry in registered():
        if not entry.builtin and entry.module.split(".")[0] == p.top:
            _forget(entry)
    _purge_modules(p.top)
    p.loaded, p.error = False, None
    if p.name in _PLUGINS and _PLUGINS[p.name] is not p:
        _PLUGINS[p.name].loaded = False
    return p


# ------------------------------------------------------------------------------------------- artifacts


def required_plugins(program, spec=None) -> list[dict]:
    """The plugins an artifact of `program` (and `spec`) needs to load: those whose ops it runs or whose block or
    FFN kinds its spec lists, with what it uses of each (recorded in the manifest)."""
    used = {("op", o.op) for fn in program.functions for o in fn.ops}
    if spec is not None:
        used |= {("block", layer.block.value) for layer in spec.layers}
        used |= {("ffn", (layer.ffn or spec.ffn).value) for layer in spec.layers}
    uses: dict[str, list[str]] = {}
    for e in registered():
        if e.builtin or (e.kind, e.name) not in used:
            continue
        uses.setdefault(e.module.split(".")[0], []).append(f"{e.kind} {e.name}")
    out = []
    for top, used in sorted(uses.items()):
        p = next((q for q in plugins() if q.top == top), None)
        out.append({"name": p.name if p else top, "module": p.module if p else top,
                    "package": p.package if p else None, "version": p.version if p else None,
                    "uses": sorted(used)})
    return out


def _present(use: str) -> bool:
    kind, _, name = use.partition(" ")
    if kind == "op":
        return name in OPS
    if kind == "block":
        return name in BlockKind._known
    if kind == "ffn":
        return name in FFNType._known
    return False


def check_required(required: list, where: str) -> None:
    """Every plugin an artifact's manifest lists is loaded (loading installed ones first), or an MlxcError naming
    the first missing plugin, its package and what the artifact uses of it."""
    for r in required:
        if not isinstance(r, dict) or not isinstance(r.get("uses"), list) or \
                not all(isinstance(u, str) for u in r["uses"]):
            raise MlxcError(f"{where}: malformed plugin record {r!r} in its manifest")
    if all(_present(u) for r in required for u in r["uses"]):
        return
    load_plugins(strict=False)
    for r in required:
        absent = [u for u in r["uses"] if not _present(u)]
        if not absent:
            continue
        name, package = r.get("name"), r.get("package")
        version = f" {r['version']}" if r.get("version") else ""
        pkg = f"Python package {package}{version}" if package else f"module {r.get('module')}"
        known = next((p for p in _PLUGINS.values() if p.name == name), None)
        if known is not None and known.disabled:
            why = f"it is disabled ({DISABLE_ENV})"
        elif known is not None and known.error is not None:
            why = f"it failed to load: {known.error}"
        else:
            why = "it is not installed" + (f" (pip install {package})" if package else "")
        raise MlxcError(f"{where} needs the mlxc plugin {name!r} ({pkg}) for {', '.join(absent)}, and {why}")
