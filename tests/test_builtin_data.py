"""Tests for the built-in world (builtin_world.py): the tasks, the pre-training mixture and
the tiny CLIP, and that the world gives the method something to do (training helps,
routing works)."""

import os
import sys
import time

import pytest
import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import builtin_world as world  # noqa: E402
import clip_model  # noqa: E402
from data import builtin_task  # noqa: E402
import lpi  # noqa: E402


@pytest.fixture(scope="module")
def tasks():
    return {name: make(n_train=200, n_test=100, seed=0) for name, make in lpi.BUILTIN_TASKS.items()}


def all_captions(data):
    return [c for caps in data.captions for c in caps]


def words(captions):
    return {w for c in captions for w in c.split()}


# ---------------------------------------------------------------------------------------
# Layout, determinism, vocabulary
# ---------------------------------------------------------------------------------------

def test_every_family_is_a_task_with_the_right_layout(tasks):
    assert list(tasks) == list(world.FAMILIES) and len(tasks) >= 6
    for name, task in tasks.items():
        assert task.name == name and task.readable == world.FAMILIES[name].label
        for data, n in ((task.train, 200), (task.test, 100)):
            assert data.images.dtype == torch.uint8
            assert data.images.shape == (n, 3, world.IMAGE_SIZE, world.IMAGE_SIZE)
            assert len(data) == n and all(len(c) == 1 and isinstance(c[0], str) for c in data.captions)


def test_deterministic_by_seed():
    for make in lpi.BUILTIN_TASKS.values():
        a, b, c = make(n_train=30, n_test=10, seed=1), make(n_train=30, n_test=10, seed=1), make(n_train=30, n_test=10, seed=2)
        assert torch.equal(a.train.images, b.train.images) and torch.equal(a.test.images, b.test.images)
        assert a.train.captions == b.train.captions and a.test.captions == b.test.captions
        assert a.test.captions != c.test.captions
    (i1, c1), (i2, c2), (_, c3) = world.generic_mixture(40, seed=3), world.generic_mixture(40, seed=3), world.generic_mixture(40, seed=4)
    assert torch.equal(i1, i2) and c1 == c2 and c1 != c3


def test_every_task_word_is_taught_in_pretraining(tasks):
    """No word a task or a task name uses is left untrained: each occurs in the pre-training
    mixture (a sample of 2,000 pairs; a batch is 128)."""
    taught = words(c[0] for c in world.generic_mixture(2000, seed=0)[1])
    used = words(c for t in tasks.values() for c in all_captions(t.train) + all_captions(t.test))
    used |= words(lpi.TASK_NAME_TEMPLATE.format(t.readable) for t in tasks.values())
    assert used <= taught, sorted(used - taught)
    # and the task names are taught as whole captions, exactly as LPI reads them
    names = {c[0] for c in world.generic_mixture(2000, seed=0)[1]}
    assert all(lpi.TASK_NAME_TEMPLATE.format(t.readable) in names for t in tasks.values())


def test_captions_unique_and_test_scenes_unseen_in_training(tasks):
    for task in tasks.values():
        train, test = all_captions(task.train), all_captions(task.test)
        assert len(set(test)) == len(test)
        assert not set(train) & set(test)


def test_every_caption_fits_the_context_with_prompt_tokens(tasks):
    caps = [c[0] for c in world.generic_mixture(200, seed=0)[1]]
    for task in tasks.values():
        caps += all_captions(task.test)
    tokens = clip_model.tokenize(caps, context_length=32, truncate=False, prompt_length=8)  # raises if too long
    assert tokens.shape == (len(caps), 32)


def test_families_have_their_own_nouns_and_related_pairs_share_a_word():
    nouns = [set(f.nouns) for f in world.FAMILIES.values()]
    assert all(not (a & b) for i, a in enumerate(nouns) for b in nouns[i + 1:])
    labels = [set(f.label.split()) for f in world.FAMILIES.values()]
    sharing = [(i, j) for i in range(len(labels)) for j in range(i + 1, len(labels)) if labels[i] & labels[j]]
    assert 0 < len(sharing) < len(labels) * (len(labels) - 1) // 2   # some related pairs, not all


def test_generation_is_fast():
    world.generic_mixture(100, seed=0)  # warm-up
    start = time.perf_counter()
    world.generic_mixture(2000, seed=0)
    builtin_task("sea-animals")
    assert time.perf_counter() - start < 5.0  # ~0.4 s on an idle 2-core machine


# ---------------------------------------------------------------------------------------
# Pictures: the caption says what is drawn; glyphs and settings are distinct
# ---------------------------------------------------------------------------------------

