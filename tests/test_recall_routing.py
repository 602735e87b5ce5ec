"""Tests for Recall@K (against a brute-force reference) and for k-means task routing."""

import os
import sys

import pytest
import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import lpi  # noqa: E402
from lpi import (TaskRouter, i2t_ranks, kmeans, recall_at_k, recall_from_ranks,
                     t2i_ranks)  # noqa: E402


# ---------------------------------------------------------------------------------------
# Brute-force reference: one query at a time, a Python sort with the same tie rule.
# Candidates are sorted by score, high first; among equal scores the WRONG candidates go
# first (pessimistic). The rank is the number of wrong candidates before the first correct.
# ---------------------------------------------------------------------------------------

def _rank_by_sorting(scores, is_correct):
    order = sorted(range(len(scores)), key=lambda j: (-scores[j], is_correct[j]))
    for position, j in enumerate(order):
        if is_correct[j]:
            return position  # everything before the first correct candidate is wrong
    return len(scores)  # no correct candidate at all


def brute_force_recall(sim, cap2img, ks=(1, 5, 10), img_queries=None, cap_queries=None):
    s = sim.tolist()
    c2i = cap2img.tolist()
    n_img, n_cap = len(s), len(c2i)
    img_q = range(n_img) if img_queries is None else img_queries.tolist()
    cap_q = range(n_cap) if cap_queries is None else cap_queries.tolist()
    i2t = [_rank_by_sorting(s[i], [c2i[c] == i for c in range(n_cap)]) for i in img_q]
    t2i = [_rank_by_sorting([s[i][c] for i in range(n_img)],
                            [c2i[c] == i for i in range(n_img)]) for c in cap_q]

    def recall(ranks):
        return {f"R@{k}": 100.0 * sum(r < k for r in ranks) / len(ranks) for k in ks}
    return {"i2t": recall(i2t), "t2i": recall(t2i)}, i2t, t2i


def random_problem(n_img, max_caps, seed, integer_range=None):
    """A random pool with 1..max_caps captions per image (shuffled caption order)."""
    g = torch.Generator().manual_seed(seed)
    counts = torch.randint(1, max_caps + 1, (n_img,), generator=g)
    cap2img = torch.repeat_interleave(torch.arange(n_img), counts)
    cap2img = cap2img[torch.randperm(len(cap2img), generator=g)]
    if integer_range is None:
        sim = torch.randn(n_img, len(cap2img), generator=g)
    else:  # many exact ties
        sim = torch.randint(0, integer_range, (n_img, len(cap2img)), generator=g).float()
    return sim, cap2img


def assert_same(got, want):
    for direction in ("i2t", "t2i"):
        for key, value in want[direction].items():
            assert got[direction][key] == pytest.approx(value, abs=1e-9), (direction, key)


# ---------------------------------------------------------------------------------------
# Recall@K
# ---------------------------------------------------------------------------------------

@pytest.mark.parametrize("seed", range(4))
@pytest.mark.parametrize("integer_range", [None, 3, 6])
def test_recall_matches_brute_force(seed, integer_range):
    sim, cap2img = random_problem(n_img=30, max_caps=5, seed=seed, integer_range=integer_range)
    want, want_i2t, want_t2i = brute_force_recall(sim, cap2img, ks=(1, 2, 5, 10))
    assert_same(recall_at_k(sim, cap2img, ks=(1, 2, 5, 10)), want)
    # The ranks themselves, not only the recalls; small chunks exercise the chunk loops.
    assert i2t_ranks(sim, cap2img, chunk=7).tolist() == want_i2t
    assert t2i_ranks(sim, cap2img, chunk=7).tolist() == want_t2i


