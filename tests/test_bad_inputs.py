"""The bad-input catalogue: every input a user can get wrong, with the message they must see,
the exit code, and a check that nothing written earlier (data, an earlier run) was damaged.

Errors exit with code 2 and one `error: ...` line, never a traceback. Images that can be
decoded are used (converted to RGB); only undecodable ones are skipped and counted.
Captions of any content or length are used (truncated to the context). The cases run
lpi.main in this process; test_bad_input_in_a_fresh_interpreter runs one as a user does.
This file is the one home of bad-input tests.
"""
from __future__ import annotations

import hashlib
import json
import os
import pickle
import shutil
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import pytest
import torch
from PIL import Image

import lpi
from fixtures import make_coco_fixture, make_flickr_fixture, make_hf_clip

ROOT = Path(__file__).resolve().parents[1]

QUICK = ["--epochs", "1", "--batch-size", "4", "--no-progress", "--workers", "0"]
BUILTIN = ["--tasks", "sea-animals", "--max-train-per-task", "16", "--max-test-per-task", "8", *QUICK]


@dataclass
class Case:
    name: str
    setup: Callable[[Path], list[str]]     # tmp -> the lpi.py arguments (after making files there)
    needles: tuple[str, ...]               # in stderr (errors) or stdout (runs that succeed)
    code: int = 2
    skipped: int | None = None             # for runs that succeed: unreadable images counted
    extra: dict = field(default_factory=dict)


def flickr(tmp: Path) -> Path:
    make_flickr_fixture(tmp / "data", n_train=6, n_test=4)
    return tmp / "data"


def flickr_args(tmp: Path) -> list[str]:
    return ["--tasks", "flickr", "--data-root", str(tmp / "data"), "--out", str(tmp / "out"), *QUICK]


def karpathy(tmp: Path) -> Path:
    return tmp / "data" / "flickr30k" / "dataset_flickr30k.json"


def edit_karpathy(tmp: Path, edit) -> list[str]:
    flickr(tmp)
    data = json.loads(karpathy(tmp).read_text())
    edit(data)
    karpathy(tmp).write_text(json.dumps(data))
    return flickr_args(tmp)


def write_raw(tmp: Path, content: bytes) -> list[str]:
    flickr(tmp)
    karpathy(tmp).write_bytes(content)
    return flickr_args(tmp)


def a_test_image(tmp: Path) -> Path:
    data = json.loads(karpathy(tmp).read_text())
    name = next(e["filename"] for e in data["images"] if e["split"] == "test")
    return tmp / "data" / "flickr30k" / "flickr30k-images" / name


def replace_image(tmp: Path, write) -> list[str]:
    flickr(tmp)
    write(a_test_image(tmp))
    return flickr_args(tmp)


def set_caption(tmp: Path, text: str) -> list[str]:
    def edit(data):
        next(e for e in data["images"] if e["split"] == "train")["sentences"][0]["raw"] = text
    return edit_karpathy(tmp, edit)


def finished_run(tmp: Path) -> Path:
    shutil.copytree(FINISHED, tmp / "out")
    return tmp / "out"


def resume_args(tmp: Path, *extra: str) -> list[str]:
    finished_run(tmp)
    return [*BUILTIN, "--out", str(tmp / "out"), "--resume", *extra]


def corrupt_checkpoint(tmp: Path, how: str) -> list[str]:
    args = resume_args(tmp)
    ckpt = lpi.latest_checkpoint(tmp / "out")
    if how == "truncated":
        ckpt.write_bytes(ckpt.read_bytes()[:300])
    else:  # a pickle whose unpickling would run a command
        with open(ckpt, "wb") as f:
            pickle.dump({"config": {}, "payload": Evil()}, f, protocol=2)
    return args


class Evil:
    def __reduce__(self):
        return (os.system, ("echo pwned > /dev/null",))


def missing_image_folder(tmp: Path) -> list[str]:
    flickr(tmp)
    (tmp / "data/flickr30k/flickr30k-images").rename(tmp / "data/elsewhere")
    return flickr_args(tmp)


