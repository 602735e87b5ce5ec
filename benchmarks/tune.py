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
# Each range reaches past the best point of every setting (LPI's Adam and joint's SGD peaked at
# the top of the first, narrower grid: 0.3 and 4).
GRID = ([("sgd", lr) for lr in (0.01, 0.05, 0.25, 1.0, 4.0, 16.0)]
        + [("adam", lr) for lr in (0.003, 0.01, 0.03, 0.1, 0.3, 1.0)])
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
# Stage 2: each setting's TOP best points of stage 1 on all six tasks, the same split per task,
# at seeds other than the evidence table's (0..4), so that its noise is not the full runs'.
# Two points per setting, and PREDICT's points for the headline pair only (LPI and S-Prompts):
# a stage-2 run costs as much as a full run, which is what the 2-core budget bites on.
SIX = dict(tasks=6, n_train=500, n_val=100, seeds=(100, 101))
TOP = 2
PREDICT_SIX = ("lpi", "sprompts")
# The check: full runs at these points (the evidence table's size), and the earlier protocol
# (the first task's 1,000 training images less 200 held out, seed 0).
PREDICT = dict(methods=("lpi", "sprompts", "l2p", "seqft"),
               points=(("sgd", 0.05), ("sgd", 1.0), ("adam", 0.01), ("adam", 0.03), ("adam", 0.1), ("adam", 0.3),
                       ("adam", 1.0)))
FULL = dict(max_train_per_task=400, max_test_per_task=100)      # = benchmarks/evidence.py's DEFAULT_SIZE
ONE_TASK = dict(tasks=1, n_train=1000, n_val=200, seeds=(0,))
QUICK = dict(validation=dict(tasks=2, n_train=40, n_val=12, seeds=(0, 1)), one_task=dict(tasks=1, n_train=40, n_val=12,
             seeds=(0,)), six=dict(tasks=3, n_train=40, n_val=12, seeds=(100, 101)),
             full=dict(max_train_per_task=24, max_test_per_task=8, tasks="sea-animals,farm-animals"),
             epochs=1, batch_size=16, settings=("lpi", "sprompts"), grid=(("sgd", 0.05), ("adam", 0.1)), top=1)


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


def spearman(a: list[float], b: list[float]) -> float | None:
    """Spearman's rank correlation (Pearson's on the ranks; None if either side is constant,
    where no order can be predicted)."""
    ra, rb = ranks(a), ranks(b)
    ma, mb = statistics.fmean(ra), statistics.fmean(rb)
    cov = sum((x - ma) * (y - mb) for x, y in zip(ra, rb))
    var = (sum((x - ma) ** 2 for x in ra) * sum((y - mb) ** 2 for y in rb)) ** 0.5
    return cov / var if var else None


def job(kind: str, name: str, overrides: dict, point: tuple, seed: int, split: dict | None, size: dict, work: Path,
        cache_dir: str, threads: int) -> tuple:
    """One run's spec for run_point; its folder is named by every setting it depends on."""
    run = dict(overrides, epochs=size["epochs"], batch_size=size["batch_size"], **(size["full"] if kind == "full" else {}))
    key = resolved(dict(run, optimizer=point[0], lr=point[1], seed=seed)) + json.dumps(split)
    out = work / kind / f"{name}_{point[0]}_{point[1]:g}_{hashlib.sha256(key.encode()).hexdigest()[:8]}" / f"seed{seed}"
    return (kind, name, *point, seed, run, split, cache_dir, str(out), threads)


def plan(settings: dict, grid, size: dict, **where) -> list[tuple]:
    """Stage 1: every setting at every point on the first tasks; and for the check, the full
    runs and the earlier protocol's one-task runs at PREDICT's points."""
    v = size["validation"]
    jobs = [job("grid", name, over, p, seed, v, size, **where) for name, over in settings.items() for p in grid
            for seed in v["seeds"]]
    for name in (m for m in PREDICT["methods"] if m in settings):
        for p in (p for p in size["points"] if p in grid):
            jobs += [job("full", name, settings[name], p, seed, None, size, **where) for seed in v["seeds"]]
            jobs += [job("one-task", name, settings[name], p, seed, size["one_task"], size, **where)
                     for seed in size["one_task"]["seeds"]]
    return jobs