@pytest.mark.parametrize("integer_range", [None, 4])
def test_query_subsets_match_brute_force_and_slicing(integer_range):
    sim, cap2img = random_problem(n_img=25, max_caps=4, seed=7, integer_range=integer_range)
    img_q = torch.tensor([3, 0, 17, 9, 24])
    cap_q = torch.tensor([5, 1, 40, 2, 33, 11])
    want, want_i2t, want_t2i = brute_force_recall(sim, cap2img, img_queries=img_q,
                                                  cap_queries=cap_q)
    assert_same(recall_at_k(sim, cap2img, img_queries=img_q, cap_queries=cap_q), want)
    assert i2t_ranks(sim, cap2img, img_q, chunk=2).tolist() == want_i2t
    assert t2i_ranks(sim, cap2img, cap_q, chunk=4).tolist() == want_t2i
    # Ranking everything once and slicing gives the same ranks (the per-task pattern).
    assert torch.equal(i2t_ranks(sim, cap2img)[img_q], i2t_ranks(sim, cap2img, img_q))
    assert torch.equal(t2i_ranks(sim, cap2img)[cap_q], t2i_ranks(sim, cap2img, cap_q))


def test_hand_made_example():
    # 3 images; captions 0,1 -> image 0, caption 2 -> image 1, captions 3,4 -> image 2.
    cap2img = torch.tensor([0, 0, 1, 2, 2])
    sim = torch.tensor([
        # c0   c1   c2   c3   c4
        [0.9, 0.1, 0.5, 0.2, 0.3],   # img 0: best correct c0 (0.9) is first   -> rank 0
        [0.1, 0.2, 0.3, 0.4, 0.3],   # img 1: c2 = 0.3; c3 (0.4) and c4 tie    -> rank 2
        [0.8, 0.7, 0.1, 0.6, 0.0],   # img 2: best correct c3 = 0.6, c0, c1 ahead -> rank 2
    ])
    assert i2t_ranks(sim, cap2img).tolist() == [0, 2, 2]
    # t2i: c0 img0 .9 vs .1,.8 -> 0; c1 img0 .1 vs .2,.7 -> 2; c2 img1 .3 vs .5,.1 -> 1;
    #      c3 img2 .6 vs .2,.4 -> 0; c4 img2 .0 vs .3,.3 -> 2.
    assert t2i_ranks(sim, cap2img).tolist() == [0, 2, 1, 0, 2]
    r = recall_at_k(sim, cap2img, ks=(1, 2, 3))
    assert r["i2t"] == pytest.approx({"R@1": 100 / 3, "R@2": 100 / 3, "R@3": 100.0})
    assert r["t2i"] == pytest.approx({"R@1": 40.0, "R@2": 60.0, "R@3": 100.0})


def test_ties_are_pessimistic_and_correct_ties_do_not_count():
    # All scores equal: every wrong candidate ties with the correct one.
    cap2img = torch.tensor([0, 0, 1, 1, 2, 2])
    sim = torch.zeros(3, 6)
    assert i2t_ranks(sim, cap2img).tolist() == [4, 4, 4]     # 4 wrong captions tie
    assert t2i_ranks(sim, cap2img).tolist() == [2] * 6        # 2 wrong images tie
    assert recall_at_k(sim, cap2img, ks=(1,))["i2t"]["R@1"] == 0.0
    # Two correct captions tying at the top, no wrong one as high: rank 0 (not 1).
    sim = torch.tensor([[1.0, 1.0, 0.0, 0.0, 0.0, 0.0]] * 3)
    assert i2t_ranks(sim, cap2img)[0].item() == 0


def test_image_without_captions_is_never_a_hit():
    cap2img = torch.tensor([0, 0, 2])      # image 1 has no caption
    sim = torch.rand(3, 3)
    assert i2t_ranks(sim, cap2img)[1].item() == 3
    assert recall_from_ranks(torch.tensor([0, 3, 12]), ks=(1, 5)) == pytest.approx(
        {"R@1": 100 / 3, "R@5": 200 / 3})


def test_perfect_and_reversed_scores():
    sim, cap2img = random_problem(n_img=20, max_caps=3, seed=1)
    perfect = (cap2img[None, :] == torch.arange(20)[:, None]).float()
    assert recall_at_k(perfect, cap2img, ks=(1,)) == {"i2t": {"R@1": 100.0},
                                                      "t2i": {"R@1": 100.0}}
    assert recall_at_k(-perfect, cap2img, ks=(1,)) == {"i2t": {"R@1": 0.0},
                                                       "t2i": {"R@1": 0.0}}


