"""The setup every notebook shares: `from nbsetup import *` in its first code cell.

Puts the repository (one folder up) on the import path, imports what the notebooks use,
fixes threads, seed and figure size, and defines
  show(obj, start, stop)  the source of a function or class as it is in lpi.py, clip_model.py
                          or a module beside them (imported, never copied into a notebook);
                          a decorated function (@torch.no_grad) shows its own source
  check(condition, claim) the check below a sentence of prose: prints "✓ claim", or raises
                          AssertionError(claim) when the claim no longer holds
  timed(what)             a context manager that prints how long its block took
  run_lpi(**settings)     a whole run (lpi.run, as `python lpi.py`) in this process, into a
                          temporary folder; it says how long it took
  WORK, CACHE             that temporary folder (removed when the kernel exits)
  elapsed()               the last cell of every notebook: prints how long the notebook has
                          taken since its `from nbsetup import *` (its running time, measured)
"""
import contextlib
import inspect
import io
import json
import math
import pathlib
import sys
import tempfile
import textwrap
import time

STARTED = time.perf_counter()  # when the notebook ran `from nbsetup import *` (the first import)

ROOT = pathlib.Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import matplotlib.pyplot as plt  # noqa: E402
import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from IPython import get_ipython  # noqa: E402
from IPython.display import Image, Markdown, display  # noqa: E402

import baselines  # noqa: E402
import builtin_world as world  # noqa: E402
import clip_model  # noqa: E402
import data  # noqa: E402
import lpi  # noqa: E402
import reporting  # noqa: E402

__all__ = ["ROOT", "CACHE", "WORK", "RC", "F", "Image", "Markdown", "clip_model", "contextlib", "display", "inspect", "io",
           "json", "lpi", "math", "pathlib", "plt", "run_lpi", "show", "check", "timed", "elapsed", "time", "sys", "tempfile", "textwrap", "torch", "world",
           "data", "reporting", "baselines"]

# One thread: the tests run two notebooks side by side on two cores, and the tiny CLIP's
# small matrices gain nothing from more (on a busy machine extra threads only spin).
torch.set_num_threads(1)
torch.manual_seed(0)
RC = {"figure.dpi": 80, "savefig.dpi": 80, "font.size": 9}  # small pictures keep the notebooks small
plt.rcParams.update(RC)

WORK = tempfile.TemporaryDirectory()  # runs go here; removed when the notebook's kernel exits
CACHE = WORK.name  # the tiny CLIP ships with the repository (tiny_clip.pt.xz): nothing is pre-trained here


def show(obj, start=None, stop=None):
    """Show the source of `obj` as it is in the repository: all of it, or from the first line
    containing `start` through the next one containing `stop`. Decorators are unwrapped, so
    that a @torch.no_grad function shows its own source, not the decorator's."""
    obj = inspect.unwrap(obj)
    lines, first = inspect.getsourcelines(obj)
    i = 0 if start is None else next(k for k, line in enumerate(lines) if start in line)
    j = len(lines) if stop is None else next(k for k, line in enumerate(lines[i:], i) if stop in line) + 1
    where = f"{pathlib.Path(inspect.getsourcefile(obj)).name}, line {first + i}"
    display(Markdown(f"`{where}`\n```python\n{textwrap.dedent(''.join(lines[i:j]))}```"))


def check(condition, claim: str) -> None:
    """The check of a sentence of prose: "✓ claim" when it holds; AssertionError(claim) when it
    does not, so that a notebook whose prose went stale fails when it is executed."""
    if not condition:
        raise AssertionError(f"no longer true: {claim}")
    print(f"✓ {claim}")


@contextlib.contextmanager
def timed(what: str):
    """Print how long the block took: `with timed("40 steps"): ...`."""
    t0 = time.perf_counter()
    yield
    print(f"{what}: {time.perf_counter() - t0:.0f} s")


def elapsed() -> None:
    """Print the seconds since this notebook's `from nbsetup import *`: called by the last
    cell, it is the notebook's running time, top to bottom, on the machine that ran it (cells
    run again in the same kernel count on from the first import)."""
    took = time.perf_counter() - STARTED
    print(f"this notebook ran top to bottom in {took:.0f} s on this machine "
          f"(since `from nbsetup import *`; torch threads: {torch.get_num_threads()})")


def run_lpi(report=True, **settings):
    """A whole run, as `python lpi.py` does it (lpi.run), in this process, into a fresh
    temporary folder; settings are lpi.configs keywords (method="seqft", epochs=2, R=2, ...).
    Prints lpi.py's report (or, with report=False, its mean-recall line; the folder shown as
    <out>) and how long the run took; returns (results.json as a dict, the folder)."""
    out = tempfile.mkdtemp(dir=WORK.name)
    s, cfg = lpi.configs(**{"cache_dir": CACHE, "progress": False, "workers": 0, **settings, "out": out})
    log = io.StringIO()
    t0 = time.perf_counter()
    with contextlib.redirect_stdout(log), contextlib.redirect_stderr(log):
        results = lpi.run(s, cfg)
    took = time.perf_counter() - t0
    text = (log.getvalue() + lpi.report(results, out)).replace(out, "<out>").replace(CACHE, "<cache>")
    changed = ", ".join(f"{k}={v}" for k, v in settings.items())
    print(text if report else changed + ": " + next(l for l in text.splitlines() if l.startswith("mean recall")))
    print(f"(this run took {took:.0f} s)")
    if get_ipython() is not None:
        get_ipython().run_line_magic("matplotlib", "inline")  # lpi's plots switched matplotlib to Agg
    plt.rcParams.update(RC)
    return results, pathlib.Path(out)
