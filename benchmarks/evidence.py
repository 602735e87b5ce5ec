"""The evidence: every method, every single-component ablation of LPI and every departure, the
sweeps of the paper's tables (R, J, M with S-Prompts at the same M, alpha, R'), and the two
experiments of benchmarks/loss_regimes.py, on the built-in tasks over five seeds, each run
through `lpi.run`; then LPI against S-Prompts again at lpi.py's own budget (every training image).

Writes <out-dir>/evidence.md (mean ± std over seeds, each row's paired difference with LPI and
its 95% interval, the authors' Average and forgetting), <out-dir>/evidence.json (every run's
numbers behind it), recall_vs_params.png (mean recall against trainable parameters per task)
and recall_matrices.png, and the parameter tables at ViT-B/16 scale from lpi.method_parameters.
Rows that resolve to the same settings (R=4, J=4, M=4, alpha=0.1 and R'=4 are LPI's defaults on
the tiny CLIP) share their runs. Each run has its own folder under --work-dir; a finished run is
reused and an interrupted one resumed, so an interrupted table continues where it stopped.
Usage:  python benchmarks/evidence.py [--seeds 5] [--quick] [--rows WORDS] ...
From Python: evidence.make_table(quick=True, out_dir=..., work_dir=...).
"""
import argparse
import concurrent.futures
import contextlib
import hashlib
import json
import math
import multiprocessing
import os
import platform
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

import loss_regimes  # noqa: E402  (where the paper's two losses should help)
import tune  # noqa: E402  (the settings of the ablations, and what makes two runs the same experiment)

# Default size: lpi.py's tiny defaults (J=M=R=4, 8 epochs, batch 64) on the six built-in tasks
# with 400 training images each (of lpi.py's 1,000) and the full 100 test images; five seeds.
# --quick: a smoke test of the script (< 1 min).
DEFAULT_SIZE = dict(max_train_per_task=400, max_test_per_task=100)
QUICK_SIZE = dict(max_train_per_task=32, max_test_per_task=16, epochs=1, batch_size=16, tasks="sea-animals,garden-tools")

METRICS = ("i2t_R@1", "t2i_R@1", "mean_recall", "i2t_forgetting_R@1", "t2i_forgetting_R@1",
           "routing_image", "routing_text", "wall_time_s",
           "authors_average_i2t_R@1", "authors_average_t2i_R@1", "authors_forgetting_i2t_R@1", "authors_forgetting_t2i_R@1")
# Every recall's authors' Average and forgetting (lpi.summarize), kept per run in evidence.json
AUTHORS = tuple(f"authors_{m}_{d}_R@{K}" for m in ("average", "forgetting") for d in ("i2t", "t2i") for K in (1, 5, 10))
ROUTED = ("lpi", "sprompts")  # the methods whose routing accuracy means something


TUNING = ROOT / "benchmarks" / "results" / "tuning.json"
# LPI before the fixes of METHOD.md §1-4: the authors' SGD at lr 0.05, deep prompts replacing
# the hidden state, the hierarchical terms weighted by λ_h, the interaction's LayerNorm starting
# at gain 1, and our factor-level loss on.
BEFORE = dict(optimizer="sgd", lr=0.05, deep_prompts="replace", hier_tau_scaled=False, interaction_gain=1.0,
              hier_factor=True)
# The single-component ablations and our departures, as the settings they change (tune.SETTINGS)
ABLATIONS = ("full-rank", "no-interaction", "alpha=0", "no-interaction-ln", "no-hier-prompt", "hier-factor", "no-task-loss",
             "routing oracle")
# The sweeps of the paper's tables (LPI at its protocol choice; S-Prompts at the same M at its own)
SWEEPS = (("LPI rank", "R", "R", (1, 2, 4, 8, 16)), ("LPI depth", "J", "J", (1, 2, 3, 4)),
          ("LPI length", "M", "M", (1, 2, 4, 8)), ("LPI alpha", "alpha", "alpha", (0.0, 0.1, 0.3, 0.5, 1.0)),
          ("LPI interaction rank", "R'", "interaction_rank", (1, 4, 16)))
DEPARTURES = ("deep-prompts=replace", "hier-unscaled", "interaction-gain=1")
# The sweeps that change the parameter count (alpha does not), drawn as lines against it
SWEEP_GROUPS = tuple(g for g, _, name, _ in SWEEPS if name != "alpha") + ("S-Prompts length",)
# LPI against S-Prompts again at lpi.py's own budget (all of a task's training images, not the
# table's 400, a cut made for time), over the same seeds: how the gap depends on the budget.
BUDGET = ("lpi", "sprompts", "sprompts (SGD 0.05)")


def tuned(label: str, quick: bool = False) -> dict:
    """An ablation's optimiser and lr as the tuning protocol chose them (benchmarks/tune.py);
    the methods take theirs from lpi.TUNED, their defaults, and LPI with oracle routing trains
    as LPI does. A setting the committed tuning.json lacks stops the table (run tune.py)."""
    if quick or label not in tune.SETTINGS:
        return {}
    chosen = json.loads(TUNING.read_text())["chosen"].get(label) if TUNING.is_file() else None
    if chosen is None:
        raise SystemExit(f"{TUNING} holds no choice for {label!r}: run python benchmarks/tune.py first")
    return {"optimizer": chosen["optimizer"], "lr": chosen["chosen_lr"]}