# ---------------------------------------------------------------------------------------
# k-means and task routing
# ---------------------------------------------------------------------------------------

def blobs(n_centers, per_center, dim, spread, seed):
    """Points around random unit centres; returns (points, labels, centres)."""
    g = torch.Generator().manual_seed(seed)
    centers = torch.nn.functional.normalize(torch.randn(n_centers, dim, generator=g), dim=-1)
    labels = torch.arange(n_centers).repeat_interleave(per_center)
    points = centers[labels] + spread * torch.randn(len(labels), dim, generator=g)
    perm = torch.randperm(len(labels), generator=g)
    return points[perm], labels[perm], centers


def test_kmeans_recovers_separated_clusters():
    x, labels, centers = blobs(n_centers=5, per_center=40, dim=32, spread=0.05, seed=0)
    c = kmeans(x, 5, seed=0)
    assert c.shape == (5, 32)
    assert torch.allclose(c.norm(dim=-1), torch.ones(5), atol=1e-5)
    # Every true centre has a found centroid very close to it (a perfect matching).
    cos = centers @ c.T                                                        # (5, 5)
    assert (cos.max(1).values > 0.99).all()
    assert sorted(cos.argmax(1).tolist()) == list(range(5))


def test_kmeans_is_deterministic_and_handles_small_inputs():
    x, _, _ = blobs(n_centers=3, per_center=30, dim=16, spread=0.3, seed=2)
    assert torch.equal(kmeans(x, 5, seed=3), kmeans(x, 5, seed=3))
    # N <= k: the (normalised) points themselves.
    few = torch.randn(3, 16)
    assert torch.allclose(kmeans(few, 5), torch.nn.functional.normalize(few, dim=-1))
    # Fewer distinct points than k (duplicates): still k finite unit centroids.
    dup = torch.randn(2, 16).repeat(10, 1)
    c = kmeans(dup, 4, seed=0)
    assert c.shape == (4, 16) and torch.isfinite(c).all()


def test_router_on_separated_tasks_is_exact_and_checkpointable():
    n_tasks, dim = 4, 32
    router = TaskRouter(seed=0)
    img_test, txt_test = [], []
    for t in range(n_tasks):
        # Each task: a few sub-clusters of its own (separate seeds per task and modality).
        img, _, _ = blobs(n_centers=3, per_center=30, dim=dim, spread=0.05, seed=100 + t)
        txt, _, _ = blobs(n_centers=3, per_center=50, dim=dim, spread=0.05, seed=200 + t)
        assert router.add_task(img[:60] * 3.0, txt[:100], k=5) == t   # scale is irrelevant
        img_test.append(img[60:]), txt_test.append(txt[100:])     # 30 and 50 held out
    img_test, txt_test = torch.cat(img_test), torch.cat(txt_test)
    truth = torch.arange(n_tasks).repeat_interleave(30)
    assert router.image_keys.shape == (n_tasks * 5, dim)
    assert torch.equal(router.route_images(img_test), truth)
    assert torch.equal(router.route_texts(txt_test), torch.arange(n_tasks).repeat_interleave(50))

    # state_dict round trip: plain tensors, same routing.
    state = router.state_dict()
    assert all(isinstance(v, torch.Tensor) for v in state.values())
    restored = TaskRouter()
    restored.load_state_dict(state)
    assert restored.num_tasks == n_tasks
    assert torch.equal(restored.route_images(img_test), truth)

    # Same seed, same data -> identical keys.
    again = TaskRouter(seed=0)
    for t in range(n_tasks):
        img, _, _ = blobs(n_centers=3, per_center=30, dim=dim, spread=0.05, seed=100 + t)
        txt, _, _ = blobs(n_centers=3, per_center=50, dim=dim, spread=0.05, seed=200 + t)
        again.add_task(img[:60] * 3.0, txt[:100], k=5)
    assert torch.equal(again.image_keys, router.image_keys)
    assert torch.equal(again.text_keys, router.text_keys)


