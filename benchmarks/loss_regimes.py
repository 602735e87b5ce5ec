"""Where the paper's two losses should help: one experiment each, in the regime its rationale
names, over several seeds, paired (the same seed with and without the loss).

The regimes were written down before any of these runs:

- Task contrastive constraint (METHOD.md §5). Its rationale: tasks that are semantically close
  should have close prompts, so that what an earlier task learned carries over to a related
  later one. That should matter most where the later task alone gives little to learn from:
  a related task with few training images, learned right after a related task learned on
  many. "Related" must be what the constraint itself is told (its targets Y), or the loss
  pushes the two tasks' prompts apart instead. On the six built-in tasks in lpi.py's order,
  two consecutive pairs are related both in the world (a shared word and outline) and for the
  constraint (Y = 1 from the names' similarity, range-normalised over the six): garden-tools
  then kitchen-tools, and road-vehicles then water-vehicles. The six tasks, 400 training
  images each except 64 for kitchen-tools and water-vehicles. Measured: those two tasks' final
  R@1 (mean of i2t and t2i, then of the two tasks) in the pool of all six, with the
  constraint (λ_task = 0.1, lpi.py's default) and without it. A run whose targets do not mark
  both pairs related stops with an error.
  A first version ran two-task sequences (sea-animals then farm-animals, garden-tools then
  kitchen-tools, 400 then 64 images). With two tasks θ applies to the raw cosine of the names,
  and both pairs came out unrelated (Y = 0): the constraint pushed the prompts apart, so those
  runs did not test the rationale (their paired difference, +0.0 [-1.5, +1.5] over five seeds,
  is not reported as evidence). This version replaced it before it was run.
- Hierarchical (prompt-level) contrastive loss (METHOD.md §4). Its rationale (the paper's
  abstract): the two modalities' prompts start from unrelated random low-rank factors, and the
  loss aligns them "to ensure training robustness". That should matter most while the prompts
  are still close to their random start: short training. The six built-in tasks at 400 images,
  one epoch per task (7 steps of batch 64) instead of 8. Measured: final mean recall and its
  spread over seeds, with the loss and without it.

Each experiment's rows are ordinary runs (lpi.run, or the continual loop on tasks of chosen
sizes), each in its own folder, reused when finished. benchmarks/evidence.py runs them after the
table and puts them in evidence.json / evidence.md.
"""
from __future__ import annotations

import contextlib
import json
from pathlib import Path

# name -> the regime in one line, the arms (the settings each changes), and the runs: a
# sequence of (task, training images) for the continual loop on chosen sizes, or lpi.run settings.
EXPERIMENTS = {
    "task loss: a related task with few images": dict(
        regime="the six tasks at 400 images, kitchen-tools and water-vehicles at 64, each right after a related "
               "task (garden-tools, road-vehicles)",
        arms={"with": {}, "without": {"task_loss": False}},
        sequence=(("sea-animals", 400), ("farm-animals", 400), ("garden-tools", 400), ("kitchen-tools", 64),
                  ("road-vehicles", 400), ("water-vehicles", 64)),
        few={"kitchen-tools": "garden-tools", "water-vehicles": "road-vehicles"},   # task -> the related one before it
        measure="R@1 of the two 64-image tasks"),
    "prompt-level loss: short training": dict(
        regime="the six tasks at 400 images, one epoch per task (the prompts near their random start)",
        arms={"with": {}, "without": {"hier_prompt": False}},
        run=dict(max_train_per_task=400, max_test_per_task=100, epochs=1),
        measure="mean recall"),
}


def jobs(seeds, work: Path, fixed: dict) -> list[tuple]:
    """(experiment, arm, seed, settings, out) of every run."""
    out = []
    for name, e in EXPERIMENTS.items():
        slug = "".join(c for c in name.split(":")[0].replace(" ", "_") if c.isalnum() or c == "_")
        for arm, changes in e["arms"].items():
            for seed in seeds:
                settings = dict(fixed, **e.get("run", {}), **changes)
                out.append((name, arm, seed, settings, str(work / slug / f"{arm}_seed{seed}")))
    return out


def run(spec: tuple) -> tuple:
    """One run of an experiment; returns (experiment, arm, seed, measured value, results)."""
    import torch
    import lpi
    import data

    name, arm, seed, settings, out = spec
    out, e = Path(out), EXPERIMENTS[name]
    done = out / "results.json"
    if done.is_file() and "zeroshot" in (res := json.loads(done.read_text())):
        return name, arm, seed, measured(e, res), res
    settings = dict(settings, seed=seed, out=str(out), resume=lpi.latest_checkpoint(out) is not None)
    out.mkdir(parents=True, exist_ok=True)
    with open(out / "log.txt", "a") as log, contextlib.redirect_stdout(log), contextlib.redirect_stderr(log):
        if "sequence" not in e:
            res = lpi.run(*lpi.configs(**settings))
        else:  # the continual loop on tasks of chosen sizes
            s, cfg = lpi.fill_defaults(*lpi.configs(**settings), tiny=True)
            clip, preprocess, _ = data.load_backbone(s, torch.device("cpu"))
            tasks = [data.builtin_task(task, n_train=n) for task, n in e["sequence"]]
            config = dict(lpi.dataclasses.asdict(s), **lpi.dataclasses.asdict(cfg))
            res = lpi.run_continual(lpi.make_method(s.method, cfg, clip), tasks, s,
                                    lpi.Env(torch.device("cpu"), preprocess), config)
    return name, arm, seed, measured(e, res), res


def measured(e: dict, res: dict) -> float:
    """The experiment's measure of one run: the few-image tasks' final R@1 (after checking that
    the constraint's targets call each related to the task before it), or mean recall."""
    if "few" not in e:
        return res["summary"]["mean_recall"]
    names, Y = res["tasks"], res["task_targets"]
    for task, before in e["few"].items():
        if Y[names.index(task)][names.index(before)] != 1:
            raise SystemExit(f"the task constraint does not call {task} related to {before} (Y = 0): "
                             "this run does not test the regime of loss_regimes.py")
    final = {d: res["recall"][d]["R@1"][-1] for d in ("i2t", "t2i")}
    return sum((final["i2t"][names.index(t)] + final["t2i"][names.index(t)]) / 2 for t in e["few"]) / len(e["few"])
