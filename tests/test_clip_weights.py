"""CLIP weights as users hold them, each equal to its reference implementation (fp32, CPU):

- Hugging Face transformers folders (config.json + model.safetensors), QuickGELU and GELU,
  against transformers' own get_image_features / get_text_features;
- open_clip's ViT-B-32 (GELU, LAION's architecture) saved as .safetensors in OpenAI's names,
  loaded with activation="gelu", against open_clip;
- TorchScript archives only when trusted, and their conversion to .safetensors;
- the activation never silent: taken from the file, a contradicting flag refused, recorded
  in results.json and checkpoints, and a --resume with another one refused.
"""
import json

import pytest
import torch

import clip_model
import lpi
from clip_model import CLIPLoadError
from fixtures import make_coco_fixture, make_flickr_fixture, make_hf_clip

pytestmark = pytest.mark.filterwarnings("ignore:`torch.jit.load` is deprecated:FutureWarning")
TOL = 1e-5
CAPTIONS = ["", "a dog", "Two people riding bicycles down a busy street next to parked cars, at dusk."]


def features(model, images, tokens, reference=False):
    """(image features, caption features): ours, or transformers' (reference=True)."""
    with torch.inference_mode():
        if not reference:
            return model.encode_image(images), model.encode_text(tokens)
        img, txt = model.get_image_features(pixel_values=images), model.get_text_features(input_ids=tokens)
        as_tensor = lambda out: out if isinstance(out, torch.Tensor) else out.pooler_output  # noqa: E731
        return as_tensor(img), as_tensor(txt)


def largest_difference(a, b) -> float:
    return max((x - y).abs().max().item() for x, y in zip(a, b))


@pytest.mark.parametrize("activation", ["quick_gelu", "gelu"])
def test_hugging_face_folder_equals_transformers(tmp_path, activation):
    ref = make_hf_clip(tmp_path / "hf", activation)
    ours, _ = clip_model.load(tmp_path / "hf")
    assert ours.cfg.activation == activation and ours.cfg.embed_dim == 64 and ours.visual.input_resolution == 64
    images = torch.randn(3, 3, 64, 64, generator=torch.Generator().manual_seed(1))
    tokens = clip_model.tokenize(CAPTIONS, 77, truncate=True)
    theirs = features(ref, images, tokens, reference=True)
    assert min(t.abs().max().item() for t in theirs) > 0.1          # features of a real size
    diff = largest_difference(features(ours, images, tokens), theirs)
    print(f"Hugging Face folder, {activation}: largest feature difference {diff:.2e}")
    assert diff < TOL
    # the same tensors under the other activation are clearly not that model
    other = "gelu" if activation == "quick_gelu" else "quick_gelu"
    wrong = clip_model.load_weights(clip_model.dataclasses.replace(ours.cfg, activation=other), ours.state_dict())
    assert largest_difference(features(wrong, images, tokens), theirs) > 100 * TOL
    with pytest.raises(CLIPLoadError, match="contradicts"):
        clip_model.load(tmp_path / "hf", activation=other)
    # its model.safetensors alone, with config.json beside it, is the same model
    alone, _ = clip_model.load(tmp_path / "hf" / "model.safetensors")
    assert largest_difference(features(alone, images, tokens), theirs) < TOL


def test_open_clip_vit_b32_gelu_as_safetensors_equals_open_clip(tmp_path):
    """LAION's architecture: open_clip's ViT-B-32 (GELU), its state dict as .safetensors."""
    open_clip = pytest.importorskip("open_clip")
    from safetensors.torch import save_file

    torch.manual_seed(0)
    ref = open_clip.create_model("ViT-B-32", pretrained=None).eval()
    save_file({k: v.contiguous() for k, v in ref.state_dict().items()}, str(tmp_path / "vit-b-32.safetensors"))
    ours, _ = clip_model.load(tmp_path / "vit-b-32.safetensors", activation="gelu")
    images = torch.randn(2, 3, 224, 224, generator=torch.Generator().manual_seed(1))
    tokens = clip_model.tokenize(CAPTIONS, 77, truncate=True)
    with torch.inference_mode():
        theirs = ref.encode_image(images), ref.encode_text(tokens)
    diff = largest_difference(features(ours, images, tokens), theirs)
    print(f"open_clip ViT-B-32 (GELU) as .safetensors: largest feature difference {diff:.2e}")
    assert diff < TOL
    silent, _ = clip_model.load(tmp_path / "vit-b-32.safetensors")   # OpenAI's default: QuickGELU
    assert silent.cfg.activation == "quick_gelu"
    assert largest_difference(features(silent, images, tokens), theirs) > 100 * TOL