def table_rows(depth: int, quick: bool) -> list[tuple[str, str, dict]]:
    """(group, label, the settings it changes: lpi.configs keywords) for every row of the table.
    depth: the tiny CLIP's layers (J = depth prompts every layer)."""
    rows = [("method", m, {"method": m}) for m in ("zeroshot", "seqft", "sprompts", "l2p", "joint", "lpi")]
    # S-Prompts with the authors' recipe too: the protocol's choice for it is not the only fair one
    rows.insert(3, ("method", "sprompts (SGD 0.05)", {"method": "sprompts", "optimizer": "sgd", "lr": 0.05}))
    changes = dict(tune.SETTINGS, **{"routing oracle": {"routing": "oracle"}})
    # "alpha=0" at its own tuned lr; the alpha sweep's "alpha=0" point takes LPI's, as every sweep point
    rows += [("LPI ablation", label + " (own lr)" * (label == "alpha=0"), dict(changes[label], **tuned(label, quick)))
             for label in ABLATIONS]
    # our departures from the authors' code, one at a time, and LPI as it was before them
    rows += [("LPI departure", label, dict(changes[label], **tuned(label, quick))) for label in DEPARTURES]
    rows += [("LPI departure", "before the fixes", dict(BEFORE))]
    for group, symbol, name, values in SWEEPS:
        rows += [(group, f"{symbol}={v:g}", {name: v}) for v in values if name != "J" or v <= depth]
        if name == "M":  # S-Prompts at the same prompt length
            rows += [("S-Prompts length", f"M={v:g} (sprompts)", {"method": "sprompts", "M": v}) for v in values]
    if quick:  # a method without training, one with a pool, LPI, and a row sharing LPI's runs
        rows = [r for r in rows if r[1] in ("zeroshot", "l2p", "lpi", "R=4")]
    return rows


def resolved_settings(settings: dict) -> str:
    """Everything a run's results depend on, with the tiny-scale defaults filled in: rows
    with equal settings are the same experiment (tune.resolved, the seed left out)."""
    return tune.resolved({k: v for k, v in settings.items() if k != "seed"})


def run_metrics(res: dict) -> dict:
    s, r = res["summary"], res["routing_accuracy"][-1]
    out = {k: s[k] for k in METRICS[:5] + AUTHORS}
    out.update(routing_image=r["image"], routing_text=r["text"], wall_time_s=res["wall_time_s"],
               optimizer=res["config"]["optimizer"], lr=res["config"]["lr"])
    return out


def run_one(lpi, settings: dict, out: Path) -> dict:
    """One lpi.run in this process (stdout/stderr to out.log); reuse or resume a previous one
    in `out`. The tiny CLIP is read once per process (lpi's backbone loader keeps it)."""
    res_path = out / "results.json"
    if res_path.is_file():
        res = json.loads(res_path.read_text())
        if "zeroshot" in res:  # written only at the end of a finished run
            return res
    s, cfg = lpi.configs(**settings, out=str(out), resume=lpi.latest_checkpoint(out) is not None)
    out.mkdir(parents=True, exist_ok=True)
    with open(out.with_suffix(".log"), "a") as log, contextlib.redirect_stdout(log), contextlib.redirect_stderr(log):
        try:
            return lpi.run(s, cfg)
        except lpi.LPIError as e:
            raise SystemExit(f"a run with {settings} failed ({e}); see {out.with_suffix('.log')}") from None


def job(spec: tuple[dict, str, int | None]) -> tuple:
    """One run (in this process or a pool worker): (settings, out, results, wall s, cpu s)."""
    import torch
    import lpi

    settings, out, threads = spec
    if threads:
        torch.set_num_threads(threads)
    t0, c0 = time.time(), time.process_time()
    res = run_one(lpi, settings, Path(out))
    return settings, out, res, time.time() - t0, time.process_time() - c0


# Student's t, 97.5% quantile, by degrees of freedom: the half-width of a 95% interval of a
# mean of n paired differences is T975[n - 1] * sd / sqrt(n).
T975 = {1: 12.706, 2: 4.303, 3: 3.182, 4: 2.776, 5: 2.571, 6: 2.447, 7: 2.365, 8: 2.306, 9: 2.262, 10: 2.228}


def paired(a: dict[int, float], b: dict[int, float]) -> dict:
    """a - b at each seed both have ({seed: value}): the mean difference, its 95% interval
    (paired t) and whether the interval excludes 0 ("beyond noise")."""
    seeds = sorted(a.keys() & b.keys())
    d = [a[s] - b[s] for s in seeds]
    mean = statistics.fmean(d)
    if len(d) < 2:                       # one seed: no interval (None, not nan: evidence.json stays JSON)
        return dict(seeds=seeds, diffs=d, mean=mean, low=None, high=None, beyond_noise=False)
    half = T975.get(len(d) - 1, 1.96) * statistics.stdev(d) / math.sqrt(len(d))
    return dict(seeds=seeds, diffs=d, mean=mean, low=mean - half, high=mean + half, beyond_noise=abs(mean) > half)


