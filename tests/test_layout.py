"""The folders are dependency rules: the model library imports nothing federated, and the federated
core imports no transport, files-and-processes or wiring code. Read from the source, every import
statement (function-level ones too), so that a lazy import cannot hide a cycle."""

import ast
import pathlib

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]
PACKAGE = ROOT / "jaxblock"
# subpackage -> the subpackages it must never import
FORBIDDEN = {
    "model": {"fed", "net", "run", "flower"},
    "fed": {"net", "run", "flower"},
    "net": {"run", "flower"},
    "run": {"flower"},  # flower/ is the top: the Flower App over run/ and net/
}


def imports(path: pathlib.Path) -> set[str]:
    """Every jaxblock module that `path` imports, as dotted names (`from jaxblock.x import y` gives
    both jaxblock.x and jaxblock.x.y: y may be a module)."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found |= {a.name for a in node.names if a.name.startswith("jaxblock")}
        elif isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("jaxblock"):
            found.add(node.module)
            found |= {f"{node.module}.{a.name}" for a in node.names}
    return found


def subpackage(dotted: str) -> str | None:
    parts = dotted.split(".")
    return parts[1] if len(parts) > 1 and (PACKAGE / parts[1]).is_dir() else None


def module_files() -> list[pathlib.Path]:
    return sorted(p for p in PACKAGE.rglob("*.py") if p.parent != PACKAGE)


@pytest.mark.parametrize("path", module_files(), ids=lambda p: str(p.relative_to(PACKAGE)))
def test_no_subpackage_imports_a_layer_above_it(path):
    own = path.relative_to(PACKAGE).parts[0]
    bad = sorted(m for m in imports(path) if subpackage(m) in FORBIDDEN.get(own, set()))
    assert not bad, f"jaxblock/{path.relative_to(PACKAGE)} ({own}/) imports {bad}"


def test_every_module_lives_in_a_subpackage():
    loose = [p.name for p in PACKAGE.glob("*.py") if p.name != "__init__.py"]
    assert not loose, f"modules outside model/ fed/ net/ run/: {loose}"


def _module_name(path: pathlib.Path) -> str:
    rel = path.relative_to(ROOT).with_suffix("")
    parts = rel.parts[:-1] if rel.name == "__init__" else rel.parts
    return ".".join(parts)


def test_no_import_cycles():
    """No cycle among jaxblock's modules (a package's __init__ counts as the package)."""
    names = {_module_name(p): p for p in PACKAGE.rglob("*.py")}
    graph = {m: {i for i in imports(p) if i in names and i != m} for m, p in names.items()}
    for m in names:  # importing a.b.c from outside a.b runs a.b's __init__ first
        for i in list(graph[m]):
            parents = {".".join(i.split(".")[:k]) for k in range(2, i.count(".") + 1)}
            graph[m] |= {p for p in parents if p in names and p != m and not m.startswith(p + ".")}
    graph["jaxblock"] = set()  # the top-level package only re-exports for users
    state: dict[str, int] = {}

    def visit(m: str, stack: list[str]) -> None:
        state[m] = 1
        for n in sorted(graph[m]):
            if state.get(n) == 1:
                cycle = stack[stack.index(n) :] + [n] if n in stack else [m, n]
                pytest.fail("import cycle: " + " -> ".join(cycle))
            if n not in state:
                visit(n, [*stack, n])
        state[m] = 2

    for m in sorted(graph):
        if m not in state:
            visit(m, [m])
