"""clip_model.load() reads every checkpoint format CLIP users meet, refuses everything else
with a CLIPLoadError that says what went wrong, and downloads released weights safely.

Checkpoints are made on the fly from a TINY CLIP with random weights; "equal to the source"
means equal features on a batch of images and captions.
"""

import io
import os
import sys
import urllib.error
import urllib.request
import warnings

import pytest
import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import clip_model  # noqa: E402
from clip_model import CLIPLoadError, TINY  # noqa: E402

# Reading a TorchScript archive (OpenAI's releases are TorchScript) calls torch.jit.load, which
# torch now flags as deprecated on every call; the notice says nothing about the checkpoint.
pytestmark = pytest.mark.filterwarnings("ignore:`torch.jit.load` is deprecated:FutureWarning")


# ---------------------------------------------------------------------------------------
# Sources: a TINY CLIP, a batch to compare features on, and the checkpoints made from it
# ---------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def source() -> clip_model.CLIP:
    torch.manual_seed(0)
    return clip_model.CLIP(TINY).eval()


@pytest.fixture(scope="module")
def batch():
    g = torch.Generator().manual_seed(0)
    images = torch.randn(3, 3, TINY.image_resolution, TINY.image_resolution, generator=g)
    tokens = clip_model.tokenize(["a dog", "", "two red circles on the left of a blue square"],
                                 context_length=TINY.context_length)
    return images, tokens


def _features(model, batch):
    images, tokens = batch
    with torch.inference_mode():
        return model.encode_image(images), model.encode_text(tokens)


def _assert_same_model(loaded, reference, batch):
    assert loaded.cfg == reference.cfg
    assert not loaded.training
    assert all(p.dtype == torch.float32 for p in loaded.parameters())
    for ours, theirs in zip(_features(loaded, batch), _features(reference, batch)):
        assert torch.equal(ours, theirs)


class OpenAIStyleArchive(clip_model.CLIP):
    """CLIP plus the non-parameter entries of released archives: OpenAI's scalar buffers
    input_resolution / context_length / vocab_size, and the attn_mask buffer that a traced
    open_clip model carries."""

    def __init__(self, cfg):
        super().__init__(cfg)
        del self.context_length  # a plain int attribute on CLIP, a buffer in the archives
        self.register_buffer("input_resolution", torch.tensor(cfg.image_resolution))
        self.register_buffer("context_length", torch.tensor(cfg.context_length))
        self.register_buffer("vocab_size", torch.tensor(cfg.vocab_size))
        L = cfg.context_length
        self.register_buffer("attn_mask", torch.full((L, L), float("-inf")).triu(1))


@pytest.fixture(scope="module")
def torchscript_file(tmp_path_factory, source, batch):
    archive = OpenAIStyleArchive(TINY).eval()
    archive.load_state_dict(source.state_dict(), strict=False)
    path = tmp_path_factory.mktemp("ts") / "tiny-traced.pt"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # tracer warnings about int(eot.max()); deprecation notices
        traced = torch.jit.trace(archive, batch, check_trace=False)
        torch.jit.save(traced, str(path))
    return path


@pytest.fixture(scope="module")
def state_dict_file(tmp_path_factory, source):
    path = tmp_path_factory.mktemp("sd") / "tiny.pt"
    torch.save(source.state_dict(), path)
    return path


# ---------------------------------------------------------------------------------------
# Formats that load
# ---------------------------------------------------------------------------------------

def test_torchscript_archive(torchscript_file, source, batch):
    """A traced TorchScript archive with OpenAI's extra scalars (and an attn_mask) loads,
    when trusted (it is not one of OpenAI's releases), into a model equal to the one traced."""
    keys = torch.jit.load(str(torchscript_file)).state_dict().keys()
    assert {"input_resolution", "context_length", "vocab_size", "attn_mask"} <= set(keys)
    model, _ = clip_model.load(torchscript_file, trust_torchscript=True)
    _assert_same_model(model, source, batch)


def test_plain_state_dict(state_dict_file, source, batch):
    """A torch.save'd state dict loads into a model equal to its source."""
    model, _ = clip_model.load(state_dict_file)
    _assert_same_model(model, source, batch)