def paired_cell(p: dict | None) -> str:
    if p is None:
        return "—"
    if len(p["diffs"]) < 2:
        return f"{p['mean']:+.1f} (one seed)"
    return f"{p['mean']:+.1f} [{p['low']:+.1f}, {p['high']:+.1f}]" + (" *" if p["beyond_noise"] else "")


def mean_std(values: list[float]) -> tuple[float, float]:
    return statistics.fmean(values), (statistics.stdev(values) if len(values) > 1 else 0.0)


def cell(mean: float, std: float) -> str:
    return f"{mean:.1f} ± {std:.1f}"


def parameter_table(lpi, tasks: int = 12) -> tuple[list[dict], str]:
    """LPI vs S-Prompts (J = 1, as the authors ran it) vs full-rank prompts at LPI's depth vs
    L2P, at ViT-B/16 scale (D_v=768, D_t=512, E=512, J=9, M=16, R=4)."""
    cfg = lpi.LPIConfig(J=9, M=16, R=4)
    full = lpi.LPIConfig(J=9, M=16, R=4, low_rank=False, interaction=False)
    rows = []
    for m, name, c in (("lpi", "LPI", cfg), ("sprompts", "S-Prompts (J=1)", cfg), ("lpi", "full rank (J=9)", full),
                       ("l2p", "L2P", cfg)):
        p = lpi.method_parameters(m, c, 768, 512, 512, tasks=tasks)
        rows.append(dict(method=name, **p))
    sp = rows[1]
    lines = [f"## Trainable parameters at ViT-B/16 scale (D_v=768, D_t=512, E=512, J=9, M=16, R=4, "
             f"R'=4; L2P: N={lpi.L2PConfig.pool_size}, top-k={lpi.L2PConfig.top_k}, "
             f"M_p={max(1, 16 // lpi.L2PConfig.top_k)})", "",
             "Counted by `lpi.method_parameters` on the real modules. *Per task*: trained at each task "
             "(L2P trains its whole pool, keys and text prompts at every task). *After T tasks*: stored "
             "(per-task sets for LPI and S-Prompts, one pool for L2P). The k-means routing keys "
             "(not trained: 2 x 5 x 512 = 5,120 per task for LPI and S-Prompts) are not counted.", "",
             f"| method | prompts | interaction | keys | per task | after {tasks} tasks | after {tasks} vs S-Prompts |",
             "|---|---:|---:|---:|---:|---:|---:|"]
    for r in rows:
        lines.append(f"| {r['method']} | {r['prompts']:,} | {r['interaction']:,} | {r['keys']:,} | {r['total']:,} | "
                     f"{r['after_tasks']:,} | {100 * r['after_tasks'] / sp['after_tasks']:.1f}% |")
    return rows, "\n".join(lines)


def plot_matrices(work: Path, slug_of: dict, rows: list, fixed: dict, seeds: list, path: Path) -> None:
    """The R@1 matrices (mean of i2t and t2i, averaged over seeds) of LPI, seqft and S-Prompts
    side by side: where a shared prompt forgets and per-task prompts do not."""
    from matplotlib.figure import Figure

    panels = []
    for label in ("lpi", "seqft", "sprompts"):
        changes = next((c for _, lb, c in rows if lb == label), None)
        if changes is None:
            continue
        mats = []
        for s in seeds:
            res = json.loads((work / slug_of[resolved_settings({**fixed, **changes})] / f"seed{s}" / "results.json").read_text())
            r1 = [res["recall"][d]["R@1"] for d in ("i2t", "t2i")]
            mats.append([[None if a is None else (a + b) / 2 for a, b in zip(ra, rb)] for ra, rb in zip(*r1)])
        mean = [[None if row[k] is None else statistics.fmean(m[t][k] for m in mats) for k, _ in enumerate(row)]
                for t, row in enumerate(mats[0])]
        panels.append((label, mean, res["tasks"]))
    if not panels:
        return
    T = len(panels[0][2])
    fig = Figure(figsize=(3.2 * len(panels) + 1, 3.4))
    axes = fig.subplots(1, len(panels), squeeze=False)[0]
    top = max(v for _, m, _ in panels for row in m for v in row if v is not None)
    for ax, (label, m, names) in zip(axes, panels):
        grid = [[float("nan") if v is None else v for v in row] for row in m]
        im = ax.imshow(grid, vmin=0, vmax=top, cmap="viridis")
        for t in range(T):
            for k in range(T):
                if m[t][k] is not None:
                    ax.text(k, t, f"{m[t][k]:.0f}", ha="center", va="center", fontsize=7,
                            color="white" if m[t][k] < 0.6 * top else "black")
        ax.set_xticks(range(T), names, rotation=60, ha="right", fontsize=7)
        ax.set_yticks(range(T), [f"after {t + 1}" for t in range(T)], fontsize=7)
        ax.set_title(f"{label}: R@1 (%), mean of i2t and t2i", fontsize=8)
    fig.colorbar(im, ax=list(axes), shrink=0.8)
    fig.savefig(path, dpi=110, bbox_inches="tight")


