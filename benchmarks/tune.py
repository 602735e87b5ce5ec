"""The tuning protocol: one grid of optimiser x learning rate for every trained method and
every LPI ablation, each point scored on a validation split held out from the first task's
*training* data (never a test item), at python lpi.py's budget.

Each setting (a method, or LPI with one component switched) is trained on the first built-in
task's training images less N_VAL held out, for lpi.py's tiny-scale epochs, then scored by
mean recall (i2t and t2i R@1/5/10) on the held-out images. The best point of each setting
becomes its default (lpi.TUNED for the methods; benchmarks/evidence.py gives the ablations
their choices). Writes <out-dir>/tuning.md (the grid's scores) and tuning.json.
Usage:  python benchmarks/tune.py [--jobs 2] [--quick]
"""
import argparse
import concurrent.futures
import contextlib
import dataclasses
import hashlib
import json
import multiprocessing
import os
import platform
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import data  # noqa: E402

# The same grid for every setting: each optimiser with learning rates around its usual range
# (SGD with momentum needs larger ones than Adam, whose step does not scale with the gradient).
GRID = [("sgd", lr) for lr in (0.01, 0.05, 0.25, 1.0, 4.0)] + [("adam", lr) for lr in (0.003, 0.01, 0.03, 0.1, 0.3)]
# Every trained method, and every LPI ablation of the evidence table that changes what is
# trained on one task (the task loss and the routing act only from the second task on).
# Each setting: the lpi.RunConfig / lpi.LPIConfig values it changes (lpi.configs).
SETTINGS = {
    "lpi": {}, "sprompts": {"method": "sprompts"}, "l2p": {"method": "l2p"},
    "full-rank": {"low_rank": False}, "no-interaction": {"interaction": False}, "alpha=0": {"alpha": 0.0},
    "no-hier-prompt": {"hier_prompt": False}, "hier-factor": {"hier_factor": True},
    # our departures from the authors' code, one at a time
    "deep-prompts=replace": {"deep_prompts": "replace"}, "hier-unscaled": {"hier_tau_scaled": False},
    "interaction-gain=1": {"interaction_gain": 1.0},
}
# seqft and joint train one prompt set of LPI's shape: on the first task alone that is LPI's
# model on the same data, the same computation (a first run of the grid gave equal scores at
# every point), so they share LPI's runs and choice.
SHARED = {"seqft": "lpi", "joint": "lpi"}
N_VAL = 200          # images of the first task's 1,000 training images held out for validation
QUICK = dict(n_train=48, n_val=16, epochs=1, batch_size=16, settings=("lpi", "sprompts"), grid=GRID[1:2] + GRID[7:8])


def validation_task(task, n_val: int, seed: int = 0):
    """The task with its training images split: the last n_val of a fixed permutation become
    the 'test' set (validation), the rest the training set. The test items are not used."""
    import torch

    n = len(task.train)
    if not 1 <= n_val < n - 1:
        raise ValueError(f"n_val={n_val} must leave at least 2 of the {n} training images for training")
    order = torch.randperm(n, generator=torch.Generator().manual_seed(seed))
    fit, val = order[: n - n_val].sort().values, order[n - n_val:].sort().values
    take = lambda idx: data.ImageCaptionSet(task.train.images[idx], [task.train.captions[i] for i in idx.tolist()])  # noqa: E731
    return data.Task(task.name, take(fit), take(val), task.label)


# What may differ between two runs of the same experiment: where and how they run and write.
NOT_SETTINGS = ("out", "resume", "progress", "workers", "cache_dir", "device", "precision")


def resolved(overrides: dict) -> str:
    """Every setting a run's result depends on (lpi.configs of `overrides`, the tiny scale's
    defaults filled in), as JSON: a folder named by its hash is never reused by a run made
    with other settings (or other defaults)."""
    import lpi

    s, cfg = lpi.fill_defaults(*lpi.configs(**overrides), tiny=True)
    settings = dict(dataclasses.asdict(s), **dataclasses.asdict(cfg))
    return json.dumps({k: v for k, v in sorted(settings.items()) if k not in NOT_SETTINGS})