def test_fp16_state_dict_becomes_fp32(tmp_path, source, batch):
    """A half-precision state dict loads into fp32 parameters holding the fp16 values."""
    path = tmp_path / "tiny-fp16.pt"
    torch.save({k: v.half() for k, v in source.state_dict().items()}, path)
    model, _ = clip_model.load(path)
    rounded = clip_model.build_model({k: v.half().float() for k, v in source.state_dict().items()})
    _assert_same_model(model, rounded, batch)
    # ... which is close to, but not the same as, the fp32 source.
    assert not torch.equal(model.visual.proj, source.visual.proj)
    torch.testing.assert_close(model.visual.proj, source.visual.proj, atol=1e-3, rtol=1e-3)


def test_wrapped_state_dict(tmp_path, source, batch):
    """A training checkpoint {"state_dict": ..., "epoch": ...} loads its state dict."""
    path = tmp_path / "tiny-ckpt.pt"
    torch.save({"state_dict": source.state_dict(), "epoch": 3}, path)
    model, _ = clip_model.load(path)
    _assert_same_model(model, source, batch)


# ---------------------------------------------------------------------------------------
# What is refused, and how
# ---------------------------------------------------------------------------------------

def test_missing_file(tmp_path):
    """A path that does not exist: the message names it and says what may be passed."""
    path = tmp_path / "nowhere" / "ViT-B-16.pt"
    with pytest.raises(CLIPLoadError) as err:
        clip_model.load(path)
    assert str(path) in str(err.value) and "ViT-B/16" in str(err.value)


