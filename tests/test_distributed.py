"""Several processes with the standard launcher: `torchrun --nproc_per_node 2 lpi.py ...` on the
CPU (gloo) trains like one process with the same global batch, and writes its outputs once.
"""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
RUN = ["--tasks", "sea-animals,garden-tools", "--max-train-per-task", "48", "--max-test-per-task", "24", "--epochs", "2",
       "--no-progress", "--workers", "0"]


def launch(args, nproc: int):
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(ROOT))
    cmd = ([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(nproc)]
           if nproc > 1 else [sys.executable])
    return subprocess.run([*cmd, str(ROOT / "lpi.py"), *args], capture_output=True, text=True, timeout=600,
                          env=env, cwd=ROOT)


def close(a: float, b: float) -> bool:
    return abs(a - b) <= 1e-4 * max(1.0, abs(a))


@pytest.mark.slow
def test_two_processes_equal_one_with_the_global_batch(tmp_path):
    one = launch([*RUN, "--batch-size", "16", "--out", str(tmp_path / "one")], 1)
    assert one.returncode == 0, one.stderr[-3000:]
    two = launch([*RUN, "--batch-size", "8", "--out", str(tmp_path / "two")], 2)
    assert two.returncode == 0, two.stderr[-3000:]
    a, b = (json.loads((tmp_path / n / "results.json").read_text()) for n in ("one", "two"))
    # the losses of the first steps of every task
    for task in a["first_steps"]:
        assert len(a["first_steps"][task]) == len(b["first_steps"][task]) == 5
        for x, y in zip(a["first_steps"][task], b["first_steps"][task]):
            assert x.keys() == y.keys() and all(close(x[k], y[k]) for k in x), (task, x, y)
    # the final recall matrices (and zero-shot's)
    for d in ("i2t", "t2i"):
        for K in ("R@1", "R@5", "R@10"):
            for row_a, row_b in zip(a["recall"][d][K], b["recall"][d][K]):
                assert all((x is None and y is None) or close(x, y) for x, y in zip(row_a, row_b)), (d, K)
            assert all(close(x, y) for x, y in zip(a["zeroshot"]["recall"][d][K], b["zeroshot"]["recall"][d][K]))
    # outputs exist once: one table on stdout, one set of files
    assert two.stdout.count("mean recall") == 1 and two.stdout.count("wrote ") == 1
    assert sorted(p.name for p in (tmp_path / "two").iterdir()) == ["checkpoints", "recall_r1.png", "results.json", "retrievals.png"]
    assert sorted(p.name for p in (tmp_path / "two" / "checkpoints").iterdir()) == ["task_01.pt", "task_02.pt"]
    # --resume works under torchrun (here: after the last task, so only the final evaluation runs again)
    again = launch([*RUN, "--batch-size", "8", "--out", str(tmp_path / "two"), "--resume"], 2)
    assert again.returncode == 0, again.stderr[-3000:]
    assert again.stdout.count("resuming after task 2 of 2") == 1
    c = json.loads((tmp_path / "two" / "results.json").read_text())
    assert c["recall"] == b["recall"] and c["summary"] == b["summary"]
