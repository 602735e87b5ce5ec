"""End-to-end tests of `python lpi.py`: real data layouts, resume after a kill, bad input.

All runs use a tiny CLIP pre-trained for a few steps (cached once per test session) and
small subsets, so that each run takes seconds; the numbers are not the point here, the
plumbing is.
"""
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

import lpi
from fixtures import make_coco_fixture, make_flickr_fixture

ROOT = Path(__file__).resolve().parents[1]
QUICK = ["--pretrain-steps", "3", "--epochs", "1", "--batch-size", "16", "--no-progress", "--workers", "0"]


@pytest.fixture(scope="session")
def cache_dir(tmp_path_factory):
    """A tiny CLIP cache shared by every run of the session (built by the first one)."""
    d = tmp_path_factory.mktemp("lpi_cache")
    lpi.world.load_or_build_tiny_clip(d, steps=3, progress=False)
    return d


@pytest.fixture(scope="session")
def data_root(tmp_path_factory):
    root = tmp_path_factory.mktemp("data")
    make_coco_fixture(root, n_train=24, n_test=24, corrupt=2)
    make_flickr_fixture(root, n_train=12, n_test=8)
    return root


def run_cli(args, cache_dir, timeout=300):
    """Run lpi.py in a fresh interpreter, as a user would."""
    env = dict(os.environ, PYTHONPATH=str(ROOT), LPI_CACHE=str(cache_dir))
    return subprocess.run([sys.executable, str(ROOT / "lpi.py"), *args], capture_output=True, text=True,
                          timeout=timeout, env=env, cwd=ROOT)


def check_schema(res: dict, T: int):
    """results.json holds what the issue lists, with T x T matrices (null above the diagonal)."""
    for key in ("config", "tasks", "recall", "summary", "routing_accuracy", "trainable_params_per_task",
                "wall_time_s"):
        assert key in res, key
    assert len(res["tasks"]) == T and len(res["routing_accuracy"]) == T
    for d in ("i2t", "t2i"):
        for K in ("R@1", "R@5", "R@10"):
            m = res["recall"][d][K]
            assert len(m) == T and all(len(row) == T for row in m)
            for t in range(T):
                assert all(v is not None and 0 <= v <= 100 for v in m[t][: t + 1])
                assert all(v is None for v in m[t][t + 1:])
    for key in ("i2t_R@1", "t2i_R@1", "mean_recall", "i2t_forgetting_R@1", "t2i_forgetting_R@1"):
        assert key in res["summary"]


def test_coco_flickr_end_to_end(tmp_path, cache_dir, data_root):
    """`--tasks coco,flickr --data-root R --clip tiny --epochs 1` runs on the exact download layouts;
    the corrupt COCO images are skipped and counted, not a crash."""
    out = tmp_path / "run"
    p = run_cli(["--tasks", "coco,flickr", "--data-root", str(data_root), "--clip", "tiny", "--out", str(out), *QUICK],
                cache_dir)
    assert p.returncode == 0, p.stderr[-3000:]
    res = json.loads((out / "results.json").read_text())
    check_schema(res, 2)
    assert res["tasks"] == ["coco", "flickr"]
    assert res["skipped_images"] == 2
    assert (out / "recall_r1.png").stat().st_size > 1000
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == ["task_01.pt", "task_02.pt"]
    assert "average" in p.stdout and "zeroshot" in p.stdout


def test_supercategory_tasks_in_paper_order(data_root):
    """coco:supercategory expands to the paper's 12 tasks in its order (ids 11, 6, 3, 10, 5, 12, 7, 9, 2, 8, 4, 1)."""
    tasks = lpi.parse_task_specs("coco:supercategory", str(data_root), {})
    assert [t.name for t in tasks] == ["coco:" + n for n in (
        "appliance", "sports", "outdoor", "electronic", "accessory", "indoor", "kitchen", "furniture",
        "vehicle", "food", "animal", "person")]


def _results_numbers(path: Path) -> dict:
    res = json.loads(path.read_text())
    return {"recall": res["recall"], "summary": res["summary"], "routing": res["routing_accuracy"]}


