"""The package's structure: no import cycle (counting imports inside functions, so a lazy import
cannot hide one), every module importable alone in a fresh interpreter, and no module reaching
into another's ``_private`` names."""

from __future__ import annotations

import ast
import concurrent.futures
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import REPO

PACKAGE = REPO / "hpo"


def _modules() -> dict[str, Path]:
    found = {}
    for path in sorted(PACKAGE.rglob("*.py")):
        parts = path.relative_to(REPO).with_suffix("").parts
        name = ".".join(parts[:-1] if parts[-1] == "__init__" else parts)
        found[name] = path
    return found


MODULES = _modules()


def _imports(name: str, path: Path) -> list[tuple[str, list[str]]]:
    """(module imported, names taken from it) for every import in the file, top level or not."""
    package = name if path.name == "__init__.py" else name.rsplit(".", 1)[0]
    out = []
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            out += [(alias.name, []) for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                base = ".".join(package.split(".")[:len(package.split(".")) - node.level + 1] + ([base] if base else []))
            out.append((base, [alias.name for alias in node.names]))
    return out


def _graph() -> dict[str, set[str]]:
    graph: dict[str, set[str]] = {name: set() for name in MODULES}
    for name, path in MODULES.items():
        for module, names in _imports(name, path):
            if not module.startswith("hpo"):
                continue
            # "from hpo import study" imports the module hpo.search.study, not the package's __init__.
            targets = [f"{module}.{n}" for n in names if f"{module}.{n}" in MODULES]
            if len(targets) < len(names) or not names:
                targets.append(module)
            graph[name].update(t for t in targets if t in MODULES and t != name)
    return graph


def _cycle(graph: dict[str, set[str]]) -> list[str] | None:
    state: dict[str, int] = {}
    stack: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        stack.append(node)
        for nxt in sorted(graph[node]):
            if state.get(nxt) == 1:
                return stack[stack.index(nxt):] + [nxt]
            if nxt not in state and (found := visit(nxt)):
                return found
        stack.pop()
        state[node] = 2
        return None

    for node in sorted(graph):
        if node not in state and (found := visit(node)):
            return found
    return None


def test_the_cycle_finder_finds_a_cycle():
    assert _cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert _cycle({"a": {"b"}, "b": set()}) is None


def test_no_import_cycle_even_through_imports_inside_functions():
    cycle = _cycle(_graph())
    assert cycle is None, "import cycle: " + " -> ".join(cycle)


def test_no_module_imports_another_modules_private_names():
    offenders = []
    for name, path in MODULES.items():
        for module, names in _imports(name, path):
            if not module.startswith("hpo"):
                continue
            private = [n for n in names if n.startswith("_") and f"{module}.{n}" not in MODULES]
            offenders += [f"{name}: from {module} import {n}" for n in private]
    assert offenders == []


def test_only_optuna_private_uses_optunas_private_api():
    offenders = []
    for name, path in MODULES.items():
        if name == "hpo.store.optuna_private":
            continue
        for module, names in _imports(name, path):
            if module.startswith("optuna") and (any(part.startswith("_") for part in module.split("."))
                                                or any(n.startswith("_") for n in names)):
                offenders.append(f"{name}: {module} {names}")
    assert offenders == []


# The standard library's own underscored API, documented as public.
STDLIB_UNDERSCORED = {("sys", "_getframe"), ("os", "_exit")}


def _private_attributes(path: Path) -> list[tuple[int, str]]:
    """(line, expression) of every ``x._name`` read or written where ``x`` is not ``self``, ``cls``
    or ``super()``: another object's private attribute (an Optuna trial's ``_trial_id``, a study's
    ``_storage`` or ``_study_id``, another hpo class's internals)."""
    found = []
    for node in ast.walk(ast.parse(path.read_text())):
        if not (isinstance(node, ast.Attribute) and node.attr.startswith("_") and not node.attr.startswith("__")):
            continue
        owner = node.value
        if isinstance(owner, ast.Name) and (owner.id in {"self", "cls"} or (owner.id, node.attr) in STDLIB_UNDERSCORED):
            continue
        if isinstance(owner, ast.Call) and isinstance(owner.func, ast.Name) and owner.func.id == "super":
            continue
        found.append((node.lineno, ast.unparse(node)))
    return found


def test_the_private_attribute_finder_finds_optunas_ids(tmp_path):
    code = tmp_path / "m.py"
    code.write_text("def f(trial, study, self):\n    return trial._trial_id, study._storage._backend, self._own, "
                    "study._study_id, os._exit\n")
    assert sorted(text for _, text in _private_attributes(code)) == [
        "study._storage", "study._storage._backend", "study._study_id", "trial._trial_id"]


def test_no_private_attribute_of_another_object_outside_optuna_private():
    """Optuna's private attributes (``_trial_id``, ``_storage``, ``_study_id``, ...) are read only
    through ``hpo.store.optuna_private``; no module reaches into another object's internals."""
    offenders = [f"{name}:{line}: {text}" for name, path in MODULES.items() if name != "hpo.store.optuna_private"
                 for line, text in _private_attributes(path)]
    assert offenders == []


@pytest.mark.slow
def test_every_module_imports_alone_in_a_fresh_interpreter():
    def import_alone(name: str) -> tuple[str, int, str]:
        proc = subprocess.run([sys.executable, "-c", f"import {name}"], cwd=REPO, capture_output=True, text=True,
                              timeout=300)
        return name, proc.returncode, proc.stderr.strip().splitlines()[-1:] and proc.stderr.strip().splitlines()[-1]

    with concurrent.futures.ThreadPoolExecutor(max_workers=2) as pool:
        failed = [(n, err) for n, code, err in pool.map(import_alone, sorted(MODULES)) if code]
    assert failed == []


@pytest.mark.parametrize("statement", ["import hpo", "import hpo.export.loading",
                                       "import hpo.spec, hpo.search, hpo.store, hpo.running, hpo.data, hpo.nn, "
                                       "hpo.training, hpo.retrain, hpo.report, hpo.export"])
def test_hpo_and_hpo_load_import_no_optuna_sqlalchemy_or_plotly(statement):
    """``import hpo`` and the module behind ``hpo.load`` stay light: a model is loaded without the
    study machinery, and every folder's ``__init__`` imports nothing."""
    code = f"{statement}\nimport sys\nprint(sorted(m for m in ('optuna', 'sqlalchemy', 'plotly') if m in sys.modules))"
    proc = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == "[]"


def test_folder_inits_are_docstrings_only():
    for init in PACKAGE.glob("*/__init__.py"):
        if init.parent.name in {"commands", "bench"}:
            continue
        body = ast.parse(init.read_text()).body
        assert len(body) == 1 and isinstance(body[0], ast.Expr), f"{init} holds more than its docstring"


def test_no_test_expects_just_any_exception():
    """``pytest.raises(Exception)`` passes on a typo or a wrong argument as well as on the error
    meant: every test names the error it expects (an HpoError subclass, one SQLAlchemy error, ...)."""
    offenders = []
    for path in sorted((REPO / "tests").rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text())):
            if (isinstance(node, ast.Call) and ast.unparse(node.func) == "pytest.raises" and node.args
                    and ast.unparse(node.args[0]) in {"Exception", "BaseException"}):
                offenders.append(f"{path.relative_to(REPO)}:{node.lineno}")
    assert offenders == []