def plain_scenes(noun, colour, vertical, small):
    """Scenes in plain light on the grey background, from lists."""
    plain = world.SETTING_NAMES.index("plain")
    n = len(vertical)
    return world.Scenes(noun=torch.tensor(noun), colour=torch.tensor(colour), vertical=torch.tensor(vertical),
                        small=torch.tensor(small), setting=torch.full((n,), plain), light=torch.full((n,), plain))


def test_caption_matches_the_picture():
    """A red fish left of a blue crab in plain light: red pixels on the left, blue on the
    right; the same objects one above the other read 'above', red on top."""
    fish, crab = world.NOUNS.index("fish"), world.NOUNS.index("crab")
    red, blue = world.COLOUR_NAMES.index("red"), world.COLOUR_NAMES.index("blue")
    scenes = plain_scenes([[fish, crab]] * 2, [[red, blue]] * 2, [False, True], [[False, True]] * 2)
    images, caps = world.render(scenes, torch.Generator().manual_seed(0))
    assert caps == [["a red fish left of a blue crab"], ["a red fish above a blue crab"]]
    img = images.float() / 255
    is_red = (img[:, 0] > 0.6) & (img[:, 1] < 0.4) & (img[:, 2] < 0.4)
    is_blue = (img[:, 2] > 0.6) & (img[:, 0] < 0.4)
    assert is_red[0, :, :16].sum() > 40 and is_red[0, :, 16:].sum() == 0
    assert is_blue[0, :, 16:].sum() > 20 and is_blue[0, :, :16].sum() == 0
    assert is_red[1, :16].sum() > 40 and is_red[1, 16:].sum() == 0
    assert is_blue[1, 16:].sum() > 20 and is_blue[1, :16].sum() == 0
    assert is_red[0].sum() > 1.5 * is_blue[0].sum()       # the fish is the larger object, the crab small


def test_a_task_overlaps_its_partner_as_documented():
    """World v3: the larger object is of the task's family; the second is of the partner's
    family in about MIXED of the pictures (else of its own); the picture is in the partner's
    setting in about IN_PARTNER_SETTING of them, and always in the task's own light; the
    caption names both objects and not their size."""
    g = torch.Generator().manual_seed(0)
    n = 4000
    for name, fam in world.FAMILIES.items():
        sc = world.task_scenes(name, n, g)
        own, partner = set(world.family_nouns(name).tolist()), set(world.family_nouns(fam.partner).tolist())
        larger = sc.noun[torch.arange(n), sc.small.long().argmin(1)]
        smaller = sc.noun[torch.arange(n), sc.small.long().argmax(1)]
        assert (sc.small.sum(1) == 1).all() and set(larger.tolist()) <= own
        mixed = torch.tensor([x in partner for x in smaller.tolist()])
        assert set(smaller.tolist()) <= own | partner
        assert abs(mixed.float().mean() - world.MIXED) < 0.03, name
        away = sc.setting == world.SETTING_NAMES.index(world.FAMILIES[fam.partner].setting)
        assert (away | (sc.setting == world.SETTING_NAMES.index(fam.setting))).all()
        assert abs(away.float().mean() - world.IN_PARTNER_SETTING) < 0.03, name
        assert (sc.light == world.SETTING_NAMES.index(fam.setting)).all()
        for (a, b), cap in zip(sc.noun[:20].tolist(), world.captions(sc[:20])):
            assert world.NOUNS[a] in cap and world.NOUNS[b] in cap and "small" not in cap and "large" not in cap
    assert all(world.FAMILIES[f.partner].partner == f.name and world.FAMILIES[f.partner].kind != f.kind
               for f in world.FAMILIES.values())            # partners pair up, across the related pairs


def test_objects_look_distinct_and_related_families_share_an_outline():
    n = len(world.NOUNS)
    masks = world.glyph_masks(torch.arange(n), torch.full((n,), 8.0), torch.full((n,), 8.0)).flatten(1)
    assert (masks.sum(1) >= 40).all()                                     # visible
    diff = (masks.unsqueeze(1) ^ masks.unsqueeze(0)).sum(-1) + 1000 * torch.eye(n, dtype=torch.long)
    assert int(diff.min()) >= 20                                          # any two differ in 20+ pixels
    looks = world.looks()
    assert len(set(looks)) == n
    for fam in world.FAMILIES.values():
        related = [f for f in world.FAMILIES.values() if f.kind == fam.kind and f is not fam]
        assert len(related) == 1
        outline = {looks[world.NOUNS.index(x)][0] for x in fam.nouns + related[0].nouns}
        assert outline == {fam.kind}


