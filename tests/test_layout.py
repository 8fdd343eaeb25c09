"""The repository's import layout, read from the source with ``ast`` (nothing here imports the
modules it checks):

- the library ``utils`` has no import cycle;
- ``utils`` imports nothing from the scripts (the stage scripts, ``dataset/``, ``scripts/``,
  ``bench/``, ``tests/``);
- the core (``utils`` outside ``utils/demo/``) imports nothing from ``utils.demo``: what only
  the quickstart and the real-model demo use lives apart;
- no code but the tests imports the kept-path shims (``utils.guidance``, ``utils.answers``,
  ``utils.tiny_models``, ``utils.real_models``): the library, scripts and benchmarks use the
  real paths;
- test modules share code through ``tests.helpers`` only: no test module imports another or
  ``tests.conftest``;
- ``bench/`` does not import ``tests``;
- the README's module table lists every module of ``utils``.

Every ``import`` counts, at module level or inside a function. ``from utils.x import name``
is an import of ``utils.x.name`` when that is a module of the repository, else of
``utils.x``; a package's ``__init__.py`` is the package's module.
"""

from __future__ import annotations

import ast
from dataclasses import dataclass
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
STAGE_SCRIPTS = ("collect_training_data", "combine_training_data", "train_classifier", "eval_ckpt")
SCRIPT_FOLDERS = ("dataset", "scripts", "bench", "tests")
SHIMS = ("utils.guidance", "utils.answers", "utils.tiny_models", "utils.real_models")
DEMO = "utils.demo"


@dataclass(frozen=True)
class Import:
    importer: str  # the importing module
    path: str  # its file, relative to the repository
    line: int
    target: str  # the imported module

    def __str__(self) -> str:
        return f"{self.path}:{self.line} imports {self.target}"


