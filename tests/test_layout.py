"""The house: lpi.py is the paper and its loop, the plumbing sits beside it in flat modules,
imports point down only (no circle), and every function fits on a screen."""
import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
# Each module's level: a module may import only modules of a lower level.
LEVELS = {"clip_model": 0, "run_support": 0, "builtin_world": 1, "data": 2, "baselines": 2, "reporting": 2, "lpi": 3}


def imported_modules(path: Path) -> set[str]:
    """The repository's modules that `path` imports, anywhere in the file."""
    names = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names |= {a.name.split(".")[0] for a in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names.add(node.module.split(".")[0])
    return names & set(LEVELS)


@pytest.mark.parametrize("module", LEVELS)
def test_imports_point_down_only(module):
    for dep in imported_modules(ROOT / f"{module}.py"):
        assert LEVELS[dep] < LEVELS[module], f"{module}.py imports {dep}.py, which is not below it"


def test_every_module_of_the_repository_has_a_level():
    modules = {p.stem for p in ROOT.glob("*.py")}
    assert modules == set(LEVELS), modules ^ set(LEVELS)


@pytest.mark.parametrize("module", LEVELS)
def test_no_function_is_longer_than_a_screen(module):
    tree = ast.parse((ROOT / f"{module}.py").read_text())
    long = [(n.name, n.end_lineno - n.lineno + 1) for n in ast.walk(tree)
            if isinstance(n, (ast.FunctionDef, ast.AsyncFunctionDef)) and n.end_lineno - n.lineno + 1 > 60]
    assert not long, long


def test_lpi_py_holds_the_method_and_its_loop_in_at_most_1500_lines():
    source = (ROOT / "lpi.py").read_text()
    assert len(source.splitlines()) <= 1500
    defined = {n.name for n in ast.parse(source).body if isinstance(n, (ast.FunctionDef, ast.ClassDef))}
    for name in ("LPIConfig", "LowRankPrompts", "Interaction", "prompt_level_loss", "task_contrastive_loss", "LPI",
                 "TaskRouter", "recall_at_k", "train_task", "evaluate", "run_continual", "run", "load_run", "main"):
        assert name in defined, name
