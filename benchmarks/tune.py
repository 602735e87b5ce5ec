"""The tuning protocol: one grid of optimiser x learning rate for every trained method and
every LPI ablation, each point scored on validation splits held out from the *training* data
of the first three built-in tasks, learned continually as the real run learns them, over two
seeds; never a test item. Then the check that it predicts the continual run.

- The grid. For each setting (a method, or LPI with one component switched) and each point:
  the first VALIDATION["tasks"] built-in tasks in order, each with VALIDATION["n_train"] of its
  training images (drawn by the seed, as the evidence runs draw theirs) of which n_val are held
  out; the rest is trained on continually, with routing, at the evidence table's budget; the
  score is the final mean recall (i2t and t2i R@1/5/10) on the pool of the held-out images of
  all those tasks. The mean over the seeds picks each setting's point: lpi.TUNED for the
  methods, benchmarks/evidence.py's rows for the ablations.
- Predictiveness. For PREDICT's methods at PREDICT's points: the full continual run on the six
  tasks at the evidence budget, scored on the test items (seeds as the grid's), and the
  earlier protocol's score (the first task alone, one seed). Spearman's rank correlation
  between each protocol's scores and the full runs' says how well it predicts them.
Writes <out-dir>/tuning.md and tuning.json. Every point has its own folder under --work-dir
and a finished point is reused.
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
import statistics
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
# trained. Each setting: the lpi.RunConfig / lpi.LPIConfig values it changes (lpi.configs).
# The routing acts only at test time: LPI with oracle routing trains as LPI does and keeps
# its choice; the sweeps of the evidence table take their method's choice.
SETTINGS = {
    "lpi": {}, "seqft": {"method": "seqft"}, "joint": {"method": "joint"}, "sprompts": {"method": "sprompts"},
    "l2p": {"method": "l2p"},
    "full-rank": {"low_rank": False}, "no-interaction": {"interaction": False}, "alpha=0": {"alpha": 0.0},
    "no-interaction-ln": {"interaction_ln": False}, "no-hier-prompt": {"hier_prompt": False},
    "no-task-loss": {"task_loss": False}, "hier-factor": {"hier_factor": True},
    # our departures from the authors' code, one at a time
    "deep-prompts=replace": {"deep_prompts": "replace"}, "hier-unscaled": {"hier_tau_scaled": False},
    "interaction-gain=1": {"interaction_gain": 1.0},
}
METHODS = ("lpi", "seqft", "joint", "sprompts", "l2p")          # whose choice becomes lpi.TUNED
# The validation runs: 3 tasks (the second and third are partners: they share a setting and
# objects, so routing can go wrong as in the real run), 500 training images each, which the
# seed split 400 trained on (the evidence table's budget) and 100 held out. Two seeds.
VALIDATION = dict(tasks=3, n_train=500, n_val=100, seeds=(0, 1))
# The check: full runs at these points (the evidence table's size), and the earlier protocol
# (the first task's 1,000 training images less 200 held out, seed 0).
PREDICT = dict(methods=("lpi", "sprompts", "l2p", "seqft"),
               points=(("sgd", 0.05), ("sgd", 1.0), ("adam", 0.01), ("adam", 0.03), ("adam", 0.1), ("adam", 0.3)))
FULL = dict(max_train_per_task=400, max_test_per_task=100)      # = benchmarks/evidence.py's DEFAULT_SIZE
ONE_TASK = dict(tasks=1, n_train=1000, n_val=200, seeds=(0,))
QUICK = dict(validation=dict(tasks=2, n_train=40, n_val=12, seeds=(0, 1)), one_task=dict(tasks=1, n_train=40, n_val=12,
             seeds=(0,)), full=dict(max_train_per_task=24, max_test_per_task=8, tasks="sea-animals,farm-animals"),
             epochs=1, batch_size=16, settings=("lpi", "sprompts"), grid=(GRID[1], GRID[8]))


def validation_task(task, n_val: int, seed: int = 0):
    """The task with its training images split: the last n_val of a permutation drawn by the
    seed become the 'test' set (validation), the rest the training set. The test items are
    not used."""
    import torch

    n = len(task.train)
    if not 1 <= n_val < n - 1:
        raise ValueError(f"n_val={n_val} must leave at least 2 of the {n} training images for training")
    order = torch.randperm(n, generator=torch.Generator().manual_seed(seed))
    fit, val = order[: n - n_val].sort().values, order[n - n_val:].sort().values
    take = lambda idx: data.ImageCaptionSet(task.train.images[idx], [task.train.captions[i] for i in idx.tolist()])  # noqa: E731
    return data.Task(task.name, take(fit), take(val), task.label)


def validation_tasks(v: dict, seed: int) -> list:
    """The first v["tasks"] built-in tasks, each with v["n_train"] training images (as the
    evidence runs make theirs), split by the seed into training and validation images."""
    return [validation_task(data.builtin_task(n, n_train=v["n_train"]), v["n_val"], seed)
            for n in list(data.BUILTIN_TASKS)[: v["tasks"]]]


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


def finished(out: Path) -> dict | None:
    res = out / "results.json"
    if res.is_file() and "zeroshot" in (r := json.loads(res.read_text())):   # written at the end of a run
        return r
    return None


def run_point(spec: tuple) -> tuple:
    """One job: (kind, setting, optimizer, lr, seed, settings, split, cache_dir, out, threads).
    kind "full": lpi.run on the built-in tasks, scored on their test items; otherwise the
    continual loop on the validation tasks of `split`, scored on their held-out images."""
    import torch
    import lpi

    kind, name, optimizer, lr, seed, settings, split, cache_dir, out, threads = spec
    torch.set_num_threads(threads)
    out = Path(out)
    res = finished(out)
    if res is None:
        run = dict(settings, optimizer=optimizer, lr=lr, seed=seed, progress=False, workers=0, out=str(out),
                   cache_dir=cache_dir, resume=lpi.latest_checkpoint(out) is not None)
        out.mkdir(parents=True, exist_ok=True)
        with open(out / "log.txt", "a") as log, contextlib.redirect_stdout(log), contextlib.redirect_stderr(log):
            if kind == "full":
                res = lpi.run(*lpi.configs(**run))
            else:
                s, cfg = lpi.fill_defaults(*lpi.configs(**run), tiny=True)
                clip, preprocess, _ = data.load_backbone(s, torch.device("cpu"))      # read once per process
                config = dict(dataclasses.asdict(s), **dataclasses.asdict(cfg))
                res = lpi.run_continual(lpi.make_method(s.method, cfg, clip), validation_tasks(split, seed), s,
                                        lpi.Env(torch.device("cpu"), preprocess), config)
    return kind, name, optimizer, lr, seed, res["summary"]["mean_recall"], res["wall_time_s"]


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


def ranks(values: list[float]) -> list[float]:
    """Ranks 1..n, ties sharing their mean rank."""
    order = sorted(range(len(values)), key=lambda i: values[i])
    r = [0.0] * len(values)
    i = 0
    while i < len(order):
        j = i
        while j + 1 < len(order) and values[order[j + 1]] == values[order[i]]:
            j += 1
        for k in range(i, j + 1):
            r[order[k]] = (i + j) / 2 + 1
        i = j + 1
    return r


def spearman(a: list[float], b: list[float]) -> float:
    """Spearman's rank correlation (Pearson's on the ranks; nan if either side is constant)."""
    ra, rb = ranks(a), ranks(b)
    ma, mb = statistics.fmean(ra), statistics.fmean(rb)
    cov = sum((x - ma) * (y - mb) for x, y in zip(ra, rb))
    var = (sum((x - ma) ** 2 for x in ra) * sum((y - mb) ** 2 for y in rb)) ** 0.5
    return cov / var if var else float("nan")


def plan(settings: dict, grid, size: dict, work: Path, cache_dir: str, threads: int) -> list[tuple]:
    """Every job: the grid on the validation tasks, and for the check the full runs and the
    earlier protocol's one-task runs at PREDICT's points."""
    def job(kind, name, overrides, point, seed, split):
        run = dict(overrides, epochs=size["epochs"], batch_size=size["batch_size"], **(size["full"] if kind == "full" else {}))
        key = resolved(dict(run, optimizer=point[0], lr=point[1], seed=seed)) + json.dumps(split)
        out = work / kind / f"{name}_{point[0]}_{point[1]:g}_{hashlib.sha256(key.encode()).hexdigest()[:8]}" / f"seed{seed}"
        return (kind, name, *point, seed, run, split, cache_dir, str(out), threads)

    jobs = [job("grid", name, over, p, seed, size["validation"]) for name, over in settings.items() for p in grid
            for seed in size["validation"]["seeds"]]
    for name in (m for m in PREDICT["methods"] if m in settings):
        for p in (p for p in size["points"] if p in grid):
            jobs += [job("full", name, settings[name], p, seed, None) for seed in size["validation"]["seeds"]]
            jobs += [job("one-task", name, settings[name], p, seed, size["one_task"]) for seed in size["one_task"]["seeds"]]
    return jobs


def collect(jobs: list, n_jobs: int) -> tuple[dict, float]:
    """Run the jobs, n_jobs at a time in separate processes: {kind: {setting: {point: [score per
    seed]}}} and the sum of the runs' wall times (s)."""
    scores, run_s, t0 = {}, 0.0, time.time()
    pool = concurrent.futures.ProcessPoolExecutor(n_jobs, mp_context=multiprocessing.get_context("spawn"))
    for i, f in enumerate(concurrent.futures.as_completed([pool.submit(run_point, j) for j in jobs]), 1):
        kind, name, o, lr, seed, score, wall = f.result()
        scores.setdefault(kind, {}).setdefault(name, {}).setdefault((o, lr), []).append((seed, score))
        run_s += wall
        print(f"[{i}/{len(jobs)}] {kind} {name} {o} {lr:g} seed {seed}: mean recall {score:.1f} "
              f"({(time.time() - t0) / 60:.1f} min)", flush=True)
    pool.shutdown()
    means = {kind: {name: {p: statistics.fmean(s for _, s in sorted(v)) for p, v in sorted(pts.items(), key=lambda kv: GRID.index(kv[0]))}
                    for name, pts in by_name.items()} for kind, by_name in scores.items()}
    return means, run_s


