"""Dependencies point one way: `ir` imports nothing else of mlxc, `passes` only `ir`, frontends build IR and plain
data (no runtime, no passes), codegen reads IR (and kernels), the runtime runs what codegen wrote; the API, the
CLI and the tools compose them. Checked on every module's imports, at any depth (function-level imports count)."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent

# package -> the mlxc packages (top-level modules) its modules may import, besides itself
ALLOWED = {
    "ir": set(),
    "passes": {"ir"},
    "frontends": {"ir", "files"},
    "codegen": {"ir", "kernels", "files"},
    "kernels": {"ir", "files"},
    "runtime": {"ir", "codegen", "kernels", "files"},
}


def _package_of(path: Path) -> str:
    rel = path.relative_to(ROOT)
    return rel.parts[0] if len(rel.parts) > 1 else rel.stem


def _imported_packages(path: Path, root: Path = ROOT) -> set[str]:
    """The top-level mlxc packages a module imports (relative imports resolved against its location)."""
    tree = ast.parse(path.read_text(), filename=str(path))
    here = path.relative_to(root).parts[:-1]
    found = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom):
            if node.level:
                base = here[: len(here) - (node.level - 1)]
                parts = list(base) + (node.module.split(".") if node.module else [])
                if not parts:  # `from .. import x` at the root: x names the package
                    parts = [alias.name for alias in node.names]
                    found.update(parts)
                    continue
                found.add(parts[0])
            elif node.module and node.module.startswith("mlxc."):
                found.add(node.module.split(".")[1])
            elif node.module == "mlxc":
                found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.Import):
            for alias in node.names:
                if alias.name.startswith("mlxc."):
                    found.add(alias.name.split(".")[1])
    return found


MODULES = sorted(p for pkg in ALLOWED for p in (ROOT / pkg).rglob("*.py") if "build" not in p.parts)


@pytest.mark.parametrize("path", MODULES, ids=lambda p: str(p.relative_to(ROOT)))
def test_imports_point_one_way(path):
    pkg = _package_of(path)
    bad = _imported_packages(path) - ALLOWED[pkg] - {pkg}
    assert not bad, f"{path.relative_to(ROOT)} ({pkg}) imports {sorted(bad)}"


def test_the_check_sees_violations(tmp_path):
    """The import walker resolves relative imports at any depth, inside functions too (so the rule can fail)."""
    module = tmp_path / "frontends" / "families" / "x.py"
    module.parent.mkdir(parents=True)
    module.write_text("from ..gguf import a\nfrom ...ir import b\n\ndef f():\n    from ...runtime.cache import c\n"
                      "    import mlxc.passes.lora\n")
    assert _imported_packages(module, tmp_path) == {"frontends", "ir", "runtime", "passes"}