def top_points(points: dict, k: int) -> list[tuple]:
    """The k best points of a setting (ties: the first in GRID order)."""
    return sorted(points, key=lambda p: (-points[p], GRID.index(p)))[:k]


def plan_six(settings: dict, top: dict, grid, size: dict, **where) -> list[tuple]:
    """Stage 2: each setting's top points of stage 1 on all six tasks; for the check, also
    PREDICT_SIX's methods at PREDICT's points."""
    jobs = []
    for name, over in settings.items():
        points = list(top[name])
        if name in PREDICT_SIX:
            points += [p for p in size["points"] if p in grid and p not in points]
        jobs += [job("six", name, over, p, seed, size["six"], size, **where) for p in points for seed in size["six"]["seeds"]]
    return jobs


def collect(jobs: list, n_jobs: int) -> tuple[dict, float, list]:
    """Run the jobs, n_jobs at a time in separate processes: {kind: {setting: {point: mean
    score over the seeds}}}, the sum of the runs' wall times (s), and every run's score."""
    scores, run_s, t0 = {}, 0.0, time.time()
    pool = concurrent.futures.ProcessPoolExecutor(n_jobs, mp_context=multiprocessing.get_context("spawn"))
    for i, f in enumerate(concurrent.futures.as_completed([pool.submit(run_point, j) for j in jobs]), 1):
        kind, name, o, lr, seed, score, wall = f.result()
        scores.setdefault(kind, {}).setdefault(name, {}).setdefault((o, lr), []).append((seed, score))
        run_s += wall
        print(f"[{i}/{len(jobs)}] {kind} {name} {o} {lr:g} seed {seed}: mean recall {score:.1f} "
              f"({(time.time() - t0) / 60:.1f} min)", flush=True)
    pool.shutdown()
    ordered = lambda pts: sorted(pts.items(), key=lambda kv: GRID.index(kv[0]))  # noqa: E731
    means = {kind: {name: {p: statistics.fmean(s for _, s in v) for p, v in ordered(pts)} for name, pts in by_name.items()}
             for kind, by_name in scores.items()}
    runs = [dict(kind=kind, setting=name, optimizer=o, lr=lr, seed=seed, mean_recall=score)
            for kind, by_name in scores.items() for name, pts in by_name.items() for (o, lr), v in ordered(pts)
            for seed, score in sorted(v)]
    return means, run_s, runs


# The protocols whose predictiveness is checked: (kind of run, what it validates on)
PROTOCOLS = (("grid", "stage 1"), ("six", "stage 2"), ("one-task", "earlier protocol (one task)"))


def predictiveness(means: dict, chosen: dict) -> dict:
    """Per method of PREDICT, at PREDICT's points: the full runs' test scores and, for each
    protocol, its scores, their Spearman correlation with the full runs, and its regret: the
    best full-run score minus the full-run score of the point the protocol ranks first; and
    the regret of the point the two stages chose (stage 2 sees only stage 1's top points)."""
    out = {}
    for name, full in means.get("full", {}).items():
        points = list(full)
        test = [full[p] for p in points]
        out[name] = dict(points=[list(p) for p in points], full_run=test)
        for kind, _ in PROTOCOLS:
            if any(p not in means.get(kind, {}).get(name, {}) for p in points):
                out[name][kind] = None                            # stage 2 ran only some points
                continue
            scores = [means[kind][name][p] for p in points]
            pick = max(range(len(points)), key=lambda i: (scores[i], -i))
            out[name][kind] = dict(scores=scores, spearman=spearman(scores, test), regret=max(test) - test[pick],
                                   pick=list(points[pick]))
        c = (chosen[name]["optimizer"], chosen[name]["chosen_lr"]) if name in chosen else None
        out[name]["chosen"] = dict(point=list(c), regret=max(test) - full[c]) if c in full else None
    return out


