"""benchmarks/evidence.py --quick runs end to end and writes its table and the JSON behind it."""
import importlib.util
import json
from pathlib import Path

import lpi

ROOT = Path(__file__).resolve().parents[1]


def load_script(name: str):
    spec = importlib.util.spec_from_file_location(name, ROOT / "benchmarks" / f"{name}.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_evidence_quick(tmp_path):
    evidence = load_script("evidence")  # with lpi.py's default (shipped) tiny CLIP: no pre-training
    out = tmp_path / "out"
    assert evidence.main(["--quick", "--cache-dir", str(tmp_path / "cache"), "--out-dir", str(out),
                          "--work-dir", str(tmp_path / "work")]) == 0
    md, res = (out / "evidence.md").read_text(), json.loads((out / "evidence.json").read_text())
    rows = {r["label"]: r for r in res["rows"]}
    assert set(rows) == {"zeroshot", "l2p", "lpi", "R=4"}
    assert rows["R=4"]["same_runs_as"] == "lpi" and rows["R=4"]["mean"] == rows["lpi"]["mean"]
    assert rows["lpi"]["routed"] and not rows["l2p"]["routed"]
    for r in res["rows"]:
        assert set(evidence.METRICS) <= set(r["mean"]) and set(evidence.METRICS) <= set(r["std"])
        assert len(r["runs"]) == len(res["settings"]["seeds"]) == 1
        assert f"| {r['group']} | {r['label']}" in md
    # the real-scale parameter table, from the accounting function
    p = {r["method"]: r for r in res["parameters_vitb16"]}
    assert p["LPI"]["prompts"] == 5284 and p["S-Prompts (J=1)"]["after_tasks"] == 12 * 20480
    assert p["full rank (J=9)"]["total"] == 184320
    assert "ViT-B/16 scale" in md and "| L2P |" in md


def test_evidence_rows_cover_the_issue():
    """Every method, every single-component ablation, R in {1,2,4,8,16}, J in {1,2,4,all}."""
    evidence = load_script("evidence")
    rows = evidence.table_rows(depth=4, quick=False)
    labels = [label for _, label, _ in rows]
    assert {"zeroshot", "seqft", "sprompts", "l2p", "joint", "lpi"} <= set(labels)
    assert {"full-rank", "no-interaction", "no-hier-prompt", "hier-factor", "no-task-loss",
            "routing oracle", "alpha=0"} <= set(labels)
    assert {"deep-prompts=replace", "hier-unscaled", "interaction-gain=1", "before the fixes"} <= set(labels)
    assert [l for l in labels if l.startswith("R=")] == ["R=1", "R=2", "R=4", "R=8", "R=16"]
    assert [l for l in labels if l.startswith("J=")] == ["J=1", "J=2", "J=4", "J=all (4)"]
    for _, _, flags in rows:  # every row is a valid lpi.py command line
        lpi.build_parser().parse_args(flags)
