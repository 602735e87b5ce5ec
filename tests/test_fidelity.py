"""Each component as the paper and the authors' code describe it (METHOD.md): task similarity
from names with targets that split the pairs on any backbone (§5), the task loss averaged over
modalities on a representation where every layer counts (§5), the α = 0 interaction ablation
(§3), S-Prompts at J = 1, and the authors' recipe as switches:
--augment, --pairs, --route-metric (§6-7). The prompt-level loss (§4) is tested in
test_lpi_components.py.
"""
import copy
import json

import pytest
import torch
import torch.nn.functional as F

import data as data_module
import lpi


@pytest.fixture(scope="module")
def tiny_clip(tmp_path_factory):
    """The shipped tiny CLIP (lpi.py's default backbone)."""
    return lpi.world.load_or_build_tiny_clip(tmp_path_factory.mktemp("cache"), progress=False)


def _off(T):
    return ~torch.eye(T, dtype=torch.bool)


# ----------------------------------------------------------------------------------------
# §5 task similarity and targets
# ----------------------------------------------------------------------------------------

def test_builtin_task_names_give_related_and_unrelated_pairs(tiny_clip):
    """§5 --task-similarity names: on the built-in tasks, Y has positive and negative off-diagonal pairs."""
    names = list(lpi.BUILTIN_TASKS)
    S = lpi.name_similarity(tiny_clip, names)
    assert S.shape == (len(names), len(names))
    torch.testing.assert_close(S, S.t())
    Y = lpi.task_targets(S, lpi.LPIConfig.theta)
    off = Y[_off(len(names))]
    assert (off == 1).any() and (off == 0).any(), (S, Y)
    assert torch.equal(Y.diagonal(), torch.ones(len(names)))


@pytest.mark.parametrize("seed", range(5))
def test_targets_split_pairs_when_every_raw_cosine_is_above_theta(seed):
    """§5: a real CLIP's name cosines can all exceed θ = 0.4 (shared component); after range
    normalisation θ still splits them, and the order of the pairs is kept."""
    g = torch.Generator().manual_seed(seed)
    T = 12
    common = torch.randn(1, 64, generator=g)
    e = F.normalize(3 * common + torch.randn(T, 64, generator=g), dim=-1)   # a large shared component
    S = e @ e.t()
    assert (S[_off(T)] > 0.4).all()              # raw θ would call every pair related
    Y = lpi.task_targets(S, 0.4)
    off_S, off_Y = S[_off(T)], Y[_off(T)]
    assert 0 < off_Y.sum() < len(off_Y)
    assert off_S[off_Y == 1].min() > off_S[off_Y == 0].max()  # a threshold on the order of the pairs
    torch.testing.assert_close(Y, Y.t())


def test_targets_on_the_authors_matrix_range_keep_their_split():
    """§5: off-diagonal values spread like the authors' (0.22-0.70): θ = 0.4 after rescaling sits at a raw 0.41."""
    vals = torch.tensor([0.22, 0.30, 0.38, 0.40, 0.42, 0.55, 0.70])
    T = 3
    for v in vals[1:-1]:
        S = torch.eye(T)
        S[0, 1] = S[1, 0] = 0.22
        S[0, 2] = S[2, 0] = 0.70
        S[1, 2] = S[2, 1] = v
        assert bool(lpi.task_targets(S, 0.4)[1, 2]) == bool(v > 0.22 + 0.4 * 0.48), v


def test_targets_with_two_tasks_use_the_raw_cosine():
    """§5: with one pair there is no range: θ applies to the raw value."""
    for v, want in ((0.9, 1), (0.3, 0)):
        S = torch.tensor([[1.0, v], [v, 1.0]])
        assert int(lpi.task_targets(S, 0.4)[0, 1]) == want


# ----------------------------------------------------------------------------------------
# §5 the task loss as the authors weigh it
# ----------------------------------------------------------------------------------------

def _lpi(tiny_clip, n_tasks, **kw):
    torch.manual_seed(0)
    model = lpi.LPI(copy.deepcopy(tiny_clip), lpi.LPIConfig(J=3, M=4, R=2, interaction_rank=2, **kw))
    for _ in range(n_tasks):
        model.add_task()
    return model


