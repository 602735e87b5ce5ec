"""Unit tests of LPI's components against METHOD.md (sections §1-§5, §7).

Each test checks one equation or property of the spec on small hand-made cases or on a
randomly initialised tiny CLIP (clip_model.TINY, fixed seed): the CP decomposition and its
parameter count, the interaction modules, the losses, gradient isolation between tasks,
per-sample prompt routing and every switch of LPIConfig.
"""

import copy
import dataclasses
import itertools
import math
import os
import sys

import pytest
import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import clip_model  # noqa: E402
from lpi import (CPLinear, FullRankPrompts, Interaction, LowRankPrompts, LPI, LPIConfig,  # noqa: E402
                 TaskPrompts, clip_loss, count_parameters, factor_level_loss, prompt_level_loss,
                 standardize_tokens, task_contrastive_loss, task_targets, token_structure)
from lpi import centroid_similarity as task_similarity  # noqa: E402  (the --task-similarity centroids source)

CAPTIONS = ["a cat on a mat", "a red car", "two dogs playing in the park", "a bowl of soup",
            "a man riding a horse", "x"]


pytestmark = pytest.mark.usefixtures("one_thread")  # conftest.py


@pytest.fixture(scope="module")
def tiny_clip(random_tiny_clip):
    return random_tiny_clip


def _small_cfg(**kw):
    base = dict(J=3, M=4, R=2, interaction_rank=2, hier_factor=True)  # every component on
    base.update(kw)
    return LPIConfig(**base)


def _lpi(tiny_clip, n_tasks=2, seed=1, **kw):
    torch.manual_seed(seed)
    model = LPI(copy.deepcopy(tiny_clip), _small_cfg(**kw))
    for _ in range(n_tasks):
        model.add_task()
    return model


def _batch(model, B=4, seed=2):
    g = torch.Generator().manual_seed(seed)
    images = torch.randn(B, 3, 32, 32, generator=g)
    tokens = model.tokenize(CAPTIONS[:B])
    return images, tokens


ACTIVE_S = torch.tensor([[1.0, 0.9], [0.9, 1.0]])  # tasks 0, 1 similar (> θ = 0.4): task loss active
ACTIVE_Y = task_targets(ACTIVE_S, 0.4)


# ----------------------------------------------------------------------------------------
# §2  CP decomposition, shared A, parameter counts
# ----------------------------------------------------------------------------------------

def test_cp_decomposition_equals_explicit_loops():
    """§2: P[j,m,:] = (1/R) Σ_r A[j,r] B[m,r] C[:,r] for both modalities, by explicit Python loops."""
    torch.manual_seed(0)
    J, M, D_v, D_t, R = 3, 2, 4, 5, 3
    lp = LowRankPrompts(J, M, D_v, D_t, R, std=0.5).double()
    P_v, P_t = lp()
    assert P_v.shape == (J, M, D_v) and P_t.shape == (J, M, D_t)
    A, B_v, B_t, C_v, C_t = (p.detach().tolist() for p in (lp.A, lp.B_v, lp.B_t, lp.C_v, lp.C_t))
    for B, C, D, P in ((B_v, C_v, D_v, P_v), (B_t, C_t, D_t, P_t)):
        ref = torch.zeros(J, M, D, dtype=torch.float64)
        for j in range(J):
            for m in range(M):
                for d in range(D):
                    s = 0.0
                    for r in range(R):
                        s += A[j][r] * B[m][r] * C[d][r]
                    ref[j, m, d] = s / R
        torch.testing.assert_close(P.detach(), ref, rtol=1e-12, atol=1e-12)


def test_layer_factor_A_is_literally_shared():
    """§2: A is one tensor object used by both modalities' products; a gradient from P_t alone reaches A."""
    torch.manual_seed(0)
    lp = LowRankPrompts(3, 2, 4, 5, 2, std=0.5)
    names = dict(lp.named_parameters())
    assert set(names) == {"A", "B_v", "B_t", "C_v", "C_t"}  # no per-modality copy of A
    with torch.no_grad():
        P_v, P_t = lp()
        lp.A[1] *= 3.0                                   # one entry-row of A: layer 1 of both modalities
        P_v3, P_t3 = lp()
        lp.B_v.mul_(2.0)                                 # a visual factor: the visual prompts only
        P_v6, P_t6 = lp()
    torch.testing.assert_close(P_v3[1], 3 * P_v[1]), torch.testing.assert_close(P_t3[1], 3 * P_t[1])
    for layer in (0, 2):
        assert torch.equal(P_v3[layer], P_v[layer]) and torch.equal(P_t3[layer], P_t[layer])
    torch.testing.assert_close(P_v6, 2 * P_v3), torch.testing.assert_close(P_t6, P_t3)
    lp = LowRankPrompts(3, 2, 4, 5, 2, std=0.5)

    _, P_t = lp()
    P_t.pow(2).sum().backward()
    assert lp.A.grad is not None and lp.A.grad.abs().sum() > 0
    assert lp.B_t.grad.abs().sum() > 0 and lp.C_t.grad.abs().sum() > 0
    assert lp.B_v.grad is None and lp.C_v.grad is None  # the text prompt does not involve them


@pytest.mark.parametrize("modality", [0, 1])
def test_the_shared_layer_factor_learns_from_each_modality_alone(modality):
    """§2: A is common to both modalities, so a loss on P_v alone (or on P_t alone) reaches it,
    with the gradient the CP product gives: dL/dA[j, r] = (1/R) sum_{m,d} G[j, m, d] B[m, r] C[d, r]."""
    torch.manual_seed(0)
    prompts = LowRankPrompts(J=3, M=4, D_v=8, D_t=8, R=2, std=0.5)
    G = torch.randn(3, 4, 8)                                   # dL/dP of L = <P, G>
    (prompts()[modality] * G).sum().backward()
    B, C = (prompts.B_v, prompts.C_v) if modality == 0 else (prompts.B_t, prompts.C_t)
    expected = torch.einsum("jmd,mr,dr->jr", G, B.detach(), C.detach()) / 2
    assert prompts.A.grad is not None
    torch.testing.assert_close(prompts.A.grad, expected)