def test_kill_during_task_2_then_resume_equals_uninterrupted(tmp_path, cache_dir):
    """Kill -9 the run during task 2 of 3, then --resume: the same results.json numbers as one
    uninterrupted run with the same seed."""
    args = ["--tasks", "sea-animals,farm-animals,garden-tools", "--max-train-per-task", "96", "--max-test-per-task", "48",
            "--epochs", "3", *QUICK[:2], *QUICK[4:]]
    full = tmp_path / "full"
    p = run_cli([*args, "--out", str(full)], cache_dir)
    assert p.returncode == 0, p.stderr[-3000:]

    cut = tmp_path / "cut"
    env = dict(os.environ, PYTHONPATH=str(ROOT), LPI_CACHE=str(cache_dir))
    proc = subprocess.Popen([sys.executable, str(ROOT / "lpi.py"), *args, "--out", str(cut)], env=env, cwd=ROOT,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 240
    while not (cut / "checkpoints" / "task_01.pt").exists():
        assert proc.poll() is None and time.time() < deadline, "the run ended before task 1 was checkpointed"
        time.sleep(0.02)
    proc.send_signal(signal.SIGKILL)  # in task 2: task 1 is on disk, task 2 is not
    proc.wait()
    assert not (cut / "checkpoints" / "task_03.pt").exists()
    # the kill may land between a checkpoint and its results.json: the checkpoint is the record
    first = lpi.read_checkpoint(lpi.latest_checkpoint(cut))["results"]
    assert first["recall"]["i2t"]["R@1"][2][0] is None  # task 3 never finished

    p = run_cli([*args, "--out", str(cut), "--resume"], cache_dir)
    assert p.returncode == 0, p.stderr[-3000:]
    assert "resuming after task" in p.stdout
    assert _results_numbers(cut / "results.json") == _results_numbers(full / "results.json")


# ---------------------------------------------------------------------------------------
# Bad input: one clear message, exit code 2, no traceback, nothing already written damaged
# ---------------------------------------------------------------------------------------

def _bad(args, cache_dir, *needles, capsys=None):
    """Exit code 2 and an `error: ...` message naming the culprit, no traceback. With capsys,
    lpi.main runs in this process (fast); without, in a fresh interpreter (as a user runs it)."""
    if capsys is None:
        p = run_cli(args, cache_dir, timeout=120)
        code, err = p.returncode, p.stderr
    else:
        capsys.readouterr()
        code = lpi.main([*args, "--cache-dir", str(cache_dir)])
        err = capsys.readouterr().err
    assert code == 2, (code, err[-2000:])
    assert "Traceback" not in err
    assert err.startswith("error: "), err
    for n in needles:
        assert n in err, (n, err)


def test_unknown_task_name(tmp_path, cache_dir):
    """In a fresh interpreter, as a user meets it."""
    _bad(["--tasks", "sea-animals,mars", "--out", str(tmp_path / "o"), *QUICK], cache_dir, "'mars'", "valid task names")


def test_missing_data_root(tmp_path, cache_dir, capsys):
    _bad(["--tasks", "coco", "--data-root", str(tmp_path / "nowhere"), "--out", str(tmp_path / "o"), *QUICK],
         cache_dir, "nowhere", "dataset_coco.json", capsys=capsys)
    _bad(["--tasks", "flickr", "--out", str(tmp_path / "o"), *QUICK], cache_dir, "--data-root", capsys=capsys)


def test_missing_annotation_file(tmp_path, cache_dir, capsys):
    root = tmp_path / "data"
    make_coco_fixture(root, n_train=6, n_test=6)
    (root / "coco" / "annotations" / "instances_val2014.json").unlink()
    _bad(["--tasks", "coco:supercategory", "--data-root", str(root), "--out", str(tmp_path / "o"), *QUICK],
         cache_dir, "instances_val2014.json", capsys=capsys)


def test_malformed_json(tmp_path, cache_dir, capsys):
    root = tmp_path / "data"
    make_flickr_fixture(root, n_train=4, n_test=4)
    path = root / "flickr30k" / "dataset_flickr30k.json"
    path.write_text(path.read_text()[:-40])
    _bad(["--tasks", "flickr", "--data-root", str(root), "--out", str(tmp_path / "o"), *QUICK], cache_dir,
         "dataset_flickr30k.json", "line", capsys=capsys)


def test_missing_image_folder(tmp_path, cache_dir, capsys):
    root = tmp_path / "data"
    make_flickr_fixture(root, n_train=4, n_test=4)
    (root / "flickr30k" / "flickr30k-images").rename(root / "flickr30k" / "images-elsewhere")
    _bad(["--tasks", "flickr", "--data-root", str(root), "--out", str(tmp_path / "o"), *QUICK], cache_dir,
         "flickr30k-images", capsys=capsys)


def test_incompatible_checkpoint(tmp_path, cache_dir, capsys):
    """--clip pointing at something that is not a CLIP checkpoint."""
    bad = tmp_path / "not_clip.pt"
    bad.write_bytes(b"this is not a checkpoint")
    _bad(["--clip", str(bad), "--out", str(tmp_path / "o"), *QUICK], cache_dir, "not_clip.pt", capsys=capsys)
    _bad(["--clip", str(tmp_path / "missing.pt"), "--out", str(tmp_path / "o"), *QUICK], cache_dir, "missing.pt", capsys=capsys)


@pytest.mark.parametrize("flag,value,needle", [
    ("--depth", "99", "--depth"), ("--alpha", "1.5", "--alpha"), ("--epochs", "0", "--epochs"),
    ("--batch-size", "1", "--batch-size"), ("--rank", "0", "--rank"), ("--lr", "-1", "--lr"),
])
def test_out_of_range_flags(tmp_path, cache_dir, capsys, flag, value, needle):
    _bad([*QUICK, flag, value, "--out", str(tmp_path / "o")], cache_dir, needle, capsys=capsys)  # the last value wins


def test_bad_input_leaves_existing_run_untouched(tmp_path, cache_dir):
    """A finished run's results and checkpoints survive a second, bad invocation on the same --out,
    and a plain re-run on it refuses instead of overwriting."""
    out = tmp_path / "run"
    args = ["--tasks", "sea-animals", "--max-train-per-task", "32", "--max-test-per-task", "16", *QUICK]
    assert run_cli([*args, "--out", str(out)], cache_dir).returncode == 0
    before = {p: p.read_bytes() for p in out.rglob("*") if p.is_file()}
    _bad([*args, "--out", str(out), "--resume", "--tasks", "sea-animals,nonsense"], cache_dir, "nonsense")
    _bad([*args, "--out", str(out)], cache_dir, "--resume")
    _bad([*args, "--out", str(out), "--resume", "--alpha", "0.3"], cache_dir, "alpha")
    after = {p: p.read_bytes() for p in out.rglob("*") if p.is_file()}
    assert before == after


def test_export_tiny_clip_writes_what_pretraining_gives(tmp_path):
    """`--export-tiny-clip PATH` (the command that made the shipped tiny_clip.pt.xz, here at 3
    steps, from an empty cache) writes exactly the weights that pre-training with those
    settings gives, in the shipped format: fp16, the unused token rows zeroed."""
    path = tmp_path / "tiny.pt.xz"
    assert lpi.main(["--export-tiny-clip", str(path), "--pretrain-steps", "3", "--cache-dir", str(tmp_path / "cache"),
                     "--no-progress"]) == 0
    key, exported = lpi.world.read_tiny_clip(path)
    assert key == lpi.world.settings_key(3)[1]
    fresh = lpi.world.pretrain_tiny_clip(steps=3, progress=False).state_dict()
    keep = torch.zeros(fresh["token_embedding.weight"].shape[0], dtype=torch.bool)
    keep[lpi.world.world_vocabulary()] = True
    for k, a in exported.state_dict().items():
        want = fresh[k].half().float()
        if k == "token_embedding.weight":
            want[~keep] = 0
        assert torch.equal(a, want), k


def test_shipped_tiny_clip_matches_the_default_settings():
    """The shipped backbone was built with today's defaults, so `python lpi.py` never pre-trains."""
    _, key = lpi.world.settings_key(lpi.world.PRETRAIN_DEFAULTS["steps"])
    shipped_key, model = lpi.world.read_tiny_clip(lpi.world.SHIPPED_TINY_CLIP)
    assert shipped_key == key, "tiny_clip.pt.xz is stale: rebuild it with python lpi.py --export-tiny-clip tiny_clip.pt.xz"
    assert model.cfg == lpi.clip_model.TINY
