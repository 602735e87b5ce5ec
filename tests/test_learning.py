"""How the prompts learn (METHOD.md §1, §4, §7 "How the factors learn"): what the encoders
see of a prompt's scale, the step each optimiser takes, deep prompts added or replacing,
hierarchical losses whose gradient does not inflate the prompts, the training log in
results.json, and the tuning protocol's split and choice."""

import copy
import json

import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

import clip_model  # noqa: E402
import data  # noqa: E402
import lpi  # noqa: E402
from lpi import LPI, LPIConfig, LowRankPrompts  # noqa: E402

CAPTIONS = ["a cat on a mat", "a red car", "two dogs playing", "a bowl of soup"]


pytestmark = pytest.mark.usefixtures("one_thread")  # conftest.py


@pytest.fixture(scope="module")
def tiny_clip(random_tiny_clip):
    return random_tiny_clip


def _batch(clip, M=4):
    torch.manual_seed(3)
    images = torch.randn(len(CAPTIONS), 3, 32, 32)
    return images, clip_model.tokenize(CAPTIONS, clip.context_length, truncate=True, prompt_length=M)


def test_encoders_ignore_the_scale_of_a_visual_prompt_and_its_gradient_shrinks_as_one_over_it(tiny_clip):
    """Every prompt token passes a LayerNorm: c·P gives the same image features, and the
    gradient of any loss of those features is 1/c as large, so SGD's useful step ~ lr/c²."""
    images, _ = _batch(tiny_clip)
    torch.manual_seed(1)
    P = 0.06 * torch.randn(1, 4, tiny_clip.visual.transformer.width)       # layer-0 prompt (J=1, M=4, D_v)
    target = torch.randn(len(CAPTIONS), tiny_clip.cfg.embed_dim)
    feats, grads = {}, {}
    for c in (1.0, 10.0):
        Pc = (c * P).requires_grad_()
        f = tiny_clip.encode_image(images, Pc)
        (F.normalize(f, dim=-1) * target).sum().backward()
        feats[c], grads[c] = f.detach(), Pc.grad
    assert (1 - F.cosine_similarity(feats[1.0], feats[10.0], dim=-1)).max() < 1e-5
    ratio = grads[1.0].norm() / grads[10.0].norm()
    assert 9.0 < ratio < 11.0, ratio


def _angle_moved(kind: str, optimizer: str, std: float = 0.5, lr: float = 0.001, steps: int = 10) -> float:
    """How far (radians) the direction of a layer-0 prompt turns in `steps` steps on a loss
    that sees only that direction (as the encoders do through LayerNorm)."""
    torch.manual_seed(0)
    f = (LowRankPrompts(J=1, M=4, D_v=32, D_t=32, R=4, std=std) if kind == "low"    # full rank: the same
         else lpi.FullRankPrompts(J=1, M=4, D_v=32, D_t=32, std=std ** 3 / 2))        # std at init (σ³/√R)
    torch.manual_seed(1)
    goal = torch.randn(4 * 32)
    start = F.normalize(f()[0].detach().flatten(), dim=0)
    opt = lpi.make_optimizer(list(f.parameters()), lpi.RunConfig(lr=lr, weight_decay=0.0, optimizer=optimizer))
    for _ in range(steps):
        loss = -F.cosine_similarity(f()[0].flatten(), goal, dim=0)
        opt.zero_grad()
        loss.backward()
        opt.step()
    return torch.arccos((start @ F.normalize(f()[0].detach().flatten(), dim=0)).clamp(-1, 1)).item()


def test_sgd_steps_on_scale_free_factors_shrink_as_one_over_norm_squared_adams_as_one_over_norm():
    """The step-size argument on live tensors: factors twice as large turn the product 4x
    less under SGD (lr/|w|^2) and 2x less under Adam (lr/|w|)."""
    sgd = _angle_moved("low", "sgd", std=1.0) / _angle_moved("low", "sgd", std=0.5)
    adam = _angle_moved("low", "adam", std=1.0) / _angle_moved("low", "adam", std=0.5)
    assert 0.22 < sgd < 0.28 and 0.45 < adam < 0.55, (sgd, adam)


