"""The import graph of the project's own Python modules, read from the source with `ast` (nothing is imported).

Nodes are dotted module names of every .py file under the project's packages (chestct, stages and app when it
exists), found by walking the folders, so the graph follows any package layout. Edges count every import that
runs: module level and inside functions, `import a.b`, `from a import b` where b is a submodule, and relative
imports. Imports under `if TYPE_CHECKING:` never run, so they are left out.

Loading `a.b.c` also runs `a/__init__.py` and `a/b/__init__.py`: those files are part of what a module loads, and
they are graph edges too, but an `__init__` that imports nothing of the project has no edges out, so it cannot
close a cycle.

A list literal such as `[sys.executable, "-m", "chestct.export_check", ...]` runs a project module in a child
process: its code is part of what the caller depends on, so `transitive_files` follows it (it is not an import,
so `find_cycles` does not).
"""

from __future__ import annotations

import ast
from dataclasses import dataclass
from functools import cache
from pathlib import Path

PROJECT_ROOT = Path(__file__).resolve().parents[1]
PACKAGE_ROOTS = ("chestct", "stages", "app")


@dataclass(frozen=True)
class ImportRecord:
    target: str  # dotted name: a project module when it resolves to one, else the name as written
    deferred: bool  # inside a function body: runs when the function is called, not when the module loads
    line: int


def _is_type_checking_guard(test: ast.expr) -> bool:
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING")


class _Collector(ast.NodeVisitor):
    """The imports and `-m` runs of one module's syntax tree."""

    def __init__(self, graph: ImportGraph, module: str):
        self.graph, self.module = graph, module
        self.depth = 0  # function nesting: > 0 means deferred
        self.imports: list[ImportRecord] = []
        self.runs: set[str] = set()

    def _function(self, node: ast.AST) -> None:
        self.depth += 1
        self.generic_visit(node)
        self.depth -= 1

    visit_FunctionDef = visit_AsyncFunctionDef = _function

    def visit_If(self, node: ast.If) -> None:
        if _is_type_checking_guard(node.test):  # annotations only: never runs
            for statement in node.orelse:
                self.visit(statement)
        else:
            self.generic_visit(node)

    def visit_Import(self, node: ast.Import) -> None:
        for alias in node.names:
            self.imports.append(ImportRecord(alias.name, self.depth > 0, node.lineno))

    def visit_ImportFrom(self, node: ast.ImportFrom) -> None:
        base = self.graph.resolve_from(self.module, node.module, node.level)
        if base == "__future__":
            return
        for alias in node.names:
            submodule = f"{base}.{alias.name}"
            # `from pkg import name`: a submodule when one exists by that name, else a name defined in pkg
            target = submodule if submodule in self.graph.modules else base
            self.imports.append(ImportRecord(target, self.depth > 0, node.lineno))

    def _literal_sequence(self, node: ast.List | ast.Tuple) -> None:
        items = node.elts
        for flag, name in zip(items, items[1:], strict=False):
            if (isinstance(flag, ast.Constant) and flag.value == "-m" and isinstance(name, ast.Constant)
                    and name.value in self.graph.modules):
                self.runs.add(name.value)
        self.generic_visit(node)

    visit_List = visit_Tuple = _literal_sequence


