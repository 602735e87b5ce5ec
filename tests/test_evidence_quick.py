"""benchmarks/evidence.py: its rows cover every method, ablation and sweep, rows with equal
settings share their runs (and only those), and the table is the runs' own numbers."""
import importlib.util
import json
import statistics
import sys
from pathlib import Path

import lpi

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))


def load_script(name: str):
    spec = importlib.util.spec_from_file_location(name, ROOT / "benchmarks" / f"{name}.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_evidence_quick_table_is_the_runs_numbers(tmp_path):
    evidence = load_script("evidence")  # with lpi.py's default (shipped) tiny CLIP: no pre-training
    out, work = tmp_path / "out", tmp_path / "work"
    res = evidence.make_table(quick=True, cache_dir=str(tmp_path / "cache"), out_dir=str(out), work_dir=str(work))
    assert res == json.loads((out / "evidence.json").read_text())
    md = (out / "evidence.md").read_text()
    rows = {r["label"]: r for r in res["rows"]}
    assert set(rows) == {"zeroshot", "l2p", "lpi", "R=4"}
    # each row's mean is the mean of what its runs wrote to their results.json
    finished = [json.loads(p.read_text()) for p in work.rglob("results.json")]
    assert len(finished) == 3                                  # R=4 ran no run of its own
    for r in res["rows"]:
        method = r["settings"].get("method", "lpi")
        mine = [f for f in finished if f["config"]["method"] == method]
        assert len(mine) == 1, r["label"]
        assert r["mean"]["mean_recall"] == statistics.fmean(f["summary"]["mean_recall"] for f in mine)
        assert r["runs"][0]["i2t_R@1"] == mine[0]["summary"]["i2t_R@1"]
        assert f"| {r['group']} | {r['label']}" in md
    assert rows["lpi"]["routed"] and not rows["l2p"]["routed"]
    # the real-scale parameter table, from the accounting function
    p = {r["method"]: r for r in res["parameters_vitb16"]}
    assert p["LPI"]["prompts"] == 5284 and p["S-Prompts (J=1)"]["after_tasks"] == 12 * 20480
    assert p["full rank (J=9)"]["total"] == 184320
    assert "ViT-B/16 scale" in md and "| L2P |" in md


def test_rows_share_runs_exactly_when_their_settings_resolve_alike():
    """R=4, J=4, M=4, alpha=0.1 and R'=4 are LPI's tiny-scale defaults: the same experiment as
    the lpi row. Every other row is a distinct experiment, and each changes what its label says."""
    evidence = load_script("evidence")
    rows = evidence.table_rows(depth=4, quick=False)
    fixed = dict(evidence.DEFAULT_SIZE, progress=False)
    slug_of, distinct = evidence.distinct_settings(rows, fixed)
    key = {label: evidence.resolved_settings({**fixed, **changes}) for _, label, changes in rows}
    assert key["R=4"] == key["J=4"] == key["M=4"] == key["alpha=0.1"] == key["R'=4"] == key["lpi"]
    assert len(set(key)) == len(rows)                               # no two rows share a label
    assert key["M=4 (sprompts)"] == key["sprompts"]                  # S-Prompts' M is 4 too
    # the alpha=0 ablation at its own tuned lr is the sweep's alpha=0 point when that lr is LPI's
    own = evidence.tuned("alpha=0")
    same = (own["optimizer"], own["lr"]) == (lpi.TUNED["lpi"]["optimizer"], lpi.TUNED["lpi"]["lr"][own["optimizer"]])
    assert (key["alpha=0 (own lr)"] == key["alpha=0"]) == same
    assert len(distinct) == len(set(key.values())) == len(rows) - 5 - 1 - same
    base = json.loads(key["lpi"])
    for label, want in (("full-rank", {"low_rank": False}), ("R=2", {"R": 2}), ("no-task-loss", {"task_loss": False}),
                        ("deep-prompts=replace", {"deep_prompts": "replace"}), ("routing oracle", {"routing": "oracle"})):
        differ = {k: v for k, v in json.loads(key[label]).items() if base[k] != v}
        assert want.items() <= differ.items() and set(differ) <= set(want) | {"optimizer", "lr"}, (label, differ)


def test_evidence_rows_cover_every_method_ablation_and_sweep():
    """Every method, every single-component ablation, and the sweeps: R in {1,2,4,8,16}, J in
    {1,2,3,4}, M in {1,2,4,8} (S-Prompts too), alpha in {0,0.1,0.3,0.5,1}, R' in {1,4,16}."""
    evidence = load_script("evidence")
    rows = evidence.table_rows(depth=4, quick=False)
    labels = [label for _, label, _ in rows]
    assert {"zeroshot", "seqft", "sprompts", "l2p", "joint", "lpi"} <= set(labels)
    assert {"full-rank", "no-interaction", "no-hier-prompt", "hier-factor", "no-task-loss",
            "routing oracle", "alpha=0 (own lr)", "no-interaction-ln"} <= set(labels)
    assert {"deep-prompts=replace", "hier-unscaled", "interaction-gain=1", "before the fixes"} <= set(labels)
    assert [l for l in labels if l.startswith("R=")] == ["R=1", "R=2", "R=4", "R=8", "R=16"]
    assert [l for l in labels if l.startswith("J=")] == ["J=1", "J=2", "J=3", "J=4"]
    assert [l for l in labels if l.startswith("M=")] == [f"M={m}" for m in (1, 2, 4, 8)] + [
        f"M={m} (sprompts)" for m in (1, 2, 4, 8)]
    assert [l for l in labels if l.startswith("alpha=")] == ["alpha=0 (own lr)"] + [
        f"alpha={a}" for a in ("0", "0.1", "0.3", "0.5", "1")]
    assert [l for l in labels if l.startswith("R'=")] == ["R'=1", "R'=4", "R'=16"]
    for _, _, changes in rows:  # every row is a valid setting of lpi.py
        lpi.check_switches(*lpi.configs(**changes))


def test_readme_quotes_the_committed_evidence():
    """README's results tables are evidence.readme_block of the committed evidence.json, and the
    figures its prose quotes are today's: re-measuring the evidence without updating the README
    fails here."""
    import evidence

    readme = (ROOT / "README.md").read_text()
    e = json.loads((ROOT / "benchmarks" / "results" / "evidence.json").read_text())
    block = readme.split("<!-- evidence:begin -->\n")[1].split("\n<!-- evidence:end -->")[0]
    assert block == evidence.readme_block(e), "README's evidence tables differ from evidence.json: paste readme_block's"
    rows = {r["label"]: r for r in e["rows"]}
    forget = {k: (rows[k]["mean"]["i2t_forgetting_R@1"] + rows[k]["mean"]["t2i_forgetting_R@1"]) / 2 for k in ("seqft", "lpi")}
    params = {k: rows[k]["trainable_params"]["total"] for k in ("lpi", "sprompts", "no-interaction")}
    tuning = json.loads((ROOT / "benchmarks" / "results" / "tuning.json").read_text())
    six, regret = tuning["six_task_scores"], tuning["predictiveness"]["sprompts"]["chosen"]["regret"]
    best = {k: max(p["mean_recall"] for p in six[k]) for k in ("lpi", "no-task-loss", "no-hier-prompt")}
    runs = evidence.n_runs(e["rows"], e["budget"], e["experiments"])
    quoted = [f"({forget['seqft']:.1f} against {forget['lpi']:.1f} points)",
              f"interaction modules are {100 * (params['lpi'] - params['no-interaction']) / params['lpi']:.0f}% of LPI's parameters",
              f"LPI trains {params['lpi'] / params['sprompts']:.1f}× S-Prompts'",
              f"(stage 2: LPI {best['lpi']:.1f}, without the task loss {best['no-task-loss']:.1f}, without\n  the prompt-level loss {best['no-hier-prompt']:.1f}",
              f"{runs} runs,\n{e['compute_time_s'] / 3600:.1f} h of one-thread runs",
              f"protocol's choice costs S-Prompts {regret:.1f} points"]
    for q in quoted:
        assert q in readme, f"README no longer quotes today's evidence: {q!r}"