def parse_args(argv):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--quick", action="store_true", help="tiny sizes, one seed, a few rows: a smoke test of the script")
    p.add_argument("--seeds", type=int, default=None, help="seeds 0..n-1 (default 5; 1 with --quick)")
    p.add_argument("--max-train-per-task", type=int, default=None,
                   help=f"training images per task (default {DEFAULT_SIZE['max_train_per_task']})")
    p.add_argument("--max-test-per-task", type=int, default=None,
                   help=f"test images per task (default {DEFAULT_SIZE['max_test_per_task']})")
    p.add_argument("--epochs", type=int, default=None, help="epochs per task (default: lpi.py's for the tiny CLIP)")
    p.add_argument("--batch-size", type=int, default=None, help="default: lpi.py's for the tiny CLIP")
    p.add_argument("--tasks", default=None, help="built-in tasks (default: all of them, lpi.py's default)")
    p.add_argument("--pretrain-steps", type=int, default=None, help="tiny CLIP pre-training (default: lpi.py's)")
    p.add_argument("--cache-dir", default=os.environ.get("LPI_CACHE", str(Path.home() / ".cache" / "lpi")))
    p.add_argument("--out-dir", default=None,
                   help="where evidence.md / .json go (default benchmarks/results; runs/evidence_quick with --quick)")
    p.add_argument("--work-dir", default=None, help="one folder per run (default runs/evidence[_quick])")
    p.add_argument("--jobs", type=int, default=None,
                   help="runs in parallel, each in its own process with one torch thread (default: 2, as many as "
                        "the 2 cores the default size is made for; 1 with --quick)")
    p.add_argument("--threads", type=int, default=None,
                   help="torch threads per run (default: 1 with --jobs > 1, else torch's own choice)")
    p.add_argument("--rows", default=None, help="only rows whose label contains one of these comma-separated words")
    return p.parse_args(argv)


def sizes_and_settings(a, lpi) -> tuple[dict, dict]:
    """The sizes of the runs (quick or default, overridden by the command line) and the
    settings every run shares."""
    size = dict(QUICK_SIZE if a.quick else DEFAULT_SIZE)
    for k in ("max_train_per_task", "max_test_per_task", "epochs", "batch_size", "tasks", "pretrain_steps"):
        if getattr(a, k) is not None:
            size[k] = getattr(a, k)
    size.setdefault("pretrain_steps", lpi.world.PRETRAIN_DEFAULTS["steps"])
    return size, dict(size, cache_dir=a.cache_dir, progress=False, workers=0)


def distinct_settings(rows: list, fixed: dict) -> tuple[dict, list]:
    """Rows -> {settings: run folder name} and the distinct (settings, row's changes) to run."""
    slug_of, distinct = {}, []
    for group, label, changes in rows:
        key = resolved_settings({**fixed, **changes})
        if key not in slug_of:
            # the folder names the settings: other sizes or defaults never reuse a stale run
            name = "".join(c for c in label.replace(" ", "_") if c.isalnum() or c in "_-")
            slug_of[key] = f"{name}_{hashlib.sha256(key.encode()).hexdigest()[:8]}"
            distinct.append((key, changes))
    return slug_of, distinct


def run_all(jobs: list, n_jobs: int) -> dict[str, list[dict]]:
    """Every run, n_jobs at a time; -> {settings: [one dict of metrics per seed]}."""
    runs: dict[str, list[dict]] = {}
    t_runs = time.time()
    if n_jobs == 1:
        done = (job(j) for j in jobs)
    else:  # separate processes (spawned: a clean torch each), one torch thread apiece
        pool = concurrent.futures.ProcessPoolExecutor(n_jobs, mp_context=multiprocessing.get_context("spawn"))
        done = (f.result() for f in concurrent.futures.as_completed([pool.submit(job, j) for j in jobs]))
    for i, (settings, out, res, wall, cpu) in enumerate(done, 1):
        runs.setdefault(resolved_settings(settings), []).append(dict(
            seed=settings["seed"], run_time_s=wall, cpu_time_s=cpu, trainable_params=res["trainable_params_per_task"],
            **run_metrics(res)))
        elapsed = time.time() - t_runs
        print(f"[{i}/{len(jobs)}] {Path(out).parent.name} seed {settings['seed']}: {wall:.0f}s (cpu {cpu:.0f}s) "
              f"(elapsed {elapsed / 60:.1f} min, ETA {elapsed / i * (len(jobs) - i) / 60:.1f} min)", flush=True)
    if n_jobs > 1:
        pool.shutdown()
    for rs in runs.values():
        rs.sort(key=lambda r: r["seed"])
    return runs


def table(rows: list, runs: dict, fixed: dict) -> list[dict]:
    """One dict per row: its runs, their mean and std per metric, the row whose runs it shares,
    and its mean recall's paired difference with LPI's (same seeds)."""
    out = []
    for group, label, changes in rows:
        key = resolved_settings({**fixed, **changes})
        rs, method = runs[key], changes.get("method", "lpi")
        stats = {m: mean_std([r[m] for r in rs]) for m in METRICS + AUTHORS}
        shared_with = next(lb for _, lb, c in rows if resolved_settings({**fixed, **c}) == key)
        out.append(dict(group=group, label=label, settings=changes, method=method,
                        same_runs_as=None if shared_with == label else shared_with,
                        routed=method in ROUTED, trainable_params=rs[0]["trainable_params"],
                        mean={m: v[0] for m, v in stats.items()}, std={m: v[1] for m, v in stats.items()}, runs=rs))
    ref = next((r for r in out if r["label"] == "lpi"), None)
    by_seed = lambda r: {x["seed"]: x["mean_recall"] for x in r["runs"]}  # noqa: E731
    for r in out:
        r["vs_lpi"] = None if ref is None or r is ref or r["same_runs_as"] == "lpi" else paired(by_seed(r), by_seed(ref))
    return out


