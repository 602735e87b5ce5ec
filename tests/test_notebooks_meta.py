"""The notebooks as files: what nbmake (which executes them) does not check.

They are committed with their outputs, small, free of any machine's absolute paths, numbered in
reading order, import the repository's code instead of copying it, and together show every symbol
of METHOD.md next to the line of code that implements it.
"""
import json
import re
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
NOTEBOOKS = sorted((ROOT / "notebooks").glob("[0-9][0-9]_*.ipynb"))
MAX_BYTES = 2 * 1024 * 1024

# An absolute path of some machine: /work/..., /tmp/..., home folders, Windows drives.
ABSOLUTE_PATH = re.compile(r"(?<![\w.])(/work/|/tmp/|/home/|/root/|/Users/|/private/|/var/folders/|[A-Za-z]:\\\\)")
TEXT_MIME = ("text/plain", "text/markdown", "text/html", "application/json")

# Every symbol of METHOD.md, as the notebooks' symbol tables spell it (first column).
SYMBOLS = [r"$J$", r"$M$", r"$D_v$", r"$D_t$", r"$R$", r"$A$", r"$B_v$", r"$B_t$", r"$C_v$", r"$C_t$",
           r"$P_v$", r"$P_t$", r"$W_{t\to v}$", r"$W_{v\to t}$", r"$\alpha$", "LN", r"$s_v$", r"$s_t$",
           r"$\tau$", r"$\lambda_h$", r"$\theta$", r"$X$", r"$Y$", "keys / k-means", "R@K", "forgetting"]


def _load(path: Path) -> dict:
    return json.loads(path.read_text(encoding="utf-8"))


def _source(cell: dict) -> str:
    return "".join(cell["source"]) if isinstance(cell["source"], list) else cell["source"]


def _output_texts(cell: dict):
    for out in cell.get("outputs", []):
        if "text" in out:
            yield "".join(out["text"]) if isinstance(out["text"], list) else out["text"]
        for mime, data in out.get("data", {}).items():
            if mime in TEXT_MIME:
                yield data if isinstance(data, str) else "".join(data) if isinstance(data, list) else json.dumps(data)
        if "traceback" in out:
            yield "\n".join(out["traceback"])


def _symbol_rows() -> dict[str, list[str]]:
    """First column of every `| symbol | meaning | code |` table row -> the code column(s)."""
    rows: dict[str, list[str]] = {}
    for path in NOTEBOOKS:
        for cell in _load(path)["cells"]:
            if cell["cell_type"] != "markdown":
                continue
            table = False
            for line in _source(cell).splitlines():
                cols = [c.strip() for c in line.strip().strip("|").split("|")]
                if cols[:3] == ["symbol", "meaning", "code"]:
                    table = True
                elif table and line.startswith("|") and not set(line) <= set("|-: "):
                    for symbol in re.split(r",\s*", cols[0]):
                        rows.setdefault(symbol, []).append(cols[-1])
                elif not line.startswith("|"):
                    table = False
    return rows


def test_notebooks_are_numbered_in_reading_order():
    # 01-07 the course, 08 the appendix (how the factors learn)
    numbers = [int(p.name[:2]) for p in NOTEBOOKS]
    assert numbers == list(range(1, 9)), [p.name for p in NOTEBOOKS]


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.name)
def test_notebook_is_committed_executed_small_and_path_free(path):
    assert path.stat().st_size < MAX_BYTES, f"{path.name} is {path.stat().st_size / 1e6:.1f} MB"
    nb = _load(path)
    code = [c for c in nb["cells"] if c["cell_type"] == "code"]
    assert code, "no code"
    # executed top to bottom, in one run, with no error
    counts = [c.get("execution_count") for c in code]
    assert all(isinstance(n, int) for n in counts), f"{path.name}: cells without outputs (not executed)"
    assert counts == sorted(counts), f"{path.name}: cells executed out of order {counts}"
    for cell in code:
        assert not any(o.get("output_type") == "error" for o in cell.get("outputs", [])), \
            f"{path.name}: a cell failed: {_source(cell)[:80]!r}"
    # no absolute path of any machine, in the sources, the outputs or the metadata
    for i, cell in enumerate(nb["cells"]):
        for text in [_source(cell), *_output_texts(cell), json.dumps(cell.get("metadata", {}))]:
            m = ABSOLUTE_PATH.search(text)
            assert m is None, f"{path.name}, cell {i}: absolute path {text[max(0, m.start() - 30):m.end() + 30]!r}"
    assert ABSOLUTE_PATH.search(json.dumps(nb["metadata"])) is None


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.name)
def test_notebook_imports_the_repository_and_copies_none_of_it(path):
    import baselines
    import builtin_world
    import clip_model
    import data
    import lpi
    import reporting
    import run_support

    code = [_source(c) for c in _load(path)["cells"] if c["cell_type"] == "code"]
    assert re.search(r"^from nbsetup import \*$", code[0], re.M), "the first cell must be the shared setup"
    modules = (lpi, clip_model, builtin_world, data, reporting, baselines, run_support)
    public = {n for mod in modules for n in vars(mod) if not n.startswith("_")}
    for src in code:
        for name in re.findall(r"^\s*(?:def|class)\s+(\w+)", src, re.M):
            assert name not in public, f"{path.name} defines {name}, which the repository's modules already have"


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.name)
def test_notebook_outputs_come_from_todays_code(path):
    """notebooks/execute.py stamps each notebook with a hash of the code it teaches; outputs
    that an older version produced must be regenerated (python notebooks/execute.py)."""
    sys.path.insert(0, str(ROOT / "notebooks"))
    from execute import code_hash

    stamp = _load(path)["metadata"].get("lpi", {}).get("code")
    assert stamp == code_hash(), (f"{path.name} was executed against other code (stamp {stamp}, today "
                                  f"{code_hash()}): run python notebooks/execute.py {path.name[:2]}")


