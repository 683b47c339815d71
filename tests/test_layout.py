"""The shape of the package, checked: modules stay readable (at most 400 lines, functions at most 100), imports
form no cycle, and the simulation drives the protocol cores through their public entry points only."""
from __future__ import annotations

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parent.parent / "hpcembed"
MODULES = sorted(PACKAGE.rglob("*.py"))


def module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def imports_of(path: Path) -> set[str]:
    """Modules of the package this one imports, at import time or inside a function (a deferred import still
    ties the two modules together)."""
    tree = ast.parse(path.read_text())
    here = module_name(path).split(".")
    package = here if path.name == "__init__.py" else here[:-1]
    out = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom):
            if node.level:
                base = package[: len(package) - node.level + 1]
                target = ".".join(base + ([node.module] if node.module else []))
            else:
                target = node.module or ""
            if target.startswith("hpcembed"):
                names = [f"{target}.{a.name}" for a in node.names]
                out.update(n if n in NAMES else target for n in names)
        elif isinstance(node, ast.Import):
            out.update(a.name for a in node.names if a.name.startswith("hpcembed"))
    return {m for m in out if m in NAMES}


NAMES = {module_name(p) for p in MODULES}


def test_modules_and_functions_stay_short():
    long_modules = {module_name(p): n for p in MODULES if (n := len(p.read_text().splitlines())) > 400}
    assert not long_modules
    long_functions = []
    for path in MODULES:
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                length = node.end_lineno - node.lineno + 1
                if length > 100:
                    long_functions.append(f"{module_name(path)}.{node.name}: {length} lines")
    assert not long_functions


def test_no_import_cycles():
    graph = {module_name(p): imports_of(p) for p in MODULES}
    # A package imports its own submodules through its __init__; that is not a cycle between modules.
    for name, deps in graph.items():
        deps.discard(name)
    done: set[str] = set()

    def visit(node: str, stack: list[str]) -> None:
        if node in stack:
            cycle = stack[stack.index(node):] + [node]
            raise AssertionError("import cycle: " + " -> ".join(cycle))
        if node in done:
            return
        for dep in sorted(graph[node]):
            if not (dep.startswith(node + ".") and node in {module_name(p) for p in PACKAGE.rglob("__init__.py")}):
                visit(dep, stack + [node])
        done.add(node)

    for name in sorted(graph):
        visit(name, [])


def test_the_simulation_touches_no_private_member_of_a_role():
    for path in (PACKAGE / "scaling").glob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Attribute) and node.attr.startswith("_") and not node.attr.startswith("__"):
                owner = node.value
                assert isinstance(owner, ast.Name) and owner.id == "self", \
                    f"{path.name}:{node.lineno} reaches into {ast.unparse(node)}"
            if isinstance(node, ast.ImportFrom) and node.module and "roles" in node.module.split("."):
                raise AssertionError(f"{path.name}:{node.lineno} imports a real-time driver ({node.module})")