# ---------------------------------------------------------------------------------------
# The protocol: one pool of every seen task's items; forgetting against earlier rows only
# ---------------------------------------------------------------------------------------

def _encoded(img, cap):
    return lpi.Encoded(img, cap, torch.arange(len(img)), torch.ones(len(img), dtype=torch.bool))


def test_the_pool_holds_every_seen_tasks_items(random_tiny_clip):
    """Each task's queries are ranked against the test items of all seen tasks. Task 2 holds a
    copy of task 1's first image with the same caption: in the pool the copy ties with the
    right item, and ties count against the query, so both tasks lose that pair at R@1 in both
    directions; ranked against its own task alone, every query is a hit."""
    e = torch.eye(3)                            # features: item i matches caption i, nothing else
    frozen = [_encoded(e[[0, 1]], e[[0, 1]]), _encoded(e[[0, 2]], e[[0, 2]])]
    empty = lpi.ImageCaptionSet(torch.zeros(2, 3, 32, 32, dtype=torch.uint8), [["a"], ["b"]])
    tasks = [lpi.Task(f"task{k}", empty, empty) for k in (1, 2)]
    zero_shot = lpi.LPI(random_tiny_clip, lpi.LPIConfig(J=0, routing="oracle"))
    s, env = lpi.RunConfig(progress=False), lpi.Env(torch.device("cpu"))
    recall, routing, pool = lpi.evaluate(zero_shot, tasks, frozen, lpi.TaskRouter(), s, env)
    for d in ("i2t", "t2i"):
        assert recall[d]["R@1"] == [50.0, 50.0] and recall[d]["R@5"] == [100.0, 100.0], recall
    alone = lpi.pool_recall(pool, 2, alone=True)
    assert all(alone[d]["R@1"] == [100.0, 100.0] for d in alone), alone
    assert routing == {"image": 100.0, "text": 100.0}


def test_forgetting_counts_a_later_gain_as_negative():
    """Forgetting of task k after step t = its best recall after an EARLIER step (k..t-1) minus
    its recall now: a task that improved at step t has negative forgetting, not 0."""
    m = [[50.0, None, None],
         [40.0, 60.0, None],
         [70.0, 65.0, 80.0]]
    assert lpi.forgetting(m, 1) == 50.0 - 40.0                        # task 1 dropped
    assert lpi.forgetting(m, 2) == ((50.0 - 70.0) + (60.0 - 65.0)) / 2  # both improved: -12.5
    assert lpi.forgetting(m, 0) == 0.0                                # nothing learned before


def test_the_authors_average_and_forgetting_on_a_hand_made_matrix():
    """The authors' results script: Average = for each task the mean of its recall over every
    evaluation since it was learned, then the mean over tasks; forgetting = for each earlier
    task its final recall minus its best before, summed, divided by T - 1 (their sign)."""
    m = [[50.0, None, None],
         [40.0, 60.0, None],
         [70.0, 65.0, 80.0]]
    assert lpi.authors_average(m, 2) == ((50 + 40 + 70) / 3 + (60 + 65) / 2 + 80) / 3   # 65.28
    assert lpi.authors_average(m, 1) == ((50 + 40) / 2 + 60) / 2                      # 52.5
    assert lpi.authors_forgetting(m, 2) == ((70 - 50) + (65 - 60)) / 2                  # +12.5: both improved
    assert lpi.authors_forgetting(m, 1) == (40 - 50) / 1                               # -10: task 1 dropped
    assert lpi.authors_forgetting(m, 2) == -lpi.forgetting(m, 2)                       # the negative of ours
    joint = [[None, None], [70.0, 80.0]]                                               # trained once, at the end
    assert lpi.authors_average(joint, 1) == 75.0 and lpi.authors_forgetting(joint, 1) == 0.0
    summary = lpi.summarize({d: {"R@1": m} for d in ("i2t", "t2i")}, 2)
    assert summary["authors_average_t2i_R@1"] == lpi.authors_average(m, 2)
    assert summary["authors_forgetting_i2t_R@1"] == 12.5 and summary["i2t_forgetting_R@1"] == -12.5