def markdown(means: dict, top: dict, chosen: dict, pred: dict, size: dict, minutes: float, run_min: float,
             quick: bool) -> str:
    v, six, grid_scores = size["validation"], size["six"], means["grid"]
    grid = [p for p in GRID if any(p in pts for pts in grid_scores.values())]
    names = list(data.BUILTIN_TASKS)
    lines = ["# Tuning protocol: optimiser x learning rate, on held-out training images, learned continually", "",
             f"Two stages, the same for every setting; no test item is used. **Stage 1** (the whole grid): the first "
             f"{v['tasks']} built-in tasks in order ({', '.join(names[: v['tasks']])}), each with {v['n_train']} "
             f"training images split by the seed into {v['n_train'] - v['n_val']} trained on ({size['epochs']} "
             f"epochs, batch {size['batch_size']}) and {v['n_val']} held out, with the method's routing; scored by "
             f"the final mean recall (i2t and t2i R@1/5/10) on the pool of the held-out images of all "
             f"{v['tasks']} tasks; mean over seeds {list(v['seeds'])}. **Stage 2** (each setting's {size['top']} best "
             f"points of stage 1): the same on all {six['tasks']} tasks, seeds {list(six['seeds'])}; its best point "
             f"is the setting's choice. Made by `python benchmarks/tune.py{' --quick' if quick else ''}` on "
             f"{platform.machine()} ({os.cpu_count()} cores); its runs took {run_min:.0f} min of wall time added up, "
             f"one process each, two at a time (a finished run is read back, not run again).", "",
             "## Stage 1: the grid on the first tasks", "",
             "| setting | " + " | ".join(f"{o} {lr:g}" for o, lr in grid) + " |",
             "|---|" + "---:|" * len(grid)]
    for name, points in grid_scores.items():
        cells = [(f"**{points[p]:.1f}**" if p in top[name] else f"{points[p]:.1f}") if p in points else "" for p in grid]
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    lines += ["", f"**Bold**: the {size['top']} points that go on to stage 2.", "",
              f"## Stage 2: the best points on all {six['tasks']} tasks", "",
              "| setting | " + " | ".join(f"point {i + 1}" for i in range(size["top"])) + " | chosen |",
              "|---|" + "---|" * size["top"] + "---|"]
    for name, points in top.items():
        c = (chosen[name]["optimizer"], chosen[name]["chosen_lr"])
        cells = [f"{o} {lr:g}: " + (f"**{means['six'][name][(o, lr)]:.1f}**" if (o, lr) == c
                                      else f"{means['six'][name][(o, lr)]:.1f}") for o, lr in points]
        lines.append(f"| {name} | " + " | ".join(cells) + f" | {c[0]} {c[1]:g} |")
    if pred:
        f = size["full"]
        lines += ["", "## Does it predict the continual run?", "",
                  f"At {len(next(iter(pred.values()))['points'])} points of the grid, each method's full continual run "
                  f"({f.get('tasks', 'the six built-in tasks').replace(',', ', ')}, {f['max_train_per_task']} training / "
                  f"{f['max_test_per_task']} test images per task, k-means routing, scored on the test items; mean over "
                  f"seeds {list(v['seeds'])}) beside each protocol's validation score: stage 1, stage 2, and the "
                  f"earlier protocol (the first task alone: {size['one_task']['n_train'] - size['one_task']['n_val']} "
                  f"training / {size['one_task']['n_val']} held-out images, seed {size['one_task']['seeds'][0]}). "
                  "ρ: Spearman's rank correlation of a protocol's scores with the full runs' over these points. "
                  "Regret: the best full-run score of these points minus the full-run score of the point the "
                  "protocol ranks first; the protocol's choice: the same for the point the two stages chose (stage 2 "
                  "sees only stage 1's best points).", "",
                  "| method | point | " + " | ".join(label for _, label in PROTOCOLS) + " | full run (test) |",
                  "|---|---|" + "---:|" * (len(PROTOCOLS) + 1)]
        for name, r in pred.items():
            for i, (o, lr) in enumerate(r["points"]):
                lines.append(f"| {name} | {o} {lr:g} | " + " | ".join(
                    f"{r[k]['scores'][i]:.1f}" if r[k] else "" for k, _ in PROTOCOLS) + f" | {r['full_run'][i]:.1f} |")
            lines.append(f"| {name} | **ρ with the full run** | " + " | ".join(
                ("not run" if not r[k] else "— (a constant side)" if r[k]["spearman"] is None
                 else f"**{r[k]['spearman']:.2f}**") for k, _ in PROTOCOLS) + " | |")
            lines.append(f"| {name} | **regret** | " + " | ".join(
                f"**{r[k]['regret']:.1f}**" if r[k] else "not run" for k, _ in PROTOCOLS) + " | |")
            if r["chosen"]:
                o, lr = r["chosen"]["point"]
                lines.append(f"| {name} | **the protocol's choice**: {o} {lr:g} | regret **{r['chosen']['regret']:.1f}** "
                             + "|" * len(PROTOCOLS))
    return "\n".join(lines)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--quick", action="store_true", help="two settings, two points, tiny sizes: a smoke test")
    p.add_argument("--settings", default=None, help="comma-separated names of SETTINGS (default: all)")
    p.add_argument("--jobs", type=int, default=2, help="runs in parallel, one torch thread each")
    p.add_argument("--cache-dir", default=os.environ.get("LPI_CACHE", str(Path.home() / ".cache" / "lpi")))
    p.add_argument("--out-dir", default=None, help="default benchmarks/results (runs/tune_quick with --quick)")
    p.add_argument("--work-dir", default=None, help="one folder per run (default runs/tune[_quick])")
    a = p.parse_args(argv)
    import lpi

    size = dict(validation=VALIDATION, six=SIX, top=TOP, one_task=ONE_TASK, full=FULL, points=PREDICT["points"],
                epochs=lpi.TINY_DEFAULTS["epochs"], batch_size=lpi.TINY_DEFAULTS["batch_size"])
    settings, grid = SETTINGS, GRID
    if a.quick:
        size.update({k: QUICK[k] for k in ("validation", "six", "top", "one_task", "full", "epochs", "batch_size")},
                    points=QUICK["grid"])
        settings, grid = {k: SETTINGS[k] for k in QUICK["settings"]}, list(QUICK["grid"])
    if a.settings:
        unknown = [k for k in a.settings.split(",") if k not in SETTINGS]
        if unknown:
            p.error(f"--settings: unknown {', '.join(unknown)}; known: {', '.join(SETTINGS)}")
        settings = {k: SETTINGS[k] for k in a.settings.split(",")}
    out_dir = Path(a.out_dir or (ROOT / ("runs/tune_quick" if a.quick else "benchmarks/results")))
    where = dict(work=Path(a.work_dir or (ROOT / ("runs/tune_quick" if a.quick else "runs/tune"))),
                 cache_dir=a.cache_dir, threads=1 if a.jobs > 1 else 2)
    t0 = time.time()
    data.world.load_or_build_tiny_clip(a.cache_dir, progress=True)  # built (or read) once, before the workers
    jobs = plan(settings, grid, size, **where)
    print(f"stage 1 and the check: {len(jobs)} runs, {a.jobs} at a time", flush=True)
    means, run_s, runs = collect(jobs, a.jobs)
    top = {name: top_points(means["grid"][name], size["top"]) for name in settings}
    jobs = plan_six(settings, top, grid, size, **where)
    print(f"stage 2: {len(jobs)} runs, {a.jobs} at a time", flush=True)
    six, six_s, six_runs = collect(jobs, a.jobs)
    means.update(six)
    chosen = choose({name: {p: means["six"][name][p] for p in top[name]} for name in settings})
    for name, first in choose(means["grid"]).items():   # an optimiser stage 2 did not reach: its stage-1 best lr
        chosen[name]["lr"] = {o: chosen[name]["lr"].get(o, lr) for o, lr in first["lr"].items()}
    pred = predictiveness(means, chosen)
    md = markdown(means, top, chosen, pred, size, (time.time() - t0) / 60, (run_s + six_s) / 60, a.quick)
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "tuning.md").write_text(md + "\n")
    (out_dir / "tuning.json").write_text(json.dumps(dict(
        size=size, grid=grid, settings=settings, top={k: [list(p) for p in v] for k, v in top.items()}, chosen=chosen,
        predictiveness=pred, total_time_s=time.time() - t0, run_time_s=run_s + six_s,
        scores={name: [{"optimizer": o, "lr": lr, "mean_recall": v} for (o, lr), v in pts.items()]
                for name, pts in means["grid"].items()},
        six_task_scores={name: [{"optimizer": o, "lr": lr, "mean_recall": v} for (o, lr), v in pts.items()]
                         for name, pts in means["six"].items()}, runs=runs + six_runs), indent=2))
    print(md)
    return 0


if __name__ == "__main__":
    sys.exit(main())
