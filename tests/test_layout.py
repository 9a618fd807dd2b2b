"""The house's rule, pinned: imports run one way, scripts -> stages/ -> models/ and data/, with
data/ importing neither models/ nor stages/, models/ importing no stage, and no import cycles."""

import ast
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
PACKAGES = ("data", "models", "stages")
SCRIPTS = sorted(path.stem for path in REPO.glob("*.py"))
# Folders of scripts (tools/): like the top level's, they import stages/, models/ and data/, and nothing imports them.
SCRIPT_FOLDERS = ("tools",)
# What each package may import from the project (scripts are imported by nobody).
ALLOWED = {"data": {"data"}, "models": {"models", "data"}, "stages": {"stages", "models", "data"}}


def project_modules() -> dict[str, Path]:
    """Every module of the project by dotted name: the packages' modules and the scripts (top level, tools/)."""
    modules = {name: REPO / f"{name}.py" for name in SCRIPTS}
    for folder in SCRIPT_FOLDERS:
        modules.update({f"{folder}.{path.stem}": path for path in sorted((REPO / folder).glob("*.py"))})
    for package in PACKAGES:
        for path in sorted((REPO / package).glob("*.py")):
            modules[package if path.stem == "__init__" else f"{package}.{path.stem}"] = path
    return modules


def imported_modules(path: Path, known: set[str]) -> set[str]:
    """The project modules `path` imports anywhere in its body (late imports inside functions too)."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            # `from stages import evaluate` imports the module stages.evaluate
            names = [node.module, *(f"{node.module}.{alias.name}" for alias in node.names)]
        else:
            continue
        found.update(name for name in names if name in known)
    return found


def import_graph() -> dict[str, set[str]]:
    modules = project_modules()
    known = set(modules)
    return {name: imported_modules(path, known) - {name} for name, path in modules.items()}


def top(name: str) -> str:
    return name.split(".")[0]


def test_the_graph_sees_the_packages_and_scripts():
    graph = import_graph()
    assert {"train", "predict", "tools.plot_run", "models.decoding", "data.features", "stages.train"} <= set(graph)
    assert "models.hf_export" in graph["tools.interpret_prefix"]
    assert "stages.train" in graph["train"]  # the script is the stage's front door
    assert "models.decoding" in graph["stages.predict"]


def test_imports_run_one_way():
    wrong = []
    for module, imports in import_graph().items():
        package = top(module)
        for imported in imports:
            if top(imported) in SCRIPTS or top(imported) in SCRIPT_FOLDERS:
                wrong.append(f"{module} imports the script {imported}")
            elif package in ALLOWED and top(imported) not in ALLOWED[package]:
                wrong.append(f"{module} imports {imported}")
    assert not wrong, "imports against the direction scripts -> stages -> models, data:\n" + "\n".join(sorted(wrong))


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One import cycle as a list of modules (first == last), or None."""
    state: dict[str, str] = {}  # "open" while on the current path, "done" after

    def visit(module: str, path: list[str]) -> list[str] | None:
        state[module] = "open"
        for imported in sorted(graph[module]):
            if state.get(imported) == "open":
                return path[path.index(imported) :] + [imported]
            if imported not in state and (cycle := visit(imported, [*path, imported])):
                return cycle
        state[module] = "done"
        return None

    for module in sorted(graph):
        if module not in state and (cycle := visit(module, [module])):
            return cycle
    return None


def test_no_import_cycles():
    cycle = find_cycle(import_graph())
    assert cycle is None, "import cycle: " + " -> ".join(cycle)


@pytest.mark.parametrize(
    ("graph", "expected"),
    [
        ({"a": {"b"}, "b": {"c"}, "c": set()}, None),
        ({"a": {"b"}, "b": {"c"}, "c": {"a"}}, ["a", "b", "c", "a"]),
        ({"a": {"b"}, "b": {"b", "c"}, "c": set()}, ["b", "b"]),
    ],
)
def test_the_cycle_finder_finds_cycles(graph, expected):
    assert find_cycle(graph) == expected


def test_training_and_models_import_without_pycocoevalcap():
    # A lent GPU box has torch and transformers but no pycocoevalcap: the scoring toolkit is imported
    # only where captions are scored.
    modules = ["models." + path.stem for path in sorted((REPO / "models").glob("*.py")) if path.stem != "__init__"]
    code = (
        "import sys\n"
        f"for name in {[*modules, 'stages.train', 'stages.predict', 'stages.extract']!r}:\n"
        "    __import__(name)\n"
        "print(sorted(name for name in sys.modules if name.startswith('pycocoevalcap')))\n"
    )
    result = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, check=True)
    assert result.stdout.strip() == "[]"


def test_importing_the_project_changes_no_library_setting():
    """No import-time side effects: transformers' progress bars stay on until a script turns them off."""
    modules = ", ".join(sorted(name for name in project_modules() if "." in name or name in PACKAGES))
    probe = f"import {modules}; from transformers.utils import logging; print(logging.is_progress_bar_enabled())"
    result = subprocess.run([sys.executable, "-c", probe], cwd=REPO, capture_output=True, text=True, check=True)
    assert result.stdout.strip() == "True"


def subclasses_of(name: str) -> list[str]:
    """Every class in the project whose bases name `name` (`Trainer`, `train.Trainer`, ...)."""
    found = []
    for module, path in project_modules().items():
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, ast.ClassDef):
                bases = [ast.unparse(base).split(".")[-1] for base in node.bases]
                if name in bases:
                    found.append(f"{module}.{node.name}")
    return found


def test_no_class_derives_from_the_trainer():
    """Composition is the design: an objective is a value the Trainer holds (stages/objectives.py)."""
    assert subclasses_of("Trainer") == []
    assert subclasses_of("Tracker") == ["stages.tracking.WandbTracker"]  # the finder finds subclasses