def missing_instances(tmp: Path) -> list[str]:
    make_coco_fixture(tmp / "data", n_train=6, n_test=6)
    (tmp / "data/coco/annotations/instances_val2014.json").unlink()
    return ["--tasks", "coco:supercategory", "--data-root", str(tmp / "data"), "--out", str(tmp / "out"), *QUICK]


def hf_clip(tmp: Path, edit_tensors=None, edit_config=None) -> list[str]:
    """A small Hugging Face CLIP folder (GELU), its tensors or config.json edited; the
    arguments of a built-in run on it."""
    from safetensors.torch import load_file, save_file

    make_hf_clip(tmp / "hf", "gelu", image_size=32)
    if edit_tensors:
        tensors = load_file(str(tmp / "hf" / "model.safetensors"))
        edit_tensors(tensors)
        save_file(tensors, str(tmp / "hf" / "model.safetensors"))
    if edit_config:
        config = json.loads((tmp / "hf" / "config.json").read_text())
        edit_config(config)
        (tmp / "hf" / "config.json").write_text(json.dumps(config))
    return [*BUILTIN, "--clip", str(tmp / "hf"), "--depth", "2", "--length", "2", "--out", str(tmp / "out")]


def untrusted_archive(tmp: Path) -> list[str]:
    """A TorchScript archive that is not one of OpenAI's releases."""
    torch.jit.save(torch.jit.script(torch.nn.Linear(2, 2)), str(tmp / "archive.pt"))
    return [*BUILTIN, "--clip", str(tmp / "archive.pt"), "--out", str(tmp / "out")]


def both_towers(key: str, value):
    def edit(config):
        for tower in ("text_config", "vision_config"):
            config[tower][key] = value
    return edit


def a_file(tmp: Path, name: str, content: bytes = b"junk") -> Path:
    (tmp / name).write_bytes(content)
    return tmp / name


def a_dir(tmp: Path, name: str) -> Path:
    (tmp / name).mkdir()
    return tmp / name


def unavailable_device() -> str:
    return "cuda" if not torch.cuda.is_available() else "mps"


def save_image(mode: str, size, fmt: str = "JPEG"):
    return lambda path: Image.new(mode, size, (10, 200, 30, 128)[: len(mode)] if mode != "L" else 90).save(path, fmt)


