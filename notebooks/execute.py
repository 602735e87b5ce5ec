"""Execute notebooks in place and stamp them with the code they were executed against.

    python notebooks/execute.py                 # all of them (about 10 CPU minutes)
    python notebooks/execute.py 03 06           # those whose names start with 03 or 06

Each notebook's metadata gets {"lpi": {"code": CODE_HASH}}, a hash of the files the notebooks
teach (CODE_FILES). tests/test_notebooks_meta.py compares it with the hash of today's files, so
committed outputs that an older version of the code produced fail the tests: re-execute them
with this script after changing the code.
"""
import hashlib
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
# What the notebooks' outputs depend on: the code they teach, the shipped tiny CLIP, and the
# evidence script and committed results that notebook 07 runs and reads.
CODE_FILES = ("clip_model.py", "lpi.py", "builtin_world.py", "notebooks/nbsetup.py", "tiny_clip.pt.xz",
              "benchmarks/evidence.py", "benchmarks/results/evidence.json", "benchmarks/results/recall_matrices.png")


def code_hash() -> str:
    h = hashlib.sha256()
    for name in CODE_FILES:
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