def test_task_loss_is_the_mean_of_the_two_modalities(tiny_clip):
    """§5: L_task = (L_task_v + L_task_t) / 2, on the prompts as inserted."""
    model = _lpi(tiny_clip, 3)
    Y = torch.tensor([[1.0, 1.0, 0.0], [1.0, 1.0, 0.0], [0.0, 0.0, 1.0]])
    tokens = model.tokenize(["a red circle", "a blue square"])
    with torch.no_grad():
        out = model.losses(torch.randn(2, 3, 32, 32), tokens, 2, Y)
        pv, pt = model.stacked_prompts()
        want = (lpi.task_contrastive_loss(pv, Y, model.cfg.tau_task) + lpi.task_contrastive_loss(pt, Y, model.cfg.tau_task)) / 2
    torch.testing.assert_close(out["task"], want)


def test_task_loss_counts_every_layer():
    """§5: scaling one layer's tokens (as the interaction's LayerNorm scales deep layers) does
    not change the task loss: every layer and token counts alike, whatever its scale."""
    g = torch.Generator().manual_seed(0)
    T, J, M, D = 3, 4, 5, 16
    P = torch.randn(T, J, M, D, generator=g)
    Y = torch.tensor([[1.0, 1.0, 0.0], [1.0, 1.0, 0.0], [0.0, 0.0, 1.0]])
    ref = lpi.task_contrastive_loss(P, Y, 0.1)
    scaled = P.clone()
    scaled[:, 1:] *= 16.0       # deep layers at unit scale vs layer 0 at ~0.06
    torch.testing.assert_close(lpi.task_contrastive_loss(scaled, Y, 0.1), ref)
    # and layer 0 alone moves it: it is not drowned by the deep layers
    moved = scaled.clone()
    moved[1, 0] = torch.randn(M, D, generator=g)
    assert (lpi.task_contrastive_loss(moved, Y, 0.1) - ref).abs() > 1e-3


# ----------------------------------------------------------------------------------------
# §3 --alpha 0: every module, no mixing
# ----------------------------------------------------------------------------------------

def test_alpha_zero_keeps_the_modules_and_mixes_nothing():
    """§3: with α = 0 the interaction keeps its parameters and LayerNorm, but a change of the
    textual factors no longer reaches the visual prompts (and it does at α = 0.1)."""
    for alpha, reaches in ((0.0, False), (0.1, True)):
        torch.manual_seed(0)
        tp = lpi.TaskPrompts(lpi.LPIConfig(J=3, M=2, R=2, alpha=alpha), 8, 6)
        n_inter = sum(p.numel() for p in tp.interaction.parameters())
        assert n_inter == lpi.count_parameters(lpi.LPIConfig(J=3, M=2, R=2), 8, 6)["interaction"] > 0
        before = tp()[0].detach().clone()
        with torch.no_grad():
            tp.prompts.C_t.add_(1.0)
        after = tp()[0]
        assert torch.equal(before[0], after[0])  # layer 0 never mixes
        assert (not torch.allclose(before, after)) == reaches, alpha
        if alpha == 0:
            gain = lpi.LPIConfig().interaction_gain  # the LayerNorm's gain at init
            torch.testing.assert_close(after[1:], gain * F.layer_norm(tp.raw()[0][1:], (8,)))


# ----------------------------------------------------------------------------------------
# Baselines and parameters
# ----------------------------------------------------------------------------------------

def test_sprompts_is_full_rank_at_layer_zero_only(tiny_clip):
    """Baselines: --method sprompts has full-rank prompts with J = 1; --no-low-rank keeps LPI's depth."""
    model = lpi.make_method("sprompts", lpi.LPIConfig(J=4, M=4), copy.deepcopy(tiny_clip))
    model.add_task()
    tp = model.task_prompts[0]
    assert isinstance(tp.prompts, lpi.FullRankPrompts) and tp.prompts.P_v.shape[0] == 1 and tp.interaction is None
    model = lpi.make_method("lpi", lpi.LPIConfig(J=4, M=4, low_rank=False), copy.deepcopy(tiny_clip))
    model.add_task()
    assert model.task_prompts[0].prompts.P_v.shape[0] == 4


