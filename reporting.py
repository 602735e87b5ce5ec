"""Reporting for lpi.py: what a run logs of its training (prompt scale, each loss term's
gradient norm), the table printed at the end of a run, the heat-map of the R@1 matrix and the
picture of retrievals. Reads results.json's dict, the evaluation's pools and a model's
prompts; knows nothing else of the method."""
from __future__ import annotations

import math
from pathlib import Path

import torch

from run_support import atomic_write


def prompt_scale(model) -> dict[str, float]:
    """The std of the current task's raw prompts (before interaction) at layer 0 and at the
    deeper layers, per modality: what the hierarchical losses could inflate. {} for L2P."""
    if not getattr(model, "task_prompts", None):
        return {}
    P_v, P_t = model.task_prompts[-1].raw()                       # (J, M, D_v), (J, M, D_t)
    out = {"P_v[0]": P_v[0].std().item(), "P_t[0]": P_t[0].std().item()}
    if P_v.shape[0] > 1:
        out.update({"P_v[1:]": P_v[1:].std().item(), "P_t[1:]": P_t[1:].std().item()})
    return {k: round(v, 6) for k, v in out.items()}


def grad_norms(losses: dict[str, torch.Tensor], weights: dict[str, float],
               params: list[torch.Tensor]) -> dict[str, float]:
    """|d term / d params| for every loss term (weighted as it enters the total), over the
    trained parameters: which term drives the step. Costs one backward pass per term."""
    out = {}
    for name in (k for k in losses if k != "total"):
        g = torch.autograd.grad(weights[name] * losses[name], params, retain_graph=True, allow_unused=True)
        out[name] = round(math.sqrt(sum(float((x.float() ** 2).sum()) for x in g if x is not None)), 8)
    return out


def format_parameter_comparison(comparison: dict[str, dict[str, int]]) -> str:
    """One line: LPI's per-task parameters against the full-rank ones, as ratios."""
    lpi = comparison["LPI"]
    parts = [f"LPI {lpi['total']:,} (prompts {lpi['prompts']:,} + interaction {lpi['interaction']:,})"]
    for name, c in comparison.items():
        if name != "LPI":
            parts.append(f"{name} {c['total']:,} (LPI is {lpi['total'] / c['total']:.2f}x)")
    return "parameters per task: " + "; ".join(parts)


def format_table(results: dict, routed: bool) -> str:
    """Final recall per task (the method and zero-shot CLIP on the same pool) and the averages.
    routed: the method chose each query's prompts by routing (its accuracy is then reported)."""
    names, rec, zs = results["tasks"], results["recall"], results.get("zeroshot")
    method = results["config"].get("method", "lpi")
    cols = [(d, K) for d in ("i2t", "t2i") for K in ("R@1", "R@5", "R@10")]
    row = lambda name, who, vals: f"{name:<22}{who:<10}" + "".join(f"{v:>10.1f}" for v in vals)  # noqa: E731
    lines = [f"{'task':<22}{'method':<10}" + "".join(f"{d} {K:<6}" for d, K in cols)]
    for k, name in enumerate(names):
        lines.append(row(name, method, [rec[d][K][-1][k] for d, K in cols]))
        lines += [row("", "zeroshot", [zs["recall"][d][K][k] for d, K in cols])] if zs else []
    s = results["summary"]
    lines.append("-" * len(lines[0]))
    lines.append(row("average", method, [s[f"{d}_{K}"] for d, K in cols]))
    lines += [row("", "zeroshot", [zs["summary"][f"{d}_{K}"] for d, K in cols])] if zs else []
    if "authors_average_i2t_R@1" in s:  # the authors' results script's summaries, in their sign
        lines.append(row("authors' Average", method, [s[f"authors_average_{d}_{K}"] for d, K in cols]))
        lines.append(row("authors' forgetting", method, [s[f"authors_forgetting_{d}_{K}"] for d, K in cols]))
    lines.append(f"mean recall {s['mean_recall']:.1f}" + (f" (zero-shot {zs['summary']['mean_recall']:.1f})" if zs else "")
                 + f"; average forgetting of R@1: i2t {s['i2t_forgetting_R@1']:.1f}, t2i {s['t2i_forgetting_R@1']:.1f}")
    if "alone" in results:
        lines.append(format_pool_cost(results))
    if results["routing_accuracy"] and routed:
        r = results["routing_accuracy"][-1]
        lines.append(f"routing accuracy after the last task: images {r['image']:.1f}%, captions {r['text']:.1f}%")
    if results.get("skipped_images"):
        lines.append(f"skipped {results['skipped_images']} unreadable image(s) (missing or corrupt files)")
    p = results["trainable_params_per_task"]
    keys = f", keys {p['keys']:,}" if p.get("keys") else ""
    lines.append(f"trainable parameters per task: {p['total']:,} (prompts {p['prompts']:,}, "
                 f"interaction {p['interaction']:,}{keys}); wall time {results['wall_time_s']:.0f} s")
    if method == "lpi" and "parameter_comparison" in results:
        lines.append(format_parameter_comparison(results["parameter_comparison"]))
    return "\n".join(lines)


