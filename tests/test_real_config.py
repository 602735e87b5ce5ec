"""The real configuration, proven to run: OpenAI's architectures with random weights
(`--clip random:NAME`), ViT-B/16 with LPI at J = 9 through the COCO + Flickr30K fixture on
the CPU, and mixed precision (`--precision`)."""
import json

import open_clip
import pytest
import torch

import clip_model
import lpi
import run_support
from fixtures import make_coco_fixture, make_flickr_fixture


@pytest.mark.parametrize("name,oracle", [("ViT-B/32", "ViT-B-32-quickgelu"), ("ViT-B/16", "ViT-B-16-quickgelu"),
                                         ("ViT-L/14", "ViT-L-14-quickgelu")])
def test_architectures_match_the_released_ones(name, oracle):
    """random:NAME builds exactly the tensors of the released model (names and shapes of
    open_clip's reference, whose state dicts OpenAI's checkpoints load into)."""
    with torch.device("meta"):
        ours = clip_model.CLIP(clip_model.ARCHITECTURES[name]).state_dict()
        ref = open_clip.create_model(oracle, pretrained=None, device="meta").state_dict()
    ref = {k: v for k, v in ref.items() if k != "attn_mask"}
    assert {k: tuple(v.shape) for k, v in ours.items()} == {k: tuple(v.shape) for k, v in ref.items()}


@pytest.mark.slow
def test_vit_b16_lpi_j9_through_coco_and_flickr(tmp_path):
    """ViT-B/16 (random weights), LPI with J = 9, M = 16: a few steps on each of COCO and
    Flickr30K (fixtures in the real layouts), evaluation, checkpoints, on the CPU."""
    root = tmp_path / "data"
    make_coco_fixture(root, n_train=6, n_test=6)
    make_flickr_fixture(root, n_train=6, n_test=4)
    out = tmp_path / "run"
    res = lpi.run(lpi.RunConfig(tasks="coco,flickr", data_root=str(root), clip="random:ViT-B/16", max_train_per_task=4,
                                max_test_per_task=4, epochs=1, batch_size=4, pairs="per-image", workers=0,
                                progress=False, out=str(out)))
    assert res == json.loads((out / "results.json").read_text())
    assert res["config"]["J"] == 9 and res["config"]["M"] == 16 and res["config"]["augment"] == "auto"
    assert res["trainable_params_per_task"]["prompts"] == 5284 and res["trainable_params_per_task"]["interaction"] == 12872
    assert len(res["recall"]["i2t"]["R@1"]) == 2 and "zeroshot" in res
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == ["task_01.pt", "task_02.pt"]


def test_bf16_on_cpu_is_within_tolerance_of_fp32(tmp_path):
    """--precision bf16 trains and evaluates on the CPU; its mean recall is within 3 points
    of fp32's (the encoders' matmuls in bf16, prompts and losses in fp32)."""
    summary = {}
    for precision in ("fp32", "bf16"):
        s = lpi.RunConfig(tasks="sea-animals,garden-tools", max_train_per_task=128, max_test_per_task=64, epochs=2,
                          progress=False, precision=precision, out=str(tmp_path / precision))
        summary[precision] = lpi.run(s)["summary"]
    assert summary["fp32"] != summary["bf16"]                     # bf16 really ran
    assert abs(summary["fp32"]["mean_recall"] - summary["bf16"]["mean_recall"]) < 3.0, summary


def test_autocast_precision_switch():
    dev = torch.device("cpu")
    a, b = torch.randn(4, 4), torch.randn(4, 4)
    with run_support.autocast(dev, "bf16"):
        assert (a @ b).dtype == torch.bfloat16
    with run_support.autocast(dev, "fp32"):
        assert (a @ b).dtype == torch.float32
    assert run_support.default_precision(dev) == "fp32"


def test_gpu_check_runs_on_the_cpu(capsys):
    """benchmarks/gpu_check.py at a small batch on the CPU (on a GPU it measures batch 64)."""
    import importlib.util
    from pathlib import Path
    spec = importlib.util.spec_from_file_location("gpu_check", Path(__file__).resolve().parents[1] / "benchmarks" / "gpu_check.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    assert mod.main(["--device", "cpu", "--arch", "ViT-B/32", "--batch", "2", "--steps", "1"]) == 0
    out = capsys.readouterr().out
    assert "LPI/plain" in out and "\nfp32" in out and "\nbf16" in out