# ----------------------------------------------------------------------------------------
# The authors' recipe as switches
# ----------------------------------------------------------------------------------------

def test_pairs_per_caption_visits_every_caption_once():
    """--pairs per-caption: an epoch is every (image, caption) pair once; per-image: every image once."""
    data = data_module.ImageCaptionSet(images=torch.zeros(4, 3, 2, 2, dtype=torch.uint8),
                               captions=[["a", "b"], ["c"], ["d", "e", "f"], ["g"]])
    g = torch.Generator().manual_seed(0)
    imgs, caps = data_module.training_pairs(data, True, g)
    assert sorted(zip(imgs, caps)) == [(0, 0), (0, 1), (1, 0), (2, 0), (2, 1), (2, 2), (3, 0)]
    imgs, caps = data_module.training_pairs(data, False, g)
    assert sorted(imgs) == [0, 1, 2, 3] and all(c < len(data.captions[i]) for i, c in zip(imgs, caps))


def test_augment_crops_and_flips_each_image_on_its_own():
    """--augment: tensor images get their own random crop and flip, at the same size."""
    torch.manual_seed(0)
    x = torch.randn(16, 3, 32, 32)
    y = data_module.augment_tensors(x)
    assert y.shape == x.shape and torch.isfinite(y).all()
    changed = [(not torch.allclose(a, b)) for a, b in zip(x, y)]
    assert all(changed)
    flip = data_module.train_transform(32).transforms
    assert [type(t).__name__ for t in flip][:2] == ["RandomResizedCrop", "RandomHorizontalFlip"]


def test_route_metric_l1_is_euclidean_kmeans_and_l1_routing():
    """§6 --route-metric l1: centroids are the plain means of their points (not on the sphere),
    and a query goes to the key of smallest L1 distance."""
    g = torch.Generator().manual_seed(0)
    x = torch.cat([torch.randn(40, 8, generator=g) + 4 * torch.eye(8)[k] for k in range(3)])
    c = lpi.kmeans(x, 3, spherical=False)
    xn = F.normalize(x, dim=-1)
    assign = torch.cdist(xn, c).argmin(1)
    for k in range(3):
        torch.testing.assert_close(c[k], xn[assign == k].mean(0))
    assert (c.norm(dim=-1) < 1 - 1e-4).all()              # means of unit vectors lie inside the sphere
    router = lpi.TaskRouter(metric="l1")
    router.add_task(x[:40], x[:40], k=2)
    router.add_task(x[40:], x[40:], k=2)
    q = torch.randn(30, 8, generator=g)
    want = router.image_key_task[torch.cdist(F.normalize(q, dim=-1), router.image_keys, p=1).argmin(1)]
    assert torch.equal(router.route_images(q), want)
    with pytest.raises(ValueError):
        lpi.TaskRouter(metric="l2")


def test_help_shows_the_new_switches_with_defaults():
    text = lpi.build_parser().format_help()
    for flag, default in (("--task-similarity", "names"), ("--alpha", "0.1"), ("--augment", "auto"),
                          ("--pairs", "per-caption"), ("--route-metric", "cosine")):
        after = text[text.index("\n  " + flag) + 3:]                # the option's own entry, not the usage line
        entry = "".join(after[: after.index("\n  -")].split())     # argparse wraps lines (and hyphens)
        assert f"(default:{default})" in entry, flag


def test_results_hold_task_similarity_and_targets(tmp_path, capsys):
    """A run (lpi.run, here at reduced size) writes S and Y to results.json and says how Y splits the pairs."""
    for source in ("names", "centroids"):
        out = tmp_path / source
        lpi.run(lpi.RunConfig(max_train_per_task=24, max_test_per_task=8, epochs=1, batch_size=8, progress=False,
                              out=str(out)), lpi.LPIConfig(task_similarity=source, route_metric="l1"))
        res = json.loads((out / "results.json").read_text())
        T = len(res["tasks"])
        S, Y = torch.tensor(res["task_similarity"]), torch.tensor(res["task_targets"])
        assert S.shape == Y.shape == (T, T)
        assert (Y[_off(T)] == 1).any() and (Y[_off(T)] == 0).any()
        assert f"task similarity ({source}):" in capsys.readouterr().out
