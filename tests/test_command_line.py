"""The command line is the switch tables, and the documentation's commands are real.

- Every row of lpi.LPIConfig and lpi.RunConfig round-trips through the real parser: a valid
  value other than its default (both ways for a boolean, every choice, a value for each row
  whose default is None) comes out of `build_parser` + `from_values` (what `main` does) as it
  went in. The rows are read from the tables, so a row added later is covered as it lands.
- Every `python lpi.py ...` command and every flag set written in README.md, METHOD.md and the
  notebooks' markdown parses with the real parser; the cheap ones (built-in tasks, tiny CLIP)
  run for one task and one epoch.
"""
from __future__ import annotations

import dataclasses
import json
import re
import shlex
from pathlib import Path

import pytest

import lpi
from run_support import check_switches, flag_of, from_values

ROOT = Path(__file__).resolve().parents[1]
TABLES = (lpi.LPIConfig, lpi.RunConfig)
ROWS = [(table, f) for table in TABLES for f in dataclasses.fields(table)]


# ----------------------------------------------------------------------------------------
# Every row round-trips
# ----------------------------------------------------------------------------------------

# Values a string row without choices can take (paths and names: argparse keeps them as given).
STRINGS = {"tasks": "farm-animals,sea-animals", "clip": "random:ViT-B/32", "data_root": "/data/somewhere",
           "cache_dir": "/tmp/another-cache", "out": "runs/elsewhere"}


def row_type(f: dataclasses.Field) -> type:
    kw = f.metadata["argparse"]
    if "type" in kw:
        return kw["type"]
    if kw.get("choices"):
        return type(kw["choices"][0])
    return type(f.default)


def other_values(f: dataclasses.Field) -> list:
    """Valid values of a row to pass on the command line: both values of a boolean, every
    choice, else one value other than the default that the row's check accepts."""
    kw, check = f.metadata["argparse"], f.metadata["check"]
    if isinstance(f.default, bool):
        return [True, False]
    if kw.get("choices"):
        return list(kw["choices"])
    kind = row_type(f)
    if kind is str:
        return [STRINGS[f.name]]  # a new string row: add a value above
    base = f.default if f.default is not None else 1
    for v in (base * 2, base + 1, base + 3, base / 2, 2, 3, 0.5, 0.25, 7):
        v = kind(v)
        if v != f.default and (check is None or check[0](v)):
            return [v]
    raise AssertionError(f"no valid non-default value found for {f.name}: add one to other_values")


def argv_for(f: dataclasses.Field, value) -> list[str]:
    flag = flag_of(f)
    if isinstance(f.default, bool):
        return [flag if value else "--no-" + flag[2:]]
    return [flag, str(value)]


def parsed(argv: list[str]):
    """What main() makes of argv: both tables, checked."""
    args = lpi.build_parser().parse_args(argv)
    s, cfg = from_values(lpi.RunConfig, args), from_values(lpi.LPIConfig, args)
    check_switches(s, cfg)
    return args, s, cfg


@pytest.mark.parametrize("table,f", ROWS, ids=[f"{t.__name__}.{f.name}" for t, f in ROWS])
def test_every_row_round_trips_through_the_command_line(table, f):
    values = other_values(f)
    assert values, f.name
    for value in values:
        _, s, cfg = parsed(argv_for(f, value))
        got = getattr(s if table is lpi.RunConfig else cfg, f.name)
        assert got == value and type(got) is type(value), (f.name, value, got)
        short = f.metadata["argparse"].get("short")
        if short:  # -J, -M, -R give the same
            _, s2, cfg2 = parsed([short, str(value)])
            assert getattr(s2 if table is lpi.RunConfig else cfg2, f.name) == value


def test_no_arguments_give_every_rows_default():
    _, s, cfg = parsed([])
    for table, f in ROWS:
        assert getattr(s if table is lpi.RunConfig else cfg, f.name) == f.default, f.name


def test_a_row_defaulting_to_none_needs_a_type():
    """argparse would call NoneType(value): such a row is refused when the parser is made."""
    import argparse
    from run_support import add_switches, switch

    @dataclasses.dataclass
    class Broken:
        thing: str | None = switch(None, "no type given")

    with pytest.raises(TypeError, match="thing"):
        add_switches(argparse.ArgumentParser(), Broken)


def test_optimizer_from_the_command_line():
    """The flag the README uses for the authors' recipe."""
    _, s, _ = parsed(["--optimizer", "sgd", "--lr", "0.05"])
    assert (s.optimizer, s.lr) == ("sgd", 0.05)
    s, _ = lpi.fill_defaults(parsed(["--optimizer", "adam"])[1], lpi.LPIConfig(), tiny=True)
    assert (s.optimizer, s.lr) == ("adam", lpi.TUNED["lpi"]["lr"]["adam"])


# ----------------------------------------------------------------------------------------
# Every documented command parses; the cheap ones run
# ----------------------------------------------------------------------------------------

DOCS = [ROOT / "README.md", ROOT / "METHOD.md"]
# Flags the documentation gives for other scripts than lpi.py, and where they are.
OTHER_SCRIPTS = {"--quick": "benchmarks/evidence.py", "--kills": "benchmarks/kill_resume.py"}


