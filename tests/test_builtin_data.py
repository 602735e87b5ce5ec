"""Tests for the built-in procedural image-caption tasks and the tiny CLIP pre-training."""

import os
import sys
import time

import pytest
import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import clip_model  # noqa: E402

from lpi import (BUILTIN_TASKS, COLOUR_NAMES, DOMAINS, GENERIC, SHAPES, Scenes,  # noqa: E402
                     generic_mixture, load_or_build_tiny_clip, normalize_images, render, shape_masks)  # noqa: E402


@pytest.fixture(scope="module")
def tasks():
    return {name: make(n_train=200, n_test=100, seed=0) for name, make in BUILTIN_TASKS.items()}


def all_captions(data):
    return [c for caps in data.captions for c in caps]


# ---------------------------------------------------------------------------------------
# Shapes, dtypes, determinism
# ---------------------------------------------------------------------------------------

def test_every_domain_is_a_task_with_the_right_layout(tasks):
    assert list(tasks) == list(DOMAINS) and len(set(DOMAINS)) == len(DOMAINS) >= 4
    for name, task in tasks.items():
        assert task.name == name
        for data, n in ((task.train, 200), (task.test, 100)):
            assert data.images.dtype == torch.uint8
            assert data.images.shape == (n, 3, 32, 32)
            assert len(data) == n and all(len(c) == 1 and isinstance(c[0], str) for c in data.captions)


def test_deterministic_by_seed():
    for make in BUILTIN_TASKS.values():
        a, b, c = make(n_train=30, n_test=10, seed=1), make(n_train=30, n_test=10, seed=1), make(n_train=30, n_test=10, seed=2)
        assert torch.equal(a.train.images, b.train.images) and torch.equal(a.test.images, b.test.images)
        assert a.train.captions == b.train.captions and a.test.captions == b.test.captions
        assert a.test.captions != c.test.captions
    assert torch.equal(generic_mixture(20, seed=3).images, generic_mixture(20, seed=3).images)
    assert generic_mixture(20, seed=3).captions != generic_mixture(20, seed=4).captions


def test_generation_is_fast():
    generic_mixture(100, seed=0)  # warm-up
    start = time.perf_counter()
    generic_mixture(2000, seed=0)
    BUILTIN_TASKS["night"](n_train=2000, n_test=300)
    assert time.perf_counter() - start < 5.0  # ~0.3 s on an idle 2-core machine


# ---------------------------------------------------------------------------------------
# Captions: unique, disjoint splits, compositional, fit the text context
# ---------------------------------------------------------------------------------------

def test_captions_unique_and_test_scenes_unseen_in_training(tasks):
    for task in tasks.values():
        train, test = all_captions(task.train), all_captions(task.test)
        assert len(set(train)) == len(train) and len(set(test)) == len(test)
        assert not set(train) & set(test)
    generic = all_captions(generic_mixture(2000, seed=0))
    assert len(set(generic)) == len(generic)


def test_every_caption_fits_the_context_with_prompt_tokens(tasks):
    caps = all_captions(generic_mixture(200, seed=0))
    for task in tasks.values():
        caps += all_captions(task.test)
    tokens = clip_model.tokenize(caps, context_length=32, truncate=False, prompt_length=8)  # raises if too long
    assert tokens.shape == (len(caps), 32)


def test_verbal_styles_differ(tasks):
    """Each domain has its own template: the words around the object phrases differ."""
    vocab = set(SHAPES) | set(COLOUR_NAMES) | {"small", "large"}

    def frame(caption):
        return tuple(w for w in caption.replace(",", " ").replace(";", " ").replace(":", " ").split()
                     if w not in vocab)
    frames = {"generic": {frame(c) for c in all_captions(generic_mixture(100, seed=0))}}
    frames.update({name: {frame(c) for c in all_captions(t.test)} for name, t in tasks.items()})
    names = list(frames)
    for i, a in enumerate(names):
        for b in names[i + 1:]:
            assert not frames[a] & frames[b], f"{a} and {b} share a caption template"