def point_settings(overrides: dict, optimizer: str, lr: float, size: dict) -> dict:
    return dict(overrides, optimizer=optimizer, lr=lr, epochs=size["epochs"], batch_size=size["batch_size"])


def score_point(spec: tuple) -> tuple:
    """Train one setting at one grid point on the fitting split; score on the validation split."""
    import torch
    import lpi

    name, overrides, optimizer, lr, size, cache_dir, out, threads = spec
    torch.set_num_threads(threads)
    res_path = Path(out) / "results.json"
    if res_path.is_file() and "zeroshot" in (res := json.loads(res_path.read_text())):
        return name, optimizer, lr, dict(res, reused=True)   # a finished point is reused
    settings = dict(point_settings(overrides, optimizer, lr, size), progress=False, workers=0, out=str(out),
                    cache_dir=cache_dir, resume=lpi.latest_checkpoint(Path(out)) is not None)
    s, cfg = lpi.fill_defaults(*lpi.configs(**settings), tiny=True)
    clip, preprocess, _ = data.load_backbone(s, torch.device("cpu"))      # read once per process
    first = data.builtin_task(next(iter(data.BUILTIN_TASKS)), n_train=size["n_train"])
    task = validation_task(first, size["n_val"])
    config = dict(dataclasses.asdict(s), **dataclasses.asdict(cfg))
    Path(out).mkdir(parents=True, exist_ok=True)
    with open(Path(out) / "log.txt", "w") as log, contextlib.redirect_stdout(log), contextlib.redirect_stderr(log):
        res = lpi.run_continual(lpi.make_method(s.method, cfg, clip), [task], s, lpi.Env(torch.device("cpu"), preprocess),
                                config)
    return name, optimizer, lr, res


def choose(scores: dict) -> dict:
    """{setting: {(optimizer, lr): mean recall}} -> each setting's best point overall and best
    lr per optimizer (ties: the first in GRID order)."""
    chosen = {}
    for name, points in scores.items():
        best = lambda pts: max(pts, key=lambda p: (points[p], -GRID.index(p)))  # noqa: E731
        opt, lr = best(list(points))
        chosen[name] = {"optimizer": opt, "lr": {o: best([p for p in points if p[0] == o])[1]
                                                 for o in dict.fromkeys(o for o, _ in points)}}
        chosen[name]["chosen_lr"] = lr
    return chosen


