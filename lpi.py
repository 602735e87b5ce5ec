"""LPI: Low-rank Prompt Interaction for continual image-text retrieval: the method and its loop.

Reference implementation of "Low-rank Prompt Interaction for Continual Vision-Language
Retrieval" (ACM MM 2024, arXiv 2501.14369), following our reading in METHOD.md (the §
numbers below are that page's sections). A frozen CLIP (clip_model.py) meets retrieval tasks
one after another; per task LPI learns only small multi-modal prompts.

Reading order = the paper's order, then the data flow:
  §1-2  the switches of the method; low-rank decomposed multi-modal prompts
  §3    multi-modal correlation (interaction) modules
  §4-5  hierarchical low-rank contrastive loss; task contrastive constraint; CLIP's loss
  -     the LPI model: a frozen CLIP and one prompt set per task
  §6    task identity at test time: k-means keys and routing
  §7    Recall@K; training a task; the continual loop; the methods of the comparison
  -     a run: its settings, `run(settings, cfg)`, `load_run(folder)` and the command line

Beside this file, below it: clip_model.py (the backbone), data.py (tasks, COCO / Flickr30K,
images, the training recipe's sampling), baselines.py (L2P), run_support.py (processes,
precision, files), reporting.py (the table and the plots), builtin_world.py (the built-in
tasks and the tiny CLIP).

Run `python lpi.py` for the whole method on built-in data on a laptop CPU, or
`python lpi.py --tasks coco,flickr --data-root DATA --clip ViT-B/16` on a GPU. From Python:
`lpi.run(lpi.RunConfig(epochs=2), lpi.LPIConfig(R=2))`.
"""
from __future__ import annotations

import argparse
import dataclasses
import math
import os
import sys
import time
from contextlib import nullcontext
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Callable

import torch
import torch.nn.functional as F
from torch import Tensor
from torch import nn

import builtin_world as world
import clip_model
import reporting
from reporting import grad_norms, prompt_scale
from baselines import L2P, L2PConfig, PromptPool
from data import (BUILTIN_TASKS, Encoded, ImageCaptionSet, Task, augment_tensors, convert_clip, encode_set, epoch_batches,
                  export_tiny_clip, global_batches, load_backbone, load_tasks, train_transform, union)
from run_support import (POSITIVE, PRECISIONS, Env, LPIError, add_switches, all_reduce_ints, at_least, atomic_write,
                         autocast, average_gradients, broadcast_, check_finite, check_switches, default_precision, from_values,
                         gather_with_grad, init_distributed, latest_checkpoint, pick_device, read_checkpoint, run_lock,
                         save_json, switch, within)


# ========================================================================================
# §1-2  The switches of the method, and low-rank interaction-augmented decomposition
# ========================================================================================

# Every switch is defined once, as a row of a table (LPIConfig here, RunConfig below) with
# its help, flag and valid range; the command line is made from the rows (run_support.switch).
#
# The paper's factor std σ = 0.5 and rank R = 4 give low-rank prompts of std σ³/√R = 0.0625
# at init. Full-rank prompts (and L2P's pool) start at this std, and the interaction's
# LayerNorms at this gain, so that all prompts start alike whatever --rank says.
PROMPT_STD = 0.5 ** 3 / math.sqrt(4)
ROUTE_METRICS = ("cosine", "l1")  # §6: see TaskRouter


@dataclass
class LPIConfig:
    """Every switch of the method (METHOD.md §1-6); [ours] marks where we depart from the
    authors. None for J or M: the scale's default (PAPER_DEFAULTS / TINY_DEFAULTS), filled in
    by run()."""
    # §1 prompts: J layers receive M tokens each, in both encoders
    J: int | None = switch(None, "§1 prompt depth J (default 9; 4 with --clip tiny)", "--depth", at_least(0),
                           short="-J", type=int)
    M: int | None = switch(None, "§1 prompt length M (default 16; 4 with --clip tiny)", "--length", at_least(0),
                           short="-M", type=int)
    deep_prompts: str = switch("add", "§1 layers j >= 1: add P[j] to the hidden states at the prompt positions "
                               "[ours], or replace them (VPT-deep / MaPLe)", choices=clip_model.Transformer.DEEP_MODES)
    # §2 decomposition
    low_rank: bool = switch(True, "§2 CP-decomposed prompts; --no-low-rank: free (J, M, D) prompts per task")
    R: int = switch(4, "§2 CP rank R of the prompts", "--rank", at_least(1), short="-R")
    factor_std: float = switch(0.5, "§2 the CP factors start ~ N(0, std²), as the authors' code", check=POSITIVE)
    full_rank_std: float = switch(PROMPT_STD, "§2 std at init of full-rank prompts and of L2P's pool [ours]",
                                  check=POSITIVE)
    # §3 interaction
    interaction: bool = switch(True, "§3 cross-modal correlation modules on layers j >= 1")
    alpha: float = switch(0.1, "§3 mixing weight α of the other modality", check=within(0, 1))
    interaction_rank: int = switch(4, "§3 CP rank R' of each cross-modal weight tensor", check=at_least(1))
    interaction_ln: bool = switch(True, "§3 LayerNorm after mixing")
    interaction_gain: float = switch(PROMPT_STD, "§3 the LayerNorms' gain at init: the raw prompts' std at init "
                                     "[ours]; 1 is the authors' LayerNorm", check=at_least(0))
    # §4 hierarchical low-rank contrastive loss
    hier_prompt: bool = switch(True, "§4 prompt-level contrastive loss: layer summaries s_v[j] <-> s_t[j]")
    hier_factor: bool = switch(False, "§4 factor-level loss [ours]: rows of B_v <-> rows of B_t; off: it did "
                               "not help on the validation split (METHOD.md §4)")
    tau_h: float = switch(0.01, "§4 temperature τ_h", check=POSITIVE)
    hier_tau_scaled: bool = switch(True, "§4 weight λ_h·τ_h [ours], so that the terms' gradient does not grow as "
                                   "1/τ_h; --no-hier-tau-scaled: λ_h, as the authors")
    lambda_h: float = switch(0.1, "§4 loss weight λ_h", check=at_least(0))
    # §5 task contrastive constraint
    task_loss: bool = switch(True, "§5 task contrastive constraint")
    task_similarity: str = switch("names", "§5 how related two tasks are: CLIP text embeddings of the task names "
                                  "(as the authors), or frozen-CLIP centroids of each task, computed online",
                                  choices=("names", "centroids"))
    theta: float = switch(0.4, "§5 threshold θ on the range-normalised similarity: above it, two tasks are "
                          "related", check=within(-1, 1))
    tau_task: float = switch(0.1, "§5 temperature [ours; 0.001 in the authors' code: see task_contrastive_loss]",
                             check=POSITIVE)
    lambda_task: float = switch(0.1, "§5 loss weight λ_task", check=at_least(0))
    # §6 task identity at test time
    routing: str = switch("kmeans", "§6 the task of a test query: nearest k-means key, or the true task",
                          choices=("kmeans", "oracle"))
    keys: int = switch(5, "§6 k-means keys per task and modality", check=at_least(1))
    route_metric: str = switch("cosine", "§6 cosine: spherical k-means, route by largest cosine [ours]; l1: "
                               "Euclidean k-means, route by smallest L1 distance (the authors')",
                               choices=ROUTE_METRICS)

class LowRankPrompts(nn.Module):
    """One task's visual and textual prompts as rank-R CP decompositions (METHOD.md §2):

        P_v[j, m, :] = (1/R) * sum_r A[j, r] * B_v[m, r] * C_v[:, r]
        P_t[j, m, :] = (1/R) * sum_r A[j, r] * B_t[m, r] * C_t[:, r]

    A (J x R) is the *common* layer factor, literally one tensor used by both modalities, so
    what one modality learns about "which layer needs how much of which component" is
    shared; B_v, B_t (M x R) and C_v (D_v x R), C_t (D_t x R) are modality-specific.
    Parameters per task: R * (J + 2M + D_v + D_t).

    Scale: the encoders read a prompt token through a LayerNorm, i.e. its direction
    (METHOD.md §2); no per-layer rescaling. The paper's 1/R and N(0, 0.5^2) factors give prompts
    of std ~0.06, which dominate text layer 0's positional embedding (std ~0.01) at their
    positions, as a word embedding does.
    """

    def __init__(self, J: int, M: int, D_v: int, D_t: int, R: int, std: float):
        super().__init__()
        self.R = R
        self.A = nn.Parameter(std * torch.randn(J, R))      # (J, R)   shared layer factor
        self.B_v = nn.Parameter(std * torch.randn(M, R))    # (M, R)   visual token factor
        self.B_t = nn.Parameter(std * torch.randn(M, R))    # (M, R)   textual token factor
        self.C_v = nn.Parameter(std * torch.randn(D_v, R))  # (D_v, R) visual feature factor
        self.C_t = nn.Parameter(std * torch.randn(D_t, R))  # (D_t, R) textual feature factor

    def forward(self) -> tuple[torch.Tensor, torch.Tensor]:
        P_v = torch.einsum("jr,mr,dr->jmd", self.A, self.B_v, self.C_v) / self.R  # (J, M, D_v)
        P_t = torch.einsum("jr,mr,dr->jmd", self.A, self.B_t, self.C_t) / self.R  # (J, M, D_t)
        return P_v, P_t


def prompt_init_std(cfg: LPIConfig) -> float:
    """The std of the low-rank product's entries at init: a sum of R products of three
    N(0, σ²) factors, divided by R, has std σ³/√R (0.0625 for the paper's σ = 0.5, R = 4)."""
    return cfg.factor_std ** 3 / math.sqrt(cfg.R)


class FullRankPrompts(nn.Module):
    """The baseline / ablation: free (J, M, D) tensors per modality, J*M*(D_v+D_t) parameters.
    [ours] They start at std = cfg.full_rank_std, the low-rank product's std at the paper's
    σ and R (PROMPT_STD), so that the two variants start alike and differ only in their
    parametrisation."""

    def __init__(self, J: int, M: int, D_v: int, D_t: int, std: float):
        super().__init__()
        self.P_v = nn.Parameter(std * torch.randn(J, M, D_v))
        self.P_t = nn.Parameter(std * torch.randn(J, M, D_t))

    def forward(self) -> tuple[torch.Tensor, torch.Tensor]:
        return self.P_v, self.P_t


# ========================================================================================
# §3  Multi-modal correlation (interaction) modules
# ========================================================================================

