"""Where the paper's two losses should help: one experiment each, in the regime its rationale
names, over several seeds, paired (the same seed with and without the loss).

The regimes were written down before any of these runs:

- Task contrastive constraint (METHOD.md §5). Its rationale: tasks that are semantically close
  should have close prompts, so that what an earlier task learned carries over to a related
  later one. That should matter most where the later task alone gives little to learn from:
  a related task with few training images, learned right after a related task learned on
  many. Two related pairs of the built-in world (their names share a word, their objects an
  outline): sea-animals (400 images) then farm-animals (64 images), and garden-tools (400) then
  kitchen-tools (64). Measured: the second task's final R@1 (mean of i2t and t2i) in the pool of
  both, with the constraint (λ_task = 0.1, lpi.py's default) and without it.
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

# name -> the regime in one line, the arms (the settings each changes), and the runs: task
# sizes (name, training images) for the continual loop on chosen sizes, or lpi.run settings.
EXPERIMENTS = {
    "task loss: a related task with few images": dict(
        regime="a related task learned from 64 images right after one learned from 400 (2 pairs)",
        arms={"with": {}, "without": {"task_loss": False}},
        pairs=((("sea-animals", 400), ("farm-animals", 64)), (("garden-tools", 400), ("kitchen-tools", 64))),
        measure="R@1 of the second task"),
    "prompt-level loss: short training": dict(
        regime="the six tasks at 400 images, one epoch per task (the prompts near their random start)",
        arms={"with": {}, "without": {"hier_prompt": False}},
        run=dict(max_train_per_task=400, max_test_per_task=100, epochs=1),
        measure="mean recall"),
}


def jobs(seeds, work: Path, fixed: dict) -> list[tuple]:
    """(experiment, arm, pair index or None, seed, settings, out) of every run."""
    out = []
    for name, e in EXPERIMENTS.items():
        slug = "".join(c for c in name.split(":")[0].replace(" ", "_") if c.isalnum() or c == "_")
        for arm, changes in e["arms"].items():
            for seed in seeds:
                if "pairs" in e:
                    out += [(name, arm, i, seed, dict(fixed, **changes), str(work / slug / f"{arm}_pair{i}_seed{seed}"))
                            for i in range(len(e["pairs"]))]
                else:
                    out.append((name, arm, None, seed, dict(fixed, **e["run"], **changes),
                                str(work / slug / f"{arm}_seed{seed}")))
    return out


def run(spec: tuple) -> tuple:
    """One run of an experiment; returns (experiment, arm, pair, seed, measured value, results)."""
    import torch
    import lpi
    import data

    name, arm, pair, seed, settings, out = spec
    out, e = Path(out), EXPERIMENTS[name]
    done = out / "results.json"
    if done.is_file() and "zeroshot" in (res := json.loads(done.read_text())):
        return name, arm, pair, seed, measured(e, res), res
    settings = dict(settings, seed=seed, out=str(out), resume=lpi.latest_checkpoint(out) is not None)
    out.mkdir(parents=True, exist_ok=True)
    with open(out / "log.txt", "a") as log, contextlib.redirect_stdout(log), contextlib.redirect_stderr(log):
        if pair is None:
            res = lpi.run(*lpi.configs(**settings))
        else:  # the continual loop on tasks of chosen sizes
            s, cfg = lpi.fill_defaults(*lpi.configs(**settings), tiny=True)
            clip, preprocess, _ = data.load_backbone(s, torch.device("cpu"))
            tasks = [data.builtin_task(task, n_train=n) for task, n in e["pairs"][pair]]
            config = dict(lpi.dataclasses.asdict(s), **lpi.dataclasses.asdict(cfg))
            res = lpi.run_continual(lpi.make_method(s.method, cfg, clip), tasks, s,
                                    lpi.Env(torch.device("cpu"), preprocess), config)
    return name, arm, pair, seed, measured(e, res), res


def measured(e: dict, res: dict) -> float:
    if e["measure"] == "R@1 of the second task":
        return (res["recall"]["i2t"]["R@1"][-1][1] + res["recall"]["t2i"]["R@1"][-1][1]) / 2
    return res["summary"]["mean_recall"]