def test_parameter_counts_match_formulas():
    """§2-3: per task R(J+2M+D_v+D_t) = 5,284 low-rank, J·M·(D_v+D_t) = 184,320 full-rank; interaction by formula."""
    cfg = LPIConfig(J=9, M=16)  # the paper's ViT-B/16 settings; R=4 by default
    D_v, D_t = 768, 512
    J, M, R, Rp = cfg.J, cfg.M, cfg.R, cfg.interaction_rank
    n = count_parameters(cfg, D_v, D_t)
    assert n["prompts"] == R * (J + 2 * M + D_v + D_t) == 5284
    full = count_parameters(dataclasses.replace(cfg, low_rank=False), D_v, D_t)
    assert full["prompts"] == J * M * (D_v + D_t) == 184320
    # Interaction = two CPLinear maps over layers 1..J-1, each L (J-1, R') + U (D_in+1, R') + V (D_out, R'):
    #   t2v: R'((J-1) + (D_t+1) + D_v),  v2t: R'((J-1) + (D_v+1) + D_t)
    # plus, with LN, weight+bias of LN_v and LN_t: 2 D_v + 2 D_t.
    #   => R'(2(J-1) + 2(D_v+D_t) + 2) + 2(D_v+D_t)·[LN]
    def inter(J, D_v, D_t, Rp, ln):
        return Rp * (2 * (J - 1) + 2 * (D_v + D_t) + 2) + (2 * (D_v + D_t) if ln else 0)

    assert n["interaction"] == inter(J, D_v, D_t, Rp, True) == 12872
    assert n["total"] == 5284 + 12872
    no_ln = count_parameters(dataclasses.replace(cfg, interaction_ln=False), D_v, D_t)
    assert no_ln["interaction"] == inter(J, D_v, D_t, Rp, False) == 10312
    assert count_parameters(dataclasses.replace(cfg, interaction=False), D_v, D_t)["interaction"] == 0
    assert count_parameters(dataclasses.replace(cfg, J=0), D_v, D_t)["total"] == 0
    # other sizes, and counted on really built modules
    for J_, M_, R_, Rp_, dv, dt in [(3, 4, 2, 3, 128, 96), (2, 1, 1, 1, 8, 8), (12, 8, 6, 2, 1024, 768)]:
        c = LPIConfig(J=J_, M=M_, R=R_, interaction_rank=Rp_)
        got = count_parameters(c, dv, dt)
        assert got["prompts"] == R_ * (J_ + 2 * M_ + dv + dt)
        assert got["interaction"] == inter(J_, dv, dt, Rp_, True)
        tp = TaskPrompts(c, dv, dt)
        assert sum(p.numel() for p in tp.parameters()) == got["total"]


def test_trainable_parameters_of_lpi_are_one_task(tiny_clip):
    """§2/§7: after add_task the trainable parameters are exactly one task's count_parameters total."""
    model = _lpi(tiny_clip, n_tasks=3)
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    assert trainable == count_parameters(model.cfg, model.D_v, model.D_t)["total"]


@pytest.mark.parametrize("J", [1, 2, 3])
def test_every_counted_parameter_gets_a_gradient(tiny_clip, J):
    """§2-3: every parameter counted per task is used: one backward of task t's loss reaches all of them (J = 1: no layer j ≥ 1, no interaction)."""
    model = _lpi(tiny_clip, n_tasks=2, J=J)
    images, tokens = _batch(model)
    model.losses(images, tokens, t=1, targets=ACTIVE_Y)["total"].backward()
    dead = [n for n, p in model.task_prompts[1].named_parameters() if p.grad is None or not p.grad.abs().sum() > 0]
    assert not dead, f"J={J}: parameters counted by count_parameters but never used: {dead}"
    if J == 1:  # §3: modules exist "for each prompted layer j >= 1": none here
        assert count_parameters(model.cfg, model.D_v, model.D_t)["interaction"] == 0


# ----------------------------------------------------------------------------------------
# §3  Interaction modules
# ----------------------------------------------------------------------------------------

def test_cplinear_forward_equals_affine_map_with_weight():
    """§3: CPLinear(x)[j] = [x[j], 1] @ W[j] with W = (1/R') Σ_r L[j,r] U[:,r] V[:,r]^T, for every layer j."""
    torch.manual_seed(0)
    layers, D_in, D_out, rank, M = 4, 6, 5, 3, 7
    lin = CPLinear(layers, D_in, D_out, rank, std=0.5).double()
    x = torch.randn(layers, M, D_in, dtype=torch.float64)
    y = lin(x)
    W = lin.weight()
    assert W.shape == (layers, D_in + 1, D_out)
    for j in range(layers):
        x1 = torch.cat([x[j], torch.ones(M, 1, dtype=torch.float64)], dim=1)
        torch.testing.assert_close(y[j], x1 @ W[j], rtol=1e-12, atol=1e-12)
        # and W itself by its definition
        Wj = sum(lin.L[j, r] * torch.outer(lin.U[:, r], lin.V[:, r]) for r in range(rank)) / rank
        torch.testing.assert_close(W[j], Wj, rtol=1e-12, atol=1e-12)


def test_interaction_identity_at_alpha_zero_without_ln():
    """§3: with α = 0 and no LayerNorm, P' = P exactly (all layers, both modalities)."""
    torch.manual_seed(0)
    J, M, D_v, D_t = 4, 3, 8, 6
    inter = Interaction(J, D_v, D_t, rank=2, alpha=0.0, use_ln=False, std=0.5)
    P_v, P_t = torch.randn(J, M, D_v), torch.randn(J, M, D_t)
    out_v, out_t = inter(P_v, P_t)
    assert torch.equal(out_v, P_v) and torch.equal(out_t, P_t)
    # and through TaskPrompts (the path LPI uses)
    tp = TaskPrompts(LPIConfig(J=J, M=M, R=2, alpha=0.0, interaction_ln=False), D_v, D_t)
    raw, ins = tp.raw(), tp()
    assert torch.equal(raw[0], ins[0]) and torch.equal(raw[1], ins[1])