def test_under_sgd_the_product_turns_far_slower_than_a_full_rank_prompt_and_adam_closes_the_gap():
    """Same init scale of P, same lr: SGD moves the CP product several times less than a
    full-rank prompt; Adam moves the product faster than SGD and halves that gap."""
    gap_sgd = _angle_moved("full", "sgd") / _angle_moved("low", "sgd")
    gap_adam = _angle_moved("full", "adam") / _angle_moved("low", "adam")
    assert gap_sgd > 4 and gap_adam < gap_sgd / 1.5, (gap_sgd, gap_adam)
    assert _angle_moved("low", "adam") > 3 * _angle_moved("low", "sgd")


def test_additive_deep_prompts_add_to_the_hidden_state_and_zero_adds_nothing(tiny_clip):
    images, tokens = _batch(tiny_clip)
    torch.manual_seed(2)
    D_v, D_t = tiny_clip.visual.transformer.width, tiny_clip.transformer.width
    P_v, P_t = 0.06 * torch.randn(3, 4, D_v), 0.06 * torch.randn(3, 4, D_t)
    zero_deep_v = torch.cat([P_v[:1], torch.zeros(2, 4, D_v)])
    zero_deep_t = torch.cat([P_t[:1], torch.zeros(2, 4, D_t)])
    with torch.no_grad():
        # adding zeros at layers 1..J-1 = layer-0 prompts alone
        torch.testing.assert_close(tiny_clip.encode_image(images, zero_deep_v, "add"),
                                   tiny_clip.encode_image(images, P_v[:1], "add"))
        torch.testing.assert_close(tiny_clip.encode_text(tokens, zero_deep_t, "add"),
                                   tiny_clip.encode_text(tokens, P_t[:1], "add"))
        # replacing by zeros is not
        assert not torch.allclose(tiny_clip.encode_image(images, zero_deep_v, "replace"),
                                  tiny_clip.encode_image(images, P_v[:1]), atol=1e-4)
        # with J = 1 the two modes are the same
        torch.testing.assert_close(tiny_clip.encode_image(images, P_v[:1], "add"),
                                   tiny_clip.encode_image(images, P_v[:1], "replace"))
    with pytest.raises(ValueError, match="deep must be one of"):
        tiny_clip.encode_image(images, P_v, "multiply")


def test_lpi_passes_its_deep_prompt_mode_to_both_encoders(tiny_clip):
    images, tokens = _batch(tiny_clip)
    feats = {}
    for mode in ("add", "replace"):
        torch.manual_seed(5)
        model = LPI(copy.deepcopy(tiny_clip), LPIConfig(J=3, M=4, R=2, interaction_rank=2, deep_prompts=mode))
        model.add_task()
        with torch.no_grad():
            P_v, P_t = model.task_prompts[0]()
            feats[mode] = (model.encode_image(images, 0), model.encode_text(tokens, 0))
            torch.testing.assert_close(feats[mode][0], tiny_clip.encode_image(images, P_v, mode))
            torch.testing.assert_close(feats[mode][1], tiny_clip.encode_text(tokens, P_t, mode))
    assert not torch.allclose(feats["add"][0], feats["replace"][0], atol=1e-4)


def _inflation(scaled: bool, steps: int = 30) -> float:
    """Factor norm after SGD on the hierarchical terms alone, relative to its start."""
    cfg = LPIConfig(J=3, M=4, R=4, hier_tau_scaled=scaled)
    torch.manual_seed(0)
    f = LowRankPrompts(J=3, M=4, D_v=32, D_t=24, R=4, std=0.5)
    norm0 = sum(p.norm() ** 2 for p in f.parameters()).sqrt().item()
    opt = torch.optim.SGD(f.parameters(), lr=0.05, momentum=0.9)
    weight = cfg.lambda_h * (cfg.tau_h if scaled else 1.0)
    for _ in range(steps):
        P_v, P_t = f()
        loss = weight * (lpi.prompt_level_loss(P_v, P_t, cfg.tau_h) + lpi.factor_level_loss(f.B_v, f.B_t, cfg.tau_h))
        opt.zero_grad()
        loss.backward()
        opt.step()
    return sum(p.norm() ** 2 for p in f.parameters()).sqrt().item() / norm0