CASES = [
    # --- flags
    Case("depth out of range", lambda t: [*BUILTIN, "--out", str(t / "out"), "--depth", "99"], ("--depth", "layers")),
    Case("zero epochs", lambda t: [*BUILTIN, "--out", str(t / "out"), "--epochs", "0"], ("--epochs", ">= 1")),
    Case("batch of one", lambda t: [*BUILTIN, "--out", str(t / "out"), "--batch-size", "1"], ("--batch-size", "negatives")),
    Case("alpha above one", lambda t: [*BUILTIN, "--out", str(t / "out"), "--alpha", "1.5"], ("--alpha", "[0, 1]")),
    Case("theta out of range", lambda t: [*BUILTIN, "--out", str(t / "out"), "--theta", "3"], ("--theta",)),
    Case("zero temperature", lambda t: [*BUILTIN, "--out", str(t / "out"), "--tau-h", "0"], ("--tau-h", "> 0")),
    Case("rank zero", lambda t: [*BUILTIN, "--out", str(t / "out"), "--rank", "0"], ("--rank", ">= 1")),
    Case("negative learning rate", lambda t: [*BUILTIN, "--out", str(t / "out"), "--lr", "-1"], ("--lr", "> 0")),
    Case("unknown method", lambda t: [*BUILTIN, "--out", str(t / "out"), "--method", "magic"], ("invalid choice", "magic")),
    Case("learning rate not a number", lambda t: [*BUILTIN, "--out", str(t / "out"), "--lr", "fast"], ("--lr", "fast")),
    Case("device not on this machine", lambda t: [*BUILTIN, "--out", str(t / "out"), "--device", unavailable_device()],
         ("not available",)),
    # --- tasks and the data layout
    Case("unknown task", lambda t: ["--tasks", "sea-animals,mars", "--out", str(t / "out"), *QUICK], ("'mars'", "valid task names")),
    Case("task twice", lambda t: ["--tasks", "sea-animals,sea-animals", "--out", str(t / "out"), *QUICK], ("more than once",)),
    Case("no tasks", lambda t: ["--tasks", ",", "--out", str(t / "out"), *QUICK], ("--tasks is empty",)),
    Case("only spaces as tasks", lambda t: ["--tasks", "  ", "--out", str(t / "out"), *QUICK], ("--tasks is empty",)),
    Case("an empty task between commas", lambda t: ["--tasks", "sea-animals,,farm-animals", "--out", str(t / "out"),
                                                    *QUICK], ("empty task name", "sea-animals,,farm-animals")),
    Case("a trailing comma in --tasks", lambda t: ["--tasks", "sea-animals,", "--out", str(t / "out"), *QUICK],
         ("empty task name",)),
    Case("a task of spaces between commas", lambda t: ["--tasks", "sea-animals, ,farm-animals", "--out",
                                                       str(t / "out"), *QUICK], ("empty task name",)),
    Case("real data without --data-root", lambda t: ["--tasks", "flickr", "--out", str(t / "out"), *QUICK], ("--data-root",)),
    Case("data root missing", lambda t: ["--tasks", "flickr", "--data-root", str(t / "nowhere"), "--out", str(t / "out"), *QUICK],
         ("nowhere", "not a directory")),
    Case("data root is a file", lambda t: ["--tasks", "flickr", "--data-root", str(a_file(t, "file")),
                                           "--out", str(t / "out"), *QUICK], ("not a directory",)),
    Case("COCO split file missing", lambda t: ["--tasks", "coco", "--data-root", str(flickr(t)), "--out", str(t / "out"),
                                               *QUICK], ("dataset_coco.json", "layout")),
    Case("image folder missing", missing_image_folder, ("flickr30k-images", "not found")),
    Case("instance annotations missing", missing_instances, ("instances_val2014.json",)),
    # --- malformed split files
    Case("JSON cut short", lambda t: write_raw(t, b'{"images": [{"filename": "a.jpg", "split"'),
         ("dataset_flickr30k.json", "not valid JSON", "line")),
    Case("JSON not UTF-8", lambda t: write_raw(t, "{\"images\": [\"caf\xe9\"]}".encode("latin-1")), ("not UTF-8",)),
    Case("no images list", lambda t: edit_karpathy(t, lambda d: d.pop("images")), ("'images' list",)),
    Case("entry without sentences", lambda t: edit_karpathy(t, lambda d: d["images"][0].pop("sentences")),
         ("images[0]", "'sentences'")),
    Case("unknown split", lambda t: edit_karpathy(t, lambda d: d["images"][1].update(split="holdout")),
         ("images[1]", "'holdout'")),
    Case("sentences not objects", lambda t: edit_karpathy(t, lambda d: d["images"][2].update(sentences=["a dog"])),
         ("images[2]", "malformed")),
    Case("entry with no sentence", lambda t: edit_karpathy(t, lambda d: d["images"][0].update(sentences=[])),
         ("images[0]", "no sentences")),
    Case("no test images", lambda t: edit_karpathy(t, lambda d: [e.update(split="train") for e in d["images"]]),
         ("no test images",)),
    # --- checkpoints and backbones
    Case("truncated checkpoint", lambda t: corrupt_checkpoint(t, "truncated"), ("not a readable checkpoint",)),
    Case("checkpoint that would run code", lambda t: corrupt_checkpoint(t, "evil"), ("refused", "weights_only")),
    Case("resume with other settings", lambda t: resume_args(t, "--alpha", "0.3"), ("other settings", "alpha")),
    Case("backbone file not a CLIP", lambda t: [*BUILTIN, "--clip", str(a_file(t, "clip.pt")), "--out", str(t / "out")],
         ("clip.pt",)),
    Case("unknown random architecture", lambda t: [*BUILTIN, "--clip", "random:ViT-X/3", "--out", str(t / "out")],
         ("random:ViT-X/3", "ViT-B/16")),
    Case("backbone file missing", lambda t: [*BUILTIN, "--clip", str(t / "missing.pt"), "--out", str(t / "out")],
         ("missing.pt",)),
    # --- CLIP weights as users hold them
    Case("CLIP folder without config.json", lambda t: [*BUILTIN, "--clip", str(a_dir(t, "hf")), "--out", str(t / "out")],
         ("config.json",)),
    Case("Hugging Face CLIP with a tensor missing", lambda t: hf_clip(t, lambda d: d.pop("visual_projection.weight")),
         ("missing visual.proj",)),
    Case("Hugging Face CLIP with a misshapen tensor",
         lambda t: hf_clip(t, lambda d: d.update({"text_model.final_layer_norm.weight": torch.ones(7)})),
         ("ln_final.weight has shape (7,)",)),
    Case("Hugging Face config with an unknown activation",
         lambda t: hf_clip(t, edit_config=both_towers("hidden_act", "relu")), ("hidden_act relu",)),
    Case("activation contradicting config.json", lambda t: [*hf_clip(t), "--clip-activation", "quick_gelu"],
         ("contradicts", "gelu")),
    Case("unknown activation", lambda t: [*BUILTIN, "--clip-activation", "relu", "--out", str(t / "out")],
         ("invalid choice", "relu")),
    Case("GELU asked of the tiny CLIP", lambda t: [*BUILTIN, "--clip-activation", "gelu", "--out", str(t / "out")],
         ("quick_gelu",)),
    Case("untrusted TorchScript archive", untrusted_archive, ("not one of OpenAI's releases", "--trust-torchscript")),
    # --- the output folder
    Case("output folder under a file", lambda t: [*BUILTIN, "--out", str(a_file(t, "file") / "run")],
         ("cannot be created",)),
    Case("output folder holds a run", lambda t: [*BUILTIN, "--out", str(finished_run(t))],
         ("already holds a run", "--resume")),
    Case("resume in an empty folder", lambda t: [*BUILTIN, "--out", str(a_dir(t, "out")), "--resume"],
         ("nothing to resume in", "no checkpoint of lpi.py", "drop --resume")),
    Case("resume in a folder that does not exist", lambda t: [*BUILTIN, "--out", str(t / "typo"), "--resume"],
         ("nothing to resume in", "typo", "drop --resume")),
    # --- images and captions that must be used (or skipped and counted), not crash the run
    Case("truncated JPEG", lambda t: replace_image(t, lambda p: p.write_bytes(p.read_bytes()[:100])),
         ("skipped 1 unreadable image",), code=0, skipped=1),
    Case("zero-byte image", lambda t: replace_image(t, lambda p: p.write_bytes(b"")),
         ("skipped 1 unreadable image",), code=0, skipped=1),
    Case("grayscale image", lambda t: replace_image(t, save_image("L", (40, 30))), (), code=0, skipped=0),
    Case("CMYK image", lambda t: replace_image(t, save_image("CMYK", (40, 30))), (), code=0, skipped=0),
    Case("PNG with alpha", lambda t: replace_image(t, save_image("RGBA", (40, 30), "PNG")), (), code=0, skipped=0),
    Case("1x1 image", lambda t: replace_image(t, save_image("RGB", (1, 1))), (), code=0, skipped=0),
    Case("empty caption", lambda t: set_caption(t, ""), (), code=0, skipped=0),
    Case("non-ASCII caption", lambda t: set_caption(t, "Ein Hund läuft über die Straße — 犬が走る 🐕"), (), code=0, skipped=0),
    Case("caption longer than the context", lambda t: set_caption(t, "a dog running " * 60), (), code=0, skipped=0),
]
assert len(CASES) >= 25 and len({c.name for c in CASES}) == len(CASES)
FINISHED: Path  # a finished built-in run, made once (module fixture)