def tiny_archive(path, activation="quick_gelu"):
    """A TorchScript archive of a random tiny CLIP (traced, as OpenAI's releases are)."""
    torch.manual_seed(0)
    model = clip_model.CLIP(clip_model.dataclasses.replace(clip_model.TINY, activation=activation)).eval()
    images = torch.randn(2, 3, 32, 32)
    tokens = clip_model.tokenize(["a dog", "a cat"], clip_model.TINY.context_length)
    traced = torch.jit.trace(model, (images, tokens), check_trace=False)
    torch.jit.save(traced, str(path))
    return model, images, tokens


def test_torchscript_only_when_trusted_and_converted_once(tmp_path):
    source, images, tokens = tiny_archive(tmp_path / "archive.pt")
    with pytest.raises(CLIPLoadError, match="--trust-torchscript"):
        clip_model.load(tmp_path / "archive.pt")
    trusted, _ = clip_model.load(tmp_path / "archive.pt", trust_torchscript=True)
    assert largest_difference(features(trusted, images, tokens), features(source, images, tokens)) == 0
    clip_model.save_safetensors(trusted, tmp_path / "converted.safetensors")
    converted, _ = clip_model.load(tmp_path / "converted.safetensors")        # no trust needed
    assert largest_difference(features(converted, images, tokens), features(source, images, tokens)) == 0


def test_converted_file_records_its_activation(tmp_path):
    torch.manual_seed(0)
    gelu = clip_model.CLIP(clip_model.dataclasses.replace(clip_model.TINY, activation="gelu")).eval()
    clip_model.save_safetensors(gelu, tmp_path / "gelu.safetensors")
    assert clip_model.load(tmp_path / "gelu.safetensors")[0].cfg.activation == "gelu"
    with pytest.raises(CLIPLoadError, match="contradicts"):
        clip_model.load(tmp_path / "gelu.safetensors", activation="quick_gelu")


def test_convert_clip_flag_writes_a_file_that_needs_no_trust(tmp_path, capsys):
    tiny_archive(tmp_path / "archive.pt")
    out = tmp_path / "archive.safetensors"
    assert lpi.main(["--clip", str(tmp_path / "archive.pt"), "--convert-clip", str(out)]) == 2
    assert "--trust-torchscript" in capsys.readouterr().err and not out.exists()
    assert lpi.main(["--clip", str(tmp_path / "archive.pt"), "--trust-torchscript", "--convert-clip", str(out)]) == 0
    assert clip_model.load(out)[0].cfg.activation == "quick_gelu"


def test_lpi_runs_on_a_hugging_face_folder_and_records_its_activation(tmp_path):
    """`python lpi.py --clip <hf-folder> --tasks coco,flickr ...` on the real-layout fixtures."""
    make_hf_clip(tmp_path / "hf", "gelu", image_size=32)
    make_coco_fixture(tmp_path / "data", n_train=6, n_test=4)
    make_flickr_fixture(tmp_path / "data", n_train=6, n_test=4)
    out = tmp_path / "run"
    args = ["--clip", str(tmp_path / "hf"), "--tasks", "coco,flickr", "--data-root", str(tmp_path / "data"),
            "--depth", "2", "--length", "2", "--epochs", "1", "--batch-size", "4", "--workers", "0",
            "--no-progress", "--out", str(out)]
    assert lpi.main(args) == 0
    res = json.loads((out / "results.json").read_text())
    assert res["config"]["clip_activation"] == "gelu" and res["tasks"] == ["coco", "flickr"]
    assert lpi.read_checkpoint(lpi.latest_checkpoint(out))["config"]["clip_activation"] == "gelu"
    assert lpi.load_run(out).model.clip.cfg.activation == "gelu"


def test_resume_with_another_activation_is_refused(tmp_path, capsys):
    """A state dict in OpenAI's names says nothing: the run records quick_gelu (the default),
    and a --resume that asks for gelu is refused before anything is written."""
    torch.manual_seed(0)
    torch.save(clip_model.CLIP(clip_model.TINY).state_dict(), tmp_path / "tiny.pt")
    out = tmp_path / "run"
    args = ["--clip", str(tmp_path / "tiny.pt"), "--tasks", "sea-animals", "--max-train-per-task", "8",
            "--max-test-per-task", "4", "--depth", "2", "--length", "2", "--epochs", "1", "--batch-size", "4",
            "--workers", "0", "--no-progress", "--out", str(out)]
    assert lpi.main(args) == 0
    assert json.loads((out / "results.json").read_text())["config"]["clip_activation"] == "quick_gelu"
    before = {p: p.read_bytes() for p in out.rglob("*") if p.is_file()}
    capsys.readouterr()
    assert lpi.main([*args, "--resume", "--clip-activation", "gelu"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and "clip_activation" in err
    assert before == {p: p.read_bytes() for p in out.rglob("*") if p.is_file()}