class ImportGraph:
    """The graph of the modules under `root`/<package> for each of `packages` that exists."""

    def __init__(self, root: Path, packages: tuple[str, ...] = PACKAGE_ROOTS):
        self.root = Path(root)
        self.modules: dict[str, Path] = {}
        for package in packages:
            folder = self.root / package
            for path in sorted(folder.rglob("*.py")) if folder.is_dir() else []:
                if "__pycache__" in path.parts:
                    continue
                parts = list(path.relative_to(self.root).with_suffix("").parts)
                if parts[-1] == "__init__":
                    parts.pop()
                self.modules[".".join(parts)] = path
        self._collected: dict[str, _Collector] = {}

    def relative_path(self, module: str) -> str:
        """Repo-relative posix path of a module (the form dvc.yaml deps use)."""
        return self.modules[module].relative_to(self.root).as_posix()

    def parents(self, module: str) -> list[str]:
        """The packages Python loads before `module`: a and a.b for a.b.c (those that are project modules)."""
        parts = module.split(".")
        return [name for name in (".".join(parts[:i]) for i in range(1, len(parts))) if name in self.modules]

    def resolve_from(self, module: str, name: str | None, level: int) -> str:
        """The absolute name `from <level dots><name> import ...` in `module` reads from."""
        if level == 0:
            return name or ""
        package = module if self.modules[module].name == "__init__.py" else module.rpartition(".")[0]
        for _ in range(level - 1):
            package = package.rpartition(".")[0]
        return f"{package}.{name}" if name else package

    def _collector(self, module: str) -> _Collector:
        if module not in self._collected:
            path = self.modules[module]
            collector = _Collector(self, module)
            collector.visit(ast.parse(path.read_text(), filename=str(path)))
            self._collected[module] = collector
        return self._collected[module]

    def import_records(self, module: str) -> list[ImportRecord]:
        """Every import statement's target in `module` (project and third-party), with where it runs."""
        return list(self._collector(module).imports)

    def imports_of(self, module: str, include_deferred: bool = True) -> set[str]:
        """The project modules `module` imports by name (the parent packages that loads are not listed)."""
        return {record.target for record in self.import_records(module)
                if record.target in self.modules and (include_deferred or not record.deferred)}

    def runs_of(self, module: str) -> set[str]:
        """Project modules `module` runs in a child process with `python -m`."""
        return set(self._collector(module).runs)

    def module_level_imports(self, module: str) -> set[str]:
        """Dotted names `module` imports when it loads (not inside a def): project modules and third-party."""
        return {record.target for record in self.import_records(module) if not record.deferred}

    def edges(self, module: str) -> set[str]:
        """Imports plus the parent packages each one loads first (self-imports left out)."""
        edges = set()
        for target in self.imports_of(module):
            edges.add(target)
            edges.update(self.parents(target))
        edges.discard(module)
        return edges

    def transitive_modules(self, module: str) -> set[str]:
        """Every project module that loading (or running) `module` may load: itself and its packages included."""
        seen: set[str] = set()
        pending = [module, *self.parents(module)]
        while pending:
            current = pending.pop()
            if current not in seen:
                seen.add(current)
                for target in self.edges(current) | self.runs_of(current):
                    pending += [target, *self.parents(target)]
        return seen

    def transitive_files(self, module: str) -> set[str]:
        """Repo-relative paths of `transitive_modules(module)`."""
        return {self.relative_path(name) for name in self.transitive_modules(module)}

    def find_cycles(self) -> list[list[str]]:
        """Import cycles as [a, b, ..., a]; every module that is part of a cycle appears in at least one."""
        graph = {module: self.edges(module) for module in self.modules}
        cycles = []
        for component in _strongly_connected(graph):
            if len(component) == 1:  # edges() drops self-imports, so a lone module is in no cycle
                continue
            covered: set[str] = set()
            for module in component:  # one shortest cycle through each module not yet shown in one
                if module not in covered:
                    cycle = _shortest_cycle(graph, module, set(component))
                    covered.update(cycle)
                    cycles.append(cycle)
        return cycles


def _strongly_connected(graph: dict[str, set[str]]) -> list[list[str]]:
    """Tarjan's algorithm, iterative (no recursion limit); components in a stable order."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    components = []
    for start in sorted(graph):
        if start in index:
            continue
        work = [(start, iter(sorted(graph[start])))]
        index[start] = low[start] = len(index)
        stack.append(start)
        on_stack.add(start)
        while work:
            node, children = work[-1]
            child = next(children, None)
            if child is not None:
                if child not in index:
                    index[child] = low[child] = len(index)
                    stack.append(child)
                    on_stack.add(child)
                    work.append((child, iter(sorted(graph[child]))))
                elif child in on_stack:
                    low[node] = min(low[node], index[child])
                continue
            work.pop()
            if work:
                parent = work[-1][0]
                low[parent] = min(low[parent], low[node])
            if low[node] == index[node]:
                component = []
                while True:
                    member = stack.pop()
                    on_stack.discard(member)
                    component.append(member)
                    if member == node:
                        break
                components.append(sorted(component))
    return components


def _shortest_cycle(graph: dict[str, set[str]], start: str, members: set[str]) -> list[str]:
    """start -> ... -> start inside one strongly connected component (breadth first: the shortest)."""
    previous: dict[str, str] = {}
    frontier = [start]
    while frontier:
        following = []
        for node in frontier:
            for child in sorted(graph[node] & members):
                if child == start:
                    path = [node]
                    while path[-1] != start:
                        path.append(previous[path[-1]])
                    return [*reversed(path), start]
                if child not in previous:
                    previous[child] = node
                    following.append(child)
        frontier = following
    raise AssertionError(f"{start} is in no cycle")  # unreachable for members of a component


# --- the project's own graph -----------------------------------------------------------------------------------


@cache
def project_graph() -> ImportGraph:
    return ImportGraph(PROJECT_ROOT)


def module_files() -> dict[str, Path]:
    """Dotted module name -> absolute path, for every .py file under the project's packages."""
    return dict(project_graph().modules)


def imports_of(module: str, include_deferred: bool = True) -> set[str]:
    return project_graph().imports_of(module, include_deferred)


def module_level_imports(module: str) -> set[str]:
    return project_graph().module_level_imports(module)


def transitive_files(module: str) -> set[str]:
    return project_graph().transitive_files(module)


def find_cycles() -> list[list[str]]:
    return project_graph().find_cycles()
