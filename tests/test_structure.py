"""The package's shape (issue 11): no import circle, no module over ~400 lines, no environment switches."""

from __future__ import annotations

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "sparseflash"
MAX_LINES = 400
# environment variables the library may read: the model cache folder (a documented user setting) and Triton's
# own interpreter switch (whether kernels can take CPU tensors)
ALLOWED_ENV = {"SPARSEFLASH_CACHE", "TRITON_INTERPRET"}


def _modules() -> dict[str, Path]:
    mods = {}
    for path in PACKAGE.rglob("*.py"):
        name = ".".join(path.relative_to(PACKAGE.parent).with_suffix("").parts)
        mods[name.removesuffix(".__init__")] = path
    return mods


def _imports(path: Path, mods: dict[str, Path]) -> set[str]:
    """sparseflash modules ``path`` imports, at module level or inside functions."""

    def resolve(name: str) -> str:
        while name not in mods and "." in name:
            name = name.rsplit(".", 1)[0]
        return name

    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found |= {resolve(a.name) for a in node.names if a.name.startswith("sparseflash")}
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and (node.module or "").startswith("sparseflash"):
            for a in node.names:
                full = f"{node.module}.{a.name}"
                found.add(full if full in mods else resolve(node.module))
    return found


def test_no_import_circle():
    mods = _modules()
    # an import of a package's own ancestor is not an edge: importing a submodule runs its parents anyway
    graph = {m: {t for t in _imports(p, mods) if t != m and not m.startswith(t + ".")} for m, p in mods.items()}
    state: dict[str, int] = {}  # 1: on the current path, 2: done
    path: list[str] = []

    def visit(m: str) -> None:
        state[m] = 1
        path.append(m)
        for t in sorted(graph[m]):
            if state.get(t) == 1:
                raise AssertionError("import circle: " + " -> ".join(path[path.index(t) :] + [t]))
            if t not in state:
                visit(t)
        path.pop()
        state[m] = 2

    for m in sorted(graph):
        if m not in state:
            visit(m)


def test_no_module_over_the_limit():
    long = {
        str(p.relative_to(PACKAGE.parent)): n
        for p in PACKAGE.rglob("*.py")
        if (n := len(p.read_text().splitlines())) > MAX_LINES
    }
    assert not long, f"modules over {MAX_LINES} lines: {long}"


def test_no_environment_switches():
    read = {}
    for path in PACKAGE.rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            call = isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute)
            if (
                call
                and node.func.attr in ("get", "getenv")
                and node.args
                and isinstance(node.args[0], ast.Constant)
                and isinstance(node.args[0].value, str)
                and ast.unparse(node.func.value) in ("os.environ", "os")
            ):
                read.setdefault(node.args[0].value, []).append(str(path.relative_to(PACKAGE.parent)))
            elif isinstance(node, ast.Subscript) and ast.unparse(node.value) == "os.environ":
                read.setdefault(ast.unparse(node.slice), []).append(str(path.relative_to(PACKAGE.parent)))
    assert set(read) <= ALLOWED_ENV, {k: v for k, v in read.items() if k not in ALLOWED_ENV}