def test_hierarchical_losses_weighted_by_tau_do_not_inflate_the_prompts():
    """Losses of normalised quantities have gradients orthogonal to the weights, so each SGD
    step grows the norm; at 1/τ_h = 100 the authors' weighting does so fast, ours does not."""
    assert _inflation(scaled=False) > 1.5
    assert _inflation(scaled=True) < 1.02


def test_losses_report_the_weight_of_every_term_and_sum_to_the_total(tiny_clip):
    images, tokens = _batch(tiny_clip)
    for scaled in (True, False):
        torch.manual_seed(5)
        model = LPI(copy.deepcopy(tiny_clip), LPIConfig(J=3, M=4, R=2, interaction_rank=2, hier_tau_scaled=scaled,
                                                        hier_factor=True))
        model.add_task(), model.add_task()
        out = model.losses(images, tokens, 1, torch.ones(2, 2))
        w = model.loss_weights()
        lam = model.cfg.lambda_h * (model.cfg.tau_h if scaled else 1.0)
        assert w == {"clip": 1.0, "prompt": lam, "factor": lam, "task": model.cfg.lambda_task}
        assert set(out) == {"clip", "prompt", "factor", "task", "total"}
        torch.testing.assert_close(out["total"], sum(w[k] * out[k] for k in w))


def test_training_log_holds_each_terms_gradient_norm_and_the_prompt_scale(tmp_path, tiny_clip):
    """results.json: the gradient norm of each weighted term on the trained parameters at
    the first steps of each task, and the prompts' std at the start and end of each task."""
    torch.manual_seed(0)
    tasks = [lpi.Task(n, lpi.ImageCaptionSet((torch.rand(12, 3, 32, 32) * 255).to(torch.uint8), [[c] for c in
                      (CAPTIONS * 3)]), lpi.ImageCaptionSet((torch.rand(4, 3, 32, 32) * 255).to(torch.uint8),
                      [[c] for c in CAPTIONS])) for n in ("a", "b")]
    model = LPI(copy.deepcopy(tiny_clip), LPIConfig(J=2, M=2, R=2, interaction_rank=2, hier_factor=True, keys=2))
    s = lpi.RunConfig(batch_size=4, epochs=2, lr=0.03, weight_decay=0.0, optimizer="adam", progress=False,
                      out=str(tmp_path))
    res = lpi.run_continual(model, tasks, s, lpi.Env(torch.device("cpu")), {"method": "lpi"})
    saved = json.loads((tmp_path / "results.json").read_text())
    for t, name in enumerate(("a", "b")):
        norms = saved["grad_norms"][name]
        assert len(norms) == 5
        expect = {"clip", "prompt", "factor"} | ({"task"} if t > 0 else set())
        assert set(norms[0]) == expect and all(v >= 0 for v in norms[0].values())
        assert norms[0]["clip"] > 0
        scale = saved["prompt_scale"][name]
        assert set(scale) == {"start", "end"} and scale["start"]["P_v[0]"] != scale["end"]["P_v[0]"]
        curve = saved["loss_curve"][name]                  # 3 batches x 2 epochs: every step is kept
        assert curve["step"] == [1, 2, 3, 4, 5, 6] and set(curve) == expect | {"step", "total"}
        assert curve["clip"][:5] == [round(f["clip"], 6) for f in saved["first_steps"][name]]
        for i in range(6):
            torch.testing.assert_close(curve["total"][i], sum(model.loss_weights()[k] * curve[k][i] for k in expect),
                                       atol=1e-5, rtol=0)
    assert res["grad_norms"] == saved["grad_norms"]


def test_validation_split_is_held_out_of_the_training_images_and_never_the_test():
    import tune

    task = data.builtin_task("sea-animals", n_train=50, n_test=10)
    v = tune.validation_task(task, 12)
    assert len(v.train) == 38 and len(v.test) == 12
    as_rows = lambda s: {tuple(img.flatten().tolist()) for img in s.images}  # noqa: E731
    train, test = as_rows(task.train), as_rows(task.test)
    assert as_rows(v.test) <= train and as_rows(v.train) <= train
    assert not as_rows(v.test) & as_rows(v.train)
    assert not (as_rows(v.test) | as_rows(v.train)) & test


