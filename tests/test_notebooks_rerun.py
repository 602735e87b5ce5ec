"""Every notebook cell can be run again: the reader steps back and forth through a notebook.

Each notebook is executed top to bottom (as nbmake does), then every code cell is executed a
second time in the same kernel, from the last cell to the first. A cell that rebinds a module's
name (a loop variable called `data`), turns a variable that earlier cells need into something
else, or keeps training a model that an earlier cell made, fails here. One kernel per notebook,
so the cost is one more pass over each notebook.
"""
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
NOTEBOOKS = sorted((ROOT / "notebooks").glob("[0-9][0-9]_*.ipynb"))


@pytest.mark.slow
@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.name)
def test_every_cell_runs_again_last_to_first(path):
    nbformat = pytest.importorskip("nbformat")
    nbclient = pytest.importorskip("nbclient")

    nb = nbformat.read(path, as_version=4)
    client = nbclient.NotebookClient(nb, timeout=900, kernel_name="python3",
                                     resources={"metadata": {"path": str(path.parent)}})
    code = [i for i, cell in enumerate(nb.cells) if cell.cell_type == "code"]
    with client.setup_kernel():
        for i in code:                                  # top to bottom, as the reader first does
            client.execute_cell(nb.cells[i], i)
        for i in reversed(code):                        # then every cell again, last to first
            try:
                client.execute_cell(nb.cells[i], i)
            except nbclient.exceptions.CellExecutionError as e:
                pytest.fail(f"{path.name}: cell {i} fails when run again after the whole notebook:\n"
                            f"{nb.cells[i].source[:300]}\n{str(e)[-1500:]}")
