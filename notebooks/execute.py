"""Execute notebooks in place and stamp them with the code they were executed against.

    python notebooks/execute.py                 # all of them (about 10 CPU minutes)
    python notebooks/execute.py 03 06           # those whose names start with 03 or 06

Each notebook's metadata gets {"lpi": {"code": CODE_HASH}}, a hash of what the notebooks'
outputs depend on: what the code they teach *does* (CODE_FILES, each file's syntax tree without
its comments and docstrings) and the data files they read (DATA_FILES, byte for byte).
tests/test_notebooks_meta.py compares it with today's hash, so committed outputs that an older
version of the code produced fail the tests: re-execute them with this script after changing
what the code does. A comment or docstring edit leaves them fresh.
"""
import ast
import hashlib
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
# The code the notebooks run: the repository's modules, their shared setup, and the
# benchmark scripts that notebook 07 runs (evidence.py reads tune.py's settings and loss_regimes.py's experiments).
CODE_FILES = ("clip_model.py", "builtin_world.py", "run_support.py", "data.py", "reporting.py", "baselines.py",
              "lpi.py", "notebooks/nbsetup.py", "benchmarks/tune.py", "benchmarks/evidence.py",
              "benchmarks/loss_regimes.py")
# The data they read: the shipped tiny CLIP and its vocabulary, and the committed results of
# the tuning protocol and of the evidence table that notebook 07 shows.
DATA_FILES = ("tiny_clip.pt.xz", "bpe_simple_vocab_16e6.txt.gz", "benchmarks/results/tuning.json",
              "benchmarks/results/tuning.md", "benchmarks/results/evidence.json",
              "benchmarks/results/recall_matrices.png", "benchmarks/results/recall_vs_params.png")


def _without_docstrings(tree: ast.AST) -> ast.AST:
    """The tree with the docstring of the module and of every class and function removed."""
    for node in ast.walk(tree):
        body = getattr(node, "body", None)
        if (isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)) and body
                and isinstance(body[0], ast.Expr) and isinstance(body[0].value, ast.Constant)
                and isinstance(body[0].value.value, str)):
            node.body = body[1:] or [ast.Pass()]
    return tree


def behaviour_hash(source: str) -> str:
    """A hash of what Python code does: its syntax tree without comments (the parser drops
    them), docstrings and line numbers. Formatting, comments and docstrings do not change it."""
    return hashlib.sha256(ast.dump(_without_docstrings(ast.parse(source))).encode()).hexdigest()


def code_hash() -> str:
    h = hashlib.sha256()
    for name in CODE_FILES:
        h.update(name.encode() + b"\0" + behaviour_hash((ROOT / name).read_text()).encode() + b"\0")
    for name in DATA_FILES:
        h.update(name.encode() + b"\0" + (ROOT / name).read_bytes() + b"\0")
    return h.hexdigest()[:16]


def execute(path: Path, timeout: int = 1800) -> None:
    import nbformat
    from nbclient import NotebookClient

    nb = nbformat.read(path, as_version=4)
    NotebookClient(nb, timeout=timeout, kernel_name="python3", resources={"metadata": {"path": str(HERE)}}).execute()
    nb.metadata["lpi"] = {"code": code_hash()}
    nbformat.write(nb, path)


def main(prefixes: list[str]) -> int:
    notebooks = sorted(p for p in HERE.glob("[0-9][0-9]_*.ipynb") if not prefixes or p.name.startswith(tuple(prefixes)))
    for path in notebooks:
        print(f"executing {path.name} ...", flush=True)
        execute(path)
    print(f"stamped {len(notebooks)} notebook(s) with code hash {code_hash()}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