def format_pool_cost(results: dict) -> str:
    """One line: average R@1 with each task ranked against the pool of all seen tasks (the
    protocol) and against its own items alone, for the method and zero-shot CLIP."""
    def pair(summary, alone):
        return " / ".join(f"{summary[f'{d}_R@1']:.1f} pooled, {alone[f'{d}_R@1']:.1f} alone" for d in ("i2t", "t2i"))
    line = f"the pool: R@1 i2t / t2i {pair(results['summary'], results['alone']['summary'])}"
    zs = results.get("zeroshot")
    return line + (f" (zero-shot {pair(zs['summary'], zs['alone']['summary'])})" if zs and "alone" in zs else "")


def plot_recall(results: dict, path: Path) -> None:
    """Heat-maps of the R@1 matrices: row t = after training task t, column k = task k."""
    from matplotlib.figure import Figure  # no pyplot: never switches the caller's backend (notebooks)

    names = results["tasks"]
    T = len(names)
    fig = Figure(figsize=(4 + 1.6 * T, 1.5 + 0.7 * T))
    axes = fig.subplots(1, 2, squeeze=False)
    mats = {d: torch.tensor([[float("nan") if v is None else v for v in row] for row in results["recall"][d]["R@1"]])
            for d in ("i2t", "t2i")}
    top = max(1.0, max(float(m.nan_to_num(0).max()) for m in mats.values()))  # one colour scale for both
    for col, (ax, d) in enumerate(zip(axes[0], ("i2t", "t2i"))):
        m = mats[d]
        im = ax.imshow(m.numpy(), vmin=0, vmax=top, cmap="viridis")
        for i in range(T):
            for k in range(T):
                if not math.isnan(m[i, k]):
                    ax.text(k, i, f"{m[i, k]:.0f}", ha="center", va="center",
                            color="white" if m[i, k] < 0.6 * top else "black", fontsize=8)
        ax.set_xticks(range(T), names, rotation=45, ha="right")
        ax.set_yticks(range(T), [f"after {n}" for n in names] if col == 0 else [""] * T)
        ax.set_title(f"{d} R@1 (%)")
        ax.set_xlabel("task evaluated")
        if col == 0:
            ax.set_ylabel("evaluation after training on")
    fig.colorbar(im, ax=axes[0].tolist(), shrink=0.8, label="R@1 (%)")
    atomic_write(path, lambda p: fig.savefig(p, dpi=110, bbox_inches="tight", format="png"))


def plot_retrievals(tasks: list, pools: dict, path: Path, n_queries: int = 4, top: int = 5) -> None:
    """For caption queries from tasks spread over the sequence: the top images under each
    pool's encoders (zero-shot CLIP, and the method after the last task), the correct image
    framed in green, the task each caption was routed to named. Tensor images only."""
    from matplotlib.figure import Figure

    first = next(iter(pools.values()))
    top = min(top, len(first.img))                                        # a pool smaller than the row
    T = int(first.cap_task.max()) + 1
    picks = sorted({round(i * (T - 1) / max(1, n_queries - 1)) for i in range(n_queries)})
    queries = [int((first.cap_task == k).nonzero()[0]) for k in picks]      # each task's first caption
    rows = len(queries) * len(pools)
    fig = Figure(figsize=(1.1 * top + 1.6, 1.25 * rows + 0.3))
    axes = fig.subplots(rows, top, squeeze=False)
    fig.subplots_adjust(left=1.5 / (1.1 * top + 1.6), right=0.98, top=1 - 0.3 / (1.25 * rows + 0.3), bottom=0.01,
                        wspace=0.08, hspace=0.45)
    for qi, q in enumerate(queries):
        k = int(first.cap_task[q])
        for pi, (label, pool) in enumerate(pools.items()):
            row = axes[qi * len(pools) + pi]
            best = (pool.cap[q] @ pool.img.t()).topk(top).indices                 # (top,) pool images
            for ax, i in zip(row, best.tolist()):
                task, idx = tasks[int(pool.img_task[i])], int(pool.img_index[i])
                ax.imshow(task.test.images[idx].permute(1, 2, 0).numpy(), interpolation="nearest")
                ax.set_xticks([]), ax.set_yticks([])
                hit = i == int(pool.cap2img[q])
                for side in ax.spines.values():
                    side.set_color("limegreen" if hit else "lightgrey"), side.set_linewidth(5 if hit else 1)
            routed = f"\nrouted to {tasks[int(pool.cap_routed[q])].name}" if label != "zero-shot CLIP" else ""
            row[0].set_ylabel(label + routed, fontsize=7, rotation=0, ha="right", va="center")
        caption = tasks[k].test.captions[int(first.img_index[first.cap2img[q]])][0]
        axes[qi * len(pools)][0].set_title(f'{tasks[k].name}: "{caption}"', fontsize=8, loc="left")
    atomic_write(path, lambda p: fig.savefig(p, dpi=110, format="png"))