def markdown(scores: dict, chosen: dict, size: dict, minutes: float, quick: bool, reused: int, run_min: float) -> str:
    grid = [p for p in GRID if any(p in pts for pts in scores.values())]
    lines = ["# Tuning protocol: optimiser x learning rate, on a validation split", "",
             f"Every setting trained on the first built-in task's training images less {size['n_val']} held out "
             f"({size['n_train'] - size['n_val']} for training, {size['epochs']} epochs, batch {size['batch_size']}, "
             f"seed 0), scored by mean recall (i2t and t2i R@1/5/10) on the {size['n_val']} held-out images. "
             f"No test item is used. Made by `python benchmarks/tune.py{' --quick' if quick else ''}` in "
             f"{minutes:.1f} min on {platform.machine()} ({os.cpu_count()} cores)"
             + (f", {reused} points reused from earlier runs of the same settings" if reused else "")
             + f"; the points' training and evaluation took {run_min:.0f} min in all, one process each"
             + ". **Bold**: the chosen point.", "",
             "| setting | " + " | ".join(f"{o} {lr:g}" for o, lr in grid) + " | chosen |",
             "|---|" + "---:|" * len(grid) + "---|"]
    for name, points in scores.items():
        c = chosen[name]
        cells = [(f"**{points[p]:.1f}**" if p == (c["optimizer"], c["chosen_lr"]) else f"{points[p]:.1f}")
                 if p in points else "" for p in grid]
        shared = f" (= {SHARED[name]}'s runs)" if name in SHARED else ""
        lines.append(f"| {name}{shared} | " + " | ".join(cells) + f" | {c['optimizer']} {c['chosen_lr']:g} |")
    return "\n".join(lines)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--quick", action="store_true", help="two settings, two points, tiny sizes: a smoke test")
    p.add_argument("--jobs", type=int, default=2, help="points in parallel, one torch thread each")
    p.add_argument("--cache-dir", default=os.environ.get("LPI_CACHE", str(Path.home() / ".cache" / "lpi")))
    p.add_argument("--out-dir", default=None, help="default benchmarks/results (runs/tune_quick with --quick)")
    p.add_argument("--work-dir", default=None, help="one folder per point (default runs/tune[_quick])")
    a = p.parse_args(argv)
    import lpi

    size = dict(n_train=data.world.TASK_SIZES["n_train"], n_val=N_VAL, epochs=lpi.TINY_DEFAULTS["epochs"],
                batch_size=lpi.TINY_DEFAULTS["batch_size"])
    settings, grid = SETTINGS, GRID
    if a.quick:
        size.update({k: QUICK[k] for k in ("n_train", "n_val", "epochs", "batch_size")})
        settings, grid = {k: SETTINGS[k] for k in QUICK["settings"]}, QUICK["grid"]
    out_dir = Path(a.out_dir or (ROOT / ("runs/tune_quick" if a.quick else "benchmarks/results")))
    work = Path(a.work_dir or (ROOT / ("runs/tune_quick" if a.quick else "runs/tune")))
    tag = f"n{size['n_train']}_v{size['n_val']}_e{size['epochs']}_b{size['batch_size']}"
    folder = lambda name, over, o, lr: work / tag / (  # noqa: E731
        f"{name}_{o}_{lr:g}_" + hashlib.sha256(resolved(point_settings(over, o, lr, size)).encode()).hexdigest()[:8])
    specs = [(name, over, o, lr, size, a.cache_dir, str(folder(name, over, o, lr)), 1 if a.jobs > 1 else 2)
             for name, over in settings.items() for o, lr in grid]
    t0, scores, reused, run_s = time.time(), {name: {} for name in settings}, 0, 0.0
    data.world.load_or_build_tiny_clip(a.cache_dir, progress=True)  # built (or read) once, before the workers
    pool = concurrent.futures.ProcessPoolExecutor(a.jobs, mp_context=multiprocessing.get_context("spawn"))
    futures = [pool.submit(score_point, s) for s in specs]
    for i, f in enumerate(concurrent.futures.as_completed(futures), 1):
        name, o, lr, res = f.result()
        scores[name][(o, lr)] = res["summary"]["mean_recall"]
        reused += bool(res.get("reused"))
        run_s += res["wall_time_s"]
        print(f"[{i}/{len(specs)}] {name} {o} {lr:g}: mean recall {scores[name][(o, lr)]:.1f} "
              f"({(time.time() - t0) / 60:.1f} min)", flush=True)
    pool.shutdown()
    scores = {name: dict(sorted(pts.items(), key=lambda kv: GRID.index(kv[0]))) for name, pts in scores.items()}
    scores.update({name: scores[same] for name, same in SHARED.items() if same in scores})
    chosen = choose(scores)
    md = markdown(scores, chosen, size, (time.time() - t0) / 60, a.quick, reused, run_s / 60)
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "tuning.md").write_text(md + "\n")
    (out_dir / "tuning.json").write_text(json.dumps(dict(
        size=size, grid=grid, settings=settings, chosen=chosen, total_time_s=time.time() - t0,
        scores={name: [{"optimizer": o, "lr": lr, "mean_recall": v} for (o, lr), v in pts.items()]
                for name, pts in scores.items()}), indent=2))
    print(md)
    return 0


if __name__ == "__main__":
    sys.exit(main())