def test_settings_look_different_and_their_light_can_be_read():
    """Every pair of settings is far apart in some pixel statistic; every light is an
    invertible colour transform, and all but the plain one change the colours."""
    def stats(setting):
        g, every = torch.Generator().manual_seed(0), torch.arange(len(world.NOUNS))
        scenes = world.mixture_scenes(200, g, every, every, torch.tensor([world.SETTING_NAMES.index(setting)]))
        x = world.render(scenes, torch.Generator().manual_seed(1))[0].float() / 255
        return torch.cat([x.mean((0, 2, 3)), x.std((0, 2, 3))])
    s = {name: stats(name) for name in world.SETTINGS}
    names = list(s)
    for i, a in enumerate(names):
        for b in names[i + 1:]:
            assert (s[a] - s[b]).abs().max() > 0.05, (a, b)
    rgb = torch.tensor(list(world.COLOURS.values()))
    for name, setting in world.SETTINGS.items():
        assert abs(torch.linalg.det(torch.tensor(setting.A, dtype=torch.float64))) > 1e-3, name
        assert (name == "plain") == torch.allclose(setting.light(rgb), rgb), name


def test_normalize_images_uses_clip_statistics():
    x = torch.full((1, 3, 2, 2), 255, dtype=torch.uint8)
    expected = (1 - torch.tensor(clip_model.CLIP_MEAN)) / torch.tensor(clip_model.CLIP_STD)
    assert torch.allclose(world.normalize_images(x)[0, :, 0, 0], expected)


# ---------------------------------------------------------------------------------------
# Pre-training: batches are a function of (seed, step); the cache is written once
# ---------------------------------------------------------------------------------------

def test_pretraining_batches_do_not_depend_on_the_worker_count():
    a = world.pretrain_tiny_clip(steps=2, batch_size=8, progress=False, workers=0)
    b = world.pretrain_tiny_clip(steps=2, batch_size=8, progress=False, workers=2)
    for (k, v), (_, v2) in zip(a.state_dict().items(), b.state_dict().items()):
        assert torch.equal(v, v2), k


def test_pretrain_cache_roundtrip(tmp_path, monkeypatch):
    model = world.load_or_build_tiny_clip(tmp_path, steps=2, batch_size=8, seed=0, progress=False)
    files = list(tmp_path.iterdir())
    assert len(files) == 1 and files[0].name.startswith("tiny_clip_") and files[0].name.endswith(".pt.xz")
    monkeypatch.setattr(world, "pretrain_tiny_clip", lambda *a, **k: pytest.fail("trained again"))
    again = world.load_or_build_tiny_clip(tmp_path, steps=2, batch_size=8, seed=0, progress=False)
    for (k, v), (k2, v2) in zip(model.state_dict().items(), again.state_dict().items()):
        assert k == k2 and torch.equal(v, v2)
    assert not again.training
    assert len(list(tmp_path.iterdir())) == 1  # no temporary file left behind


# ---------------------------------------------------------------------------------------
# The world gives the method something to do (the shipped tiny CLIP)
# ---------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def tiny_clip():
    return world.load_or_build_tiny_clip(world.SHIPPED_TINY_CLIP.parent, progress=False)


@torch.no_grad()
def frozen_features(clip, data):
    tokens = clip_model.tokenize([c[0] for c in data.captions], clip.context_length, truncate=True)
    return clip.encode_image(world.normalize_images(data.images)), clip.encode_text(tokens)


def test_frozen_tiny_clip_routes_related_tasks(tiny_clip):
    """Two related tasks (their names share a word, their objects an outline): k-means keys of
    the frozen features route at least 90% of the test images and of the captions home."""
    names = ["sea-animals", "farm-animals"]
    router = lpi.TaskRouter(seed=0)
    tests = []
    for name in names:
        task = builtin_task(name, n_train=300, n_test=100)
        router.add_task(*frozen_features(tiny_clip, task.train), k=5)
        tests.append(frozen_features(tiny_clip, task.test))
    for k, (img, txt) in enumerate(tests):
        assert (router.route_images(img) == k).double().mean() >= 0.9, names[k]
        assert (router.route_texts(txt) == k).double().mean() >= 0.9, names[k]


def test_prompts_learn_what_zero_shot_cannot(tmp_path):
    """One built-in task at reduced size, the true task given: LPI's prompts beat zero-shot
    CLIP's R@1 (mean of i2t and t2i) by a clear margin within seconds of CPU."""
    out = tmp_path / "run"
    res = lpi.run(lpi.RunConfig(tasks="sea-animals", max_train_per_task=400, max_test_per_task=100, epochs=8,
                                out=str(out), progress=False, workers=0), lpi.LPIConfig(routing="oracle"))
    r1 = lambda s: (s["i2t_R@1"] + s["t2i_R@1"]) / 2  # noqa: E731
    assert r1(res["summary"]) >= r1(res["zeroshot"]["summary"]) + 10, (res["summary"], res["zeroshot"]["summary"])


