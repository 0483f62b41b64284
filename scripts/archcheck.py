"""Read the project's import graph and code shape; print findings, exit 1 if any.

The layer order (lowest first) is written down in docs/architecture.md and
checked here: a module may import its own layer or any lower one, never a
higher one, and the graph has no cycles. Imports under ``if TYPE_CHECKING:``
count for neither rule (they never run). Plugins (``plugins/*/``) sit above the
whole core; the core never imports a plugin.
"""

from __future__ import annotations

import ast
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
MAX_MODULE_LINES = 600
MAX_FUNCTION_LINES = 80

#: Lowest first. A module belongs to the first entry that is a prefix of its name.
LAYERS: list[tuple[str, ...]] = [
    ("shadowvmm.errors",),
    ("shadowvmm.memory",),
    ("shadowvmm.virtio", "shadowvmm.options", "shadowvmm.progress"),
    ("shadowvmm.backends",),
    ("shadowvmm.state",),
    ("shadowvmm.shadow", "shadowvmm.lifecycle", "shadowvmm.timeline"),
    ("shadowvmm.device", "shadowvmm.vmmqueue"),
    ("shadowvmm.transport",),
    ("shadowvmm.guest",),
    ("shadowvmm.config", "shadowvmm.machine", "shadowvmm.workload"),
    ("shadowvmm.migration",),
    ("shadowvmm.testing",),
    ("shadowvmm.scenarios", "shadowvmm.plot"),
    ("shadowvmm.job",),
    ("shadowvmm.cli", "shadowvmm.__main__"),
    ("shadowvmm_vhost_user", "shadowvmm_vdpa", "shadowvmm_faulty", "shadowvmm_nested"),
]


def layer_of(module: str) -> int | None:
    if module == "shadowvmm":
        return 0    # the bare package: an empty __init__ (a version at most)
    for rank, names in enumerate(LAYERS):
        for name in names:
            if module == name or module.startswith(name + "."):
                return rank
    return None


def source_files() -> dict[str, Path]:
    """Module name -> file, for the core and every plugin's package."""
    found: dict[str, Path] = {}
    roots = [ROOT] + [p / "src" for p in sorted((ROOT / "plugins").glob("*")) if (p / "src").is_dir()]
    for root in roots:
        for path in sorted(root.glob("shadowvmm*/**/*.py")):
            rel = path.relative_to(root).with_suffix("")
            parts = list(rel.parts)
            if parts[-1] == "__init__":
                parts.pop()
            found[".".join(parts)] = path
    return found


def _type_checking_block(node: ast.AST) -> bool:
    return isinstance(node, ast.If) and (
        (isinstance(node.test, ast.Name) and node.test.id == "TYPE_CHECKING")
        or (isinstance(node.test, ast.Attribute) and node.test.attr == "TYPE_CHECKING"))


def imports_of(module: str, path: Path, modules: set[str]) -> set[str]:
    tree = ast.parse(path.read_text(), str(path))
    package = module if path.name == "__init__.py" else module.rpartition(".")[0]
    out: set[str] = set()

    def resolve(name: str) -> str | None:
        while name and name not in modules:
            name = name.rpartition(".")[0]
        return name or None

    def visit(node: ast.AST) -> None:
        if _type_checking_block(node):
            return
        if isinstance(node, ast.Import):
            for alias in node.names:
                if (hit := resolve(alias.name)) is not None:
                    out.add(hit)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")
                anchor = anchor[: len(anchor) - node.level + 1]
                base = ".".join(anchor + ([base] if base else []))
            for alias in node.names:
                hit = resolve(f"{base}.{alias.name}") or resolve(base)
                if hit is not None:
                    out.add(hit)
        for child in ast.iter_child_nodes(node):
            visit(child)

    visit(tree)
    out.discard(module)
    return out


def graph() -> dict[str, set[str]]:
    files = source_files()
    names = set(files)
    return {m: imports_of(m, p, names) for m, p in files.items()}


def cycles(edges: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components with more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on: set[str] = set()
    out: list[list[str]] = []
    counter = [0]

    def strong(v: str) -> None:
        index[v] = low[v] = counter[0]
        counter[0] += 1
        stack.append(v)
        on.add(v)
        for w in sorted(edges.get(v, ())):
            if w not in index:
                strong(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                out.append(sorted(comp))

    sys.setrecursionlimit(10000)
    for v in sorted(edges):
        if v not in index:
            strong(v)
    return out


def _package_parent(a: str, b: str) -> bool:
    """A package's ``__init__`` re-exporting its own submodules is not an upward import."""
    return b.startswith(a + ".")


def upward(edges: dict[str, set[str]]) -> list[str]:
    out = []
    for src, targets in sorted(edges.items()):
        ls = layer_of(src)
        for dst in sorted(targets):
            ld = layer_of(dst)
            if ls is None or ld is None:
                out.append(f"{src} -> {dst}: module not in any layer (scripts/archcheck.py LAYERS)")
            elif ld > ls and not _package_parent(src, dst):
                out.append(f"{src} (layer {ls}) imports {dst} (layer {ld})")
    return out


def shape() -> list[str]:
    out = []
    for path in sorted(source_files().values()):
        text = path.read_text()
        lines = text.count("\n")
        if lines > MAX_MODULE_LINES:
            out.append(f"{path.relative_to(ROOT)}: {lines} lines (limit {MAX_MODULE_LINES})")
        for node in ast.walk(ast.parse(text)):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                start = min([node.lineno] + [d.lineno for d in node.decorator_list])
                length = (node.end_lineno or node.lineno) - start + 1
                if length > MAX_FUNCTION_LINES:
                    out.append(f"{path.relative_to(ROOT)}:{node.lineno}: function {node.name} is "
                               f"{length} lines (limit {MAX_FUNCTION_LINES})")
    return out


def main() -> int:
    edges = graph()
    findings = [f"cycle: {' <-> '.join(c)}" for c in cycles(edges)] + upward(edges) + shape()
    for line in findings:
        print(line)
    print(f"{len(edges)} modules, {sum(map(len, edges.values()))} imports, {len(findings)} findings")
    return 1 if findings else 0


if __name__ == "__main__":
    raise SystemExit(main())