def budget_table(rows: list, seeds: list, fixed: dict, work: Path, n_jobs: int, threads: int | None) -> list[dict]:
    """The BUDGET rows at every training image of each task (lpi.py's default), paired with
    LPI's runs at that budget; their runs go under work/budget."""
    fixed = dict(fixed, max_train_per_task=None)
    chosen = [r for r in rows if r[1] in BUDGET]
    slug_of, distinct = distinct_settings(chosen, fixed)
    jobs = [({**fixed, **changes, "seed": s}, str(work / "budget" / slug_of[key] / f"seed{s}"), threads)
            for key, changes in distinct for s in seeds]
    print(f"at lpi.py's budget (every training image): {len(jobs)} runs", flush=True)
    return table(chosen, run_all(jobs, n_jobs), fixed)


def budget_markdown(budget: list[dict]) -> str:
    lines = ["## LPI against S-Prompts at lpi.py's budget", "",
             "The same seeds and settings as the table, with every training image of each task (1,000, as "
             "`python lpi.py`) instead of 400. vs LPI as in the table.", "",
             "| row | optimiser, lr | mean recall | vs LPI [95%] | per seed |", "|---|---|---:|---|---|"]
    for r in budget:
        lines.append(f"| {r['label']} | {r['runs'][0]['optimizer']} {r['runs'][0]['lr']:g} | "
                     f"{cell(r['mean']['mean_recall'], r['std']['mean_recall'])} | {paired_cell(r['vs_lpi'])} | "
                     + ", ".join(f"{x['mean_recall']:.1f}" for x in r["runs"]) + " |")
    return "\n".join(lines)


def readme_block(evidence: dict) -> str:
    """The tables README.md quotes from evidence.json (its "Results on the built-in benchmark"):
    a test keeps the two equal, so the README cannot go stale when the evidence is re-measured."""
    vit = {p["label"]: p["vitb16"] for p in evidence["rows_vitb16"]}

    def line(r):
        p = r.get("vs_lpi")
        vs = "—" if p is None else paired_cell(p).replace(" *", " **beyond noise**")
        return (f"| {r['label']} | {cell(r['mean']['mean_recall'], r['std']['mean_recall'])} | {vs} | "
                f"{r['trainable_params']['total']:,} | {vit.get(r['label'], 0):,} |")   # zero-shot trains nothing

    head = "| {} | mean recall | vs LPI, paired [95%] | params / task | at ViT-B/16 |"
    rows, rule = evidence["rows"], "|---|---:|---|---:|---:|"
    out = [head.format("row"), rule]
    out += [line(r) for r in rows if r["group"] in ("method", "LPI ablation", "LPI departure")]
    out += ["", head.format("sweep point"), rule]
    out += [line(r) for r in rows if r["group"] in SWEEP_GROUPS + ("LPI alpha",) and not r["same_runs_as"]]
    if evidence.get("budget"):
        out += ["", "At lpi.py's budget (every training image of each task):", "", head.format("row"), rule]
        out += [line(r) for r in evidence["budget"]]
    if evidence.get("experiments"):
        out += ["", "| experiment | measured | with the loss | without it | with − without [95%] |", "|---|---|---:|---:|---|"]
        for name, e in evidence["experiments"].items():
            w, wo = ([v for _, v in sorted(e["arms"][arm].items())] for arm in ("with", "without"))
            out.append(f"| {name} | {e['measure']} | {cell(*mean_std(w))} | {cell(*mean_std(wo))} | {paired_cell(e['paired'])} |")
    return "\n".join(out)


def vitb16_parameters(lpi, rows: list) -> list[dict]:
    """Each trained row's trainable parameters per task at ViT-B/16 scale (D_v=768, D_t=512,
    E=512), with the paper's J=9, M=16 where the row does not set them."""
    out = []
    for r in rows:
        if r["method"] == "zeroshot":
            continue
        run, cfg = lpi.configs(**{k: v for k, v in r["settings"].items() if k not in ("optimizer", "lr")})
        cfg = lpi.dataclasses.replace(cfg, J=cfg.J if cfg.J is not None else 9, M=cfg.M if cfg.M is not None else 16)
        p = lpi.method_parameters(run.method, cfg, 768, 512, 512)
        out.append(dict(label=r["label"], tiny=r["trainable_params"]["total"], vitb16=p["total"]))
    return out