class CPLinear(nn.Module):
    """The cross-modal maps of all prompted layers j = 1..J-1, one weight tensor
    W (J-1, D_in+1, D_out) stored as a rank-R' CP decomposition over (layer, input, output):

        W[j] = (1/R') * sum_r L[j, r] * U[:, r] V[:, r]^T        (the +1 row of U is the bias)

    Applied as ([x, 1] @ U) * L[j] @ V^T / R', never forming W: O(M R' (D_in + D_out))."""

    def __init__(self, layers: int, D_in: int, D_out: int, rank: int, std: float):
        super().__init__()
        self.rank = rank
        self.L = nn.Parameter(std * torch.randn(layers, rank))        # (J-1, R')
        self.U = nn.Parameter(std * torch.randn(D_in + 1, rank))      # (D_in+1, R')
        self.V = nn.Parameter(std * torch.randn(D_out, rank))         # (D_out, R')

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x (J-1, M, D_in) -> (J-1, M, D_out): layer j's map applied to layer j's tokens."""
        x1 = torch.cat([x, torch.ones_like(x[..., :1])], dim=-1)   # (J-1, M, D_in+1)
        h = (x1 @ self.U) * self.L[:, None, :]                       # (J-1, M, R')
        return h @ self.V.t() / self.rank                            # (J-1, M, D_out)

    def weight(self) -> torch.Tensor:
        """The full W (J-1, D_in+1, D_out), for tests and for reading."""
        return torch.einsum("jr,ir,or->jio", self.L, self.U, self.V) / self.rank


class Interaction(nn.Module):
    """One task's correlation modules (METHOD.md §3), acting on the prompts before insertion:

        P_v'[j] = LN_v((1-α) P_v[j] + α [P_t[j], 1] W_t→v[j])
        P_t'[j] = LN_t((1-α) P_t[j] + α [P_v[j], 1] W_v→t[j])      for j >= 1; layer 0 untouched

    In the authors' grounding model these maps mix per-sample hidden states. Retrieval needs
    a dual encoder (images and captions indexed independently), so here they mix the prompts
    themselves and stay input-independent [ours]. With α = 0 and no LN this is the identity.

    [ours] The LayerNorms' gains start at `gain` (cfg.interaction_gain: the raw prompts' std
    at init), not at 1: deep prompts are *added* to the hidden states (METHOD.md §1), where a
    unit-scale random token would move every feature at the start; the gain then learns how
    large the deep prompts should be.
    """

    def __init__(self, J: int, D_v: int, D_t: int, rank: int, alpha: float, use_ln: bool, std: float,
                 gain: float = 1.0):
        super().__init__()
        self.alpha = alpha
        self.t2v = CPLinear(max(J - 1, 0), D_t, D_v, rank, std)
        self.v2t = CPLinear(max(J - 1, 0), D_v, D_t, rank, std)
        self.ln_v = nn.LayerNorm(D_v) if use_ln else nn.Identity()
        self.ln_t = nn.LayerNorm(D_t) if use_ln else nn.Identity()
        for ln in (self.ln_v, self.ln_t):
            if use_ln:
                nn.init.constant_(ln.weight, gain)

    def forward(self, P_v: torch.Tensor, P_t: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        if P_v.shape[0] <= 1:
            return P_v, P_t  # nothing beyond layer 0 to couple
        a = self.alpha
        deep_v = self.ln_v((1 - a) * P_v[1:] + a * self.t2v(P_t[1:]))  # (J-1, M, D_v)
        deep_t = self.ln_t((1 - a) * P_t[1:] + a * self.v2t(P_v[1:]))  # (J-1, M, D_t)
        return torch.cat([P_v[:1], deep_v]), torch.cat([P_t[:1], deep_t])


# ========================================================================================
# §4-5  Losses: CLIP's InfoNCE, hierarchical low-rank contrastive, task contrastive
# ========================================================================================

# L_clip, the loss every method trains with, is CLIP's own: clip_model.clip_loss (the tiny
# CLIP is pre-trained with the same function). The hierarchical losses below reuse its
# symmetric InfoNCE on other logits.
clip_loss, symmetric_info_nce = clip_model.clip_loss, clip_model.symmetric_info_nce


def standardize_tokens(P: torch.Tensor) -> torch.Tensor:
    """What a pre-LN encoder reads of a prompt token (METHOD.md §2): the token centred and
    scaled to unit variance over its D features (LayerNorm without its affine part).
    (..., D) -> (..., D).
    eps is far below LayerNorm's 1e-5, so that the result is scale-free even for prompts of
    std ~0.06 (variance ~4e-3, where 1e-5 would still be felt); fp64 input stays fp64."""
    P = P if P.dtype == torch.float64 else P.float()
    return F.layer_norm(P, P.shape[-1:], eps=1e-12)


def token_structure(P: torch.Tensor) -> torch.Tensor:
    """Layer summary for the prompt-level loss: the correlations between the M tokens of
    each layer, upper triangle. (J, M, D) -> (J, M(M-1)/2).

    Each token is standardised first (standardize_tokens): the summary sees what the
    encoders read, and an M x M structure compares across modalities although D_v != D_t."""
    Z = standardize_tokens(P)                                 # (J, M, D), zero mean, unit var per token
    G = Z @ Z.transpose(1, 2) / Z.shape[-1]                   # (J, M, M) token correlations
    i, k = torch.triu_indices(G.shape[1], G.shape[1], offset=1)
    return G[:, i, k]                                         # the diagonal is always 1: left out


def prompt_level_loss(P_v: torch.Tensor, P_t: torch.Tensor, tau: float) -> torch.Tensor:
    """Hierarchical loss, prompt level (METHOD.md §4): layer j's visual prompt should pick out
    layer j's textual prompt among all J layers, compared through their token structure
    s[j] = token_structure(P)[j] (how the M tokens of layer j relate to each other):

        L_prompt = InfoNCE( cos(s_v, s_t) / τ )     over the J layers, both directions

    [ours] The authors summarise a layer by its mean over D; the token structure replaces it
    (why: METHOD.md §4). With M = 1 a layer has no token structure and the loss is 0."""
    s_v, s_t = token_structure(P_v), token_structure(P_t)    # (J, M(M-1)/2) each
    if s_v.shape[1] == 0:
        return (P_v.sum() + P_t.sum()) * 0.0                  # keeps the graph and the dtype
    s_v, s_t = F.normalize(s_v, dim=-1), F.normalize(s_t, dim=-1)
    return symmetric_info_nce(s_v @ s_t.t() / tau)


def factor_level_loss(B_v: torch.Tensor, B_t: torch.Tensor, tau: float) -> torch.Tensor:
    """Hierarchical loss, factor level [ours]: the m-th rows of the two token factors
    (each an R-vector) are positives, the other rows negatives: InfoNCE(cos(B_v, B_t) / τ)."""
    return symmetric_info_nce(F.normalize(B_v.float(), dim=-1) @ F.normalize(B_t.float(), dim=-1).t() / tau)


# The semantic similarity of tasks (METHOD.md §5). The authors load a 12 x 12 matrix: the
# cosine similarity of CLIP text embeddings of the COCO super-category names. We compute it
# the same way from each task's readable name (`--task-similarity names`, the default), or
# online from per-task centroids of frozen-CLIP features (`--task-similarity centroids`).
TASK_NAME_TEMPLATE = "a photo of {}"


@torch.no_grad()
def name_similarity(clip: clip_model.CLIP, names: list[str]) -> torch.Tensor:
    """Cosine similarity of the frozen text embeddings of TASK_NAME_TEMPLATE.format(name):
    (T, T). Known before training (the names are), so computed once for all tasks."""
    dev = clip.logit_scale.device
    tokens = clip_model.tokenize([TASK_NAME_TEMPLATE.format(n) for n in names], clip.context_length, truncate=True)
    e = F.normalize(clip.encode_text(tokens.to(dev)).float(), dim=-1)      # (T, E)
    return (e @ e.t()).cpu()


def centroid_similarity(centroids_img: torch.Tensor, centroids_txt: torch.Tensor) -> torch.Tensor:
    """The mean of the cosine similarities of per-task centroids of frozen-CLIP image and
    caption embeddings [ours]: a statistic per task, no replayed data. (T, E) x 2 -> (T, T)."""
    ci, ct = F.normalize(centroids_img.float(), dim=-1), F.normalize(centroids_txt.float(), dim=-1)
    return (ci @ ci.t() + ct @ ct.t()) / 2


def task_targets(similarity: torch.Tensor, theta: float) -> torch.Tensor:
    """Targets Y[i, k] = 1 for related tasks, 0 for unrelated ones; 1 on the diagonal.

    [ours] θ applies to the *range-normalised* similarity (off-diagonal values mapped so that
    the least similar pair is 0 and the most similar 1; the order of pairs is kept): raw CLIP
    cosines share a large common component and can all exceed θ = 0.4. On the authors' own
    matrix θ then sits at a raw 0.41, their split. With fewer than two distinct off-diagonal
    values (e.g. two tasks) there is no range, and θ applies to the raw cosine."""
    S = similarity.float()
    T = S.shape[0]
    off = ~torch.eye(T, dtype=torch.bool)
    if T > 1 and S[off].max() - S[off].min() > 1e-6:
        lo, hi = S[off].min(), S[off].max()
        S = (S - lo) / (hi - lo)
    Y = (S > theta).float()
    Y.fill_diagonal_(1.0)
    return Y


def task_contrastive_loss(prompts: torch.Tensor, targets: torch.Tensor, tau: float) -> torch.Tensor:
    """Task contrastive constraint (METHOD.md §5) for one modality.

    prompts (T, J, M, D) are the inserted prompts of tasks 1..t (older ones detached by the
    caller), targets (T, T) the 0/1 matrix Y of task_targets. With X the cosine similarity
    of the tasks' prompts, over off-diagonal pairs:

        L_task = mean_{Y=1} BCE(σ(X/τ), 1) + mean_{Y=0} BCE(σ(X/τ), 0)

    [ours] X compares the prompts with each token standardised over D (what the encoders
    read), so that no layer counts more for its scale. Each mean is 0 when it has no pairs: the loss is
    0 (not NaN) at the first task. One sigmoid (the authors' code applies two); [ours]
    τ = 0.1, since at their 0.001 the BCE's slope of 1000 swamps the retrieval loss.
    """
    T = prompts.shape[0]
    if T < 2:
        return prompts.sum() * 0.0  # keeps the graph and the dtype
    flat = F.normalize(standardize_tokens(prompts).reshape(T, -1), dim=-1)   # (T, J*M*D)
    X = flat @ flat.t()                                                      # (T, T) cosine similarities
    Y = targets[:T, :T].to(X)
    off = ~torch.eye(T, dtype=torch.bool, device=X.device)
    bce = F.binary_cross_entropy_with_logits(X / tau, Y, reduction="none")
    loss = X.new_zeros(())
    for mask in (off & (Y > 0), off & (Y == 0)):
        if mask.any():
            loss = loss + bce[mask].mean()
    return loss


# ========================================================================================
# The LPI model: a frozen CLIP and one prompt set (prompts + interaction) per task
# ========================================================================================

class TaskPrompts(nn.Module):
    """Everything task t learns: its decomposed (or full-rank) prompts and its interaction."""

    def __init__(self, cfg: LPIConfig, D_v: int, D_t: int):
        super().__init__()
        self.prompts = (LowRankPrompts(cfg.J, cfg.M, D_v, D_t, cfg.R, cfg.factor_std) if cfg.low_rank
                        else FullRankPrompts(cfg.J, cfg.M, D_v, D_t, cfg.full_rank_std))
        # §3 couples layers j >= 1 only: with J = 1 there is nothing to couple (and nothing to count)
        self.interaction = (Interaction(cfg.J, D_v, D_t, cfg.interaction_rank, cfg.alpha, cfg.interaction_ln,
                                        cfg.factor_std, gain=cfg.interaction_gain)
                            if cfg.interaction and cfg.J > 1 else None)

    def raw(self) -> tuple[torch.Tensor, torch.Tensor]:
        """Prompts before interaction: what the hierarchical loss aligns. 2 x (J, M, D)."""
        return self.prompts()

    def interact(self, P_v: torch.Tensor, P_t: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Raw prompts -> prompts as inserted (the interaction, when there is one)."""
        return self.interaction(P_v, P_t) if self.interaction is not None else (P_v, P_t)

    def forward(self) -> tuple[torch.Tensor, torch.Tensor]:
        """Prompts as inserted into the encoders: 2 x (J, M, D)."""
        return self.interact(*self.prompts())


class LPI(clip_model.FrozenCLIP):
    """A frozen CLIP plus a growing list of per-task prompt sets.

    `shared=True` keeps a single prompt set that every task trains in turn: the forgetting
    baseline (seqft) and the joint upper bound use it. `cfg.J == 0` means no prompts at all:
    zero-shot CLIP."""

    def __init__(self, clip: clip_model.CLIP, cfg: LPIConfig, shared: bool = False):
        super().__init__(clip)
        if cfg.J == 0 and cfg.M is None:
            cfg = dataclasses.replace(cfg, M=0)            # no prompts: no length either
        if cfg.J is None or cfg.M is None:
            raise LPIError("LPIConfig.J and .M must be set (run() takes them from PAPER_DEFAULTS / TINY_DEFAULTS)")
        self.cfg, self.shared = cfg, shared
        if not 0 <= cfg.J <= self.depth:
            raise LPIError(f"prompt depth J={cfg.J} (--depth) is out of range: this CLIP has {self.depth} layers per "
                           f"encoder (expected 0 <= J <= {self.depth})")
        self.task_prompts = nn.ModuleList()

    @property
    def prompted(self) -> bool:
        return self.cfg.J > 0 and self.cfg.M > 0

    def add_task(self) -> int:
        """Open a prompt set for a new task, freeze the older ones; return the set's index."""
        if not self.prompted:
            return 0
        if self.shared and len(self.task_prompts) == 1:
            return 0
        for old in self.task_prompts:
            old.requires_grad_(False)
        self.task_prompts.append(TaskPrompts(self.cfg, self.D_v, self.D_t))
        return len(self.task_prompts) - 1

    def prompt_index(self, task_ids: torch.Tensor) -> torch.Tensor:
        return torch.zeros_like(task_ids) if self.shared else task_ids

    def stacked_prompts(self) -> tuple[torch.Tensor, torch.Tensor]:
        """Inserted prompts of every task: (T, J, M, D_v), (T, J, M, D_t)."""
        pv, pt = zip(*(tp() for tp in self.task_prompts))
        return torch.stack(pv), torch.stack(pt)

    def _prompts_for(self, task_ids: torch.Tensor | int | None, modality: int):
        if not self.prompted or task_ids is None or len(self.task_prompts) == 0:
            return None
        if isinstance(task_ids, int):  # one task for the whole batch: (J, M, D)
            return self.task_prompts[0 if self.shared else task_ids]()[modality]
        idx = self.prompt_index(task_ids)
        used = idx.unique().tolist()
        if len(used) == 1:
            return self.task_prompts[used[0]]()[modality]
        return self.stacked_prompts()[modality][idx]  # (B, J, M, D) per sample

    def tokenize(self, captions: list[str]) -> torch.Tensor:
        """Captions -> tokens with M placeholder slots when text prompts are used."""
        return clip_model.tokenize(captions, self.clip.context_length, truncate=True,
                                   prompt_length=self.cfg.M if self.prompted else 0)

    def encode_image(self, images: torch.Tensor, task_ids: torch.Tensor | int | None = None) -> torch.Tensor:
        return self.clip.encode_image(images, self._prompts_for(task_ids, 0), self.cfg.deep_prompts)

    def encode_text(self, tokens: torch.Tensor, task_ids: torch.Tensor | int | None = None) -> torch.Tensor:
        return self.clip.encode_text(tokens, self._prompts_for(task_ids, 1), self.cfg.deep_prompts)

    def losses(self, images: torch.Tensor, tokens: torch.Tensor, t: int, targets: torch.Tensor | None,
               gather: Callable | None = None) -> dict[str, torch.Tensor]:
        """All loss terms for a batch of task t's pairs (METHOD.md §7), with task t's prompts
        built once: L = L_clip + λ_h τ_h (L_prompt + L_factor) + λ_task (L_task_v + L_task_t) / 2
        (λ_h alone with --no-hier-tau-scaled).
        targets: the (T, T) 0/1 task-relation matrix Y (task_targets), or None. gather:
        features of this process -> those of the global batch (several processes).
        Returns each term and "total" = Σ loss_weights()[term] · term."""
        cfg, gather = self.cfg, gather or (lambda f: f)
        if not self.prompted:
            loss = clip_loss(gather(self.clip.encode_image(images)), gather(self.clip.encode_text(tokens)),
                             self.clip.logit_scale)
            return {"clip": loss, "total": loss}
        tp = self.task_prompts[0 if self.shared else t]
        raw_v, raw_t = tp.raw()                                   # (J, M, D_v), (J, M, D_t): before interaction
        P_v, P_t = tp.interact(raw_v, raw_t)                      # as inserted into the encoders
        deep = cfg.deep_prompts
        out = {"clip": clip_loss(gather(self.clip.encode_image(images, P_v, deep)),
                                 gather(self.clip.encode_text(tokens, P_t, deep)), self.clip.logit_scale)}
        if cfg.hier_prompt:
            out["prompt"] = prompt_level_loss(raw_v, raw_t, cfg.tau_h)
        if cfg.hier_factor and cfg.low_rank:  # full-rank prompts have no factors to align
            out["factor"] = factor_level_loss(tp.prompts.B_v, tp.prompts.B_t, cfg.tau_h)
        if cfg.task_loss and not self.shared and targets is not None and t > 0:
            with torch.no_grad():  # old tasks' prompts are frozen constants: only row/column t learns
                old_v, old_t = zip(*(self.task_prompts[k]() for k in range(t)))
            Y = targets[: t + 1, : t + 1]
            out["task"] = (task_contrastive_loss(torch.stack([*old_v, P_v]), Y, cfg.tau_task)
                           + task_contrastive_loss(torch.stack([*old_t, P_t]), Y, cfg.tau_task)) / 2
        weights = self.loss_weights()
        out["total"] = sum(weights[name] * term for name, term in out.items())
        return out

    def loss_weights(self) -> dict[str, float]:
        """The weight of each loss term in the total (METHOD.md §7).

        [ours] An InfoNCE on cos / τ_h has a gradient of size up to 2 / τ_h in the cosines
        (200 at the authors' τ_h = 0.01): it swamps L_clip's and inflates the prompts' norms
        (METHOD.md §4). Weighted by λ_h·τ_h its gradient is at most 2·λ_h, whatever τ_h."""
        cfg = self.cfg
        lambda_h = cfg.lambda_h * (cfg.tau_h if cfg.hier_tau_scaled else 1.0)
        return {"clip": 1.0, "prompt": lambda_h, "factor": lambda_h, "task": cfg.lambda_task}


def count_parameters(cfg: LPIConfig, D_v: int, D_t: int) -> dict[str, int]:
    """Trainable parameters one task adds, split into prompts and interaction modules.
    Counted on the real modules (built on the meta device: no memory), so the number
    cannot drift from the code."""
    with torch.device("meta"):
        tp = TaskPrompts(cfg, D_v, D_t) if cfg.J > 0 and cfg.M > 0 else None
    prompts = sum(p.numel() for p in tp.prompts.parameters()) if tp else 0
    inter = sum(p.numel() for p in tp.interaction.parameters()) if tp and tp.interaction else 0
    return {"prompts": prompts, "interaction": inter, "total": prompts + inter}


# ========================================================================================
# §6  Task identity at test time: k-means keys per task, nearest-key routing
# ========================================================================================
# No task id is given at test time (METHOD.md §6, S-Prompts' recipe). After training task t,
# k-means on the frozen, un-prompted CLIP embeddings of t's training images gives k visual
# keys for t; the same on its captions gives k text keys. A query goes to the task of its
# nearest key, and is then encoded with that task's prompts:
#     task(x) = task_of( argmax_key  cos(x, key) )
# Two metrics (--route-metric), features L2-normalised in both:
# - cosine [ours, default]: *spherical* k-means (assign by largest cosine, centroids rescaled
#   to unit length), then route by largest cosine: one criterion for clustering and routing.
# - l1 [code]: Euclidean k-means (centroids are plain means, inside the sphere), then route
#   by the smallest L1 distance to a key, a criterion the clustering did not optimise.


def kmeans_pp_init(x: Tensor, k: int, gen: torch.Generator) -> Tensor:
    """k-means++ on unit vectors x (N, D): the first centre uniformly, each next one with
    probability proportional to the squared distance to the nearest centre so far. (k, D)"""
    n = x.shape[0]
    idx = [int(torch.randint(n, (1,), generator=gen))]
    d2 = (2 - 2 * x @ x[idx[0]]).clamp_min(0)                                  # (N,)
    for _ in range(1, k):
        if d2.sum() > 0:
            nxt = int(torch.multinomial(d2.cpu(), 1, generator=gen))
        else:  # fewer distinct points than k: any point will do
            nxt = int(torch.randint(n, (1,), generator=gen))
        idx.append(nxt)
        d2 = torch.minimum(d2, (2 - 2 * x @ x[nxt]).clamp_min(0))
    return x[idx].clone()


def kmeans(x: Tensor, k: int, iters: int = 50, seed: int = 0, spherical: bool = True) -> Tensor:
    """k-means from a k-means++ start; deterministic for a given seed.

    x: (N, D) features (normalised inside). spherical: cosine assignment and unit-norm
    centroids; else Euclidean assignment and mean centroids. Returns (min(k, N), D): with
    N <= k every point is its own centroid. An empty cluster is re-seeded with the point
    that is worst served by its current centroid."""
    x = F.normalize(x.detach().float(), dim=-1)
    if x.shape[0] == 0:
        raise ValueError("kmeans needs at least one point")
    if x.shape[0] <= k:
        return x.clone()
    centroids = kmeans_pp_init(x, k, torch.Generator(device="cpu").manual_seed(seed))   # (k, D)
    assign = None
    for _ in range(iters):
        # affinity to each centroid (N, k): cosine, or minus the squared Euclidean distance
        aff = x @ centroids.T if spherical else -torch.cdist(x, centroids) ** 2
        best_aff, new_assign = aff.max(1)
        if assign is not None and torch.equal(new_assign, assign):
            break
        assign = new_assign
        # Per-cluster sums as a matmul with the one-hot assignment matrix (much faster on
        # CPU than index_add_ for small N, which pays a thread-pool start per call).
        one_hot = F.one_hot(assign, k).to(x.dtype)                             # (N, k)
        sums, counts = one_hot.T @ x, one_hot.sum(0)                           # (k, D), (k,)
        empty = (counts == 0).nonzero().flatten()
        if len(empty) > 0:  # re-seed the empty clusters with the worst-served points, one each
            sums[empty], counts[empty] = x[best_aff.argsort()[:len(empty)]], 1
        centroids = F.normalize(sums, dim=-1) if spherical else sums / counts[:, None]
    return centroids


class TaskRouter:
    """Per-task visual and textual k-means keys; routes queries to the nearest key's task.

    Keys are stored as plain CPU float tensors (all tasks stacked) with the task id of
    every key beside them, so `state_dict()` is directly checkpointable.
    """

    def __init__(self, iters: int = 50, seed: int = 0, metric: str = "cosine"):
        if metric not in ROUTE_METRICS:
            raise ValueError(f"metric must be one of {ROUTE_METRICS}, not {metric!r}")
        self.iters, self.seed, self.metric = iters, seed, metric
        self.image_keys = torch.empty(0, 0)                            # (n_keys, D_v)
        self.image_key_task = torch.empty(0, dtype=torch.long)         # (n_keys,)
        self.text_keys = torch.empty(0, 0)                             # (n_keys, D_t)
        self.text_key_task = torch.empty(0, dtype=torch.long)          # (n_keys,)
        self.num_tasks = 0

    def add_task(self, image_feats: Tensor, text_feats: Tensor, k: int = 5) -> int:
        """Cluster one task's frozen CLIP image and caption embeddings; returns its id."""
        t = self.num_tasks
        seed = self.seed + t   # a different, fixed seed per task
        spherical = self.metric == "cosine"
        img_c = kmeans(image_feats.cpu(), k, self.iters, seed, spherical)
        txt_c = kmeans(text_feats.cpu(), k, self.iters, seed, spherical)
        self.image_keys = img_c if t == 0 else torch.cat([self.image_keys, img_c])
        self.text_keys = txt_c if t == 0 else torch.cat([self.text_keys, txt_c])
        self.image_key_task = torch.cat([self.image_key_task, torch.full((len(img_c),), t)])
        self.text_key_task = torch.cat([self.text_key_task, torch.full((len(txt_c),), t)])
        self.num_tasks += 1
        return t

    def _route(self, feats: Tensor, keys: Tensor, key_task: Tensor) -> Tensor:
        if len(keys) == 0:
            raise RuntimeError("TaskRouter has no tasks yet")
        feats = F.normalize(feats.detach().float(), dim=-1)
        keys = keys.to(feats.device)
        if self.metric == "cosine":
            nearest = (feats @ keys.T).argmax(1)                       # (N,) largest cosine
        else:
            nearest = torch.cdist(feats, keys, p=1).argmin(1)          # (N,) smallest L1 distance
        return key_task.to(feats.device)[nearest]

    def route_images(self, feats: Tensor) -> Tensor:
        """(N, D_v) frozen CLIP image embeddings -> (N,) task ids."""
        return self._route(feats, self.image_keys, self.image_key_task)

    def route_texts(self, feats: Tensor) -> Tensor:
        """(N, D_t) frozen CLIP caption embeddings -> (N,) task ids."""
        return self._route(feats, self.text_keys, self.text_key_task)

    _STATE = ("image_keys", "image_key_task", "text_keys", "text_key_task")

    def state_dict(self) -> dict:
        return {**{name: getattr(self, name).clone() for name in self._STATE}, "num_tasks": torch.tensor(self.num_tasks)}

    def load_state_dict(self, state: dict) -> None:
        for name in self._STATE:  # keys as float, their task ids as long, on the CPU
            setattr(self, name, state[name].cpu().clone().to(torch.long if name.endswith("_task") else torch.float))
        self.num_tasks = int(state["num_tasks"])


# ========================================================================================
# §7  Evaluation: Recall@K over the pool of all seen tasks
# ========================================================================================

# After task t the candidate pool is the union of the test items of tasks 1..t, and the
# recall of each seen task k is reported over the queries of task k only (METHOD.md §7).
# So we compute the rank of every query against the whole pool once, and a task's recall
# is then `recall_from_ranks(ranks[task_mask])`.
#
# Rank of a query (a deterministic, pessimistic tie rule):
#     rank(q) = #{ wrong candidates w : score(q, w) >= best score of a correct candidate }
#     hit@K(q)  <=>  rank(q) < K
# A wrong candidate that ties with the best correct one is counted as ranked above it, so
# a degenerate model (e.g. all scores equal) scores R@K = 0, never 100 %. Other correct
# candidates (the other captions of the same image) never count against a query.
# Scores must be finite: a NaN compares False and would silently count as "below".

# Row-block size of the chunked loops below. Blocks of ~1-2 M booleans (64 x 25,000)
# stay in cache and are reused by the allocator; on 2 CPU cores they made the counting
# several times faster than blocks of 500+ rows or one (N_img, N_cap) mask
# (benchmarks/recall_speed.py).
CHUNK_ROWS = 64


def t2i_ranks(sim: Tensor, cap2img: Tensor, cap_queries: Tensor | None = None,
              chunk: int = CHUNK_ROWS) -> Tensor:
    """Rank of each caption query among the images (see the tie rule above).

    sim: (N_img, N_cap) similarities; cap2img: (N_cap,) the image of each caption;
    cap_queries: optional (Q,) caption indices used as queries (default: all captions).
    Returns a LongTensor (Q,) of ranks, 0 = the caption's image comes first.
    """
    n_img, n_cap = sim.shape
    dev = sim.device
    cap2img = cap2img.to(dev)
    queries = torch.arange(n_cap, device=dev) if cap_queries is None else cap_queries.to(dev)
    # Each caption has exactly one correct image, so its correct score is one entry.
    correct = sim[cap2img[queries], queries]                                     # (Q,)
    # Count the images scoring >= the correct one, one block of image rows at a time.
    # The correct image itself always passes the test, hence the -1 at the end.
    n_ge = torch.zeros(len(queries), dtype=torch.long, device=dev)
    for start in range(0, n_img, chunk):
        block = sim[start:start + chunk]                                         # (chunk, N_cap)
        if cap_queries is not None:
            block = block[:, queries]                                            # (chunk, Q)
        n_ge += (block >= correct).sum(0)
    return n_ge - 1


def i2t_ranks(sim: Tensor, cap2img: Tensor, img_queries: Tensor | None = None,
              chunk: int = CHUNK_ROWS) -> Tensor:
    """Rank of each image query among the captions (see the tie rule above).

    sim: (N_img, N_cap); cap2img: (N_cap,); img_queries: optional (Q,) image indices
    (default: all images). An image is a hit at K if any of its captions is in the top K,
    so its rank is measured from its best-scoring caption.
    Returns a LongTensor (Q,); an image without captions gets rank N_cap (never a hit).
    """
    n_img, n_cap = sim.shape
    dev = sim.device
    cap2img = cap2img.to(dev)
    queries = torch.arange(n_img, device=dev) if img_queries is None else img_queries.to(dev)

    # Best correct score per image: scatter the correct score of every caption,
    # sim[cap2img[c], c], onto its image with an amax reduction.
    correct = sim[cap2img, torch.arange(n_cap, device=dev)]                      # (N_cap,)
    best = torch.full((n_img,), float("-inf"), dtype=sim.dtype, device=dev)
    best = best.scatter_reduce(0, cap2img, correct, reduce="amax")               # (N_img,)
    # Correct captions tying with the best one also pass the >= test below; count them
    # so they can be taken out again (they are never "wrong").
    n_best_correct = torch.bincount(cap2img[correct == best[cap2img]], minlength=n_img)

    best_q = best[queries]                                                       # (Q,)
    n_ge = torch.empty(len(queries), dtype=torch.long, device=dev)
    for start in range(0, len(queries), chunk):
        stop = start + chunk
        # A plain slice when ranking all images (no copy), gathered rows otherwise.
        block = sim[start:stop] if img_queries is None else sim[queries[start:stop]]
        n_ge[start:stop] = (block >= best_q[start:stop, None]).sum(1)            # (chunk,)
    # An image with no caption: best = -inf, every caption is ">=" and wrong -> N_cap.
    return n_ge - n_best_correct[queries]


def recall_from_ranks(ranks: Tensor, ks=(1, 5, 10)) -> dict:
    """{"R@K": percentage of queries with rank < K} for each K (NaN with no queries)."""
    if len(ranks) == 0:
        return {f"R@{k}": float("nan") for k in ks}
    return {f"R@{k}": 100.0 * (ranks < k).double().mean().item() for k in ks}


def recall_at_k(sim: Tensor, cap2img: Tensor, ks=(1, 5, 10),
                img_queries: Tensor | None = None, cap_queries: Tensor | None = None) -> dict:
    """Image->text and text->image Recall@K in percent.

    sim: (N_img, N_cap) similarities between every image and every caption of the pool;
    cap2img: (N_cap,) LongTensor, the image each caption describes (several captions
    may share one image). img_queries / cap_queries restrict the queries (e.g. to one
    task's test items) while the candidates stay the whole pool.
    Returns {"i2t": {"R@1": ..., "R@5": ..., "R@10": ...}, "t2i": {...}}.

    For a T x T table, rank once and slice per task instead of calling this T times:
        r_i2t, r_t2i = i2t_ranks(sim, cap2img), t2i_ranks(sim, cap2img)
        row = {k: recall_from_ranks(r_i2t[img_task == k], ks) for k in seen_tasks}
    """
    return {
        "i2t": recall_from_ranks(i2t_ranks(sim, cap2img, img_queries), ks),
        "t2i": recall_from_ranks(t2i_ranks(sim, cap2img, cap_queries), ks),
    }


# ========================================================================================
# §7  Training one task: the optimiser, one step, what is logged (batches: data.epoch_batches)
# ========================================================================================

# The optimiser of the per-task parameters [ours]: Adam, because SGD's useful step on the
# scale-free CP factors shrinks as lr/|w|^2 (METHOD.md §2, "How the factors learn").
# --optimizer sgd is the authors' recipe (momentum 0.9); both are in the tuning protocol.
OPTIMIZERS = ("sgd", "adam")


def make_optimizer(params: list[torch.Tensor], s: RunConfig) -> torch.optim.Optimizer:
    if s.optimizer == "adam":
        return torch.optim.Adam(params, lr=s.lr, weight_decay=s.weight_decay)
    return torch.optim.SGD(params, lr=s.lr, momentum=0.9, weight_decay=s.weight_decay)


LOSS_CURVE_POINTS = 200   # at most about this many points of each task's learning curve in results.json


def train_task(model: LPI, t: int, data: ImageCaptionSet, s: RunConfig, env: Env,
               targets: torch.Tensor | None) -> dict[str, float]:
    """Train task t's parameters (only those) on its pairs: the chosen optimiser, cosine
    schedule (METHOD.md §7), --pairs and --augment. targets: the task relations Y.
    With N processes each global batch is split among them in order, so they train as one
    process would with the global batch. Returns {"running": the loss terms' moving
    averages, "first_steps": the exact terms of the first 5 steps, "grad_norms": each
    term's gradient norm at those steps, "prompt_scale": {"start", "end"} of the task,
    "loss_curve": {"step": [...], term: [...]} every few steps}."""
    from tqdm import tqdm

    params = [p for p in model.parameters() if p.requires_grad]
    if not params:
        return {"running": {}, "first_steps": []}
    opt = make_optimizer(params, s)
    n_pairs = sum(map(len, data.captions)) if s.pairs == "per-caption" else len(data)
    total = s.epochs * len(global_batches(n_pairs, s, env))
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda i: 0.5 * (1 + math.cos(math.pi * i / total)))
    scaler = torch.amp.GradScaler(env.device.type, enabled=env.precision == "fp16" and env.device.type == "cuda")
    g = torch.Generator().manual_seed(s.seed * 1000 + t)
    files = not isinstance(data.images, torch.Tensor)
    # --augment auto: on for image files, off for the built-in tasks (their captions name positions)
    augment = s.augment == "on" or (s.augment == "auto" and files)
    preprocess = train_transform(model.clip.visual.input_resolution) if augment and files else env.preprocess
    model.train()
    bar = tqdm(total=total, desc=f"task {t + 1} train", disable=not s.progress)
    log = {"running": {}, "first_steps": [], "grad_norms": [], "prompt_scale": {"start": prompt_scale(model)},
           "loss_curve": {"step": []}}
    every = max(1, total // LOSS_CURVE_POINTS)
    for step, (caps, x, ok) in enumerate((b for _ in range(s.epochs) for b in epoch_batches(data, s, env, g, preprocess)), 1):
        losses = train_step(model, opt, scaler, x, ok, caps, t, targets, env, where=f"task {t + 1}, step {step} of {total}",
                            augment=augment and not files, log_grads=len(log["grad_norms"]) < 5)
        if losses is not None:
            sched.step()
            norms = losses.pop("grad_norms", None)
            values = {k: v.item() for k, v in losses.items()}
            log["running"] = {k: v if k not in log["running"] else 0.9 * log["running"][k] + 0.1 * v
                              for k, v in values.items()}
            log["first_steps"] += [values] if len(log["first_steps"]) < 5 else []
            log["grad_norms"] += [norms] if norms is not None else []
            if (step - 1) % every == 0 or step == total:   # the learning curve: every term, every few steps
                log["loss_curve"]["step"].append(step)
                for k, v in values.items():
                    log["loss_curve"].setdefault(k, []).append(round(v, 6))
            bar.set_postfix({k: f"{v:.3f}" for k, v in log["running"].items()})
        bar.update(1)
    bar.close()
    model.eval()
    log["prompt_scale"]["end"] = prompt_scale(model)
    return log


def train_step(model: LPI, opt, scaler, x: torch.Tensor, ok: torch.Tensor, caps: list[str], t: int,
               targets, env: Env, where: str, augment: bool = False, log_grads: bool = False) -> dict | None:
    """One optimiser step on this process's share of a global batch; None if skipped.
    augment: crop and flip the images here (tensors; image files are augmented as read).

    With N processes the contrastive loss sees the global batch (gather_with_grad), and
    each process's gradient of it reaches only its own rows; averaging the gradients over
    processes would divide the sum of those shares by N, so the CLIP term enters the
    backward pass N times. The other terms depend on the prompts alone, are the same on
    every process, and their average is themselves."""
    d = env.dist
    keep = ok.nonzero().flatten()
    total = all_reduce_ints([len(keep)], d)[0]
    fewest = -all_reduce_ints([-len(keep)], d, op="max")[0]
    if total < 2 or fewest < 1:  # a contrastive loss needs a negative; every process needs a share
        return None
    x, caps = x[keep], [caps[i] for i in keep.tolist()]
    x = augment_tensors(x) if augment else x
    tokens = model.tokenize(caps).to(env.device)
    gather = partial(gather_with_grad, d=d) if d.world > 1 else None
    with autocast(env.device, env.precision):
        losses = model.losses(x.to(env.device), tokens, t, targets, gather=gather)
    check_finite({k: v for k, v in losses.items() if k != "total"}, where, "loss term")
    params = [p for p in model.parameters() if p.requires_grad]
    norms = grad_norms(losses, model.loss_weights(), params) if log_grads else None
    opt.zero_grad(set_to_none=True)
    scaler.scale(losses["total"] + (d.world - 1) * losses["clip"]).backward()
    average_gradients(params, d)
    if not scaler.is_enabled():  # with fp16 loss scaling, inf gradients are expected: the step is skipped
        check_finite({f"gradient of {n}": p.grad for n, p in model.named_parameters()
                      if p.requires_grad and p.grad is not None}, where, "value")
    scaler.step(opt)
    scaler.update()
    check_finite({n: p for n, p in model.named_parameters() if p.requires_grad}, where, "parameter")
    return losses if norms is None else dict(losses, grad_norms=norms)


# ========================================================================================
# §7  Evaluation after each task: every seen task's test items in one pool
# ========================================================================================

def forgetting(matrix: list[list[float | None]], t: int) -> float:
    """Average forgetting after step t: for each task k < t, the best recall it had after
    an earlier step minus its recall now, averaged over k (METHOD.md §7)."""
    drops = []
    for k in range(t):
        earlier = [matrix[s][k] for s in range(k, t) if matrix[s][k] is not None]
        if earlier and matrix[t][k] is not None:  # rows a method never filled (joint) do not count
            drops.append(max(earlier) - matrix[t][k])
    return sum(drops) / len(drops) if drops else 0.0


def row_summary(row: dict) -> dict:
    """{"i2t": {"R@1": [per task], ...}, "t2i": ...} -> the average over tasks of each
    recall, and their mean ("mean recall")."""
    out = {f"{d}_{K}": sum(v) / len(v) for d in ("i2t", "t2i") for K, v in row[d].items()}
    out["mean_recall"] = sum(out.values()) / len(out)
    return out


def authors_average(matrix: list[list[float | None]], t: int) -> float:
    """The authors' "Average" after step t [code]: for each task k <= t, the mean of its recall
    over the evaluations after steps k..t (every one since it was learned), then the mean over
    tasks. Rows a method never filled (joint) are left out."""
    means = []
    for k in range(t + 1):
        seen = [matrix[s][k] for s in range(k, t + 1) if matrix[s][k] is not None]
        means += [sum(seen) / len(seen)] if seen else []
    return sum(means) / len(means) if means else float("nan")


def authors_forgetting(matrix: list[list[float | None]], t: int) -> float:
    """The authors' forgetting after step t [code]: for each task k < t, its recall now minus
    the best it had after an earlier step, summed over k and divided by t (their T - 1). It is
    <= 0 unless a task improved later: the negative of `forgetting`."""
    total = 0.0
    for k in range(t):
        earlier = [matrix[s][k] for s in range(k, t) if matrix[s][k] is not None]
        total += matrix[t][k] - max(earlier) if earlier and matrix[t][k] is not None else 0.0
    return total / t if t else 0.0


def summarize(recall: dict, t: int) -> dict:
    """After step t (0-based): row t's averages over tasks 1..t+1, the average forgetting of
    R@1 in each direction, and the authors' Average and forgetting of every recall, named as
    theirs ("authors_average_i2t_R@1", "authors_forgetting_t2i_R@5", ...)."""
    out = row_summary({d: {K: m[t][: t + 1] for K, m in recall[d].items()} for d in ("i2t", "t2i")})
    for d in ("i2t", "t2i"):
        out[f"{d}_forgetting_R@1"] = forgetting(recall[d]["R@1"], t)
        for K, m in recall[d].items():
            out[f"authors_average_{d}_{K}"] = authors_average(m, t)
            out[f"authors_forgetting_{d}_{K}"] = authors_forgetting(m, t)
    return out


@dataclass
class Pool:
    """The candidates of one evaluation: the readable test items of every seen task, each
    encoded under the task it was routed to, features normalised."""
    img: Tensor          # (N_img, E)
    cap: Tensor          # (N_cap, E)
    cap2img: Tensor      # (N_cap,) the pool image each caption describes
    img_task: Tensor     # (N_img,) true task of each image
    cap_task: Tensor     # (N_cap,) true task of each caption
    img_routed: Tensor   # (N_img,) task each image was routed to
    cap_routed: Tensor   # (N_cap,) task each caption was routed to
    img_index: Tensor    # (N_img,) the image's index in its task's test set



def route(frozen: list[Encoded], router: TaskRouter, cfg: LPIConfig) -> list[tuple[Tensor, Tensor]]:
    """§6: the task of every test image and caption, from its frozen features (nearest
    k-means key), or its true task with --routing oracle."""
    if cfg.routing == "oracle":
        return [(torch.full((len(f.img),), k), torch.full((len(f.cap),), k)) for k, f in enumerate(frozen)]
    return [(router.route_images(f.img), router.route_texts(f.cap)) for f in frozen]


def make_pool(encoded: list[Encoded], frozen: list[Encoded], routes: list[tuple]) -> Pool:
    """Join the tasks' encoded test sets into one pool; an unreadable image leaves it
    together with its captions."""
    parts = {name: [] for name in Pool.__dataclass_fields__}
    offset = 0
    for k, (e, f, (r_img, r_cap)) in enumerate(zip(encoded, frozen, routes)):
        ok, keep = f.ok, f.ok[f.cap2img]                                   # readable images, their captions
        parts["img"].append(e.img[ok]); parts["cap"].append(e.cap[keep])
        parts["cap2img"].append((torch.cumsum(ok.long(), 0) - 1)[f.cap2img[keep]] + offset)
        parts["img_task"].append(torch.full((int(ok.sum()),), k)); parts["cap_task"].append(torch.full((int(keep.sum()),), k))
        parts["img_routed"].append(r_img[ok]); parts["cap_routed"].append(r_cap[keep])
        parts["img_index"].append(ok.nonzero().flatten())
        offset += int(ok.sum())
    joined = {name: torch.cat(v) for name, v in parts.items()}
    joined["img"], joined["cap"] = F.normalize(joined["img"], dim=-1), F.normalize(joined["cap"], dim=-1)
    return Pool(**joined)


def pool_recall(pool: Pool, T: int, ks=(1, 5, 10), alone: bool = False) -> dict:
    """Recall of each task k over its own queries, ranked against the whole pool (the
    protocol), or with alone=True against task k's items only: what the pool costs.
    Returns {"i2t": {"R@1": [per task], ...}, "t2i": ...}."""
    sim = pool.img @ pool.cap.t()                                         # (N_img, N_cap)
    pooled = None if alone else {"i2t": i2t_ranks(sim, pool.cap2img), "t2i": t2i_ranks(sim, pool.cap2img)}
    recall = {d: {f"R@{K}": [] for K in ks} for d in ("i2t", "t2i")}
    for k in range(T):
        img_k, cap_k = pool.img_task == k, pool.cap_task == k
        if alone:  # a task's images are contiguous in the pool: its captions' images, counted from its first
            sub, cap2img = sim[img_k][:, cap_k], pool.cap2img[cap_k] - int(img_k.long().argmax())
            ranks = {"i2t": i2t_ranks(sub, cap2img), "t2i": t2i_ranks(sub, cap2img)}
        else:
            ranks = {"i2t": pooled["i2t"][img_k], "t2i": pooled["t2i"][cap_k]}
        for d, r in ranks.items():
            for name, v in recall_from_ranks(r, ks).items():
                recall[d][name].append(v)
    return recall


@torch.no_grad()
def evaluate(model: LPI, tasks: list[Task], frozen: list[Encoded], router: TaskRouter, s: RunConfig, env: Env,
             ks=(1, 5, 10)) -> tuple[dict, dict, Pool]:
    """Retrieval over the union of the test items of `tasks` (all tasks seen so far): every
    image and caption is routed to a task and encoded with that task's prompts; recall of
    task k is measured over task k's queries against the whole pool.
    Returns ({"i2t": {"R@1": [per task]}, "t2i": ...}, {"image": acc, "text": acc}, pool)."""
    routes = route(frozen, router, model.cfg)
    encoded = [encode_set(model, task.test, s, env, r_img, r_cap, progress=f"eval {task.name}")
               if model.prompted else f for task, f, (r_img, r_cap) in zip(tasks, frozen, routes)]
    pool = make_pool(encoded, frozen, routes)
    accuracy = lambda routed, true: 100.0 * float((routed == true).double().mean()) if len(true) else 0.0  # noqa: E731
    routing = {"image": accuracy(pool.img_routed, pool.img_task), "text": accuracy(pool.cap_routed, pool.cap_task)}
    return pool_recall(pool, len(tasks), ks), routing, pool


# ========================================================================================
# §7  The continual loop: train task t, fit its keys, evaluate all seen tasks, checkpoint
# ========================================================================================

@dataclass
class Progress:
    """What the continual loop carries from task to task, and what a checkpoint holds."""
    results: dict
    router: TaskRouter
    cent_img: list = field(default_factory=list)   # per task: mean frozen image feature (E,)
    cent_txt: list = field(default_factory=list)   # per task: mean frozen caption feature (E,)
    done: int = 0                                   # tasks finished


def open_task(model: LPI, t: int, seed: int) -> int:
    """Open task t's prompt set (freezing the older ones), seeded by (seed, t) alone: a
    resumed or reloaded run builds the very prompts an uninterrupted one did."""
    torch.manual_seed(seed * 1000 + t)
    return model.add_task()


def fit_keys(model: LPI, task: Task, s: RunConfig, env: Env, p: Progress) -> int:
    """§6 on task t's training set, through the frozen CLIP: its routing keys (k-means) and
    its centroids (for --task-similarity centroids). Returns the unreadable images skipped."""
    f = encode_set(model, task.train, s, env, progress=f"keys {task.name}")
    if model.cfg.routing == "kmeans":
        p.router.add_task(f.img[f.ok], f.cap, model.cfg.keys)
        broadcast_(p.router.image_keys, env.dist), broadcast_(p.router.text_keys, env.dist)
    p.cent_img.append(F.normalize(f.img[f.ok], dim=-1).mean(0))
    p.cent_txt.append(F.normalize(f.cap, dim=-1).mean(0))
    return int((~f.ok).sum())


def task_relations(results: dict, S: torch.Tensor, theta: float, source: str, say: Callable) -> torch.Tensor:
    """§5's targets Y from the task similarity S; both go into results, and how Y splits
    the pairs is said once."""
    Y = task_targets(S, theta)
    off = ~torch.eye(len(S), dtype=torch.bool)
    results.update(task_similarity=[[round(float(v), 6) for v in row] for row in S], task_targets=Y.int().tolist())
    if len(S) > 1:
        say(f"task similarity ({source}): {int(Y[off].sum()) // 2} related and {int((1 - Y[off]).sum()) // 2} "
            f"unrelated pairs of tasks (θ = {theta})")
    return Y


def encode_frozen(model: LPI, tasks: list[Task], frozen: list, s: RunConfig, env: Env) -> int:
    """Frozen-CLIP features of the test set of each of `tasks` not encoded yet (routing
    reads them); returns how many images of the last task were unreadable, if it was new."""
    new = [k for k in range(len(tasks)) if frozen[k] is None]
    for k in new:
        frozen[k] = encode_set(model, tasks[k].test, s, env)  # no task ids: plain CLIP
    last = len(tasks) - 1
    return int((~frozen[last].ok).sum()) if last in new else 0


def run_continual(model: LPI, tasks: list[Task], s: RunConfig, env: Env, config: dict) -> dict:
    """The continual protocol (METHOD.md §6-7). For t = 1..T: open task t's prompts, fit its
    routing keys and centroid on frozen features, train, evaluate on all seen tasks, and
    checkpoint into s.out. With s.resume it restarts after the last finished task; per-task
    seeds make the result identical to an uninterrupted run. Returns results.json's dict."""
    T, cfg, main = len(tasks), model.cfg, env.dist.main
    say = print if main else (lambda *a, **k: None)    # with torchrun, process 0 speaks and writes
    p = start_or_resume(model, tasks, s, config, say)
    if cfg.task_similarity == "names":  # §5: the relations of all T tasks are known from their names
        S = broadcast_(name_similarity(model.clip, [tk.readable for tk in tasks]), env.dist)
        Y = task_relations(p.results, S, cfg.theta, "names", say)
    t0 = time.time() - p.results["wall_time_s"]
    frozen: list[Encoded | None] = [None] * T          # frozen CLIP features of each test set
    pool, joint = None, s.method == "joint"
    for t in range(p.done, T):
        idx = open_task(model, t, s.seed)
        skipped = fit_keys(model, tasks[t], s, env, p)
        if cfg.task_similarity == "centroids":  # online: the seen tasks' centroids, renewed as tasks arrive
            S = centroid_similarity(torch.stack(p.cent_img), torch.stack(p.cent_txt))
            Y = task_relations(p.results, S, cfg.theta, "centroids", say)
        if joint and t < T - 1:  # the upper bound trains once, on every task's data, at the end
            p.results["routing_accuracy"].append(None)
            continue
        data = union([tk.train for tk in tasks]) if joint else tasks[t].train
        log = train_task(model, idx, data, s, env, None if joint else Y)
        for key in ("first_steps", "grad_norms", "prompt_scale", "loss_curve"):
            p.results.setdefault(key, {})[tasks[t].name] = log.get(key, [])
        skipped += encode_frozen(model, tasks[: t + 1], frozen, s, env)  # counted once, also across --resume
        recall, routing, pool = evaluate(model, tasks[: t + 1], frozen[: t + 1], p.router, s, env)
        for d in recall:                                # row t of the R@K matrices
            for K, values in recall[d].items():
                p.results["recall"][d][K][t][: t + 1] = values
        p.results["routing_accuracy"].append(routing)
        alone = pool_recall(pool, t + 1, alone=True)   # each task against its own items: what the pool costs
        p.results.update(skipped_images=p.results["skipped_images"] + skipped, wall_time_s=time.time() - t0,
                         summary=summarize(p.results["recall"], t),
                         alone={"recall": alone, "summary": row_summary(alone)})
        p.done = t + 1
        if main:
            save_checkpoint(model, Path(s.out), config, p)
        r1 = ", ".join(f"{d} R@1 {sum(recall[d]['R@1']) / (t + 1):.1f}" for d in recall)
        routed = f"; routing image {routing['image']:.1f}% text {routing['text']:.1f}%" if s.method in PER_TASK_METHODS else ""
        say(f"task {t + 1}/{T} {tasks[t].name}: {r1} (avg over seen tasks){routed}")
    # Zero-shot CLIP on the same final pool (the frozen features are there already)
    encode_frozen(model, tasks, frozen, s, env)
    zs, _, zs_pool = evaluate(LPI(model.clip, dataclasses.replace(cfg, J=0)), tasks, frozen, p.router, s, env)
    zs_alone = pool_recall(zs_pool, T, alone=True)
    p.results.update(zeroshot={"recall": zs, "summary": row_summary(zs), "alone": {"recall": zs_alone,
                               "summary": row_summary(zs_alone)}},
                     wall_time_s=time.time() - t0, summary=summarize(p.results["recall"], T - 1))
    if main:
        save_json(Path(s.out) / "results.json", p.results)
        if pool is not None and model.prompted and all(isinstance(tk.test.images, torch.Tensor) for tk in tasks):
            reporting.plot_retrievals(tasks, {"zero-shot CLIP": zs_pool, s.method: pool}, Path(s.out) / "retrievals.png")
    return p.results


# ----------------------------------------------------------------------------------------
# Checkpoints: one per finished task, holding everything but the frozen CLIP
# ----------------------------------------------------------------------------------------

def new_results(model: LPI, tasks: list[Task], config: dict) -> dict:
    T = len(tasks)
    empty = lambda: [[None] * T for _ in range(T)]  # noqa: E731
    return {"config": config, "tasks": [t.name for t in tasks],
            "recall": {d: {f"R@{K}": empty() for K in (1, 5, 10)} for d in ("i2t", "t2i")},
            "routing_accuracy": [], "trainable_params_per_task": model_parameters(model, T),
            "parameter_comparison": parameter_comparison(model.cfg, model.D_v, model.D_t),
            "skipped_images": 0, "wall_time_s": 0.0}


def check_out(out: Path, resume: bool) -> Path | None:
    """The last checkpoint of a run already in `out`, or None; such a run is continued only
    with --resume (never overwritten), and --resume needs one (never starts over silently)."""
    last = latest_checkpoint(out)
    if last is not None and not resume:
        raise LPIError(f"{out} already holds a run ({last.name}); pass --resume to continue it, or choose "
                       f"another --out")
    if last is None and resume:
        raise LPIError(f"nothing to resume in {out}: no checkpoint of lpi.py there (a run writes one after each "
                       f"task); drop --resume to start a run")
    return last


def restore(model: LPI, router: TaskRouter, ckpt: dict, seed: int, learned: bool = True) -> None:
    """A checkpoint into a fresh model and router: one prompt set per finished task (opened
    as the loop opened it), its learned values unless learned=False, the routing keys."""
    for t in range(ckpt["done"]):
        open_task(model, t, seed)
    if learned:
        missing, unexpected = model.load_state_dict(ckpt["learned"], strict=False)  # the CLIP is not in it
        wrong = unexpected + [k for k in missing if not k.startswith("clip.")]
        if wrong:
            raise LPIError(f"the checkpoint does not fit the model its settings describe ({', '.join(wrong[:4])})")
    router.load_state_dict(ckpt["router"])


def start_or_resume(model: LPI, tasks: list[Task], s: RunConfig, config: dict, say: Callable) -> Progress:
    """A fresh start, or with --resume the state of the last checkpoint in s.out (made with
    the same settings, but for those RunConfig marks resume_free)."""
    p = Progress(new_results(model, tasks, config), TaskRouter(seed=s.seed, metric=model.cfg.route_metric))
    path = check_out(Path(s.out), s.resume)
    if path is None:
        return p
    ckpt = read_checkpoint(path)
    free = {f.name for f in dataclasses.fields(RunConfig) if f.metadata.get("resume_free")}
    differ = sorted(k for k in set(config) | set(ckpt["config"])
                    if k not in free and config.get(k) != ckpt["config"].get(k))
    if differ:
        raise LPIError(f"--resume: {path} was made with other settings ({', '.join(differ)}); "
                       f"expected the same as the interrupted run")
    restore(model, p.router, ckpt, s.seed)
    say(f"resuming after task {ckpt['done']} of {len(tasks)} from {path}")
    return Progress(dict(ckpt["results"], config=config), p.router, list(ckpt["centroids_img"]),
                    list(ckpt["centroids_txt"]), ckpt["done"])


def save_checkpoint(model: LPI, out: Path, config: dict, p: Progress) -> None:
    learned = {k: v for k, v in model.state_dict().items() if not k.startswith("clip.")}
    state = {"config": config, "done": p.done, "learned": learned, "router": p.router.state_dict(),
             "centroids_img": torch.stack(p.cent_img), "centroids_txt": torch.stack(p.cent_txt), "results": p.results}
    atomic_write(out / "checkpoints" / f"task_{p.done:02d}.pt", lambda f: torch.save(state, f))
    save_json(out / "results.json", p.results)


# ========================================================================================
# §7  The methods of the paper's comparison, and what each trains and stores
# ========================================================================================

# The methods of the paper's comparison (METHOD.md "Baselines"). Four are settings of the LPI
# model above; L2P, whose prompts are chosen per input from a pool, is baselines.L2P, with
# the interface the loop uses (add_task, encode_image / encode_text, losses, tokenize).
METHODS = {
    "lpi": "LPI: low-rank decomposed prompts, interaction, hierarchical and task losses, k-means routing",
    "zeroshot": "frozen CLIP, no prompts",
    "seqft": "one shared prompt set (LPI's shape) trained through all tasks in order, no routing",
    "sprompts": "S-Prompts as the authors ran it: full-rank per-task prompts at layer 0 only (J = 1), k-means "
                "routing, no decomposition, interaction or extra loss (the deep full-rank variant is --full-rank)",
    "l2p": "L2P: a pool of visual prompts with learnable keys, top-k picked per image by its frozen CLIP "
           "feature, key-matching loss; one shared textual prompt set",
    "joint": "one prompt set (LPI's shape) trained on all tasks' data at once: the upper bound",
}
# Methods that open a new prompt set per task (and so route at test time); the others keep one.
PER_TASK_METHODS = ("lpi", "sprompts")



def method_config(method: str, cfg: LPIConfig) -> LPIConfig:
    """The LPIConfig a method runs with: the component switches, overridden where the
    method has no such component."""
    cfg = dataclasses.replace(cfg)
    if method == "zeroshot":
        cfg.J = 0
    elif method in ("sprompts", "l2p"):
        cfg.low_rank = cfg.interaction = cfg.hier_prompt = cfg.hier_factor = cfg.task_loss = False
    if method == "sprompts":
        cfg.J = min(cfg.J, 1)  # as the authors ran it: full-rank prompts at layer 0 only
    if method in ("seqft", "joint"):
        cfg.task_loss = False  # one prompt set: no other task's prompts to contrast with
    return cfg


def make_method(method: str, cfg: LPIConfig, clip: clip_model.CLIP, l2p: L2PConfig | None = None) -> LPI | L2P:
    """The model of a method (METHODS) with the component switches of cfg, around `clip`."""
    cfg = method_config(method, cfg)
    if method == "l2p":
        return L2P(clip, cfg, l2p)
    return LPI(clip, cfg, shared=method in ("seqft", "joint"))


def method_parameters(method: str, cfg: LPIConfig, D_v: int, D_t: int, E: int, tasks: int = 1,
                      l2p: L2PConfig | None = None) -> dict[str, int]:
    """Trainable parameters of a method, counted on its real modules (meta device: no memory).

    "total" = what is trained at each task (split into prompts, interaction modules and
    L2P's keys); "after_tasks" = what is stored after `tasks` tasks: `tasks` prompt sets for
    the per-task methods (LPI, S-Prompts), one set for the others. The k-means routing keys
    (not trained: 2 x keys x E per task) are not counted."""
    cfg = method_config(method, cfg)
    if method == "l2p":
        l2p = l2p or L2PConfig()
        with torch.device("meta"):
            pool = PromptPool(l2p.pool_size, l2p.top_k, cfg.J, max(1, cfg.M // l2p.top_k), D_v, E, 1.0)
        prompts, inter, keys = pool.prompts.numel() + cfg.J * cfg.M * D_t, 0, pool.keys.numel()
    else:
        c = count_parameters(cfg, D_v, D_t)
        prompts, inter, keys = c["prompts"], c["interaction"], 0
    total = prompts + inter + keys
    return {"prompts": prompts, "interaction": inter, "keys": keys, "total": total,
            "after_tasks": total * (tasks if method in PER_TASK_METHODS else 1), "tasks": tasks}


def parameter_comparison(cfg: LPIConfig, D_v: int, D_t: int) -> dict[str, dict[str, int]]:
    """Per-task parameters of LPI (prompts and interaction apart) beside S-Prompts as the
    authors ran it (full rank, J = 1) and full-rank prompts at LPI's depth, at these widths."""
    full = dataclasses.replace(cfg, low_rank=False, interaction=False)
    return {"LPI": count_parameters(cfg, D_v, D_t),
            "S-Prompts (J=1)": count_parameters(method_config("sprompts", cfg), D_v, D_t),
            f"full rank (J={cfg.J})": count_parameters(full, D_v, D_t)}



def model_parameters(model: LPI | L2P, tasks: int) -> dict[str, int]:
    """method_parameters of a built model (what results.json reports)."""
    if isinstance(model, L2P):
        method = "l2p"
    elif not model.prompted:
        method = "zeroshot"
    else:
        method = "seqft" if model.shared else "lpi"  # one set, or one set per task
    return method_parameters(method, model.cfg, model.D_v, model.D_t, model.clip.cfg.embed_dim, tasks,
                             getattr(model, "l2p", None))



# ========================================================================================
# A run: its settings, run(), load_run() and the command line
# ========================================================================================

@dataclass
class RunConfig:
    """Every setting of a run besides the method's switches (LPIConfig): the method, data and
    backbone, training, where it runs and writes. None: the scale's default (PAPER_DEFAULTS /
    TINY_DEFAULTS) or the method's tuned optimiser and lr (TUNED), filled in by run().
    resume_free: may differ between an interrupted run and its --resume."""
    method: str = switch("lpi", "; ".join(f"{k}: {v}" for k, v in METHODS.items()), choices=tuple(METHODS))
    # data and backbone
    tasks: str = switch(",".join(BUILTIN_TASKS), "comma-separated tasks in training order: built-in names "
                        f"({', '.join(BUILTIN_TASKS)}), coco, flickr, coco:supercategory (the paper's 12 tasks)")
    data_root: str | None = switch(None, "folder with coco/ and flickr30k/ in the Karpathy layout", type=str)
    clip: str = switch("tiny", "tiny (the built-in world's, shipped), ViT-B/16, ViT-B/32, ViT-L/14 (OpenAI's "
                       "weights, downloaded once), the path of a CLIP checkpoint (.safetensors, .pt, .bin; a "
                       "TorchScript archive only if trusted) or of a Hugging Face CLIP folder, or random:NAME "
                       "(NAME's architecture with random weights, for smoke tests and timings)")
    clip_activation: str | None = switch(None, "the CLIP's MLP activation: quick_gelu (OpenAI's releases) or gelu "
                                         "(LAION / DataComp: open_clip names without -quickgelu); default: what the "
                                         "file says (Hugging Face config.json, --convert-clip output), else quick_gelu",
                                         choices=tuple(clip_model.ACTIVATIONS), type=str)
    trust_torchscript: bool = switch(False, "read a TorchScript archive that is not one of OpenAI's releases: it "
                                     "compiles the code inside (convert it once with --convert-clip instead)",
                                     resume_free=True)
    cache_dir: str = switch(os.environ.get("LPI_CACHE", str(Path.home() / ".cache" / "lpi")),
                            "where the tiny CLIP is cached (env LPI_CACHE)", resume_free=True)
    pretrain_steps: int = switch(world.PRETRAIN_DEFAULTS["steps"], "steps of contrastive pre-training of the tiny "
                                 "CLIP", check=at_least(1))
    max_train_per_task: int | None = switch(None, "subsample each task's training images (built-in: "
                                            f"{world.TASK_SIZES['n_train']} generated)", check=at_least(2), type=int)
    max_test_per_task: int | None = switch(None, "subsample each task's test images (built-in: "
                                           f"{world.TASK_SIZES['n_test']} generated)", check=at_least(1), type=int)
    # training
    epochs: int | None = switch(None, "epochs per task (default 10; 8 with --clip tiny)", check=at_least(1), type=int)
    batch_size: int | None = switch(None, "default 64", check=(lambda v: v >= 2, ">= 2 (a contrastive batch needs "
                                                               "negatives)"), type=int)
    optimizer: str | None = switch(None, "of the per-task parameters: sgd (momentum 0.9, the authors') or adam; "
                                   "default: the method's choice by the tuning protocol (TUNED)", choices=OPTIMIZERS,
                                   type=str)
    lr: float | None = switch(None, "learning rate; default: the method's best for the optimiser in the tuning "
                              "protocol", check=POSITIVE, type=float)
    weight_decay: float = switch(2e-4, "weight decay", check=at_least(0))
    augment: str = switch("auto", "RandomResizedCrop + horizontal flip of training images, as the authors; auto: "
                          "on for image files, off for the built-in tasks (their captions name positions)",
                          choices=("auto", "on", "off"))
    pairs: str = switch("per-caption", "an epoch visits every caption once (the authors'), or every image once "
                        "with one random caption", choices=("per-caption", "per-image"))
    seed: int = switch(0, "seed of initialisation, order and subsampling")
    # where it runs and writes
    device: str = switch("auto", "auto: cuda, else mps, else cpu", choices=("auto", "cpu", "cuda", "mps"),
                         resume_free=True)
    precision: str = switch("auto", "autocast dtype of the frozen encoders (prompts and losses stay fp32); auto: "
                            "bf16 on a CUDA device that supports it, else fp32", choices=("auto", *PRECISIONS),
                            resume_free=True)
    workers: int = switch(2, "processes that load images of file data sets (or draw the tiny CLIP's pre-training "
                          "batches)", check=at_least(0), resume_free=True)
    out: str = switch("runs/default", "output folder: results.json, recall_r1.png, retrievals.png (built-in "
                      "tasks), checkpoints/", resume_free=True)
    resume: bool = switch(False, "continue the run in --out after its last finished task", resume_free=True)
    progress: bool = switch(True, "progress bars", resume_free=True)


# Defaults for the two scales. A released CLIP gets the paper's settings (METHOD.md §7); the
# tiny CLIP on the built-in data gets settings that fit in a few CPU minutes.
PAPER_DEFAULTS = dict(J=9, M=16, epochs=10, batch_size=64)
TINY_DEFAULTS = dict(J=4, M=4, epochs=8, batch_size=64)

# Each trained method's optimiser and learning rate, chosen by one tuning protocol for all
# (benchmarks/tune.py: the same grid; validation splits held out from the training images,
# learned continually over two seeds: the grid on the first three tasks, its two best points
# on all six; the scores are in benchmarks/results/tuning.md). "lr" holds the chosen lr of
# each optimiser, so that --optimizer alone picks that optimiser's best.
# The protocol ran on the built-in world; on real data run the grid again if you can.
TUNED = {
    "lpi": {"optimizer": "adam", "lr": {"sgd": 4.0, "adam": 0.1}},
    "seqft": {"optimizer": "adam", "lr": {"sgd": 1.0, "adam": 0.1}},
    "joint": {"optimizer": "sgd", "lr": {"sgd": 16.0, "adam": 1.0}},
    "sprompts": {"optimizer": "adam", "lr": {"sgd": 0.25, "adam": 0.1}},
    "l2p": {"optimizer": "adam", "lr": {"sgd": 0.05, "adam": 0.1}},
    "zeroshot": {"optimizer": "sgd", "lr": {"sgd": 0.05, "adam": 0.01}},  # trains nothing
}


def configs(**settings) -> tuple[RunConfig, LPIConfig]:
    """Both switch tables from keyword settings, each name going to the table that has it:
    configs(method="sprompts", epochs=2, R=2)."""
    names = {table: {f.name for f in dataclasses.fields(table)} for table in (RunConfig, LPIConfig)}
    unknown = set(settings) - names[RunConfig] - names[LPIConfig]
    if unknown:
        raise LPIError(f"unknown setting(s) {', '.join(sorted(unknown))}: not in RunConfig or LPIConfig")
    return tuple(table(**{k: v for k, v in settings.items() if k in names[table]}) for table in (RunConfig, LPIConfig))


def fill_defaults(s: RunConfig, cfg: LPIConfig, tiny: bool) -> tuple[RunConfig, LPIConfig]:
    """Settings left None take the scale's defaults and the method's tuned optimiser and lr."""
    scale = TINY_DEFAULTS if tiny else PAPER_DEFAULTS
    unset = lambda table: {k: v for k, v in scale.items() if getattr(table, k, 0) is None}  # noqa: E731
    s, cfg = dataclasses.replace(s, **unset(s)), dataclasses.replace(cfg, **unset(cfg))
    optimizer = s.optimizer or TUNED[s.method]["optimizer"]
    lr = s.lr if s.lr is not None else TUNED[s.method]["lr"][optimizer]
    return dataclasses.replace(s, optimizer=optimizer, lr=lr), cfg


def run(s: RunConfig | None = None, cfg: LPIConfig | None = None) -> dict:
    """A whole run, as `python lpi.py` does it: backbone, tasks, method, the continual loop;
    results.json, the plots and a checkpoint per task in s.out. Returns results.json's dict."""
    s, cfg = s or RunConfig(), cfg or LPIConfig()
    check_switches(s, cfg)
    check_out(Path(s.out), s.resume)                   # before any expensive work
    d, device = init_distributed(pick_device(s.device))
    try:
        clip, preprocess, tiny = load_backbone(s, device)
        s, cfg = fill_defaults(dataclasses.replace(s, clip_activation=clip.cfg.activation), cfg, tiny)
        tasks = load_tasks(s)
        env = Env(device, preprocess, d, default_precision(device) if s.precision == "auto" else s.precision)
        config = dict(dataclasses.asdict(s), **dataclasses.asdict(cfg), processes=d.world)  # global batch: processes x batch
        model = make_method(s.method, cfg, clip)         # a setting the backbone refuses fails before --out is made
        with run_lock(Path(s.out)) if d.main else nullcontext():
            results = run_continual(model, tasks, s, env, config)
            if d.main:
                reporting.plot_recall(results, Path(s.out) / "recall_r1.png")
        return results
    finally:
        if d.world > 1 and torch.distributed.is_initialized():
            torch.distributed.destroy_process_group()


@dataclass
class LoadedRun:
    """A finished or interrupted run as load_run rebuilds it from its folder."""
    model: LPI | L2P        # the frozen CLIP and every finished task's prompts
    router: TaskRouter      # the routing keys of every finished task
    results: dict           # results.json's dict as of the last finished task
    settings: RunConfig
    cfg: LPIConfig
    done: int               # tasks finished


def load_run(folder: str | Path, learned: bool = True, device: str = "cpu") -> LoadedRun:
    """Rebuild a run from the last checkpoint in `folder`: its backbone (s.clip), model and
    router. learned=False: the prompts as the loop initialised them, before training."""
    path = latest_checkpoint(Path(folder))
    if path is None:
        raise LPIError(f"{folder} holds no checkpoint of lpi.py (checkpoints/task_*.pt)")
    ckpt = read_checkpoint(path)
    try:
        s, cfg = from_values(RunConfig, ckpt["config"]), from_values(LPIConfig, ckpt["config"])
    except KeyError as e:
        raise LPIError(f"{path} was written by another version of lpi.py: its settings lack {e}") from None
    clip, _, _ = load_backbone(dataclasses.replace(s, progress=False), torch.device(device))
    model = make_method(s.method, cfg, clip)
    router = TaskRouter(seed=s.seed, metric=cfg.route_metric)
    restore(model, router, ckpt, s.seed, learned)
    return LoadedRun(model.eval(), router, ckpt["results"], s, cfg, ckpt["done"])


# ----------------------------------------------------------------------------------------
# The command line: made from the switch tables
# ----------------------------------------------------------------------------------------

def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="lpi.py", formatter_class=argparse.ArgumentDefaultsHelpFormatter,
        description="LPI (Low-rank Prompt Interaction) for continual image-text retrieval. With no "
                    "arguments: the whole method on the built-in tasks with a tiny CLIP, on the CPU.")
    add_switches(p.add_argument_group("method (METHOD.md §1-6); each component has one switch"), LPIConfig)
    add_switches(p.add_argument_group("run: method, data and backbone, training, where it runs and writes"), RunConfig)
    p.add_argument("--convert-clip", metavar="PATH", default=None,
                   help="read --clip and write it to PATH (.safetensors) as a plain state dict that records its "
                        "activation, so that later runs need no trust; then exit")
    p.add_argument("--export-tiny-clip", metavar="PATH", default=None,
                   help="pre-train the tiny CLIP with --pretrain-steps (or take it from the cache), write it "
                        "to PATH in the shipped format (tiny_clip.pt.xz), and exit")
    return p


def main(argv: list[str] | None = None) -> int:
    """The command line over run(): the report on stdout, errors as one line, exit code 2."""
    args = build_parser().parse_args(argv)
    s, cfg = from_values(RunConfig, args), from_values(LPIConfig, args)
    try:
        if args.export_tiny_clip or args.convert_clip:
            check_switches(s)
            return (export_tiny_clip(s, Path(args.export_tiny_clip)) if args.export_tiny_clip
                    else convert_clip(s, Path(args.convert_clip)))
        results = run(s, cfg)
        if int(os.environ.get("RANK", "0")) != 0:
            return 0
    except (LPIError, clip_model.CLIPLoadError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except OSError as e:  # e.g. the disk is full or --out became unwritable mid-run
        print(f"error: {e.strerror or e}: {e.filename or ''} (every finished task is checkpointed; "
              f"continue with --resume)", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("\ninterrupted: every finished task is checkpointed; continue with --resume", file=sys.stderr)
        return 130
    print(report(results, s.out))
    return 0


def report(results: dict, out: str | Path) -> str:
    """What `python lpi.py` prints at the end of a run: the table, and what it wrote where."""
    table = reporting.format_table(results, routed=results["config"]["method"] in PER_TASK_METHODS)
    pictures = "recall_r1.png, " + ("retrievals.png, " if (Path(out) / "retrievals.png").is_file() else "")
    return f"{table}\nwrote results.json, {pictures}checkpoints/ to {out}"


if __name__ == "__main__":
    sys.exit(main())
