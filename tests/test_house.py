"""The house rules a reader relies on: no import cycles, files small enough to read in one sitting,
every doc link resolves, no test file in the wheel, and `import fp8dispatch` from a bare checkout."""

import ast
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
# Package name -> folder, as pyproject's package-dir maps them when installing.
FOLDERS = {"fp8dispatch": ROOT / "fp8dispatch", "fp8dispatch.backends": ROOT / "backends",
           "fp8dispatch.conformance": ROOT / "conformance"}
LINE_BUDGET = 500
# Over budget until issue 11 turns api.py into a thin face over the planning path: delete then.
OVER_BUDGET_FOR_NOW = {"fp8dispatch/api.py"}
# The same issue removes this cycle (ops.py's traced path calls back into api.py's planning).
CYCLES_FOR_NOW = [{"fp8dispatch.api", "fp8dispatch.ops"}]


def package_modules() -> dict[str, Path]:
    """Every module of the installed package, by dotted name, from the folders it is built from."""
    modules = {}
    for package, folder in FOLDERS.items():
        for path in folder.rglob("*.py"):
            parts = path.relative_to(folder).with_suffix("").parts
            if "tests" in parts or any(p.startswith(".") for p in parts):
                continue
            name = ".".join((package,) + parts)
            modules[name.removesuffix(".__init__")] = path
    return modules


def imports_of(name: str, path: Path, modules: dict[str, Path]) -> set[str]:
    """The package modules `name` imports anywhere in its text (at import time or inside a function)."""
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found = set()
    tree = ast.parse(path.read_text(), str(path))
    for block in ast.walk(tree):  # imports for type checkers only never run
        if isinstance(block, ast.If) and ast.unparse(block.test).endswith("TYPE_CHECKING"):
            block.body = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            targets = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = package
            for _ in range(node.level - 1):
                base = base.rpartition(".")[0]
            base = f"{base}.{node.module}" if node.level and node.module else base if node.level else node.module
            targets = [f"{base}.{alias.name}" if f"{base}.{alias.name}" in modules else base
                       for alias in node.names]
        else:
            continue
        found.update(t for t in targets if t in modules and t != name)
    return found


def import_cycles() -> list[list[str]]:
    modules = package_modules()
    graph = {name: imports_of(name, path, modules) for name, path in modules.items()}
    cycles, state = [], {}

    def visit(node, stack):
        state[node] = "open"
        for nxt in sorted(graph[node]):
            if state.get(nxt) == "open":
                cycles.append(stack[stack.index(nxt):] + [nxt])
            elif nxt not in state:
                visit(nxt, stack + [nxt])
        state[node] = "done"

    for node in sorted(graph):
        if node not in state:
            visit(node, [node])
    return cycles


def test_no_import_cycles():
    # A package's __init__ importing its own modules is how a package is built, not a cycle a
    # reader has to untangle; every other edge counts, including imports inside functions.
    cycles = [c for c in import_cycles() if not any(m in FOLDERS and c[i + 1].startswith(m + ".")
                                                    for i, m in enumerate(c[:-1]))
              and set(c) not in CYCLES_FOR_NOW]
    assert cycles == []


def test_line_budget():
    too_long = []
    for folder in (ROOT / "fp8dispatch", ROOT / "backends"):
        for path in folder.rglob("*.py"):
            lines = len(path.read_text().splitlines())
            if lines > LINE_BUDGET and str(path.relative_to(ROOT)) not in OVER_BUDGET_FOR_NOW:
                too_long.append(f"{path.relative_to(ROOT)}: {lines} lines")
    assert too_long == []


DOCS = [ROOT / "README.md", *sorted((ROOT / "docs").rglob("*.md"))]
LINK = re.compile(r"\[[^\]]*\]\(([^)\s]+)\)")
CODE = re.compile(r"```.*?```|`[^`\n]*`", re.S)  # code is not prose: `kernel[grid](...)` is no link


@pytest.mark.parametrize("doc", DOCS, ids=lambda p: str(p.relative_to(ROOT)))
def test_doc_links_resolve(doc):
    broken = []
    for target in LINK.findall(CODE.sub("", doc.read_text())):
        if re.match(r"[a-z]+:", target) or target.startswith("#"):
            continue  # a web address or an anchor in the same page
        path = (doc.parent / target.split("#")[0]).resolve()
        if not path.exists() or ROOT not in path.parents:
            broken.append(target)
    assert broken == []


# What only the machines we build on have: docs speak of what a user can install and run.
OUTSIDE = re.compile(r"/work/|\bshared/|\$OUT\b|/root/|device tool|test machine|10-minute")


@pytest.mark.parametrize("doc", DOCS, ids=lambda p: str(p.relative_to(ROOT)))
def test_docs_name_nothing_outside_the_repository(doc):
    assert OUTSIDE.findall(doc.read_text()) == []


def test_no_test_file_is_installed():
    tomllib = pytest.importorskip("tomllib", reason="reading pyproject.toml needs Python 3.11's tomllib")
    config = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]
    installed = []
    for package in config["packages"]:
        top = next(p for p in sorted(config["package-dir"], key=len, reverse=True)
                   if package == p or package.startswith(p + "."))
        folder = ROOT / config["package-dir"][top] / Path(*package[len(top):].split(".")[1:])
        installed += [f.name for f in folder.glob("*.py")]
    assert installed and not [f for f in installed if f.startswith("test_") or f == "conftest.py"]


def test_import_from_a_bare_checkout():
    # As in a fresh clone: the checkout on sys.path, no installed copy of fp8dispatch to fall back on.
    code = ("import sys; sys.meta_path[:] = [f for f in sys.meta_path if 'editable' not in repr(f).lower()]; "
            "import fp8dispatch, fp8dispatch.conformance.runner; "
            "print(fp8dispatch.backend_names(), fp8dispatch.backends.__file__)")
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    done = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=env, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    assert "reference" in done.stdout and str(ROOT / "backends" / "__init__.py") in done.stdout