def plot_recall_vs_params(out_rows: list, path: Path) -> None:
    """Mean recall (± std over seeds) against trainable parameters per task (log scale). Left:
    the methods and the ablations that change the count; right: each sweep as a line through
    its points (alpha changes no count: it is in the table). Zero-shot as a dashed line."""
    from matplotlib.figure import Figure

    fig = Figure(figsize=(13, 5.2))
    axes = fig.subplots(1, 2, sharey=True)
    x = lambda r: r["trainable_params"]["total"]  # noqa: E731
    lpi_row = next((r for r in out_rows if r["label"] == "lpi"), None)
    left = [r for r in out_rows if r["group"] == "method" and r["method"] != "zeroshot"]
    left += [r for r in out_rows if r["label"] in ("full-rank", "no-interaction")]
    notes = []
    for r in left:
        axes[0].errorbar(x(r), r["mean"]["mean_recall"], yerr=r["std"]["mean_recall"], fmt="*" if r is lpi_row else "o",
                         ms=10 if r is lpi_row else 5, capsize=2, color="black" if r is lpi_row else "C0")
        notes.append((0, x(r), r["mean"]["mean_recall"], r["label"]))
    for i, group in enumerate(g for g in dict.fromkeys(r["group"] for r in out_rows) if g in SWEEP_GROUPS):
        rs = [r for r in out_rows if r["group"] == group]
        axes[1].errorbar([x(r) for r in rs], [r["mean"]["mean_recall"] for r in rs], yerr=[r["std"]["mean_recall"] for r in rs],
                         fmt="-o", ms=4, capsize=2, lw=1, color=f"C{i}", label=group, alpha=0.85)
        notes += [(1, x(r), r["mean"]["mean_recall"], r["label"]) for r in rs if not r["same_runs_as"]]
    if lpi_row:
        axes[1].plot(x(lpi_row), lpi_row["mean"]["mean_recall"], "*", ms=12, color="black", zorder=5,
                     label="LPI's defaults (R=4, J=4, M=4, R'=4)")
    for ax_i, ax in enumerate(axes):
        annotate_merged(ax, [(xi, yi, lb) for a, xi, yi, lb in notes if a == ax_i])
    zs = next((r for r in out_rows if r["method"] == "zeroshot"), None)
    for ax in axes:
        if zs:
            ax.axhline(zs["mean"]["mean_recall"], ls="--", c="grey", lw=1, label="zero-shot (0 parameters)")
        ax.set_xscale("log")
        ax.set_xlabel("trainable parameters per task (log scale)")
    axes[0].set_ylabel("mean recall after the last task (%), mean ± std over seeds")
    axes[0].set_title("methods, and the ablations that change the count", fontsize=10)
    axes[1].set_title("the sweeps (alpha changes no count: see the table)", fontsize=10)
    axes[0].legend(handles=axes[0].get_lines()[-1:], fontsize=7, loc="lower right")
    axes[1].legend(fontsize=7, loc="lower right")
    fig.savefig(path, dpi=110, bbox_inches="tight")



def annotate_merged(ax, points: list) -> None:
    """Label points (x, y, label); points closer than a few percent in x and 0.6 in y share
    one label, so that no two labels overlap."""
    groups: list[list] = []
    for xi, yi, lb in sorted(points, key=lambda p: (p[1], p[0])):
        near = next((g for g in groups if abs(math.log(xi / g[0][0])) < 0.06 and abs(yi - g[-1][1]) < 0.6), None)
        if near:
            near.append((xi, yi, lb))
        else:
            groups.append([(xi, yi, lb)])
    for g in groups:
        ax.annotate(", ".join(dict.fromkeys(lb for _, _, lb in g)), (g[0][0], statistics.fmean(p[1] for p in g)),
                    textcoords="offset points", xytext=(5, -3), fontsize=7)


