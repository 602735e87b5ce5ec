"""Kill a small `python lpi.py` run at random moments (SIGKILL, nothing can clean up), then
continue it with --resume, and check that nothing was lost: the final results.json numbers
and the last checkpoint must equal those of an uninterrupted run with the same seed.

Two kinds of kill point: *in a write* (the process kills itself right after writing the
temporary file of its k-th atomic write, before the rename: a checkpoint, results.json or
a plot half-way), and *timed* (after a random delay, wherever the run is: start-up,
training, evaluation, writing). Prints one line per kill and how many of them held.
Usage:  python benchmarks/kill_resume.py [--kills 20] [--seed 0]
"""
from __future__ import annotations

import argparse
import json
import os
import random
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
RUN = ["--tasks", "sea-animals,farm-animals,garden-tools", "--max-train-per-task", "48", "--max-test-per-task", "24", "--epochs", "2",
       "--batch-size", "16", "--no-progress", "--workers", "0"]
# In the child: optionally die on the k-th os.replace, i.e. with the k-th atomic write's
# temporary file complete and the real file not yet replaced.
BOOT = """
import os, signal, sys
sys.path.insert(0, {root!r})
k = int(os.environ.get("KILL_AT_REPLACE", "0"))
if k:
    real, count = os.replace, [0]
    def replace(src, dst, *a, **kw):
        count[0] += 1
        if count[0] == k:
            os.kill(os.getpid(), signal.SIGKILL)
        return real(src, dst, *a, **kw)
    os.replace = replace
import lpi
sys.exit(lpi.main(sys.argv[1:]))
"""


def run_lpi(out: Path, extra: list[str] = (), kill_at_replace: int = 0, kill_after: float | None = None) -> int:
    """One run in a fresh interpreter; returns its exit code (-9 when killed)."""
    env = dict(os.environ, KILL_AT_REPLACE=str(kill_at_replace), PYTHONUNBUFFERED="1")
    cmd = [sys.executable, "-c", BOOT.format(root=str(ROOT)), *RUN, "--out", str(out), *extra]
    with open(out.parent / f"{out.name}.log", "a") as log:
        p = subprocess.Popen(cmd, stdout=log, stderr=log, env=env, cwd=ROOT)
        try:
            return p.wait(timeout=kill_after)
        except subprocess.TimeoutExpired:
            p.send_signal(signal.SIGKILL)
            return p.wait()


def comparable(out: Path) -> dict:
    """What must not depend on interruptions: results.json and the last checkpoint, less
    the wall time, the output folder and the --resume flag."""
    def clean(results: dict) -> dict:
        r = json.loads(json.dumps(results))
        r.pop("wall_time_s", None)
        for key in ("resume", "out"):  # where and how the run was started, not what it computed
            r["config"].pop(key, None)
        return r
    import lpi

    ckpt = lpi.read_checkpoint(lpi.latest_checkpoint(out))
    tensors = {f"learned.{k}": v for k, v in ckpt["learned"].items()}
    tensors.update({f"router.{k}": v for k, v in ckpt["router"].items()})
    tensors.update(centroids_img=ckpt["centroids_img"], centroids_txt=ckpt["centroids_txt"])
    return {"results": clean(json.loads((out / "results.json").read_text())), "done": ckpt["done"],
            "checkpoint_results": clean(ckpt["results"]), "tensors": tensors}


def same(a: dict, b: dict) -> str | None:
    """None if equal, else what differs."""
    for key in ("results", "done", "checkpoint_results"):
        if a[key] != b[key]:
            return key
    if a["tensors"].keys() != b["tensors"].keys():
        return "checkpoint tensor names"
    for k, v in a["tensors"].items():
        if not torch.equal(v, b["tensors"][k]):
            return f"checkpoint tensor {k}"
    return None


def trial(reference: dict, out: Path, kill_at_replace: int = 0, kill_after: float | None = None) -> str | None:
    """Kill one run as asked, then --resume it to the end; None if it equals the reference."""
    rc = run_lpi(out, kill_at_replace=kill_at_replace, kill_after=kill_after)
    if rc == 0:  # the run finished before the kill: nothing to resume, still must be equal
        return same(reference, comparable(out))
    import lpi

    # killed before its first checkpoint: nothing to resume (--resume would refuse), so start again
    again = ["--resume"] if lpi.latest_checkpoint(out) is not None else []
    rc = run_lpi(out, again)
    if rc != 0:
        return f"{' '.join(again) or 'the restart'} exited with {rc} (see {out}.log)"
    return same(reference, comparable(out))


def kill_points(n: int, duration: float, rng: random.Random, writes: int) -> list[dict]:
    """Half in a write (cycling through the run's atomic writes), half at random times."""
    points = [dict(kill_at_replace=1 + i % writes) for i in range(n // 2)]
    points += [dict(kill_after=rng.uniform(0.2, duration)) for _ in range(n - len(points))]
    return points


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--kills", type=int, default=20, help="kill points to try")
    p.add_argument("--seed", type=int, default=0, help="seed of the random kill times")
    p.add_argument("--work-dir", default=None, help="where the runs go (default: a temporary folder)")
    a = p.parse_args(argv)
    work = Path(a.work_dir or tempfile.mkdtemp(prefix="kill_resume_"))
    work.mkdir(parents=True, exist_ok=True)
    ref_out = work / "reference"
    shutil.rmtree(ref_out, ignore_errors=True)
    t0 = time.time()
    if run_lpi(ref_out) != 0:
        raise SystemExit(f"the uninterrupted run failed: see {ref_out}.log")
    duration = time.time() - t0
    reference = comparable(ref_out)
    writes = 2 * 3 + 2  # a checkpoint and results.json per task, then the final results.json and the plot
    held = 0
    points = kill_points(a.kills, duration, random.Random(a.seed), writes)
    for i, point in enumerate(points, 1):
        out = work / f"kill{i:02d}"
        shutil.rmtree(out, ignore_errors=True)
        diff = trial(reference, out, **point)
        held += diff is None
        what = (f"in write {point['kill_at_replace']} of {writes}" if "kill_at_replace" in point
                else f"after {point['kill_after']:.1f} s of {duration:.1f}")
        print(f"kill {i:2d} {what:<22} {'held' if diff is None else 'DIFFERS: ' + diff}", flush=True)
    print(f"{held} of {len(points)} kill points held (results.json and last checkpoint equal to the "
          f"uninterrupted run); runs in {work}")
    return 0 if held == len(points) else 1


if __name__ == "__main__":
    sys.exit(main())