@pytest.fixture(scope="module", autouse=True)
def finished_run_once(tmp_path_factory):
    global FINISHED
    FINISHED = tmp_path_factory.mktemp("finished") / "run"
    assert lpi.main([*BUILTIN, "--out", str(FINISHED)]) == 0


def snapshot(root: Path) -> dict[str, str]:
    """Every file's hash and every folder under root: a failed run creates neither."""
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest() if p.is_file() else "folder"
            for p in sorted(root.rglob("*"))}


@pytest.mark.parametrize("case", CASES, ids=[c.name for c in CASES])
def test_bad_input(case, tmp_path, capsys):
    args = case.setup(tmp_path)
    before = snapshot(tmp_path)
    capsys.readouterr()
    try:
        code = lpi.main(args)
    except SystemExit as e:  # argparse's own errors (wrong type, unknown choice)
        code = e.code
    out, err = capsys.readouterr()
    assert code == case.code, (code, err[-2000:])
    assert "Traceback" not in err
    after = snapshot(tmp_path)
    changed = [k for k, h in before.items() if after.get(k) != h]
    assert not changed, f"files written before were damaged: {changed}"
    if case.code == 2:
        assert err.startswith("error: ") or "\nlpi.py: error: " in err, err   # ours, or argparse's usage error
        assert set(after) == set(before), f"a failed run left files: {sorted(set(after) - set(before))}"
        for needle in case.needles:
            assert needle in err, (needle, err)
    else:
        res = json.loads((tmp_path / "out" / "results.json").read_text())
        assert res["skipped_images"] == case.skipped
        for needle in case.needles:
            assert needle in out, (needle, out[-2000:])