def test_caption_matches_the_picture():
    """A red circle left of a blue square: red pixels on the left, blue on the right; the
    same scene named from the other object reads 'right of'."""
    scenes = Scenes(shape=torch.tensor([[0, 1], [0, 1]]), colour=torch.tensor([[0, 2], [0, 2]]),
                    size=torch.tensor([[1, 1], [1, 1]]), vertical=torch.tensor([False, False]),
                    first=torch.tensor([0, 1]))
    data = render(GENERIC, scenes, torch.Generator().manual_seed(0))
    assert data.captions == [["a large red circle left of a large blue square"],
                             ["a large blue square right of a large red circle"]]
    img = data.images.float() / 255
    red = (img[:, 0] > 0.6) & (img[:, 1] < 0.4) & (img[:, 2] < 0.4)
    blue = (img[:, 2] > 0.6) & (img[:, 0] < 0.4)
    assert red[:, :, :16].sum() > 40 and red[:, :, 16:].sum() == 0
    assert blue[:, :, 16:].sum() > 40 and blue[:, :, :16].sum() == 0


def test_shapes_are_distinct_and_visible():
    n = len(SHAPES)
    for radius in (3.6, 6.0):  # small and large
        masks = shape_masks(torch.arange(n), torch.full((n,), 16.0), torch.full((n,), 16.0), torch.full((n,), radius))
        assert (masks.flatten(1).sum(1) >= 8).all()
        for i in range(n):
            for j in range(i + 1, n):
                assert (masks[i] ^ masks[j]).sum() >= 4, (SHAPES[i], SHAPES[j], radius)


# ---------------------------------------------------------------------------------------
# Domains: really different pictures
# ---------------------------------------------------------------------------------------

def test_visual_styles_differ(tasks):
    """Per-channel mean and standard deviation of the pixels: every pair of domains (and the
    generic one) is far apart on at least one of the six statistics."""
    def stats(images):
        x = images.float() / 255
        return torch.cat([x.mean((0, 2, 3)), x.std((0, 2, 3))])
    s = {"generic": stats(generic_mixture(200, seed=0).images)}
    s.update({name: stats(t.train.images) for name, t in tasks.items()})
    names = list(s)
    for i, a in enumerate(names):
        for b in names[i + 1:]:
            assert (s[a] - s[b]).abs().max() > 0.08, (a, b, s[a], s[b])


def test_normalize_images_uses_clip_statistics():
    x = torch.full((1, 3, 2, 2), 255, dtype=torch.uint8)
    expected = (1 - torch.tensor(clip_model.CLIP_MEAN)) / torch.tensor(clip_model.CLIP_STD)
    assert torch.allclose(normalize_images(x)[0, :, 0, 0], expected)


# ---------------------------------------------------------------------------------------
# Pre-training: a few steps, the cache written once and reloaded identically
# ---------------------------------------------------------------------------------------

def test_pretrain_cache_roundtrip(tmp_path, monkeypatch):
    model = load_or_build_tiny_clip(tmp_path, steps=2, batch_size=8, seed=0, progress=False)
    files = list(tmp_path.iterdir())
    assert len(files) == 1 and files[0].name.startswith("tiny_clip_") and files[0].name.endswith(".pt.xz")

    home = sys.modules[load_or_build_tiny_clip.__module__]  # a second call must load, not train
    monkeypatch.setattr(home, "pretrain_tiny_clip", lambda *a, **k: pytest.fail("trained again"))
    again = load_or_build_tiny_clip(tmp_path, steps=2, batch_size=8, seed=0, progress=False)
    for (k, v), (k2, v2) in zip(model.state_dict().items(), again.state_dict().items()):
        assert k == k2 and torch.equal(v, v2)
    assert not again.training
    assert len(list(tmp_path.iterdir())) == 1  # no temporary file left behind