def test_protocol_chooses_each_settings_best_point_and_lpi_uses_it():
    import tune

    scores = {"a": {("sgd", 0.05): 50.0, ("sgd", 0.25): 60.0, ("adam", 0.01): 70.0, ("adam", 0.03): 65.0}}
    assert tune.choose(scores)["a"] == {"optimizer": "adam", "lr": {"sgd": 0.25, "adam": 0.01}, "chosen_lr": 0.01}
    # the committed protocol's choices are lpi.py's defaults
    tuning = json.loads((ROOT / "benchmarks" / "results" / "tuning.json").read_text())
    for method, tuned in lpi.TUNED.items():
        if method in tuning["chosen"]:
            c = tuning["chosen"][method]
            assert tuned == {"optimizer": c["optimizer"], "lr": c["lr"]}, method
    s, _ = lpi.fill_defaults(lpi.RunConfig(method="sprompts"), lpi.LPIConfig(), tiny=True)
    assert (s.optimizer, s.lr) == (lpi.TUNED["sprompts"]["optimizer"],
                                   lpi.TUNED["sprompts"]["lr"][lpi.TUNED["sprompts"]["optimizer"]])
    s, _ = lpi.fill_defaults(lpi.RunConfig(optimizer="sgd"), lpi.LPIConfig(), tiny=True)
    assert s.lr == lpi.TUNED["lpi"]["lr"]["sgd"]


def test_tuning_script_runs_end_to_end_and_writes_its_grid(tmp_path):
    """benchmarks/tune.py --quick: two settings at two grid points on continual validation
    tasks over two seeds, and the check of its predictiveness against full runs."""
    import tune

    assert tune.main(["--quick", "--jobs", "1", "--out-dir", str(tmp_path), "--work-dir", str(tmp_path / "w")]) == 0
    out = json.loads((tmp_path / "tuning.json").read_text())
    assert set(out["chosen"]) == {"lpi", "sprompts"}
    for name, points in out["scores"].items():
        assert len(points) == 2 and all(0 <= p["mean_recall"] <= 100 for p in points)
        best = max(points, key=lambda p: p["mean_recall"])
        assert out["chosen"][name]["optimizer"] == best["optimizer"]
    seeds = {p.name for p in (tmp_path / "w" / "grid").glob("*/seed*")}
    assert seeds == {"seed0", "seed1"}                                   # every point over two seeds
    assert {p.name for p in (tmp_path / "w" / "six").glob("*/seed*")} == {"seed100", "seed101"}  # stage 2
    for name, r in out["predictiveness"].items():
        assert len(r["points"]) == len(r["full_run"]) == 2
        for kind in ("grid", "six", "one-task"):                     # each protocol's scores at the points
            rho = r[kind]["spearman"]                                  # None where a side is constant
            assert len(r[kind]["scores"]) == 2 and (rho is None or -1 <= rho <= 1) and r[kind]["regret"] >= 0
        assert r["grid"]["scores"] == [p["mean_recall"] for p in out["scores"][name]]
        chosen = out["chosen"][name]
        six = {(p["optimizer"], p["lr"]): p["mean_recall"] for p in out["six_task_scores"][name]}
        assert six[(chosen["optimizer"], chosen["chosen_lr"])] == max(six[tuple(p)] for p in out["top"][name])
    md = (tmp_path / "tuning.md").read_text()
    assert "| lpi |" in md and "ρ with the full run" in md


def test_spearman_by_hand():
    import tune

    assert tune.spearman([1, 2, 3, 4], [10, 20, 30, 40]) == 1.0
    assert tune.spearman([1, 2, 3, 4], [4, 3, 2, 1]) == -1.0
    assert tune.ranks([5.0, 1.0, 5.0, 3.0]) == [3.5, 1.0, 3.5, 2.0]        # ties share their mean rank
    assert abs(tune.spearman([1, 2, 3, 4, 5], [2, 1, 4, 3, 5]) - 0.8) < 1e-12  # 1 - 6 * 4 / (5 * 24)
    assert tune.spearman([1, 2, 3], [5, 5, 5]) is None                     # no order to predict