# ----------------------------------------------------------------------------------------
# Checkpoints never execute code
# ----------------------------------------------------------------------------------------

class _Payload:
    """Unpickling this writes a file: the stand-in for any code a malicious file would run."""

    def __init__(self, marker: str):
        self.marker = marker

    def __reduce__(self):
        return (Path.write_text, (Path(self.marker), "the checkpoint ran code"))


def test_crafted_checkpoint_is_refused_and_runs_no_code(tmp_path, capsys):
    out = tmp_path / "run"
    assert lpi.main([*BUILTIN, "--out", str(out)]) == 0
    ckpt = lpi.latest_checkpoint(out)
    marker = tmp_path / "pwned"
    state = lpi.read_checkpoint(ckpt)
    state["results"]["note"] = _Payload(str(marker))
    with open(ckpt, "wb") as f:
        pickle.dump(state, f, protocol=2)      # a plain pickle: what torch.load would execute
    torch.save(state, tmp_path / "zip.pt")     # and the same object inside torch's zip format
    capsys.readouterr()
    assert lpi.main([*BUILTIN, "--out", str(out), "--resume"]) == 2
    err = capsys.readouterr().err
    assert "refused" in err and str(ckpt) in err and "weights_only" in err, err
    assert not marker.exists()
    with pytest.raises(lpi.LPIError, match="refused"):
        lpi.read_checkpoint(tmp_path / "zip.pt")
    assert not marker.exists()


def test_bad_input_in_a_fresh_interpreter(tmp_path):
    """As a user meets it: `python lpi.py` in a new process, one error line, exit code 2."""
    p = subprocess.run([sys.executable, str(ROOT / "lpi.py"), "--tasks", "sea-animals,mars", "--out", str(tmp_path / "o"),
                        *QUICK], capture_output=True, text=True, timeout=120, cwd=ROOT)
    assert p.returncode == 2 and p.stderr.startswith("error: ") and "'mars'" in p.stderr, p.stderr[-2000:]
    assert "Traceback" not in p.stderr and not (tmp_path / "o").exists()


def test_the_readme_counts_the_cases():
    readme = (ROOT / "README.md").read_text()
    assert f"`tests/test_bad_inputs.py` lists {len(CASES)} cases" in readme