def predictiveness(means: dict) -> dict:
    """Per method of PREDICT: its points' scores under both protocols and in the full runs, and
    each protocol's Spearman correlation with the full runs."""
    out = {}
    for name, full in means.get("full", {}).items():
        points = list(full)
        grid, one = [means["grid"][name][p] for p in points], [means["one-task"][name][p] for p in points]
        test = [full[p] for p in points]
        out[name] = dict(points=[list(p) for p in points], validation=grid, one_task=one, full_run=test,
                         spearman=spearman(grid, test), spearman_one_task=spearman(one, test))
    return out


def markdown(means: dict, chosen: dict, pred: dict, size: dict, minutes: float, run_min: float, quick: bool) -> str:
    v, grid_scores = size["validation"], means["grid"]
    grid = [p for p in GRID if any(p in pts for pts in grid_scores.values())]
    names = list(data.BUILTIN_TASKS)[: v["tasks"]]
    lines = ["# Tuning protocol: optimiser x learning rate, on held-out training images, learned continually", "",
             f"Every setting learns the first {v['tasks']} built-in tasks in order ({', '.join(names)}), each with "
             f"{v['n_train']} of its training images drawn by the seed, {v['n_val']} of them held out: "
             f"{v['n_train'] - v['n_val']} trained on ({size['epochs']} epochs, batch {size['batch_size']}), with "
             f"the method's routing; scored by the final mean recall (i2t and t2i R@1/5/10) on the pool of the "
             f"held-out images of all {v['tasks']} tasks; mean over seeds {list(v['seeds'])}. No test item is "
             f"used. Made by `python benchmarks/tune.py{' --quick' if quick else ''}` in {minutes:.1f} min on "
             f"{platform.machine()} ({os.cpu_count()} cores); the runs took {run_min:.0f} min in all, one "
             f"process each. **Bold**: the chosen point.", "",
             "| setting | " + " | ".join(f"{o} {lr:g}" for o, lr in grid) + " | chosen |",
             "|---|" + "---:|" * len(grid) + "---|"]
    for name, points in grid_scores.items():
        c = chosen[name]
        cells = [(f"**{points[p]:.1f}**" if p == (c["optimizer"], c["chosen_lr"]) else f"{points[p]:.1f}")
                 if p in points else "" for p in grid]
        lines.append(f"| {name} | " + " | ".join(cells) + f" | {c['optimizer']} {c['chosen_lr']:g} |")
    if pred:
        f = size["full"]
        lines += ["", "## Does it predict the continual run?", "",
                  f"At {len(next(iter(pred.values()))['points'])} points of the grid, each method's full continual run "
                  f"(the {f.get('tasks', 'six built-in').count(',') + 1 if 'tasks' in f else 6} tasks, "
                  f"{f['max_train_per_task']} training / {f['max_test_per_task']} test images per task, k-means "
                  f"routing, scored on the test items; mean over seeds {list(v['seeds'])}) beside this protocol's "
                  f"validation score and the earlier protocol's (the first task alone: "
                  f"{size['one_task']['n_train'] - size['one_task']['n_val']} training / "
                  f"{size['one_task']['n_val']} held-out images, seed {size['one_task']['seeds'][0]}). ρ: Spearman's "
                  "rank correlation of a protocol's scores with the full runs' over these points.", "",
                  "| method | point | this protocol | earlier protocol (one task) | full run (test) |",
                  "|---|---|---:|---:|---:|"]
        for name, r in pred.items():
            for (o, lr), a, b, c in zip(r["points"], r["validation"], r["one_task"], r["full_run"]):
                lines.append(f"| {name} | {o} {lr:g} | {a:.1f} | {b:.1f} | {c:.1f} |")
            lines.append(f"| {name} | **ρ with the full run** | **{r['spearman']:.2f}** | {r['spearman_one_task']:.2f} | |")
    return "\n".join(lines)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--quick", action="store_true", help="two settings, two points, tiny sizes: a smoke test")
    p.add_argument("--jobs", type=int, default=2, help="runs in parallel, one torch thread each")
    p.add_argument("--cache-dir", default=os.environ.get("LPI_CACHE", str(Path.home() / ".cache" / "lpi")))
    p.add_argument("--out-dir", default=None, help="default benchmarks/results (runs/tune_quick with --quick)")
    p.add_argument("--work-dir", default=None, help="one folder per run (default runs/tune[_quick])")
    a = p.parse_args(argv)
    import lpi

    size = dict(validation=VALIDATION, one_task=ONE_TASK, full=FULL, points=PREDICT["points"],
                epochs=lpi.TINY_DEFAULTS["epochs"], batch_size=lpi.TINY_DEFAULTS["batch_size"])
    settings, grid = SETTINGS, GRID
    if a.quick:
        size.update(validation=QUICK["validation"], one_task=QUICK["one_task"], full=QUICK["full"], points=QUICK["grid"],
                    epochs=QUICK["epochs"], batch_size=QUICK["batch_size"])
        settings, grid = {k: SETTINGS[k] for k in QUICK["settings"]}, list(QUICK["grid"])
    out_dir = Path(a.out_dir or (ROOT / ("runs/tune_quick" if a.quick else "benchmarks/results")))
    work = Path(a.work_dir or (ROOT / ("runs/tune_quick" if a.quick else "runs/tune")))
    t0 = time.time()
    data.world.load_or_build_tiny_clip(a.cache_dir, progress=True)  # built (or read) once, before the workers
    jobs = plan(settings, grid, size, work, a.cache_dir, 1 if a.jobs > 1 else 2)
    print(f"{len(jobs)} runs, {a.jobs} at a time", flush=True)
    means, run_s = collect(jobs, a.jobs)
    chosen, pred = choose(means["grid"]), predictiveness(means)
    md = markdown(means, chosen, pred, size, (time.time() - t0) / 60, run_s / 60, a.quick)
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "tuning.md").write_text(md + "\n")
    (out_dir / "tuning.json").write_text(json.dumps(dict(
        size=size, grid=grid, settings=settings, chosen=chosen, predictiveness=pred, total_time_s=time.time() - t0,
        run_time_s=run_s, scores={name: [{"optimizer": o, "lr": lr, "mean_recall": v} for (o, lr), v in pts.items()]
                                  for name, pts in means["grid"].items()}), indent=2))
    print(md)
    return 0


if __name__ == "__main__":
    sys.exit(main())