def markdown(out_rows: list, size: dict, seeds: list, a, n_jobs: int, minutes: float, lpi) -> str:
    import torch

    tasks = size.get("tasks", ",".join(lpi.BUILTIN_TASKS))
    own = [r for r in out_rows if not r["same_runs_as"]]
    lines = ["# Evidence: methods, ablations and sweeps on the built-in tasks", "",
             f"Tiny CLIP ({size['pretrain_steps']} pre-training steps), built-in tasks {tasks} "
             f"({len(tasks.split(','))} tasks), {size['max_train_per_task']} training / "
             f"{size['max_test_per_task']} test images per task, "
             f"{size.get('epochs', lpi.TINY_DEFAULTS['epochs'])} epoch(s) per task, "
             f"batch {size.get('batch_size', lpi.TINY_DEFAULTS['batch_size'])}, other settings lpi.py's defaults "
             f"(J={lpi.TINY_DEFAULTS['J']}, M={lpi.TINY_DEFAULTS['M']}, R={lpi.LPIConfig.R}); each method's and each "
             f"ablation's optimiser and lr as the tuning protocol chose them (benchmarks/tune.py, "
             f"benchmarks/results/tuning.md; the sweeps take LPI's, S-Prompts' length sweep S-Prompts'). "
             f"Mean ± std over seeds {seeds} (training order, subsampling and initialisation; the data and the "
             f"backbone are fixed). Made by `python benchmarks/evidence.py{' --quick' if a.quick else ''}` on "
             f"{platform.processor() or platform.machine()} ({os.cpu_count()} cores), {n_jobs} parallel run(s) of "
             f"{torch.get_num_threads()} torch thread(s), in {minutes:.1f} min (runs finished earlier with the same "
             f"settings are reused; the continual loops of all {sum(len(r['runs']) for r in own)} runs took "
             f"{sum(x['wall_time_s'] for r in own for x in r['runs']) / 60:.0f} min in all).", "",
             "R@1: final average over tasks, pool = all tasks' test items. Forgetting: of R@1, averaged over "
             "tasks 1..T-1. Routing: accuracy of the k-means task routing (mean of images and captions) after "
             "the last task, only for the methods that route. Params: trainable per task (L2P: its whole pool, "
             "trained at every task). Wall time: the continual loop's, per run.", "",
             "vs LPI: the row's mean recall minus LPI's at the same seed, mean and 95% interval (paired t over "
             "the seeds); * marks a difference whose interval excludes 0 (beyond the seeds' noise).", "",
             "| group | row | optimiser, lr | i2t R@1 | t2i R@1 | mean recall | vs LPI [95%] | forgetting i2t | "
             "forgetting t2i | routing | params / task | wall time (s) |",
             "|---|---|---|---:|---:|---:|---|---:|---:|---:|---:|---:|"]
    for r in out_rows:
        routing = "—"
        if r["routed"]:
            routing = cell(*mean_std([(x["routing_image"] + x["routing_text"]) / 2 for x in r["runs"]]))
        label = r["label"] + (f" (= {r['same_runs_as']})" if r["same_runs_as"] else "")
        cells = [cell(r["mean"][m], r["std"][m]) for m in METRICS[:3]] + [paired_cell(r.get("vs_lpi"))]
        cells += [cell(r["mean"][m], r["std"][m]) for m in METRICS[3:5]]
        cells += [routing, f"{r['trainable_params']['total']:,}", cell(r["mean"]["wall_time_s"], r["std"]["wall_time_s"])]
        opt = "—" if r["method"] == "zeroshot" else f"{r['runs'][0]['optimizer']} {r['runs'][0]['lr']:g}"
        lines.append(f"| {r['group']} | {label} | {opt} | " + " | ".join(cells) + " |")
    lines += ["", "## The authors' metrics", "",
              "As the authors' results script computes them, from the same runs. Average: for each task the mean of "
              "its R@1 over every evaluation from the one right after it was learned to the last, then the mean over "
              "tasks. Forgetting: for each task its final R@1 minus its best earlier one, summed over tasks and divided "
              "by T - 1 (their sign: <= 0 unless a task improved later). evidence.json holds R@5 and R@10 too.", "",
              "| row | Average i2t R@1 | Average t2i R@1 | forgetting i2t R@1 | forgetting t2i R@1 |", "|---|---:|---:|---:|---:|"]
    for r in out_rows:
        if not r["same_runs_as"]:
            lines.append(f"| {r['label']} | " + " | ".join(cell(r["mean"][m], r["std"][m]) for m in METRICS[8:]) + " |")
    return "\n".join(lines)


def experiments_markdown(exps: dict) -> str:
    lines = ["## Where the losses should help (benchmarks/loss_regimes.py)", "",
             "Each regime was written down before its runs (loss_regimes.py's docstring). Paired by seed: the arm "
             "with the loss minus the arm without it; * marks an interval that excludes 0.", "",
             "| experiment | regime | measured | with the loss | without it | with - without [95%] |", "|---|---|---|---:|---:|---|"]
    for name, e in exps.items():
        w, wo = ([v for _, v in sorted(e["arms"][arm].items())] for arm in ("with", "without"))
        lines.append(f"| {name} | {e['regime']} | {e['measure']} | {cell(*mean_std(w))} | {cell(*mean_std(wo))} | "
                     f"{paired_cell(e['paired'])} |")
    return "\n".join(lines)


def vitb16_markdown(params: list[dict]) -> str:
    lines = ["## Every row's parameters per task at ViT-B/16 scale", "",
             "The same settings on ViT-B/16 (D_v = 768, D_t = 512, E = 512; J = 9, M = 16 where a row does not set "
             "them), counted by `lpi.method_parameters`: the counterpart of recall_vs_params.png's x axis.", "",
             "| row | tiny CLIP | ViT-B/16 |", "|---|---:|---:|"]
    lines += [f"| {p['label']} | {p['tiny']:,} | {p['vitb16']:,} |" for p in params]
    return "\n".join(lines)


def run_experiments(seeds: list, work: Path, fixed: dict, n_jobs: int, threads: int | None) -> dict:
    """loss_regimes.EXPERIMENTS over the seeds: each arm's measured value per seed and the
    paired difference with - without."""
    specs = loss_regimes.jobs(seeds, work, fixed)
    pool = concurrent.futures.ProcessPoolExecutor(n_jobs, mp_context=multiprocessing.get_context("spawn"))
    values: dict = {}
    run_time: dict = {}
    for f in concurrent.futures.as_completed([pool.submit(experiment_job, (spec, threads)) for spec in specs]):
        name, arm, seed, value, res = f.result()
        values.setdefault(name, {}).setdefault(arm, {})[seed] = value
        run_time[name] = run_time.get(name, 0.0) + res["wall_time_s"]
        print(f"experiment {name}, {arm}, seed {seed}: {value:.1f}", flush=True)
    pool.shutdown()
    out = {}
    for name, arms in values.items():
        e = loss_regimes.EXPERIMENTS[name]
        out[name] = dict(regime=e["regime"], measure=e["measure"], settings=e["arms"], arms=arms,
                         paired=paired(arms["with"], arms["without"]), run_time_s=run_time[name])
    return out