@pytest.mark.parametrize("use_ln", [True, False])
def test_text_factors_change_deep_visual_prompts_never_layer0(use_ln):
    """§3: with α > 0 a change in B_t or C_t changes P_v'[j] for every j ≥ 1 and never P_v'[0]."""
    torch.manual_seed(0)
    J, M, D_v, D_t = 4, 3, 8, 6
    for name in ("B_t", "C_t"):
        tp = TaskPrompts(LPIConfig(J=J, M=M, R=2, alpha=0.1, interaction_ln=use_ln), D_v, D_t)
        with torch.no_grad():
            before_v, _ = tp()
            getattr(tp.prompts, name).add_(torch.randn_like(getattr(tp.prompts, name)))
            after_v, _ = tp()
        assert torch.equal(after_v[0], before_v[0]), f"{name}: layer 0 of the visual prompt changed"
        for j in range(1, J):
            assert not torch.allclose(after_v[j], before_v[j], rtol=0, atol=1e-6), \
                f"{name}: visual prompt layer {j} did not react to the text factors"
    # symmetric direction: visual factors reach the deep textual prompts only
    tp = TaskPrompts(LPIConfig(J=J, M=M, R=2, alpha=0.1, interaction_ln=use_ln), D_v, D_t)
    with torch.no_grad():
        _, before_t = tp()
        tp.prompts.C_v.add_(torch.randn_like(tp.prompts.C_v))
        _, after_t = tp()
    assert torch.equal(after_t[0], before_t[0])
    assert all(not torch.allclose(after_t[j], before_t[j], rtol=0, atol=1e-6) for j in range(1, J))


def test_each_modality_is_mixed_from_the_other_at_equal_widths():
    """§3 with D_v = D_t (the tiny CLIP's widths, where a shape cannot tell the maps apart):
    P_v'[j] = LN_v((1-α) P_v[j] + α [P_t[j], 1] W_t→v[j]) and P_t'[j] likewise from P_v, as
    computed here from W = CPLinear.weight(). So P_t reaches the deep P_v only through W_t→v:
    with W_t→v zero, P_t no longer moves P_v' (and still moves P_t')."""
    torch.manual_seed(0)
    J, M, D, a = 4, 3, 8, 0.3
    inter = Interaction(J, D, D, rank=2, alpha=a, use_ln=True, std=0.5, gain=0.7)
    with torch.no_grad():
        for ln in (inter.ln_v, inter.ln_t):
            ln.weight.normal_(), ln.bias.normal_()
    P_v, P_t = torch.randn(J, M, D), torch.randn(J, M, D)
    out_v, out_t = inter(P_v, P_t)
    with_one = lambda P: torch.cat([P[1:], torch.ones(J - 1, M, 1)], -1)  # noqa: E731  [P[j], 1]
    by_hand_v = inter.ln_v((1 - a) * P_v[1:] + a * with_one(P_t) @ inter.t2v.weight())
    by_hand_t = inter.ln_t((1 - a) * P_t[1:] + a * with_one(P_v) @ inter.v2t.weight())
    torch.testing.assert_close(out_v[1:], by_hand_v)
    torch.testing.assert_close(out_t[1:], by_hand_t)
    assert torch.equal(out_v[0], P_v[0]) and torch.equal(out_t[0], P_t[0])
    other_t = torch.randn(J, M, D)
    assert not torch.allclose(inter(P_v, other_t)[0], out_v)            # P_t moves P_v' ...
    with torch.no_grad():
        inter.t2v.V.zero_()                                              # ... through W_t→v only
    assert torch.equal(inter(P_v, other_t)[0], inter(P_v, P_t)[0])
    assert not torch.allclose(inter(P_v, other_t)[1], inter(P_v, P_t)[1])


# ----------------------------------------------------------------------------------------
# §7  Only the current task trains
# ----------------------------------------------------------------------------------------

def test_one_sgd_step_changes_only_current_task(tiny_clip):
    """§7: after one SGD step on task 1's total loss only task 1's parameters change; CLIP and task 0 are bit-identical."""
    model = _lpi(tiny_clip, n_tasks=2).train()
    assert all(not p.requires_grad for p in model.clip.parameters())
    images, tokens = _batch(model)
    before = {k: v.detach().clone() for k, v in model.state_dict().items()}
    # the optimiser sees *every* parameter, with momentum and weight decay as in §7:
    # nothing but a None grad can keep a tensor from moving
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9, weight_decay=2e-4)
    opt.zero_grad(set_to_none=True)
    out = model.losses(images, tokens, t=1, targets=ACTIVE_Y)
    assert "task" in out and out["task"].requires_grad and out["task"] > 0
    out["total"].backward()
    for name, p in model.named_parameters():
        if name.startswith("task_prompts.1."):
            assert p.grad is not None and p.grad.abs().sum() > 0, f"no gradient reached {name}"
        else:
            assert p.grad is None, f"gradient reached {name}"
    opt.step()
    after = model.state_dict()
    assert before.keys() == after.keys()
    cur = [k for k in before if k.startswith("task_prompts.1.")]
    assert cur and any(k.startswith("task_prompts.0.") for k in before)
    for k in before:
        if k in cur:
            assert not torch.equal(before[k], after[k]), f"current-task tensor {k} did not change"
        else:
            assert torch.equal(before[k], after[k]), f"{k} changed"
    assert all(not p.requires_grad for p in model.clip.parameters())
    assert all(not p.requires_grad for p in model.task_prompts[0].parameters())