def test_truncated_file(tmp_path, state_dict_file, torchscript_file):
    """Half a checkpoint (an interrupted download): the message names the file."""
    for source_file in (state_dict_file, torchscript_file):
        data = source_file.read_bytes()
        path = tmp_path / ("half-" + source_file.name)
        path.write_bytes(data[:len(data) // 2])
        with pytest.raises(CLIPLoadError) as err:
            clip_model.load(path)
        assert str(path) in str(err.value) and "truncated" in str(err.value)


def test_not_a_tensor_dict(tmp_path):
    """A file that holds something other than a state dict of tensors is refused."""
    path = tmp_path / "list.pt"
    torch.save([torch.zeros(2)], path)
    with pytest.raises(CLIPLoadError, match="not a state dict"):
        clip_model.load(path)


def test_non_clip_state_dict(tmp_path):
    """An image classifier's state dict (torchvision resnet18): the message lists the CLIP
    entries it lacks; no bare KeyError."""
    torchvision = pytest.importorskip("torchvision")
    path = tmp_path / "resnet18.pt"
    torch.save(torchvision.models.resnet18(weights=None).state_dict(), path)
    with pytest.raises(CLIPLoadError) as err:
        clip_model.load(path)
    message = str(err.value)
    assert "not a CLIP" in message and "visual.conv1.weight" in message and "token_embedding.weight" in message


def test_resnet_clip_checkpoint(tmp_path):
    """A ResNet CLIP (modified-ResNet image tower with attention pooling, as RN50) is
    recognised as such and refused by name."""
    open_clip = pytest.importorskip("open_clip")
    from open_clip.model import CLIP, CLIPTextCfg, CLIPVisionCfg
    # RN50's architecture at toy width (RN50 itself is layers=(3, 4, 6, 3), width=64).
    rn = CLIP(embed_dim=64, quick_gelu=True,
              vision_cfg=CLIPVisionCfg(layers=(1, 1, 1, 1), width=16, image_size=64, head_width=16),
              text_cfg=CLIPTextCfg(width=64, heads=1, layers=1, context_length=16))
    sd = rn.state_dict()
    assert "visual.layer1.0.conv1.weight" in sd and "visual.attnpool.positional_embedding" in sd
    path = tmp_path / "RN50-toy.pt"
    torch.save(sd, path)
    with pytest.raises(CLIPLoadError, match="ResNet"):
        clip_model.load(path)


def test_state_dict_that_does_not_fit(tmp_path, source):
    """CLIP keys with a tensor of the wrong shape: CLIPLoadError, not a RuntimeError."""
    sd = dict(source.state_dict())
    sd["visual.ln_post.weight"] = torch.ones(7)
    path = tmp_path / "bad.pt"
    torch.save(sd, path)
    with pytest.raises(CLIPLoadError, match="does not fit"):
        clip_model.load(path)


# ---------------------------------------------------------------------------------------
# Released names: download, cache, integrity check, and the offline case
# ---------------------------------------------------------------------------------------

class _FakeResponse(io.BytesIO):
    """What urlopen returns, reduced to what a download reads: headers and read()."""

    def __init__(self, data: bytes):
        super().__init__(data)
        self.headers = {"Content-Length": str(len(data))}


def _serve(monkeypatch, data: bytes, calls: list):
    def fake_urlopen(url, timeout=None):
        calls.append(url)
        return _FakeResponse(data)
    monkeypatch.setattr(urllib.request, "urlopen", fake_urlopen)


def _offline(monkeypatch):
    def no_network(url, timeout=None):
        raise urllib.error.URLError("[Errno -3] Temporary failure in name resolution")
    monkeypatch.setattr(urllib.request, "urlopen", no_network)


def test_offline_download_says_which_file_to_pass(tmp_path, monkeypatch):
    """No network: CLIPLoadError names ViT-B-16.pt and how to pass it; nothing is left behind."""
    _offline(monkeypatch)
    with pytest.raises(CLIPLoadError) as err:
        clip_model.load("ViT-B/16", download_root=tmp_path)
    assert "ViT-B-16.pt" in str(err.value) and "offline" in str(err.value)
    assert list(tmp_path.iterdir()) == []


def test_download_verifies_and_caches(tmp_path, monkeypatch, state_dict_file, source, batch):
    """A download whose SHA-256 matches the address is kept under its released name and is
    then loaded from the cache without touching the network."""
    data = state_dict_file.read_bytes()
    sha = clip_model.hashlib.sha256(data).hexdigest()
    monkeypatch.setitem(clip_model._MODELS, "ViT-B/16", f"https://example.invalid/clip/{sha}/ViT-B-16.pt")
    calls = []
    _serve(monkeypatch, data, calls)
    model, _ = clip_model.load("ViT-B/16", download_root=tmp_path)
    _assert_same_model(model, source, batch)
    assert calls == [clip_model._MODELS["ViT-B/16"]]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ViT-B-16.pt"]
    assert (tmp_path / "ViT-B-16.pt").read_bytes() == data

    _offline(monkeypatch)  # the second load must not need the network
    model, _ = clip_model.load("ViT-B/16", download_root=tmp_path)
    _assert_same_model(model, source, batch)


def test_download_with_wrong_checksum_is_discarded(tmp_path, monkeypatch, state_dict_file):
    """Bytes whose SHA-256 differs from the address: CLIPLoadError, and no file takes the
    final name (nor stays behind half-written)."""
    monkeypatch.setitem(clip_model._MODELS, "ViT-B/16", f"https://example.invalid/clip/{'0' * 64}/ViT-B-16.pt")
    _serve(monkeypatch, state_dict_file.read_bytes(), [])
    with pytest.raises(CLIPLoadError, match="SHA-256"):
        clip_model.load("ViT-B/16", download_root=tmp_path)
    assert list(tmp_path.iterdir()) == []


# ---------------------------------------------------------------------------------------
# Preprocessing
# ---------------------------------------------------------------------------------------

@pytest.mark.parametrize("size, mode, colour", [((37, 23), "RGB", (200, 100, 50)),
                                                ((301, 157), "RGBA", (10, 250, 128, 255)),
                                                ((225, 224), "L", 90)])
def test_preprocess_shape_and_normalisation(size, mode, colour):
    """Any image size and mode -> (3, R, R) float32, normalised with CLIP_MEAN / CLIP_STD
    (a constant-colour image comes out as the constant (c / 255 - mean) / std)."""
    from PIL import Image
    R = 224
    out = clip_model.preprocess_for(R)(Image.new(mode, size, colour))
    assert out.shape == (3, R, R) and out.dtype == torch.float32
    rgb = torch.tensor(Image.new(mode, (1, 1), colour).convert("RGB").getpixel((0, 0)), dtype=torch.float32)
    expected = (rgb / 255 - torch.tensor(clip_model.CLIP_MEAN)) / torch.tensor(clip_model.CLIP_STD)
    torch.testing.assert_close(out, expected[:, None, None].expand(3, R, R), atol=1e-5, rtol=0)


def test_load_returns_preprocess_for_the_model_resolution(state_dict_file):
    """load()'s preprocess makes images of the model's own input resolution."""
    from PIL import Image
    model, preprocess = clip_model.load(state_dict_file)
    image = preprocess(Image.new("RGB", (50, 70), (1, 2, 3)))
    assert image.shape == (3, TINY.image_resolution, TINY.image_resolution)
    assert model.encode_image(image[None]).shape == (1, TINY.embed_dim)
