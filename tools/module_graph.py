"""Print the import graph of a package: lines per module, intra-package imports, layers and cycles.

    python tools/module_graph.py [--types] [PACKAGE_DIR]   # default: lightning_trt_rtx/ next to this folder

Read from the source with :mod:`ast` (nothing is imported). A module's layer is the length of the
longest chain of intra-package imports below it (0: it imports no module of the package); modules
on a cycle share one layer (the cycle's). Imports inside functions count (they run when called);
imports under ``if TYPE_CHECKING:`` run never and are listed apart ("type-only"), outside the
layers and cycles (``--types``: counted as imports, as a type checker sees them). ``from package
import module`` is an import of ``module``, not of the package's ``__init__``. Standard library only.
"""

from __future__ import annotations

import ast
import sys
from dataclasses import dataclass
from pathlib import Path


@dataclass
class Graph:
    lines: dict[str, int]  # module -> line count
    imports: dict[str, set[str]]  # module -> the package's modules it imports (when it runs)
    type_only: dict[str, set[str]]  # module -> the package's modules it imports under TYPE_CHECKING only
    cycles: list[list[str]]  # each strongly connected set of two or more modules (or one importing itself)
    layers: dict[str, int]  # module -> longest import chain below it

    def importers(self, module: str) -> set[str]:
        return {m for m, deps in self.imports.items() if module in deps}


def _module_name(path: Path, root: Path) -> str:
    parts = list(path.relative_to(root).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts = parts[:-1]
    return ".".join([root.name, *parts])


def _is_type_checking(test: ast.expr) -> bool:
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING"
    )


def _import_nodes(tree: ast.AST, type_only: bool = False) -> list[tuple[ast.Import | ast.ImportFrom, bool]]:
    """Every import statement under ``tree``, and whether it sits under ``if TYPE_CHECKING:``."""
    found: list[tuple[ast.Import | ast.ImportFrom, bool]] = []
    for node in ast.iter_child_nodes(tree):
        if isinstance(node, (ast.Import, ast.ImportFrom)):
            found.append((node, type_only))
        elif isinstance(node, ast.If) and _is_type_checking(node.test):
            for child in node.body:
                found.extend(_import_nodes(ast.Module(body=[child], type_ignores=[]), True))
            for child in node.orelse:
                found.extend(_import_nodes(ast.Module(body=[child], type_ignores=[]), type_only))
        else:
            found.extend(_import_nodes(node, type_only))
    return found


def _longest_module_prefix(dotted: str, modules: set[str]) -> str | None:
    parts = dotted.split(".")
    for end in range(len(parts), 0, -1):
        prefix = ".".join(parts[:end])
        if prefix in modules:
            return prefix
    return None


def _imported(tree: ast.Module, name: str, is_package: bool, modules: set[str]) -> tuple[set[str], set[str]]:
    """The package's modules a module's source imports: (when it runs, under TYPE_CHECKING only)."""
    runtime: set[str] = set()
    type_only: set[str] = set()
    own_package = name if is_package else name.rpartition(".")[0]
    for node, typing_only in _import_nodes(tree):
        targets: list[str | None] = []
        if isinstance(node, ast.Import):
            targets = [_longest_module_prefix(alias.name, modules) for alias in node.names]
        else:
            if node.level:  # relative: from its own package up
                base = own_package.split(".")
                base = base[: len(base) - (node.level - 1)]
                stem = ".".join(base + ([node.module] if node.module else []))
            else:
                stem = node.module or ""
            for alias in node.names:
                submodule = f"{stem}.{alias.name}"
                targets.append(submodule if submodule in modules else _longest_module_prefix(stem, modules))
        (type_only if typing_only else runtime).update(t for t in targets if t is not None and t != name)
    return runtime, type_only - runtime


