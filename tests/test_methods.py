"""Every --method runs end to end and writes the same results.json; L2P's pieces do what
its equations say; the parameter accounting matches the modules.

End-to-end runs are in-process (lpi.run) on two small built-in tasks with the shipped
tiny CLIP (lpi.py's default: nothing to pre-train) and one epoch: plumbing, not numbers.
"""
import json

import pytest
import torch
import torch.nn.functional as F

import baselines
import lpi

TINY_RUN = dict(max_train_per_task=32, max_test_per_task=16, epochs=1, batch_size=16, progress=False, workers=0,
                tasks="sea-animals,garden-tools")


@pytest.fixture(scope="session")
def cache_dir(tmp_path_factory):
    """Stays empty while the shipped tiny CLIP matches the defaults (tests/test_cli.py checks that)."""
    return tmp_path_factory.mktemp("lpi_cache")


@pytest.fixture(scope="session")
def tiny_clip(cache_dir):
    return lpi.world.load_or_build_tiny_clip(cache_dir, progress=False)


def check_results(res: dict, T: int, method: str):
    """The schema of test_cli.check_schema, for every method. joint evaluates only after
    the last task: its earlier rows stay empty and their routing entries are None."""
    for key in ("config", "tasks", "recall", "summary", "routing_accuracy", "trainable_params_per_task",
                "wall_time_s", "zeroshot"):
        assert key in res, key
    assert res["config"]["method"] == method
    assert len(res["tasks"]) == T and len(res["routing_accuracy"]) == T
    evaluated = [T - 1] if method == "joint" else list(range(T))
    for t in range(T):
        assert (res["routing_accuracy"][t] is None) == (t not in evaluated)
    for d in ("i2t", "t2i"):
        for K in ("R@1", "R@5", "R@10"):
            m = res["recall"][d][K]
            assert len(m) == T and all(len(row) == T for row in m)
            for t in range(T):
                seen = m[t][: t + 1] if t in evaluated else []
                assert all(v is not None and 0 <= v <= 100 for v in seen)
                assert all(v is None for v in m[t][len(seen):])
    for key in ("i2t_R@1", "t2i_R@1", "mean_recall", "i2t_forgetting_R@1", "t2i_forgetting_R@1"):
        assert key in res["summary"]
    p = res["trainable_params_per_task"]
    assert {"prompts", "interaction", "total"} <= set(p)


@pytest.fixture(scope="session")
def folders(tmp_path_factory, cache_dir):
    """One tiny run per method: {method: its folder}."""
    out = {}
    for method in lpi.METHODS:
        out[method] = tmp_path_factory.mktemp(f"run_{method}")
        lpi.run(lpi.RunConfig(method=method, cache_dir=str(cache_dir), out=str(out[method]), **TINY_RUN))
    return out


@pytest.fixture(scope="session")
def runs(folders):
    """{method: its results.json}."""
    return {method: json.loads((d / "results.json").read_text()) for method, d in folders.items()}


@pytest.mark.parametrize("method", list(lpi.METHODS))
def test_method_end_to_end(runs, method):
    """`python lpi.py --method NAME` runs and writes the common results.json schema."""
    res = runs[method]
    check_results(res, 2, method)
    if method == "zeroshot":  # no prompts: exactly the frozen CLIP the loop reports beside every run
        assert res["recall"]["i2t"]["R@1"][-1] == res["zeroshot"]["recall"]["i2t"]["R@1"]
        assert res["trainable_params_per_task"]["total"] == 0


def test_results_report_method_parameters(runs, tiny_clip):
    """results.json's parameter count is the method's own (L2P: pool + keys + text prompts),
    and it equals the trainable tensors of the built model."""
    for method, res in runs.items():
        model = lpi.make_method(method, lpi.LPIConfig(J=res["config"]["J"], M=res["config"]["M"]), tiny_clip)
        model.add_task()
        trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
        assert lpi.model_parameters(model, 2)["total"] == trainable, method
        assert res["trainable_params_per_task"]["total"] == trainable, method


@pytest.mark.parametrize("method", ["lpi", "l2p", "seqft"])
def test_load_run_rebuilds_the_trained_model_and_router(folders, runs, method):
    """lpi.load_run(folder): the model and router of the run's last checkpoint; encoding the
    test items again with them gives the recall the run reported."""
    loaded = lpi.load_run(folders[method])
    assert loaded.done == 2 and loaded.results["recall"] == runs[method]["recall"]
    s, env = loaded.settings, lpi.Env(torch.device("cpu"))
    tasks = lpi.load_tasks(s)
    frozen = [lpi.encode_set(loaded.model, t.test, s, env) for t in tasks]
    recall, _, _ = lpi.evaluate(loaded.model, tasks, frozen, loaded.router, s, env)
    assert recall["i2t"]["R@1"] == runs[method]["recall"]["i2t"]["R@1"][-1]
    assert recall["t2i"]["R@1"] == runs[method]["recall"]["t2i"]["R@1"][-1]
    fresh = lpi.load_run(folders[method], learned=False)
    moved = [not torch.equal(a, b) for a, b in zip(loaded.model.parameters(), fresh.model.parameters())
             if a.requires_grad or b.requires_grad]
    assert method == "zeroshot" or any(moved)


# ----------------------------------------------------------------------------------------
# L2P's pieces
# ----------------------------------------------------------------------------------------