def n_runs(out_rows: list, budget: list, exps: dict) -> int:
    return (sum(len(r["runs"]) for r in out_rows + budget if not r["same_runs_as"])
            + sum(len(arm) for e in exps.values() for arm in e["arms"].values()))


def experiment_job(spec_threads: tuple) -> tuple:
    import torch

    spec, threads = spec_threads
    if threads:
        torch.set_num_threads(threads)
    return loss_regimes.run(spec)


def make_table(**options) -> dict:
    """The whole table (options: the command line's, as keywords: quick=True, seeds=3,
    out_dir=..., work_dir=..., jobs=...); writes evidence.md / .json and recall_matrices.png
    and returns evidence.json's dict."""
    a = parse_args([])
    unknown = set(options) - set(vars(a))
    if unknown:
        raise TypeError(f"unknown option(s): {', '.join(sorted(unknown))}")
    vars(a).update(options)
    return build(a)


def main(argv=None) -> int:
    build(parse_args(argv))
    return 0


def build(a) -> dict:
    import torch
    import lpi
    import clip_model

    n_jobs = a.jobs or (1 if a.quick else 2)
    threads = a.threads or (1 if n_jobs > 1 else None)
    if threads:
        torch.set_num_threads(threads)
    size, fixed = sizes_and_settings(a, lpi)
    seeds = list(range(a.seeds if a.seeds is not None else (1 if a.quick else 5)))
    out_dir = Path(a.out_dir or (ROOT / ("runs/evidence_quick" if a.quick else "benchmarks/results")))
    work = Path(a.work_dir or (ROOT / ("runs/evidence_quick" if a.quick else "runs/evidence")))
    t_start = time.time()
    print(f"tiny CLIP ({size['pretrain_steps']} pre-training steps) from {a.cache_dir} ...", flush=True)
    lpi.world.load_or_build_tiny_clip(a.cache_dir, steps=size["pretrain_steps"], progress=True)  # once, before the runs
    rows = table_rows(min(clip_model.TINY.vision_layers, clip_model.TINY.transformer_layers), a.quick)
    if a.rows:
        rows = [r for r in rows if any(w in r[1] for w in a.rows.split(","))]
    slug_of, distinct = distinct_settings(rows, fixed)
    jobs = [({**fixed, **changes, "seed": s}, str(work / slug_of[key] / f"seed{s}"), threads)
            for key, changes in distinct for s in seeds]
    print(f"{len(rows)} rows, {len(distinct)} distinct settings x {len(seeds)} seed(s) = {len(jobs)} runs; "
          f"sizes {size}; {n_jobs} parallel job(s), torch threads {threads or torch.get_num_threads()} each", flush=True)
    out_rows = table(rows, run_all(jobs, n_jobs), fixed)
    exps = {} if a.quick or a.rows else run_experiments(seeds, work / "loss_regimes", fixed, n_jobs, threads)
    budget = [] if a.quick or a.rows else budget_table(rows, seeds, fixed, work, n_jobs, threads)
    params, ptable = parameter_table(lpi)
    vit = vitb16_parameters(lpi, [r for r in out_rows if not r["same_runs_as"]])
    # every run's own continual loop (one torch thread each), whether it ran now or was reused
    compute = (sum(x["wall_time_s"] for r in out_rows + budget if not r["same_runs_as"] for x in r["runs"])
               + sum(e["run_time_s"] for e in exps.values()))
    md = "\n\n".join([markdown(out_rows, size, seeds, a, n_jobs, (time.time() - t_start) / 60, lpi)]
                     + ([experiments_markdown(exps)] if exps else []) + ([budget_markdown(budget)] if budget else [])
                     + [vitb16_markdown(vit), ptable]
                     + [f"All {n_runs(out_rows, budget, exps)} runs of this page, each one process of one torch "
                        f"thread, took {compute / 3600:.1f} h of compute in all (added up, whether run now or reused)."]) + "\n"
    total = time.time() - t_start
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "evidence.md").write_text(md)
    evidence = dict(settings=dict(size, seeds=seeds, quick=a.quick, jobs=n_jobs, torch_threads=torch.get_num_threads(),
                                  machine=platform.platform(), shared_settings=fixed),
                    rows=out_rows, experiments=exps, budget=budget, parameters_vitb16=params, rows_vitb16=vit, total_time_s=total,
                    compute_time_s=compute)
    (out_dir / "evidence.json").write_text(json.dumps(evidence, indent=2))
    plot_matrices(work, slug_of, rows, fixed, seeds, out_dir / "recall_matrices.png")
    plot_recall_vs_params(out_rows, out_dir / "recall_vs_params.png")
    print(md)
    print(f"wrote {out_dir / 'evidence.md'}, {out_dir / 'evidence.json'}, {out_dir / 'recall_matrices.png'} and "
          f"{out_dir / 'recall_vs_params.png'} "
          f"in {total / 60:.1f} min")
    return evidence


if __name__ == "__main__":
    sys.exit(main())