def documentation() -> list[tuple[str, str]]:
    """(where, text) of README.md, METHOD.md and every notebook's markdown cells."""
    out = [(p.name, p.read_text()) for p in DOCS]
    for nb in sorted((ROOT / "notebooks").glob("*.ipynb")):
        cells = json.loads(nb.read_text())["cells"]
        out += [(f"{nb.name}[{i}]", "".join(c["source"])) for i, c in enumerate(cells) if c["cell_type"] == "markdown"]
    return out


def documented_commands() -> list[tuple[str, list[str]]]:
    """(where, lpi.py's arguments) of every `python lpi.py ...` / `torchrun ... lpi.py ...` line
    and every backticked flag set ("`--optimizer sgd --lr 0.05`"); "..." ends a command."""
    found = []
    for where, text in documentation():
        text = re.sub(r"\s+#.*", "", text)                                     # comments after a command
        for m in re.finditer(r"(?:python|torchrun[^\n`]*?) lpi\.py([^\n`]*)", text):
            found.append((where, m.group(1)))
        for m in re.finditer(r"`(--[^`]*)`", text):
            found.append((where, m.group(1)))
    cmds = []
    for where, args in found:
        words = shlex.split(args.replace("…", "..."))
        words = words[: words.index("...")] if "..." in words else words
        cmds.append((where, words))
    return cmds


COMMANDS = documented_commands()
FLAGS = {s for a in lpi.build_parser()._actions for s in a.option_strings}


def test_the_documentation_has_commands():
    wheres = {w for w, _ in COMMANDS}
    assert len(COMMANDS) > 40 and "README.md" in wheres and "METHOD.md" in wheres
    assert any(w.startswith("07_") for w in wheres)


@pytest.mark.parametrize("where,words", COMMANDS, ids=[f"{w}:{' '.join(a)[:60]}" for w, a in COMMANDS])
def test_every_documented_command_parses(where, words):
    flags = [w for w in words if w.startswith("-")]
    if any(f in OTHER_SCRIPTS for f in flags):
        for f in flags:
            assert f in (ROOT / OTHER_SCRIPTS[f]).read_text(), (where, f)
        return
    for f in flags:
        assert f in FLAGS or f.split("=")[0] in FLAGS, f"{where}: {f} is not a flag of lpi.py"
    if len(words) == 1 and words[0] in FLAGS and not isinstance(parser_default(words[0]), bool):
        return  # a flag named on its own in prose ("`--optimizer`"): it exists
    if words == ["--help"]:
        return
    parsed(words)


def parser_default(flag: str):
    action = next(a for a in lpi.build_parser()._actions if flag in a.option_strings)
    return False if action.nargs == 0 else action.default


# What makes a documented command cheap enough to run here: the built-in tasks, the tiny CLIP,
# nothing that converts, exports, resumes or needs another device.
NOT_CHEAP = {"--data-root", "--clip", "--clip-activation", "--trust-torchscript", "--convert-clip", "--export-tiny-clip",
             "--resume", "--device", "--help"}
ONE_TASK = ["--tasks", "sea-animals", "--epochs", "1", "--max-train-per-task", "32", "--max-test-per-task", "16",
            "--batch-size", "16", "--no-progress", "--workers", "0"]


def cheap_commands() -> list[list[str]]:
    runs = []
    for where, words in COMMANDS:
        flags = {w for w in words if w.startswith("-")}
        if flags & (NOT_CHEAP | set(OTHER_SCRIPTS)) or words in runs:
            continue
        if len(words) == 1 and words[0] in FLAGS and not isinstance(parser_default(words[0]), bool):
            continue
        runs.append(words)
    return runs


CHEAP = cheap_commands()


def test_the_readme_recipes_are_among_the_runs():
    """README's "LPI before the fixes" and the S-Prompts row with the authors' SGD run as written."""
    before = ["--optimizer", "sgd", "--lr", "0.05", "--deep-prompts", "replace", "--no-hier-tau-scaled",
              "--interaction-gain", "1", "--hier-factor"]
    assert before in CHEAP
    assert ["--method", "sprompts", "--optimizer", "sgd", "--lr", "0.05"] in CHEAP
    assert [] in CHEAP  # python lpi.py itself


def row_flags(f: dataclasses.Field) -> set[str]:
    flag = flag_of(f)
    return {flag, "--no-" + flag[2:], f.metadata["argparse"].get("short")} - {None}


@pytest.mark.slow
@pytest.mark.parametrize("words", CHEAP, ids=[" ".join(w) or "(no arguments)" for w in CHEAP])
def test_cheap_documented_commands_run(words, tmp_path, capsys):
    assert lpi.main([*words, *ONE_TASK, "--out", str(tmp_path / "run")]) == 0, capsys.readouterr().err[-2000:]
    config = json.loads((tmp_path / "run" / "results.json").read_text())["config"]
    _, s, cfg = parsed(words)
    for table, f in ROWS:  # the run was made with the settings the command gives (but those ONE_TASK sets)
        if row_flags(f) & set(words) and not row_flags(f) & set(ONE_TASK):
            assert config[f.name] == getattr(s if table is lpi.RunConfig else cfg, f.name), f.name
