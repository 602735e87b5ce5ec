"""End-to-end tests of `python lpi.py` on real data layouts, and the shipped tiny CLIP. Kill /
resume is tested in test_reliability.py, bad input in test_bad_inputs.py.

All runs use a tiny CLIP pre-trained for a few steps (cached once per test session) and
small subsets, so that each run takes seconds; the numbers are not the point here, the
plumbing is.
"""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import data
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
    """results.json holds its documented keys, with T x T matrices (null above the diagonal)."""
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
    tasks = data.parse_task_specs("coco:supercategory", str(data_root), {})
    assert [t.name for t in tasks] == ["coco:" + n for n in (
        "appliance", "sports", "outdoor", "electronic", "accessory", "indoor", "kitchen", "furniture",
        "vehicle", "food", "animal", "person")]


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