# ----------------------------------------------------------------------------------------
# §4-5, §7  Losses on hand-made cases
# ----------------------------------------------------------------------------------------

def test_clip_loss_prefers_aligned_pairs():
    """§7 CLIP InfoNCE (frozen exp(logit_scale), cosine logits): aligned pairs give a lower loss than shuffled ones."""
    g = torch.Generator().manual_seed(0)
    img = torch.randn(8, 16, generator=g)
    txt = img + 0.1 * torch.randn(8, 16, generator=g)
    scale = torch.tensor(math.log(100.0))
    aligned = clip_loss(img, txt, scale)
    shuffled = clip_loss(img, txt[torch.roll(torch.arange(8), 1)], scale)
    assert aligned < shuffled
    assert aligned < math.log(8) < shuffled  # better / worse than chance
    # the formula, written out: logits = exp(s) * cos(img_i, txt_k), symmetric cross-entropy
    cos = torch.tensor([[F.cosine_similarity(img[i], txt[k], dim=0).item() for k in range(8)] for i in range(8)])
    for s in (scale, torch.tensor(math.log(3.0))):  # exp(s) = 100 saturates; 3 does not
        logits = s.exp() * cos
        ref = -(logits.log_softmax(1).diagonal().mean() + logits.log_softmax(0).diagonal().mean()) / 2
        got = clip_loss(img, txt, s)
        assert got > 1e-2 or s is scale
        torch.testing.assert_close(got, ref, rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(clip_loss(5 * img, 3 * txt, s), got)  # features are normalised


def _structured_prompts(corr, D, g):
    """Prompts (J, M, D) whose standardised tokens have (close to) the M x M correlations `corr` (J, M, M)."""
    L = torch.linalg.cholesky(corr)                                   # (J, M, M)
    Z = torch.randn(corr.shape[0], D, corr.shape[1], generator=g)     # (J, D, M) independent columns
    return (Z @ L.transpose(1, 2)).transpose(1, 2)                    # (J, M, D)


def _random_corr(J, M, g):
    A = torch.randn(J, M, 2 * M, generator=g)
    C = A @ A.transpose(1, 2)
    d = C.diagonal(dim1=1, dim2=2).sqrt()
    return C / d[:, :, None] / d[:, None, :]


def test_prompt_level_loss_minimised_by_matching_token_structure():
    """§4 prompt level: InfoNCE over layers of cos(s_v[j], s_t[k])/τ, s = token correlations, is lowest when the layers' token structures match."""
    g = torch.Generator().manual_seed(0)
    J, M, D_v, D_t, tau = 5, 6, 512, 384, 0.01
    corr = _random_corr(J, M, g)                 # distinct layers
    P_v, P_t = _structured_prompts(corr, D_v, g), _structured_prompts(corr, D_t, g)
    matched = prompt_level_loss(P_v, P_t, tau)
    permuted = prompt_level_loss(P_v, P_t[torch.roll(torch.arange(J), 1)], tau)
    unrelated = prompt_level_loss(P_v, _structured_prompts(_random_corr(J, M, g), D_t, g), tau)
    assert matched < permuted and matched < unrelated
    assert matched < 0.1, matched  # same structure, τ = 0.01: nearly one-hot
    # gradient descent on P_t from random init decreases the loss
    first, last = descend(lambda P: prompt_level_loss(P_v, P, tau), torch.randn(J, M, 32, generator=g))
    assert last < 0.5 * first, (first, last)


def descend(loss, x0: torch.Tensor, steps: int = 60, lr: float = 0.05) -> tuple[float, float]:
    """The loss before and after `steps` Adam steps on x (from x0): (first, last)."""
    x = x0.clone().requires_grad_(True)
    opt = torch.optim.Adam([x], lr=lr)
    first = loss(x).item()
    for _ in range(steps):
        opt.zero_grad()
        loss(x).backward()
        opt.step()
    return first, loss(x).item()


def test_prompt_level_loss_is_symmetric():
    """§4: the InfoNCE over layers runs both ways, visual -> textual and textual -> visual:
    L(P_v, P_t) = L(P_t, P_v) = (CE(logits) + CE(logits^T)) / 2, worked out here by hand;
    either direction alone is another number."""
    g = torch.Generator().manual_seed(0)
    J, M, D, tau = 5, 4, 16, 0.1
    P_v, P_t = torch.randn(J, M, D, generator=g), torch.randn(J, M, D, generator=g)
    loss = prompt_level_loss(P_v, P_t, tau)
    torch.testing.assert_close(prompt_level_loss(P_t, P_v, tau), loss)
    s_v, s_t = F.normalize(token_structure(P_v), dim=-1), F.normalize(token_structure(P_t), dim=-1)
    logits, layer = s_v @ s_t.t() / tau, torch.arange(J)
    one_way, other_way = F.cross_entropy(logits, layer), F.cross_entropy(logits.t(), layer)
    torch.testing.assert_close(loss, (one_way + other_way) / 2)
    assert abs(one_way - other_way) > 1e-3, "pick prompts on which the two directions differ"


def _per_token(J, M, g, low, high):
    return low + (high - low) * torch.rand(J, M, 1, generator=g, dtype=torch.float64)


@pytest.mark.parametrize("seed", range(5))
def test_prompt_level_loss_sees_what_layernorm_passes_on(seed):
    """§4 L_prompt is unchanged (1e-5) when each token is shifted x + b·1 or scaled a·x (a > 0): LayerNorm removes both."""
    g = torch.Generator().manual_seed(seed)
    J, M, D_v, D_t, tau = 4, 6, 48, 32, 0.01
    P_v = 0.06 * torch.randn(J, M, D_v, generator=g, dtype=torch.float64)
    P_t = 0.06 * torch.randn(J, M, D_t, generator=g, dtype=torch.float64)
    ref = prompt_level_loss(P_v, P_t, tau)
    b_v, b_t = torch.randn(J, M, 1, generator=g, dtype=torch.float64), torch.randn(J, M, 1, generator=g, dtype=torch.float64)
    a_v, a_t = _per_token(J, M, g, 0.1, 10.0), _per_token(J, M, g, 0.1, 10.0)
    for moved_v, moved_t in ((P_v + b_v, P_t + b_t), (a_v * P_v, a_t * P_t), (a_v * P_v + b_v, a_t * P_t + b_t)):
        torch.testing.assert_close(prompt_level_loss(moved_v, moved_t, tau), ref, rtol=0, atol=1e-5)
    # in fp32 too, at the scale prompts have (mean shifts comparable to their spread)
    P32_v, P32_t = P_v.float(), P_t.float()
    torch.testing.assert_close(prompt_level_loss(a_v.float() * P32_v + 0.05 * b_v.float(), P32_t, tau),
                               prompt_level_loss(P32_v, P32_t, tau), rtol=0, atol=1e-4)


@pytest.mark.parametrize("seed", range(5))
def test_prompt_level_loss_not_blind_to_what_layernorm_keeps(seed):
    """§4 permuting each token's features (mean and norm kept, so the old mean_D summary is blind to it) changes L_prompt."""
    g = torch.Generator().manual_seed(seed)
    J, M, D_v, D_t, tau = 4, 6, 48, 32, 0.01
    P_v, P_t = 0.06 * torch.randn(J, M, D_v, generator=g), 0.06 * torch.randn(J, M, D_t, generator=g)
    perm = torch.stack([torch.randperm(D_v, generator=g) for _ in range(J * M)]).view(J, M, D_v)
    shuffled = torch.gather(P_v, 2, perm)
    torch.testing.assert_close(shuffled.mean(-1), P_v.mean(-1))           # what the authors' summary reads
    torch.testing.assert_close(shuffled.norm(dim=-1), P_v.norm(dim=-1))
    before, after = prompt_level_loss(P_v, P_t, tau), prompt_level_loss(shuffled, P_t, tau)
    assert (before - after).abs() > 1e-2, (before, after)


def test_token_structure_is_comparable_across_widths():
    """§4: the summary is an M x M correlation structure, so D_v != D_t compare; 1 on the (left out) diagonal."""
    g = torch.Generator().manual_seed(0)
    P = torch.randn(3, 5, 40, generator=g)
    s = token_structure(P)
    assert s.shape == (3, 10)
    Z = standardize_tokens(P)
    torch.testing.assert_close(Z.mean(-1), torch.zeros(3, 5), atol=1e-5, rtol=0)
    torch.testing.assert_close((Z ** 2).mean(-1), torch.ones(3, 5), atol=1e-4, rtol=0)
    assert (s.abs() <= 1 + 1e-5).all()
    assert prompt_level_loss(torch.randn(3, 1, 8), torch.randn(3, 1, 6), 0.01) == 0  # M = 1: no structure


def test_prompt_level_loss_reaches_the_low_rank_factors():
    """§4 the gradient of L_prompt (on the raw low-rank prompts) reaches A, B_v, B_t, C_v, C_t."""
    torch.manual_seed(0)
    prompts = LowRankPrompts(J=4, M=5, D_v=24, D_t=16, R=3, std=0.5)
    prompt_level_loss(*prompts(), 0.01).backward()
    for name in ("A", "B_v", "B_t", "C_v", "C_t"):
        grad = getattr(prompts, name).grad
        assert grad is not None and grad.abs().sum() > 0, name


def test_factor_level_loss_minimised_by_matching_token_factors():
    """§4 factor level: InfoNCE of cos(B_v[m], B_t[m'])/τ over the M rows is lowest when rows match (B_v = B_t)."""
    torch.manual_seed(0)
    M, R, tau = 6, 4, 0.01
    B_v = torch.randn(M, R)
    matched = factor_level_loss(B_v, B_v.clone(), tau)
    permuted = factor_level_loss(B_v, B_v[torch.roll(torch.arange(M), 1)], tau)
    unrelated = factor_level_loss(B_v, torch.randn(M, R), tau)
    assert matched < permuted and matched < unrelated
    # scale of a row does not matter (cosine)
    torch.testing.assert_close(matched, factor_level_loss(B_v, 3.0 * B_v, tau))
    first, last = descend(lambda B_t: factor_level_loss(B_v, B_t, tau), torch.randn(M, R))
    assert last < 0.5 * first, (first, last)


@pytest.mark.parametrize("theta,direction", [(0.4, +1), (0.9, -1)])
@pytest.mark.parametrize("start", ["independent", "correlated"])
def test_task_contrastive_loss_pulls_similar_pushes_dissimilar(theta, direction, start):
    """§5: prompts of tasks with similarity > θ are pulled together (cos rises), ≤ θ pushed apart (cos falls)."""
    torch.manual_seed(0)
    shape = (3, 4, 8)
    P1 = torch.randn(shape)
    noise = torch.randn(shape)
    # independent: cos(P1, P2) ~ 0; correlated: cos ~ 0.65, where the positive BCE term
    # sigma(X/tau) is already saturated (tau = 0.1) and the pull is weak but must still pull
    P2 = (noise if start == "independent" else P1 + 1.2 * noise).requires_grad_(True)
    S = torch.tensor([[1.0, 0.7], [0.7, 1.0]])

    def cos():
        return F.cosine_similarity(P1.flatten(), P2.detach().flatten(), dim=0).item()

    c0 = cos()
    opt = torch.optim.SGD([P2], lr=0.5)
    losses = []
    for _ in range(5):
        opt.zero_grad()
        loss = task_contrastive_loss(torch.stack([P1, P2]), task_targets(S, theta), tau=0.1)
        losses.append(loss.item())
        loss.backward()
        opt.step()
    c1 = cos()
    assert direction * (c1 - c0) > (0.05 if start == "independent" else 0.0), (theta, start, c0, c1)
    assert losses[-1] < losses[0]


def test_task_contrastive_loss_single_task_is_exactly_zero():
    """§5: with one task there are no off-diagonal pairs: the loss is exactly 0, not NaN, gradient 0."""
    P = torch.randn(1, 3, 4, 8, requires_grad=True)
    for S in (torch.ones(1, 1), torch.zeros(1, 1)):
        loss = task_contrastive_loss(P, task_targets(S, 0.4), tau=0.1)
        assert torch.equal(loss, torch.zeros((), dtype=loss.dtype)) and not torch.isnan(loss)
        loss.backward()
        assert torch.equal(P.grad, torch.zeros_like(P))
        P.grad = None
    loss = task_contrastive_loss(torch.zeros(1, 3, 4, 8), torch.ones(1, 1), 0.1)
    assert loss.item() == 0.0


def test_task_similarity_unit_diagonal_and_symmetric():
    """§5: the online task similarity (centroid cosines) is 1 on the diagonal and symmetric."""
    g = torch.Generator().manual_seed(0)
    for T in (1, 2, 5, 12):
        ci, ct = torch.randn(T, 32, generator=g), torch.randn(T, 32, generator=g) * 7
        S = task_similarity(ci, ct)
        assert S.shape == (T, T)
        torch.testing.assert_close(S.diagonal(), torch.ones(T), rtol=0, atol=1e-6)
        torch.testing.assert_close(S, S.t(), rtol=0, atol=1e-7)
        assert (S <= 1 + 1e-6).all() and (S >= -1 - 1e-6).all()
        ref = torch.tensor([[(F.cosine_similarity(ci[i], ci[k], dim=0) + F.cosine_similarity(ct[i], ct[k], dim=0)).item() / 2
                             for k in range(T)] for i in range(T)])
        torch.testing.assert_close(S, ref, rtol=1e-5, atol=1e-6)  # mean of image and caption centroid cosines
        S16 = task_similarity(ci.bfloat16(), ct.bfloat16())
        torch.testing.assert_close(S16.diagonal(), torch.ones(T), rtol=0, atol=1e-6)


# ----------------------------------------------------------------------------------------
# No NaN / inf: random inputs over many seeds, float32 and bfloat16, degenerate inputs
# ----------------------------------------------------------------------------------------

def _finite(x):
    return x is None or bool(torch.isfinite(x.float()).all())


def _check(fn, tensors, label, bad):
    """Evaluate fn on leaf copies of tensors; record a NaN/inf in the loss or its gradients."""
    leaves = [t.detach().clone().requires_grad_(t.is_floating_point()) for t in tensors]
    loss = fn(*leaves)
    if not _finite(loss):
        bad.append(f"{label}: loss = {loss.item()}")
        return
    loss.backward()
    for i, leaf in enumerate(leaves):
        if leaf.requires_grad and not _finite(leaf.grad):
            bad.append(f"{label}: gradient of input {i} not finite")


def test_losses_finite_random_and_degenerate_inputs():
    """§4-5, §7: clip/prompt/factor/task losses (and their gradients) are finite for 50 seeds, fp32 and bf16, and degenerate inputs."""
    bad = []
    tau_h = 0.01
    for seed, dtype in itertools.product(range(50), (torch.float32, torch.bfloat16)):
        g = torch.Generator().manual_seed(seed)
        J, M, R, D_v, D_t, B, T = (int(torch.randint(lo, hi, (1,), generator=g))
                                   for lo, hi in ((1, 10), (1, 17), (1, 5), (4, 64), (4, 64), (1, 9), (1, 5)))
        sc = float(10 ** torch.empty(1).uniform_(-3, 1, generator=g))  # prompt scale 1e-3 .. 10
        r = lambda *s: (sc * torch.randn(*s, generator=g)).to(dtype)  # noqa: E731
        S = task_similarity(torch.randn(T, 16, generator=g), torch.randn(T, 16, generator=g)).to(dtype)
        tag = f"seed {seed} {dtype}"
        _check(lambda a, b: clip_loss(a, b, torch.tensor(math.log(100.0))), (r(B, 32), r(B, 32)), f"clip {tag}", bad)
        _check(lambda a, b: prompt_level_loss(a, b, tau_h), (r(J, M, D_v), r(J, M, D_t)), f"prompt {tag}", bad)
        _check(lambda a, b: factor_level_loss(a, b, tau_h), (r(M, R), r(M, R)), f"factor {tag}", bad)
        _check(lambda p: task_contrastive_loss(p, task_targets(S, 0.4), 0.1), (r(T, J, M, D_v),), f"task {tag}", bad)
        _check(lambda p: task_contrastive_loss(p, task_targets(S, 0.4), 0.001), (r(T, J, M, D_v),), f"task tau=1e-3 {tag}", bad)
    # degenerate inputs
    for dtype in (torch.float32, torch.bfloat16):
        J, M, R, D, T = 4, 5, 3, 16, 3
        S = torch.tensor([[1.0, 0.9, 0.1], [0.9, 1.0, 0.2], [0.1, 0.2, 1.0]]).to(dtype)
        cases = {
            "all-zero": lambda *s: torch.zeros(*s, dtype=dtype),
            "constant": lambda *s: torch.full(s, 0.3, dtype=dtype),
            "tiny 1e-30": lambda *s: (1e-30 * torch.randn(*s)).to(dtype),
            "zero-mean rows": lambda *s: (lambda x: x - x.mean(-1, keepdim=True))(torch.randn(*s)).to(dtype),
        }
        for name, mk in cases.items():
            tag = f"{name} {dtype}"
            _check(lambda a, b: clip_loss(a, b, torch.tensor(math.log(100.0))), (mk(6, 32), mk(6, 32)),
                   f"clip {tag}", bad)
            _check(lambda a, b: prompt_level_loss(a, b, tau_h), (mk(J, M, D), mk(J, M, D)), f"prompt {tag}", bad)
            _check(lambda a, b: factor_level_loss(a, b, tau_h), (mk(M, R), mk(M, R)), f"factor {tag}", bad)
            _check(lambda p: task_contrastive_loss(p, task_targets(S, 0.4), 0.1), (mk(T, J, M, D),), f"task {tag}", bad)
            # all old prompts identical to the current one
            _check(lambda p: task_contrastive_loss(p, task_targets(S, 0.4), 0.1),
                   (torch.randn(1, J, M, D).expand(T, -1, -1, -1).to(dtype),), f"task identical {tag}", bad)
    assert not bad, "non-finite losses/gradients:\n" + "\n".join(bad)


def test_lpi_total_loss_finite(tiny_clip):
    """§7: LPI.losses total (and every term) is finite for 50 seeds, fp32 and bf16 inputs, bf16 autocast, zero prompts."""
    model = _lpi(tiny_clip, n_tasks=3)
    tokens = model.tokenize(CAPTIONS[:3])
    bad = []

    def run(images, S, label, autocast=False):
        with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
            out = model.losses(images, tokens, t=2, targets=task_targets(S, 0.4))
        for k, v in out.items():
            if not _finite(v):
                bad.append(f"{label}: {k} = {v.item()}")

    for seed in range(50):
        g = torch.Generator().manual_seed(seed)
        images = torch.randn(3, 3, 32, 32, generator=g)
        S = task_similarity(torch.randn(3, 16, generator=g), torch.randn(3, 16, generator=g))
        with torch.no_grad():
            for p in model.task_prompts[2].parameters():
                p.normal_(0, 0.5, generator=g)
        run(images, S, f"seed {seed} fp32")
        run(images.bfloat16(), S.bfloat16(), f"seed {seed} bf16 inputs")
        if seed < 5:
            run(images, S, f"seed {seed} bf16 autocast", autocast=True)
    # degenerate: the current task's prompts all zero (factors zero), zero images
    with torch.no_grad():
        for name in ("A", "B_v", "B_t", "C_v", "C_t"):
            getattr(model.task_prompts[2].prompts, name).zero_()
    out = model.losses(torch.zeros(3, 3, 32, 32), tokens, t=2, targets=torch.eye(3))
    for k, v in out.items():
        if not _finite(v):
            bad.append(f"zero prompts: {k} = {v.item()}")
    out["total"].backward()
    for name, p in model.task_prompts[2].named_parameters():
        if not _finite(p.grad):
            bad.append(f"zero prompts: gradient of {name} not finite")
    assert not bad, "non-finite LPI losses:\n" + "\n".join(bad)


# ----------------------------------------------------------------------------------------
# §1, §6  Prompt insertion and per-sample routing
# ----------------------------------------------------------------------------------------

def test_mixed_task_ids_equal_per_sample_encoding(tiny_clip):
    """§6: encode_image/encode_text with mixed task_ids equal encoding each sample alone with its own task's prompts."""
    model = _lpi(tiny_clip, n_tasks=3)
    images, tokens = _batch(model, B=6)
    ids = torch.tensor([0, 2, 1, 0, 2, 1])
    with torch.no_grad():
        img, txt = model.encode_image(images, ids), model.encode_text(tokens, ids)
        for i in range(len(ids)):
            one = ids[i:i + 1]
            torch.testing.assert_close(img[i:i + 1], model.encode_image(images[i:i + 1], one), rtol=1e-5, atol=1e-5)
            torch.testing.assert_close(txt[i:i + 1], model.encode_text(tokens[i:i + 1], one), rtol=1e-5, atol=1e-5)
            torch.testing.assert_close(img[i:i + 1], model.encode_image(images[i:i + 1], int(ids[i])),
                                       rtol=1e-5, atol=1e-5)
        # routing matters: the same samples with task 0 everywhere differ where ids != 0
        img0 = model.encode_image(images, 0)
        assert not torch.allclose(img0[1], img[1], atol=1e-4)


def test_zero_shot_J0_is_plain_clip(tiny_clip):
    """§1: J = 0 gives exactly plain CLIP (bit for bit), whatever task ids are passed."""
    clip = copy.deepcopy(tiny_clip)
    model = LPI(clip, LPIConfig(J=0))
    assert model.add_task() == 0 and len(model.task_prompts) == 0
    assert count_parameters(model.cfg, model.D_v, model.D_t)["total"] == 0
    images, _ = _batch(model)
    tokens = model.tokenize(CAPTIONS[:4])
    assert torch.equal(tokens, clip_model.tokenize(CAPTIONS[:4], clip.context_length, truncate=True))
    with torch.no_grad():
        ref_i, ref_t = clip.encode_image(images), clip.encode_text(tokens)
        for ids in (None, 0, torch.zeros(4, dtype=torch.long)):
            assert torch.equal(model.encode_image(images, ids), ref_i)
            assert torch.equal(model.encode_text(tokens, ids), ref_t)
        out = model.losses(images, tokens, t=0, targets=None)
    assert set(out) == {"clip", "total"}
    assert torch.equal(out["total"], clip_loss(ref_i, ref_t, clip.logit_scale))


# ----------------------------------------------------------------------------------------
# Every switch of LPIConfig
# ----------------------------------------------------------------------------------------

def test_switch_low_rank_false_gives_full_rank_prompts(tiny_clip):
    """§2 switch low_rank: False gives FullRankPrompts (J,M,D) tensors, J·M·(D_v+D_t) parameters, no factor loss."""
    model = _lpi(tiny_clip, n_tasks=2, low_rank=False)
    tp = model.task_prompts[1]
    assert isinstance(tp.prompts, FullRankPrompts)
    cfg = model.cfg
    assert tp.prompts.P_v.shape == (cfg.J, cfg.M, model.D_v) and tp.prompts.P_t.shape == (cfg.J, cfg.M, model.D_t)
    assert sum(p.numel() for p in tp.prompts.parameters()) == cfg.J * cfg.M * (model.D_v + model.D_t)
    images, tokens = _batch(model)
    out = model.losses(images, tokens, t=1, targets=ACTIVE_Y)
    assert "factor" not in out and {"clip", "prompt", "task", "total"} <= set(out)
    assert isinstance(_lpi(tiny_clip, n_tasks=1).task_prompts[0].prompts, LowRankPrompts)


def test_switch_interaction_false(tiny_clip):
    """§3 switch interaction: False gives no interaction module, inserted prompts equal the raw ones."""
    model = _lpi(tiny_clip, n_tasks=2, interaction=False)
    for tp in model.task_prompts:
        assert tp.interaction is None
        assert not any("interaction" in n for n, _ in tp.named_parameters())
        raw, ins = tp.raw(), tp()
        assert torch.equal(raw[0], ins[0]) and torch.equal(raw[1], ins[1])
    pv, pt = model.stacked_prompts()
    assert torch.equal(pv[1], model.task_prompts[1].raw()[0])
    # and with it on, the inserted deep prompts differ from the raw ones, layer 0 does not
    on = _lpi(tiny_clip, n_tasks=1)
    assert isinstance(on.task_prompts[0].interaction, Interaction)
    raw, ins = on.task_prompts[0].raw(), on.task_prompts[0]()
    assert torch.equal(raw[0][0], ins[0][0]) and not torch.equal(raw[0][1:], ins[0][1:])


def test_switch_interaction_ln_and_alpha():
    """§3 switches interaction_ln / alpha: LN present or Identity; α is the mixing weight used."""
    tp = TaskPrompts(LPIConfig(J=3, M=2, R=2, interaction_ln=False, alpha=0.25), 8, 6)
    assert isinstance(tp.interaction.ln_v, torch.nn.Identity) and isinstance(tp.interaction.ln_t, torch.nn.Identity)
    P_v, P_t = tp.raw()
    ins_v, ins_t = tp()
    torch.testing.assert_close(ins_v[1:], 0.75 * P_v[1:] + 0.25 * tp.interaction.t2v(P_t[1:]))
    torch.testing.assert_close(ins_t[1:], 0.75 * P_t[1:] + 0.25 * tp.interaction.v2t(P_v[1:]))
    tp = TaskPrompts(LPIConfig(J=3, M=2, R=2, interaction_ln=True), 8, 6)
    assert isinstance(tp.interaction.ln_v, torch.nn.LayerNorm) and isinstance(tp.interaction.ln_t, torch.nn.LayerNorm)


def test_switches_remove_loss_terms_and_total_arithmetic(tiny_clip):
    """§7: total = clip + λ_h(prompt + factor) + λ_task·task; hier_prompt/hier_factor/task_loss False drop the key and its share of total."""
    model = _lpi(tiny_clip, n_tasks=2)
    model.eval()
    images, tokens = _batch(model)
    base = model.cfg

    def losses(**kw):
        model.cfg = dataclasses.replace(base, **kw)
        with torch.no_grad():
            return model.losses(images, tokens, t=1, targets=ACTIVE_Y)

    full = losses()
    assert set(full) == {"clip", "prompt", "factor", "task", "total"}
    assert all(float(full[k]) > 0 for k in ("prompt", "factor", "task"))
    lam_h = base.lambda_h * base.tau_h  # the hierarchical terms enter weighted by λ_h·τ_h (hier_tau_scaled)
    expect = full["clip"] + lam_h * (full["prompt"] + full["factor"]) + base.lambda_task * full["task"]
    torch.testing.assert_close(full["total"], expect)

    terms = {"hier_prompt": ("prompt", lam_h), "hier_factor": ("factor", lam_h),
             "task_loss": ("task", base.lambda_task)}
    for switch, (key, lam) in terms.items():
        out = losses(**{switch: False})
        assert key not in out, f"{switch}=False still reports '{key}'"
        assert set(out) == set(full) - {key}
        for k in out:
            if k != "total":
                torch.testing.assert_close(out[k], full[k])
        torch.testing.assert_close(out["total"], full["total"] - lam * full[key])
        assert not torch.equal(out["total"], full["total"])
    none = losses(hier_prompt=False, hier_factor=False, task_loss=False)
    assert set(none) == {"clip", "total"} and torch.equal(none["total"], none["clip"])
    # λ's scale their terms
    out = losses(lambda_h=0.3, lambda_task=0.7)
    torch.testing.assert_close(out["total"], full["clip"] + 0.3 * base.tau_h * (full["prompt"] + full["factor"])
                               + 0.7 * full["task"])
    out = losses(hier_tau_scaled=False)  # the authors' weighting: λ_h alone
    torch.testing.assert_close(out["total"], full["clip"] + base.lambda_h * (full["prompt"] + full["factor"])
                               + base.lambda_task * full["task"])
    # the task term is absent at the first task and without a similarity matrix
    model.cfg = base
    with torch.no_grad():
        assert "task" not in model.losses(images, tokens, t=0, targets=ACTIVE_Y)
        assert "task" not in model.losses(images, tokens, t=1, targets=None)


def test_rank_changes_only_the_rank(random_tiny_clip):
    """--rank sets R and nothing else: full-rank prompts, L2P's pool and text prompts, and the
    interaction's LayerNorm gain start the same (same seed) whatever R is."""
    import baselines

    def built(R, low_rank, l2p=False):
        cfg = LPIConfig(J=2, M=4, R=R, low_rank=low_rank)
        torch.manual_seed(0)
        model = baselines.L2P(random_tiny_clip, cfg) if l2p else LPI(random_tiny_clip, cfg)
        model.add_task()
        return {k: v for k, v in model.state_dict().items() if not k.startswith("clip.")}

    for low_rank, l2p in ((False, False), (False, True)):
        a, b = built(1, low_rank, l2p), built(16, low_rank, l2p)
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a), (low_rank, l2p)
    gains = {R: built(R, True)["task_prompts.0.interaction.ln_v.weight"] for R in (1, 16)}
    assert torch.equal(gains[1], gains[16])