def module_name(path: Path) -> str:
    """``utils/decoding/engine.py`` -> ``utils.decoding.engine``; a package's ``__init__.py`` -> the package."""
    parts = list(path.relative_to(REPO).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def source_files() -> list[Path]:
    files = [REPO / f"{name}.py" for name in STAGE_SCRIPTS]
    for folder in ("utils", *SCRIPT_FOLDERS):
        files += sorted((REPO / folder).rglob("*.py"))
    return files


FILES = {module_name(path): path for path in source_files()}


def is_within(module: str, *prefixes: str) -> bool:
    """``module`` is one of ``prefixes`` or inside one of them (``utils.demo.x`` is within ``utils.demo``)."""
    return any(module == prefix or module.startswith(prefix + ".") for prefix in prefixes)


def resolve(importer: str, node: ast.AST) -> list[str]:
    """The modules an ``import`` / ``from ... import`` statement of module ``importer`` imports."""
    if isinstance(node, ast.Import):
        return [alias.name for alias in node.names]
    base = node.module or ""
    if node.level:  # relative: from the importer's package (a package's __init__ is its own package)
        package = importer.split(".")
        if FILES[importer].name != "__init__.py":
            package.pop()
        package = package[: len(package) - (node.level - 1)]
        base = ".".join(part for part in (*package, base) if part)
    return [f"{base}.{alias.name}" if f"{base}.{alias.name}" in FILES else base for alias in node.names]


def imports_of(module: str) -> list[Import]:
    path = FILES[module]
    tree = ast.parse(path.read_text(encoding="utf-8"), filename=str(path))
    found = {Import(module, str(path.relative_to(REPO)), node.lineno, target)
             for node in ast.walk(tree) if isinstance(node, (ast.Import, ast.ImportFrom))
             for target in resolve(module, node)}
    return sorted(found, key=lambda i: (i.line, i.target))


IMPORTS = {module: imports_of(module) for module in FILES}


def modules(*prefixes: str) -> list[str]:
    return sorted(module for module in FILES if is_within(module, *prefixes))


def violations(importers: list[str], forbidden) -> list[str]:
    """Each import of ``importers`` whose target ``forbidden(target)`` says is not allowed."""
    return [str(i) for module in importers for i in IMPORTS[module] if forbidden(i.target)]


def check(found: list[str], rule: str) -> None:
    """Fail with ``rule`` and one line per offending import (``file:line imports module``)."""
    if found:
        pytest.fail(f"{rule}:\n  " + "\n  ".join(found), pytrace=False)


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One cycle of ``graph`` as ``[a, b, ..., a]``, or None (depth-first search)."""
    state: dict[str, str] = {}  # "open" on the current path, "done" once fully explored
    path: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = "open"
        path.append(node)
        for successor in sorted(graph.get(node, ())):
            if state.get(successor) == "open":
                return path[path.index(successor):] + [successor]
            if successor not in state and (cycle := visit(successor)):
                return cycle
        path.pop()
        state[node] = "done"
        return None

    for node in sorted(graph):
        if node not in state and (cycle := visit(node)):
            return cycle
    return None


def test_sources_are_found():
    """A guard on the checks below: the files they read are there."""
    for module in ("utils", "utils.decoding.engine", "utils.demo", "bench.eval_kl", "tests.helpers", *STAGE_SCRIPTS):
        assert module in FILES, f"{module} not found under {REPO}"


def test_find_cycle_reports_the_cycle():
    """A guard on the cycle check: a cycle is found and printed in import order."""
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b", "c"}, "b": {"c"}, "c": set()}) is None


def test_utils_has_no_import_cycle():
    library = modules("utils")
    graph = {module: {i.target for i in IMPORTS[module] if i.target in library and i.target != module}
             for module in library}
    cycle = find_cycle(graph) or []
    edges = [str(next(i for i in IMPORTS[a] if i.target == b)) for a, b in zip(cycle, cycle[1:])]
    check(edges, "utils has an import cycle " + " -> ".join(cycle))


def test_utils_imports_no_script():
    found = violations(modules("utils"), lambda target: is_within(target, *SCRIPT_FOLDERS, *STAGE_SCRIPTS))
    check(found, "the library imports a script (stage scripts, dataset/, scripts/, bench/, tests/)")


def test_core_imports_nothing_from_demo():
    """The shims ``utils.tiny_models`` and ``utils.real_models`` keep the demo's
    ``python -m`` paths; they forward to ``utils.demo`` and are not the core."""
    core = [m for m in modules("utils") if not is_within(m, DEMO, *SHIMS)]
    found = violations(core, lambda target: is_within(target, DEMO))
    check(found, "the core (utils outside utils/demo) imports utils.demo")


@pytest.mark.parametrize("folder", ["utils", *STAGE_SCRIPTS, "dataset", "scripts", "bench"])
def test_no_code_but_the_tests_imports_a_kept_path_shim(folder):
    importers = [m for m in modules(folder) if m not in SHIMS]
    found = violations(importers, lambda target: is_within(target, *SHIMS))
    check(found, f"{folder} imports a kept-path shim; import the real path")


@pytest.mark.parametrize("module", modules("tests"))
def test_tests_import_shared_code_from_helpers_only(module):
    found = violations([module], lambda target: is_within(target, "tests") and not is_within(target, "tests.helpers"))
    check(found, f"{module} imports a test module or conftest; move what it needs to tests.helpers")


def test_bench_imports_no_tests():
    found = violations(modules("bench"), lambda target: is_within(target, "tests"))
    check(found, "bench imports tests; shared code belongs in bench/ (tests may import bench)")


def test_readme_module_table_lists_every_utils_module():
    """Every ``utils`` module file is named in the README's module table, as `utils/<path>.py`
    (a package ``__init__.py`` only when it imports something)."""
    text = (REPO / "README.md").read_text()
    table = text[text.index("### Modules"):]
    table = table[: table.index("\n\n", table.index("| module |"))]
    missing = [str(path.relative_to(REPO)) for name, path in sorted(FILES.items())
               if is_within(name, "utils") and f"`{path.relative_to(REPO)}`" not in table
               and not (path.name == "__init__.py" and "import" not in path.read_text())]
    assert not missing, f"README's module table does not name: {', '.join(missing)}"


@pytest.mark.parametrize("script", ["collect_training_data", "eval_ckpt"])
def test_stage_scripts_do_not_branch_on_the_engine(script):
    """Collection and evaluation name their backend through the registry only: no comparison
    with ``.engine`` anywhere in the script."""
    tree = ast.parse(FILES[script].read_text())
    branches = [node.lineno for node in ast.walk(tree) if isinstance(node, ast.Compare)
                and any(isinstance(part, ast.Attribute) and part.attr == "engine" for part in [node.left, *node.comparators])]
    assert not branches, f"{script}.py compares .engine at line(s) {branches}: use utils.decoding.backends"