def test_the_pool_and_the_routing_matter(tmp_path):
    """What world v3 is for (README, "What python lpi.py shows"): on python lpi.py's six tasks
    the frozen tiny CLIP loses at least 3 R@1 points when each query meets the pool of all
    seen tasks instead of its own task alone, and k-means keys route between 70% and 95% of
    the test images and captions to their own task."""
    res = lpi.run(*lpi.configs(method="zeroshot", out=str(tmp_path / "zs"), progress=False, workers=0))
    zs = res["zeroshot"]
    r1 = lambda s: (s["i2t_R@1"] + s["t2i_R@1"]) / 2  # noqa: E731
    assert r1(zs["alone"]["summary"]) - r1(zs["summary"]) >= 3, (zs["alone"]["summary"], zs["summary"])
    routing = res["routing_accuracy"][-1]
    assert 70 <= routing["image"] <= 95 and 70 <= routing["text"] <= 95, routing


def test_the_readme_table_is_the_committed_runs():
    """README's "What python lpi.py shows" quotes the runs in benchmarks/results/lpi_py_runs.json:
    its table rows (seed 0), the per-seed mean recalls and the paired difference with S-Prompts."""
    import json

    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    readme = open(os.path.join(root, "README.md"), encoding="utf-8").read()
    runs = json.load(open(os.path.join(root, "benchmarks", "results", "lpi_py_runs.json")))["runs"]
    keys = [f"{d}_R@{k}" for d in ("i2t", "t2i") for k in (1, 5, 10)]
    rows = {"| **LPI** (k-means routing) |": "lpi seed 0", "| LPI with oracle routing (`--routing oracle`) |": "oracle seed 0",
            "| S-Prompts (full rank, J = 1; protocol: Adam 0.1) |": "sprompts seed 0",
            "| S-Prompts with the authors' SGD 0.05 |": "sprompts_sgd seed 0",
            "| LPI before the fixes (SGD 0.05) |": "before_the_fixes seed 0", "| zero-shot tiny CLIP |": "zeroshot"}
    for start, name in rows.items():
        s = runs[name]["summary"]
        cells = " | ".join(f"{s[k]:.1f}" for k in keys)
        mean = f"**{s['mean_recall']:.1f}**" if name == "lpi seed 0" else f"{s['mean_recall']:.1f}"
        assert f"{start} {cells} | {mean} |" in readme, f"README's row for {name} differs from lpi_py_runs.json"
    mr = {n: [runs[f"{n} seed {s}"]["summary"]["mean_recall"] for s in range(3)] for n in ("lpi", "oracle", "sprompts")}
    per_seed = lambda v: ", ".join(f"{x:.1f}" for x in v)  # noqa: E731
    said = " ".join(readme.split("Over seeds 0, 1 and 2 (`--seed`), mean recall: ")[1].split("\n\n")[0].split())
    assert said.startswith(f"LPI {per_seed(mr['lpi'])}; with oracle routing {per_seed(mr['oracle'])}; "
                           f"S-Prompts (protocol) {per_seed(mr['sprompts'])}; zero-shot "
                           f"{runs['zeroshot']['summary']['mean_recall']:.1f} at every seed"), said
    diffs = [a - b for a, b in zip(mr["lpi"], mr["sprompts"])]
    above = sum(mr["lpi"]) / 3 - runs["zeroshot"]["summary"]["mean_recall"]
    assert f"{above:.1f} mean-recall points above zero-shot" in readme
    assert f"by {sum(diffs) / 3:.1f} mean-recall points, paired by seed ({per_seed(diffs)};" in readme.replace("+", "")


def test_the_readme_routing_and_oracle_gap_are_the_committed_runs():
    """The routing accuracies and the oracle's gains README quotes for seeds 0-2."""
    import json

    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    readme = " ".join(open(os.path.join(root, "README.md"), encoding="utf-8").read().split())
    runs = json.load(open(os.path.join(root, "benchmarks", "results", "lpi_py_runs.json")))["runs"]
    img = [runs[f"lpi seed {s}"]["routing"]["image"] for s in range(3)]
    txt = [runs[f"lpi seed {s}"]["routing"]["text"] for s in range(3)]
    assert f"send {min(img):.1f}–{max(img):.1f}% of the test images and {min(txt):.1f}–{max(txt):.1f}% of the captions" in readme
    gains = [runs[f"oracle seed {s}"]["summary"]["mean_recall"] - runs[f"lpi seed {s}"]["summary"]["mean_recall"] for s in range(3)]
    assert f"gains {gains[0]:.1f}, {gains[1]:.1f} and {gains[2]:.1f} points (mean {sum(gains) / 3:.1f})" in readme
