"""Nothing lost, nothing executed, nothing silent.

- kill anywhere: SIGKILL at 5 points (inside two atomic writes, three timed), then
  --resume: results.json and the last checkpoint equal an uninterrupted run's
  (benchmarks/kill_resume.py runs any number of points). This is the one home of the
  kill / resume tests; bad input (checkpoints included) is tests/test_bad_inputs.py's;
- deterministic: two runs with the same seed write identical numbers;
- no silent NaN: a non-finite loss, gradient or parameter stops the run with a message
  naming the task, step and term (unit and property-based tests);
- one run per output folder: a live run's lock is respected, a dead run's is taken over.
"""
import importlib.util
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import clip_model
import lpi

ROOT = Path(__file__).resolve().parents[1]
SMALL = ["--tasks", "sea-animals,garden-tools", "--max-train-per-task", "32", "--max-test-per-task", "16", "--epochs", "1",
         "--batch-size", "16", "--no-progress", "--workers", "0"]


def load_script(name: str):
    spec = importlib.util.spec_from_file_location(name, ROOT / "benchmarks" / f"{name}.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


@pytest.fixture
def in_process():
    """The command line in this process, for the tests of what it prints and returns (the tiny
    CLIP is read once per process, then copied)."""
    return lpi.main


# ----------------------------------------------------------------------------------------
# Kill anywhere
# ----------------------------------------------------------------------------------------

@pytest.mark.slow
def test_kill_anywhere_then_resume_equals_uninterrupted(tmp_path):
    kr = load_script("kill_resume")
    ref = tmp_path / "reference"
    t0 = time.time()
    assert kr.run_lpi(ref) == 0, (tmp_path / "reference.log").read_text()[-2000:]
    duration = time.time() - t0
    reference = kr.comparable(ref)
    points = [dict(kill_at_replace=1), dict(kill_at_replace=4),          # task 1's checkpoint, task 2's results.json
              dict(kill_after=0.35 * duration), dict(kill_after=0.6 * duration), dict(kill_after=0.85 * duration)]
    for i, point in enumerate(points):
        out = tmp_path / f"kill{i}"
        diff = kr.trial(reference, out, **point)
        assert diff is None, f"kill point {point}: {diff}\n" + (tmp_path / f"kill{i}.log").read_text()[-2000:]
        assert not list(out.rglob(".*.tmp*")) and not (out / ".lock").exists()   # nothing half-written left


# ----------------------------------------------------------------------------------------
# Deterministic
# ----------------------------------------------------------------------------------------

def test_same_seed_same_numbers(tmp_path):
    runs = []
    for name in ("a", "b"):
        lpi.run(lpi.RunConfig(tasks="sea-animals,garden-tools", max_train_per_task=32, max_test_per_task=16, epochs=1,
                              batch_size=16, progress=False, workers=0, out=str(tmp_path / name), seed=3))
        res = json.loads((tmp_path / name / "results.json").read_text())
        res.pop("wall_time_s")
        res["config"].pop("out")
        runs.append(res)
    assert runs[0] == runs[1]


# ----------------------------------------------------------------------------------------
# One run per output folder
# ----------------------------------------------------------------------------------------

def test_a_live_runs_lock_is_respected_and_a_dead_ones_taken_over(tmp_path, in_process, capsys):
    out = tmp_path / "run"
    out.mkdir()
    sleeper = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        (out / ".lock").write_text(f"{sleeper.pid} {os.uname().nodename}")
        capsys.readouterr()
        assert in_process([*SMALL, "--out", str(out)]) == 2
        err = capsys.readouterr().err
        assert "in use by another run" in err and str(sleeper.pid) in err
        assert not (out / "results.json").exists()
    finally:
        sleeper.kill()
        sleeper.wait()
    # the process is gone: its lock is stale, the next run takes it over and removes it on exit
    assert in_process([*SMALL, "--out", str(out)]) == 0
    assert "stale lock" in capsys.readouterr().out
    assert not (out / ".lock").exists() and (out / "results.json").is_file()


# ----------------------------------------------------------------------------------------
# No silent NaN
# ----------------------------------------------------------------------------------------

def test_non_finite_loss_stops_with_task_step_and_term(tmp_path, in_process, capsys):
    out = tmp_path / "run"
    assert in_process([*SMALL, "--out", str(out), "--lr", "1e30"]) == 2
    err = capsys.readouterr().err
    assert "task 1, step" in err and "non-finite" in err, err
    assert lpi.latest_checkpoint(out) is None and not (out / ".lock").exists()


def _tiny_data(n: int, captions: list[str], g: torch.Generator) -> lpi.ImageCaptionSet:
    images = torch.randint(0, 256, (n, 3, 32, 32), dtype=torch.uint8, generator=g)
    return lpi.ImageCaptionSet(images, [[captions[i % len(captions)]] for i in range(n)])


_random_clip = None


def random_clip() -> clip_model.CLIP:
    global _random_clip
    if _random_clip is None:
        torch.manual_seed(0)
        _random_clip = clip_model.CLIP(clip_model.TINY).eval()
    return _random_clip


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(J=st.integers(1, 4), M=st.integers(1, 6), R=st.integers(1, 6), batch=st.integers(1, 4),
       n=st.integers(1, 9), lr=st.sampled_from([1e-6, 1e-2, 1.0, 1e3, 1e8, 1e20]),
       tau_h=st.sampled_from([1e-6, 1e-3, 0.01, 10.0]), tau_task=st.sampled_from([1e-6, 1e-3, 0.1, 10.0]),
       lam=st.sampled_from([0.0, 0.1, 100.0]), low_rank=st.booleans(),
       caption=st.sampled_from(["", "x", "é ñ 漢字 🙂", "a small red circle " * 40, "a red circle left of a blue ring"]))
def test_no_configuration_produces_nan_silently(J, M, R, batch, n, lr, tau_h, tau_task, lam, low_rank, caption):
    """Property: over small configurations (J, M, R, batch 1-4, extreme learning rates and
    temperatures, empty / non-ASCII / over-long captions), training two tasks either leaves
    every loss and parameter finite or stops with the non-finite message. Never NaN in silence."""
    g = torch.Generator().manual_seed(J * 1000 + M * 100 + R * 10 + batch)
    cfg = lpi.LPIConfig(J=J, M=M, R=R, low_rank=low_rank, tau_h=tau_h, tau_task=tau_task,
                        lambda_h=lam, lambda_task=lam, interaction_rank=2)
    model = lpi.LPI(random_clip(), cfg)
    s = lpi.RunConfig(batch_size=batch, epochs=1, lr=lr, optimizer="sgd", weight_decay=0.0, progress=False)
    Y = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
    try:
        for t in range(2):
            model.add_task()
            data = _tiny_data(n, [caption, "a blue ring"], g)
            running = lpi.train_task(model, t, data, s, lpi.Env(torch.device("cpu")), Y)["running"]
            assert all(torch.isfinite(torch.tensor(v)) for v in running.values()), running
        for p in model.parameters():
            assert torch.isfinite(p).all()
    except lpi.LPIError as e:
        assert "non-finite" in str(e) and "task " in str(e) and "step " in str(e)