def test_l2p_selection_is_top_k_by_cosine():
    torch.manual_seed(0)
    N, k, J, M_p, D, E, B = 10, 3, 2, 2, 8, 6, 5
    pool = baselines.PromptPool(N, k, J, M_p, D, E, std=1.0)
    q = torch.randn(B, E)
    cos, idx = pool.select(q * 7.0)  # scale-free: cosine
    expected = F.cosine_similarity(q[:, None, :], pool.keys[None, :, :], dim=-1)  # (B, N)
    assert torch.equal(idx, expected.argsort(dim=1, descending=True)[:, :k])
    assert torch.allclose(cos, expected.gather(1, idx), atol=1e-6)
    P = pool(idx)                                                   # (B, J, k*M_p, D)
    assert P.shape == (B, J, k * M_p, D)
    for b in range(B):  # the selected prompts, nearest first, side by side on the token axis
        assert torch.equal(P[b], torch.cat([pool.prompts[i] for i in idx[b].tolist()], dim=1))


def test_l2p_key_loss_decreases_as_keys_move_to_queries():
    torch.manual_seed(0)
    pool = baselines.PromptPool(10, 5, 1, 1, 4, 6, std=1.0)
    q = torch.randn(8, 6)

    def loss_after_moving(a):
        with torch.no_grad():
            cos, idx = pool.select(q)
            moved = pool.keys.clone()
            for i in idx.unique().tolist():  # each selected key towards the mean of its queries
                target = F.normalize(q[(idx == i).any(dim=1)], dim=-1).mean(0)
                moved[i] = (1 - a) * F.normalize(pool.keys[i], dim=0) + a * target
            old, pool.keys.data = pool.keys.data, moved
            loss = baselines.key_matching_loss(pool.select(q)[0])
            pool.keys.data = old
            return float(loss)

    losses = [loss_after_moving(a) for a in (0.0, 0.3, 0.6, 0.9)]
    assert all(b < a for a, b in zip(losses, losses[1:])), losses
    # and a gradient step on the keys alone lowers it; unselected keys get no gradient
    cos, idx = pool.select(q)
    before = baselines.key_matching_loss(cos)
    before.backward()
    unselected = torch.ones(10, dtype=torch.bool)
    unselected[idx.unique()] = False
    assert pool.keys.grad[unselected].abs().sum() == 0 and pool.prompts.grad is None
    with torch.no_grad():
        pool.keys -= 0.5 * pool.keys.grad
    assert baselines.key_matching_loss(pool.select(q)[0]) < before


def test_l2p_model_per_image_prompts(tiny_clip):
    """Prompted features = CLIP with each image's own selected prompts; task ids are ignored;
    None = frozen CLIP; the text side uses the one shared prompt set; nothing is ever frozen."""
    cfg = lpi.method_config("l2p", lpi.LPIConfig(J=2, M=4))
    model = baselines.L2P(tiny_clip, cfg, baselines.L2PConfig(pool_size=6, top_k=2))
    assert model.add_task() == 0 and model.add_task() == 0
    assert all(p.requires_grad for n, p in model.named_parameters() if not n.startswith("clip."))
    images = torch.randn(4, 3, 32, 32)
    with torch.no_grad():
        feats = model.encode_image(images, torch.tensor([0, 1, 0, 1]))
        assert torch.allclose(feats, model.encode_image(images, 0), atol=1e-5)
        _, idx = model.pool.select(tiny_clip.encode_image(images))
        one_by_one = torch.cat([tiny_clip.encode_image(images[b:b + 1], model.pool(idx[b:b + 1]), cfg.deep_prompts)
                                for b in range(4)])
        assert torch.allclose(feats, one_by_one, atol=1e-4)
        assert torch.equal(model.encode_image(images, None), tiny_clip.encode_image(images))
        tokens = model.tokenize(["a red circle", "a blue square"])
        assert torch.allclose(model.encode_text(tokens, 1), tiny_clip.encode_text(tokens, model.P_t, cfg.deep_prompts),
                              atol=1e-6)
    out = model.losses(images, model.tokenize(["a"] * 4), 0, None)
    assert set(out) == {"clip", "key", "total"}
    out["total"].backward()
    assert model.pool.keys.grad is not None and model.pool.prompts.grad is not None and model.P_t.grad is not None
    assert all(p.grad is None for p in tiny_clip.parameters())


def test_parameter_accounting_at_vitb16_scale():
    """METHOD.md §2's numbers (5,284 vs 184,320 per task) and L2P's pool, at ViT-B/16 scale."""
    cfg = lpi.LPIConfig(J=9, M=16, R=4)
    p = {m: lpi.method_parameters(m, cfg, 768, 512, 512, tasks=12) for m in ("lpi", "sprompts", "l2p", "zeroshot")}
    assert p["lpi"]["prompts"] == 4 * (9 + 2 * 16 + 768 + 512) == 5284
    assert p["lpi"]["after_tasks"] == 12 * p["lpi"]["total"]
    # S-Prompts as the authors ran it: full rank at layer 0 only (J = 1)
    assert p["sprompts"]["total"] == 1 * 16 * (768 + 512) == 20480 and p["sprompts"]["interaction"] == 0
    cmp = lpi.parameter_comparison(cfg, 768, 512)
    assert cmp["LPI"]["total"] == 18156 and cmp["S-Prompts (J=1)"]["total"] == 20480
    assert cmp["full rank (J=9)"]["total"] == 9 * 16 * (768 + 512) == 184320
    assert p["l2p"]["total"] == 10 * 9 * (16 // 5) * 768 + 10 * 512 + 9 * 16 * 512
    assert p["l2p"]["after_tasks"] == p["l2p"]["total"]  # one pool, whatever the number of tasks
    assert p["zeroshot"]["total"] == 0