def test_every_symbol_of_the_spec_is_shown_with_its_code():
    import clip_model
    import lpi

    rows = _symbol_rows()
    missing = [s for s in SYMBOLS if s not in rows]
    assert not missing, f"symbols without a row in any notebook's symbol table: {missing}"
    # the code column's `lpi.x` / `clip_model.x` names exist
    modules = {"lpi": lpi, "clip_model": clip_model}
    for symbol in SYMBOLS:
        for code in rows[symbol]:
            for module, dotted in re.findall(r"`(lpi|clip_model)\.([\w.]+)", code):
                obj = modules[module]
                for part in dotted.split("."):
                    assert hasattr(obj, part), f"{symbol}: the code column names {module}.{dotted}, which does not exist"
                    obj = getattr(obj, part)


def test_a_comment_or_docstring_edit_keeps_the_stamp_and_a_change_of_behaviour_does_not():
    """The stamp hashes what lpi.py does: editing a comment or a docstring leaves the notebooks
    fresh; changing a default (what the code does) marks them stale."""
    sys.path.insert(0, str(ROOT / "notebooks"))
    from execute import behaviour_hash

    source = (ROOT / "lpi.py").read_text()
    base = behaviour_hash(source)
    commented = source.replace("\nclass LPIConfig:", "\n# a new comment\nclass LPIConfig:", 1)
    redocumented = source.replace('"""A frozen CLIP plus', '"""Reworded: a frozen CLIP plus', 1)
    changed = source.replace('alpha: float = switch(0.1,', 'alpha: float = switch(0.2,', 1)
    assert commented != source and redocumented != source and changed != source
    assert behaviour_hash(commented) == behaviour_hash(redocumented) == base
    assert behaviour_hash(changed) != base


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.name)
def test_running_time_is_measured_not_typed(path):
    """A notebook that tells its running time prints it (nbsetup.elapsed() in its last cell) and
    does not type it in its opening cell, where a number would go stale."""
    cells = _load(path)["cells"]
    opening = _source(cells[0])
    if "Running it" not in opening:
        return
    running = opening[opening.index("Running it"):].split("\n\n")[0]
    assert not re.search(r"\b\d+\s*(s|seconds|min|minutes)\b", running), \
        f"{path.name}: the opening types a running time: {running[:160]!r}"
    last = [c for c in cells if c["cell_type"] == "code"][-1]
    assert re.search(r"^elapsed\(\)", _source(last), re.M), f"{path.name}: the last code cell must call elapsed()"


def test_show_unwraps_decorators(monkeypatch):
    """show() of a @torch.no_grad function gives the function's own lines in lpi.py, not the
    decorator's source in torch."""
    sys.path.insert(0, str(ROOT / "notebooks"))
    import lpi
    import nbsetup

    shown = []
    monkeypatch.setattr(nbsetup, "display", lambda md: shown.append(md.data))
    target = lpi.name_similarity
    assert hasattr(target, "__wrapped__"), "the function chosen for this test is no longer decorated"
    nbsetup.show(target)
    assert shown[0].startswith("`lpi.py, line "), shown[0][:80]
    assert f"def {target.__name__}(" in shown[0]