def _cycles(imports: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components of two or more modules (Tarjan), each sorted, sorted by first name."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []

    def visit(node: str) -> None:
        index[node] = low[node] = len(index)
        stack.append(node)
        on_stack.add(node)
        for dep in sorted(imports[node]):
            if dep not in index:
                visit(dep)
                low[node] = min(low[node], low[dep])
            elif dep in on_stack:
                low[node] = min(low[node], index[dep])
        if low[node] == index[node]:
            component = []
            while True:
                member = stack.pop()
                on_stack.discard(member)
                component.append(member)
                if member == node:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    for node in sorted(imports):
        if node not in index:
            visit(node)
    return sorted(found)


def _layers(imports: dict[str, set[str]], cycles: list[list[str]]) -> dict[str, int]:
    """Longest chain of imports below each module, a cycle counted as one node."""
    group = {m: m for m in imports}
    for cycle in cycles:
        for member in cycle:
            group[member] = cycle[0]
    below: dict[str, set[str]] = {g: set() for g in set(group.values())}
    for module, deps in imports.items():
        below[group[module]].update(group[d] for d in deps if group[d] != group[module])
    depth: dict[str, int] = {}

    def layer(node: str) -> int:
        if node not in depth:
            depth[node] = 1 + max((layer(d) for d in below[node]), default=-1)
        return depth[node]

    return {module: layer(group[module]) for module in imports}


def build(package_dir: Path | str, types: bool = False) -> Graph:
    """The graph of the package at ``package_dir``; ``types``: type-only imports count as imports."""
    root = Path(package_dir).resolve()
    files = sorted(p for p in root.rglob("*.py") if "__pycache__" not in p.parts)
    names = {p: _module_name(p, root) for p in files}
    modules = set(names.values())
    lines: dict[str, int] = {}
    imports: dict[str, set[str]] = {}
    type_only: dict[str, set[str]] = {}
    for path, name in names.items():
        source = path.read_text(encoding="utf-8")
        lines[name] = len(source.splitlines())
        tree = ast.parse(source, filename=str(path))
        imports[name], type_only[name] = _imported(tree, name, path.name == "__init__.py", modules)
    if types:
        imports = {m: imports[m] | type_only[m] for m in imports}
        type_only = {m: set() for m in imports}
    cycles = _cycles(imports)
    return Graph(lines, imports, type_only, cycles, _layers(imports, cycles))


def render(graph: Graph) -> str:
    package = min(graph.lines, key=len) if graph.lines else ""
    short = {m: m[len(package) + 1 :] or "__init__" for m in graph.lines}  # without the package's name
    width = max(len(s) for s in short.values())
    rows = [f"{'layer':>5}  {'lines':>5}  {'module':<{width}}  imports (intra-package)"]
    for module in sorted(graph.lines, key=lambda m: (-graph.layers[m], short[m])):
        deps = ", ".join(sorted(short[d] for d in graph.imports[module])) or "-"
        if graph.type_only[module]:
            deps += "  (type-only: " + ", ".join(sorted(short[d] for d in graph.type_only[module])) + ")"
        rows.append(f"{graph.layers[module]:>5}  {graph.lines[module]:>5}  {short[module]:<{width}}  {deps}")
    total = sum(graph.lines.values())
    layers = max(graph.layers.values(), default=-1) + 1
    rows.append(f"{len(graph.lines)} modules, {total} lines, {layers} layers")
    if graph.cycles:
        rows.append(f"import cycles ({len(graph.cycles)}):")
        rows.extend("  " + " <-> ".join(short[m] for m in cycle) for cycle in graph.cycles)
    else:
        rows.append("import cycles: none")
    return "\n".join(rows)


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else list(argv)
    types = "--types" in args
    args = [a for a in args if a != "--types"]
    if len(args) > 1:
        print(__doc__, file=sys.stderr)
        return 2
    package_dir = Path(args[0]) if args else Path(__file__).resolve().parent.parent / "lightning_trt_rtx"
    if not (package_dir / "__init__.py").is_file():
        print(f"{package_dir} is not a package directory (no __init__.py).", file=sys.stderr)
        return 2
    print(render(build(package_dir, types)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
