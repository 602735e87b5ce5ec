"""LPI: Low-rank Prompt Interaction for continual image-text retrieval, in one file.

Reference implementation of "Low-rank Prompt Interaction for Continual Vision-Language
Retrieval" (ACM MM 2024, arXiv 2501.14369), following our reading in METHOD.md
(the § numbers below are that page's sections). A frozen CLIP (clip_model.py) meets retrieval
tasks one after another; per task LPI learns only small multi-modal prompts.

Reading order = the paper's order, then the data flow:
  §1-2  configuration; low-rank decomposed multi-modal prompts (and the full-rank variant)
  §3    multi-modal correlation (interaction) modules
  §4    hierarchical low-rank contrastive loss;  §5 task contrastive constraint; CLIP loss
  -     the LPI model: frozen CLIP + per-task prompt sets
  -     the baselines (zero-shot, seqft, S-Prompts, L2P, joint) behind LPI's interface, and
        what each method trains and stores
  §6    task identity at test time: k-means keys and routing
  §7    evaluation (Recall@K), the continual training loop; then what it runs on (several
        processes, mixed precision, checkpoint files); the report
  data  the built-in tasks (drawn by builtin_world.py), COCO / Flickr30K (Karpathy), COCO
        super-category tasks
  -     the command line

Run `python lpi.py` for the whole method on built-in data on a laptop CPU, or
`python lpi.py --tasks coco,flickr --data-root DATA --clip ViT-B/16` on a GPU.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import pickle
import random
import socket
import sys
from collections import Counter, defaultdict
from contextlib import contextmanager, nullcontext
from functools import partial
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import torch
import torch.nn.functional as F
from torch import Tensor
from PIL import Image
from torch import nn
from torch.utils.data import Dataset

import builtin_world as world
import clip_model


class LPIError(Exception):
    """A problem with the user's input (paths, data, flags): printed without a traceback."""


@dataclass
class ImageCaptionSet:
    """Images and their captions: images[i] is described by captions[i] (one or more).
    images: file paths (COCO, Flickr30K), or uint8 (N, 3, H, W) at the model's
    resolution (built-in data)."""
    images: torch.Tensor | list[str]
    captions: list[list[str]]

    def __len__(self) -> int:
        return len(self.captions)


@dataclass
class Task:
    """One task of the continual sequence: a name, its train / test pairs, and a readable
    name (label) from which CLIP's text encoder gauges how related two tasks are (§5)."""
    name: str
    train: ImageCaptionSet
    test: ImageCaptionSet
    label: str = ""  # default: the name

    @property
    def readable(self) -> str:
        return self.label or self.name


# ========================================================================================
# §1-2  Configuration, and low-rank interaction-augmented decomposition of the prompts
# ========================================================================================

@dataclass
class LPIConfig:
    """Every switch of the method. Defaults are the paper's at ViT-B/16 scale (METHOD.md §7)."""
    # §1 prompts: J layers receive M tokens each, in both encoders
    J: int = 9                       # prompt depth (<= the number of layers of either encoder)
    M: int = 16                      # prompt length
    deep_prompts: str = "add"        # layers j >= 1: "add" P[j] to the hidden state, or "replace" it
    # §2 decomposition
    low_rank: bool = True            # False: full-rank (J, M, D) prompts per task, as S-Prompts
    R: int = 4                       # CP rank of the prompts
    factor_std: float = 0.5          # factors ~ N(0, factor_std^2) [code]
    # §3 interaction
    interaction: bool = True         # cross-modal correlation modules on layers j >= 1
    alpha: float = 0.1               # mixing weight of the other modality
    interaction_rank: int = 4        # R': CP rank of each cross-modal weight tensor
    interaction_ln: bool = True      # LayerNorm after mixing
    interaction_gain: float | None = None  # its gain at init; None: the raw prompts' std at init [ours]
    # §4 hierarchical low-rank contrastive loss
    hier_prompt: bool = True         # prompt level: layer summaries s_v[j] <-> s_t[j]
    hier_factor: bool = False        # factor level [ours]: rows of B_v <-> rows of B_t; off, see METHOD.md §4
    tau_h: float = 0.01
    hier_tau_scaled: bool = True     # [ours] weight λ_h·τ_h: the terms' gradient no longer grows as 1/τ_h
    lambda_h: float = 0.1
    # §5 task contrastive constraint
    task_loss: bool = True
    task_similarity: str = "names"   # "names" (CLIP text of the task names, as the authors) | "centroids"
    theta: float = 0.4               # tasks more similar than theta (range-normalised) are "positives"
    tau_task: float = 0.1            # [ours] 0.001 in the authors' code: see task_contrastive_loss
    lambda_task: float = 0.1


class LowRankPrompts(nn.Module):
    """One task's visual and textual prompts as rank-R CP decompositions (METHOD.md §2):

        P_v[j, m, :] = (1/R) * sum_r A[j, r] * B_v[m, r] * C_v[:, r]
        P_t[j, m, :] = (1/R) * sum_r A[j, r] * B_t[m, r] * C_t[:, r]

    A (J x R) is the *common* layer factor, literally one tensor used by both modalities, so
    what one modality learns about "which layer needs how much of which component" is
    shared; B_v, B_t (M x R) and C_v (D_v x R), C_t (D_t x R) are modality-specific.
    Parameters per task: R * (J + 2M + D_v + D_t).

    Scale [ours]: both encoders are pre-LN, so a prompt token acts on the others only through
    LN(P), its direction; no per-layer rescaling. The paper's 1/R and N(0, 0.5^2) factors give
    prompts of std ~0.06, which dominate text layer 0's positional embedding (std ~0.01) at
    their positions, as a word embedding does.
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


def interaction_gain(cfg: LPIConfig) -> float:
    """The interaction LayerNorms' gain at init: cfg.interaction_gain, or by default the raw
    prompts' scale at init (see Interaction; the authors' LayerNorm starts at 1)."""
    return prompt_init_std(cfg) if cfg.interaction_gain is None else cfg.interaction_gain


class FullRankPrompts(nn.Module):
    """The baseline / ablation: free (J, M, D) tensors per modality, J*M*(D_v+D_t) parameters.
    Initialised at the same scale as the low-rank product at init ([ours]: std^3/sqrt(R)), so
    that the two variants start alike and differ only in their parametrisation."""

    def __init__(self, J: int, M: int, D_v: int, D_t: int, R: int, std: float):
        super().__init__()
        s = std ** 3 / math.sqrt(R)
        self.P_v = nn.Parameter(s * torch.randn(J, M, D_v))
        self.P_t = nn.Parameter(s * torch.randn(J, M, D_t))

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

    [ours] The LayerNorms' gains start at `gain`, the scale of the raw prompts at init
    (TaskPrompts passes it), not at 1: deep prompts are *added* to the hidden states
    (METHOD.md §1), where a unit-scale random token would move every feature at the start;
    the gain then learns how large the deep prompts should be.
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
    """What a pre-LN encoder reads of a prompt token: the token centred and scaled to unit
    variance over its D features (LayerNorm without its affine part). (..., D) -> (..., D).
    eps is far below LayerNorm's 1e-5, so that the result is scale-free even for prompts of
    std ~0.06 (variance ~4e-3, where 1e-5 would still be felt); fp64 input stays fp64."""
    P = P if P.dtype == torch.float64 else P.float()
    return F.layer_norm(P, P.shape[-1:], eps=1e-12)


def token_structure(P: torch.Tensor) -> torch.Tensor:
    """Layer summary for the prompt-level loss: the correlations between the M tokens of
    each layer, upper triangle. (J, M, D) -> (J, M(M-1)/2).

    Each token is standardised first (standardize_tokens), so the summary sees exactly
    what LayerNorm passes on (x -> a x + b leaves it unchanged) and nothing it removes,
    and an M x M structure compares across modalities although D_v != D_t."""
    Z = standardize_tokens(P)                                 # (J, M, D), zero mean, unit var per token
    G = Z @ Z.transpose(1, 2) / Z.shape[-1]                   # (J, M, M) token correlations
    i, k = torch.triu_indices(G.shape[1], G.shape[1], offset=1)
    return G[:, i, k]                                         # the diagonal is always 1: left out


def prompt_level_loss(P_v: torch.Tensor, P_t: torch.Tensor, tau: float) -> torch.Tensor:
    """Hierarchical loss, prompt level (METHOD.md §4): layer j's visual prompt should pick out
    layer j's textual prompt among all J layers, compared through their token structure
    s[j] = token_structure(P)[j] (how the M tokens of layer j relate to each other):

        L_prompt = InfoNCE( cos(s_v, s_t) / τ )     over the J layers, both directions

    [ours] The authors summarise a layer by its mean over D, which the LayerNorm every
    prompt passes removes: such a loss moves only what the encoders never see. The token
    structure is what LayerNorm keeps (blind to each token's scale, which is left to the
    retrieval loss). With M = 1 a layer has no token structure and the loss is 0."""
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
    read), so that layer 0 (scale ~0.06) counts as much as the deep layers that leave the
    interaction's LayerNorm at unit scale. Each mean is 0 when it has no pairs: the loss is
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
        make = LowRankPrompts if cfg.low_rank else FullRankPrompts
        self.prompts = make(cfg.J, cfg.M, D_v, D_t, cfg.R, cfg.factor_std)
        # §3 couples layers j >= 1 only: with J = 1 there is nothing to couple (and nothing to count)
        self.interaction = (Interaction(cfg.J, D_v, D_t, cfg.interaction_rank, cfg.alpha, cfg.interaction_ln,
                                        cfg.factor_std, gain=interaction_gain(cfg))
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


class LPI(nn.Module):
    """A frozen CLIP plus a growing list of per-task prompt sets.

    `shared=True` keeps a single prompt set that every task trains in turn: the forgetting
    baseline (seqft) and the joint upper bound use it. `cfg.J == 0` means no prompts at all:
    zero-shot CLIP."""

    def __init__(self, clip: clip_model.CLIP, cfg: LPIConfig, shared: bool = False):
        super().__init__()
        self.clip = clip.requires_grad_(False).eval()
        self.cfg, self.shared = cfg, shared
        self.D_v, self.D_t = clip.visual.transformer.width, clip.transformer.width
        depth = min(clip.visual.transformer.layers, clip.transformer.layers)
        if not 0 <= cfg.J <= depth:
            raise LPIError(f"prompt depth J={cfg.J} (--depth) is out of range: this CLIP has {depth} layers per encoder "
                           f"(expected 0 <= J <= {depth})")
        self.task_prompts = nn.ModuleList()

    @property
    def prompted(self) -> bool:
        return self.cfg.J > 0 and self.cfg.M > 0

    def train(self, mode: bool = True):
        super().train(mode)
        self.clip.eval()  # CLIP stays frozen: no dropout exists, but keep its mode fixed anyway
        return self

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
        built once: L = L_clip + λ_h (L_prompt + L_factor) + λ_task (L_task_v + L_task_t) / 2.
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
        (100 at the authors' τ_h = 0.01): it swamps L_clip's and inflates the prompts' norms
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
# Baselines: the methods of the paper's comparison, with LPI's interface
# ========================================================================================

# The methods of the paper's comparison (METHOD.md "Baselines"). Four are settings of the LPI
# model above; L2P, whose prompts are chosen per input from a pool, is its own class below.
# Every model offers what the loop uses: add_task(), encode_image / encode_text(x, task_ids)
# (task_ids None = frozen CLIP), losses(...)["total"], tokenize(), prompted, cfg, clip.
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


# ----------------------------------------------------------------------------------------
# L2P (Wang et al., "Learning to Prompt for Continual Learning", CVPR 2022), adapted to a
# dual encoder as the issue asks. No task identity anywhere: each image picks its prompts
# from a shared pool by matching its frozen CLIP feature (the query) against learnable keys.
#
#   pool      P_1..P_N, each (J, M_p, D_v);  keys k_1..k_N in CLIP's embedding space (E)
#   query     q(x) = frozen, un-prompted CLIP image feature (an extra frozen forward)
#   select    K(x) = top-k_{i} γ(q(x), k_i),    γ = cosine similarity
#   prompt    P(x) = [P_{s_1}; ...; P_{s_k}] concatenated along the token axis: (J, k·M_p, D_v)
#   loss      L = L_clip(f(x; P(x)), g(c; P_t)) + λ · (1/B) Σ_b Σ_{i ∈ K(x_b)} (1 − γ(q(x_b), k_i))
#
# Choices [ours], each a constant of L2PConfig:
# - N = 10, k = 5, λ = 0.1: L2P's settings (pool size, top-k, pull_constraint_coeff of the
#   authors' PyTorch port). Its key loss is −λ·Σ γ / B: the same gradient as ours.
# - M_p = max(1, M // k): an image then gets k·M_p ≈ M prompt tokens per layer, as many as
#   an LPI image; the pool spans the same J layers as the other methods (L2P itself prompts
#   the input layer only).
# - Selection is per image, at training and at test time. The port's "batch-wise" majority
#   vote lets the other images of a test batch choose one's prompts: left out.
# - No frequency penalty (diversified selection) on the pool: the issue does not ask for it.
# - Keys ~ N(0, 1): directions uniform on the sphere (the port's U(0, 1) puts every key in
#   one orthant, where cosines against any query are nearly equal). Prompts at the scale
#   of FullRankPrompts, so that L2P, S-Prompts and LPI start with prompts alike.
# - Text: L2P has no text side. Captions get one shared full-rank (J, M, D_t) prompt set
#   trained through all tasks, as in seqft. The whole pool, its keys and the text prompts
#   stay trainable at every task, as in L2P: forgetting is left to the selection.
# ----------------------------------------------------------------------------------------

@dataclass
class L2PConfig:
    pool_size: int = 10     # N prompts in the pool
    top_k: int = 5          # k picked per image
    lambda_key: float = 0.1  # λ of the key-matching loss


class PromptPool(nn.Module):
    """N visual prompts (J, M_p, D_v) with one learnable key (E) each; picks per image."""

    def __init__(self, N: int, top_k: int, J: int, M_p: int, D_v: int, E: int, std: float):
        super().__init__()
        self.top_k = top_k
        self.prompts = nn.Parameter(std * torch.randn(N, J, M_p, D_v))  # (N, J, M_p, D_v)
        self.keys = nn.Parameter(torch.randn(N, E))                       # (N, E)

    def select(self, query: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """query (B, E) -> cosine of the k nearest keys (B, k) (differentiable in the keys)
        and their indices (B, k), nearest first."""
        cos = F.normalize(query.float(), dim=-1) @ F.normalize(self.keys.float(), dim=-1).t()  # (B, N)
        return cos.topk(self.top_k, dim=1)

    def forward(self, idx: torch.Tensor) -> torch.Tensor:
        """Selected indices (B, k) -> per-image prompts (B, J, k·M_p, D_v)."""
        P = self.prompts[idx]                                   # (B, k, J, M_p, D_v)
        B, k, J, M_p, D = P.shape
        return P.transpose(1, 2).reshape(B, J, k * M_p, D)      # tokens of the k prompts in a row


def key_matching_loss(selected_cos: torch.Tensor) -> torch.Tensor:
    """L2P's surrogate loss pulling the selected keys towards their queries:
    (1/B) Σ_b Σ_{i ∈ K(x_b)} (1 − γ(q(x_b), k_i)). selected_cos (B, k)."""
    return (1 - selected_cos).sum(dim=1).mean()


class L2P(nn.Module):
    """A frozen CLIP, a visual prompt pool chosen per image, one shared textual prompt set."""
    prompted = True  # always: L2P without prompts is zero-shot CLIP

    def __init__(self, clip: clip_model.CLIP, cfg: LPIConfig, l2p: L2PConfig | None = None):
        super().__init__()
        self.clip = clip.requires_grad_(False).eval()
        self.cfg, self.l2p = cfg, l2p or L2PConfig()
        self.shared = True  # one set of parameters for all tasks: no routing
        self.D_v, self.D_t = clip.visual.transformer.width, clip.transformer.width
        depth = min(clip.visual.transformer.layers, clip.transformer.layers)
        if not (1 <= cfg.J <= depth and cfg.M >= 1):
            raise LPIError(f"--method l2p needs prompts: 1 <= J <= {depth} (--depth, got {cfg.J}) and M >= 1 "
                           f"(--length, got {cfg.M})")
        if not 1 <= self.l2p.top_k <= self.l2p.pool_size:
            raise LPIError(f"L2P: top-k {self.l2p.top_k} must be in 1..{self.l2p.pool_size} (the pool size)")
        std = prompt_init_std(cfg)  # the scale of FullRankPrompts
        self.M_p = max(1, cfg.M // self.l2p.top_k)
        self.pool = PromptPool(self.l2p.pool_size, self.l2p.top_k, cfg.J, self.M_p, self.D_v,
                               clip.cfg.embed_dim, std)
        self.P_t = nn.Parameter(std * torch.randn(cfg.J, cfg.M, self.D_t))  # (J, M, D_t) shared text prompts

    def train(self, mode: bool = True):
        super().train(mode)
        self.clip.eval()
        return self

    def add_task(self) -> int:
        """Nothing to open or freeze: the pool serves every task and keeps training."""
        return 0

    def tokenize(self, captions: list[str]) -> torch.Tensor:
        return clip_model.tokenize(captions, self.clip.context_length, truncate=True, prompt_length=self.cfg.M)

    def _prompted_image(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Image features with the pool's prompts, and the selected keys' cosines (B, k)."""
        with torch.no_grad():
            query = self.clip.encode_image(images)                  # (B, E) frozen CLIP: the query
        cos, idx = self.pool.select(query)
        return self.clip.encode_image(images, self.pool(idx), self.cfg.deep_prompts), cos

    def encode_image(self, images: torch.Tensor, task_ids: torch.Tensor | int | None = None) -> torch.Tensor:
        """task_ids only says prompted (any value) or frozen CLIP (None): selection is by input."""
        return self.clip.encode_image(images) if task_ids is None else self._prompted_image(images)[0]

    def encode_text(self, tokens: torch.Tensor, task_ids: torch.Tensor | int | None = None) -> torch.Tensor:
        return self.clip.encode_text(tokens, None if task_ids is None else self.P_t, self.cfg.deep_prompts)

    def losses(self, images: torch.Tensor, tokens: torch.Tensor, t: int, targets: torch.Tensor | None,
               gather: Callable | None = None) -> dict[str, torch.Tensor]:
        """L = L_clip + λ · L_key (t and the task relations play no part)."""
        gather = gather or (lambda f: f)
        img, cos = self._prompted_image(images)
        out = {"clip": clip_loss(gather(img), gather(self.encode_text(tokens, t)), self.clip.logit_scale),
               "key": key_matching_loss(cos)}
        out["total"] = out["clip"] + self.l2p.lambda_key * out["key"]
        return out

    def loss_weights(self) -> dict[str, float]:
        return {"clip": 1.0, "key": self.l2p.lambda_key}


# ----------------------------------------------------------------------------------------
# Building a method from the command line, and counting what it trains and stores
# ----------------------------------------------------------------------------------------

def method_config(method: str, cfg: LPIConfig) -> LPIConfig:
    """The LPIConfig a method runs with: the component switches, overridden where the
    method has no such component."""
    cfg = LPIConfig(**vars(cfg))
    if method == "zeroshot":
        cfg.J = 0
    elif method in ("sprompts", "l2p"):
        cfg.low_rank = cfg.interaction = cfg.hier_prompt = cfg.hier_factor = cfg.task_loss = False
    if method == "sprompts":
        cfg.J = min(cfg.J, 1)  # as the authors ran it: full-rank prompts at layer 0 only
    if method in ("seqft", "joint"):
        cfg.task_loss = False  # one prompt set: no other task's prompts to contrast with
    return cfg


def make_method(args, clip: clip_model.CLIP) -> LPI | L2P:
    """The model a --method and the component switches describe."""
    cfg = LPIConfig(J=args.J, M=args.M, deep_prompts=args.deep_prompts, R=args.R, low_rank=not args.full_rank,
                    interaction=not args.no_interaction, interaction_gain=args.interaction_gain,
                    alpha=args.alpha, interaction_rank=args.interaction_rank, interaction_ln=not args.no_interaction_ln,
                    hier_prompt=not args.no_hier_prompt, hier_factor=args.hier_factor, tau_h=args.tau_h,
                    hier_tau_scaled=not args.hier_unscaled,
                    lambda_h=args.lambda_h, task_loss=not args.no_task_loss, task_similarity=args.task_similarity,
                    theta=args.theta,
                    tau_task=args.tau_task, lambda_task=args.lambda_task)
    cfg = method_config(args.method, cfg)
    if args.method == "l2p":
        return L2P(clip, cfg, L2PConfig(**{k: getattr(args, k) for k in ("pool_size", "top_k", "lambda_key")
                                           if getattr(args, k, None) is not None}))
    return LPI(clip, cfg, shared=args.method in ("seqft", "joint"))


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
    full = LPIConfig(**dict(vars(cfg), low_rank=False, interaction=False))
    return {"LPI": count_parameters(cfg, D_v, D_t),
            "S-Prompts (J=1)": count_parameters(method_config("sprompts", cfg), D_v, D_t),
            f"full rank (J={cfg.J})": count_parameters(full, D_v, D_t)}


def format_parameter_comparison(comparison: dict[str, dict[str, int]]) -> str:
    """One line: LPI's per-task parameters against the full-rank ones, as ratios."""
    lpi = comparison["LPI"]
    parts = [f"LPI {lpi['total']:,} (prompts {lpi['prompts']:,} + interaction {lpi['interaction']:,})"]
    for name, c in comparison.items():
        if name != "LPI":
            parts.append(f"{name} {c['total']:,} (LPI is {lpi['total'] / c['total']:.2f}x)")
    return "parameters per task: " + "; ".join(parts)


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

ROUTE_METRICS = ("cosine", "l1")


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
# §7  The continual loop: train task t, fit its keys, evaluate all seen tasks, checkpoint
# ========================================================================================

def image_batches(data: ImageCaptionSet, batches: list[list[int]], preprocess, workers: int):
    """Yield (images (b, 3, H, W) float, ok (b,) bool) for each list of image indices.
    Built-in sets are tensors already at the model's resolution: index and normalise.
    File sets go through a DataLoader; a missing or corrupt file comes back with ok=False
    (the worker cannot count it for us: the caller does)."""
    if isinstance(data.images, torch.Tensor):
        for idx in batches:
            yield world.normalize_images(data.images[torch.tensor(idx, dtype=torch.long)]), torch.ones(len(idx), dtype=torch.bool)
        return
    ds = ImageFileDataset(data, preprocess)
    loader = torch.utils.data.DataLoader(ds, batch_sampler=batches, num_workers=workers,
                                         pin_memory=torch.cuda.is_available())  # page-locked: faster copies to the GPU
    for x, _, ok in loader:
        yield x, ok


def in_batches(items: range | list, size: int) -> list:
    """Consecutive chunks of `size` (the last one shorter)."""
    return [items[s:s + size] for s in range(0, len(items), size)]


def union(sets: list[ImageCaptionSet]) -> ImageCaptionSet:
    """All pairs of several sets in one (for joint training)."""
    caps = [c for s in sets for c in s.captions]
    if all(isinstance(s.images, torch.Tensor) for s in sets):
        return ImageCaptionSet(torch.cat([s.images for s in sets]), caps)
    return ImageCaptionSet([p for s in sets for p in s.images], caps)


@torch.no_grad()
def encode_set(model: LPI, data: ImageCaptionSet, run: "RunSettings", img_task=None, cap_task=None,
               progress: str | None = None):
    """Encode every image and every caption of a set, with per-item task prompts (None:
    frozen CLIP). Returns image feats (N, E), caption feats (N_cap, E), cap2img (N_cap,),
    ok (N,) bool (False: unreadable image, to be left out of the pool). With several
    processes each encodes a contiguous shard and every process gets the whole set back."""
    from tqdm import tqdm

    dev, E = run.device, model.clip.cfg.embed_dim
    images = shard(range(len(data)), run.dist)
    img_feats, ok_all = [torch.zeros(0, E)], [torch.zeros(0, dtype=torch.bool)]
    bar = tqdm(total=len(images), desc=progress, leave=False, disable=progress is None or not run.progress)
    for idx, (x, ok) in zip(in_batches(images, run.batch_size),
                            image_batches(data, in_batches(list(images), run.batch_size), run.preprocess, run.workers)):
        ids = None if img_task is None else img_task[list(idx)].to(dev)
        with autocast(dev, run.precision):
            img_feats.append(model.encode_image(x.to(dev), ids).float().cpu())
        ok_all.append(ok)
        bar.update(len(x))
    bar.close()
    captions = [c for caps in data.captions for c in caps]
    cap2img = torch.tensor([i for i, caps in enumerate(data.captions) for _ in caps], dtype=torch.long)
    cap_feats = [torch.zeros(0, E)]
    for idx in in_batches(shard(range(len(captions)), run.dist), run.batch_size):
        batch = [captions[i] for i in idx]
        # frozen CLIP (no task ids) reads plain captions, without the M prompt placeholders
        tokens = (model.tokenize(batch) if cap_task is not None
                  else clip_model.tokenize(batch, model.clip.context_length, truncate=True)).to(dev)
        ids = None if cap_task is None else cap_task[list(idx)].to(dev)
        with autocast(dev, run.precision):
            cap_feats.append(model.encode_text(tokens, ids).float().cpu())
    return (gather_rows(torch.cat(img_feats), run.dist), gather_rows(torch.cat(cap_feats), run.dist), cap2img,
            gather_rows(torch.cat(ok_all), run.dist))


# ---------------------------------------------------------------------------------------
# The authors' training recipe, each part a switch:
# - --pairs per-caption [code]: an epoch visits every (image, caption) pair once, so an
#   image comes back once per caption (and two captions of one image may share a batch,
#   each then a false negative of the other). per-image: each image once per epoch, with
#   one of its captions at random (never two captions of an image in one batch). The
#   built-in tasks have one caption per image: there the two are the same.
# - --augment [code]: RandomResizedCrop (torchvision's default scale 0.08-1) and a random
#   horizontal flip of the training images. On by default for real data; off for the
#   built-in world, whose captions name positions ("left of", "above") that a flip or a
#   crop would falsify.
# ---------------------------------------------------------------------------------------

def training_pairs(data: ImageCaptionSet, per_caption: bool, g: torch.Generator) -> tuple[list[int], list[int]]:
    """One epoch's (image index, caption index) pairs in random order, as two lists."""
    if per_caption:
        pairs = [(i, c) for i, caps in enumerate(data.captions) for c in range(len(caps))]
        pairs = [pairs[j] for j in torch.randperm(len(pairs), generator=g).tolist()]
    else:
        order = torch.randperm(len(data), generator=g).tolist()
        pairs = [(i, int(torch.randint(len(data.captions[i]), (1,), generator=g))) for i in order]
    return [i for i, _ in pairs], [c for _, c in pairs]


def train_transform(resolution: int):
    """The authors' training augmentation on a PIL image, then CLIP's normalisation."""
    from torchvision import transforms as T

    return T.Compose([T.RandomResizedCrop(resolution, interpolation=T.InterpolationMode.BICUBIC),
                      T.RandomHorizontalFlip(), T.ToTensor(), T.Normalize(clip_model.CLIP_MEAN, clip_model.CLIP_STD)])


def augment_tensors(x: torch.Tensor) -> torch.Tensor:
    """train_transform for images that are tensors already (B, 3, H, W): each image its
    own random crop (resized back to H x W) and flip."""
    from torchvision import transforms as T
    from torchvision.transforms import functional as TF

    H, W = x.shape[-2:]
    out = []
    for img in x:
        i, j, h, w = T.RandomResizedCrop.get_params(img, scale=(0.08, 1.0), ratio=(3 / 4, 4 / 3))
        img = TF.resized_crop(img, i, j, h, w, [H, W], interpolation=T.InterpolationMode.BICUBIC, antialias=True)
        out.append(TF.hflip(img) if torch.rand(()) < 0.5 else img)
    return torch.stack(out)


def check_finite(tensors: dict[str, torch.Tensor], where: str, what: str) -> None:
    """No silent NaN: a non-finite loss term, gradient or parameter stops the run with a
    message naming the task, the step and the term. Every finished task stays checkpointed
    (the current one is not written), so --resume with other settings continues from there."""
    bad = [name for name, v in tensors.items() if not torch.isfinite(v).all()]
    if bad:
        raise LPIError(f"{where}: non-finite {what} ({', '.join(bad)}); stopped. The last good checkpoint (if any) "
                       f"holds every finished task: lower --lr, raise the temperatures, or check the data")


def global_batches(n_pairs: int, run: "RunSettings") -> list[range]:
    """One epoch's global batches of run.batch_size x processes positions; a last batch
    too small to give every process a pair is dropped."""
    return [b for b in in_batches(range(n_pairs), run.batch_size * run.dist.world) if len(b) >= run.dist.world]


def epoch_batches(data: ImageCaptionSet, run: "RunSettings", g: torch.Generator, preprocess):
    """One epoch in random order: this process's share of each global batch, as
    (captions, images (b, 3, H, W), ok (b,) bool)."""
    order, pick = training_pairs(data, run.per_caption, g)
    mine = [shard(b, run.dist) for b in global_batches(len(order), run)]
    images = image_batches(data, [[order[p] for p in P] for P in mine], preprocess, run.workers)
    for P, (x, ok) in zip(mine, images):
        yield [data.captions[order[p]][pick[p]] for p in P], x, ok


# ---------------------------------------------------------------------------------------
# The optimiser of the per-task parameters [ours]: Adam, because SGD's useful step on the
# LayerNorm-scale-free CP factors shrinks as lr/|w|^2 (METHOD.md §2, "How the factors
# learn"). --optimizer sgd is the authors' recipe (momentum 0.9); both are in the tuning
# protocol (benchmarks/tune.py).
# ---------------------------------------------------------------------------------------
OPTIMIZERS = ("sgd", "adam")


def make_optimizer(params: list[torch.Tensor], run: "RunSettings") -> torch.optim.Optimizer:
    if run.optimizer == "adam":
        return torch.optim.Adam(params, lr=run.lr, weight_decay=run.weight_decay)
    return torch.optim.SGD(params, lr=run.lr, momentum=0.9, weight_decay=run.weight_decay)


def prompt_scale(model) -> dict[str, float]:
    """The std of the current task's raw prompts (before interaction) at layer 0 and at the
    deeper layers, per modality: what the hierarchical losses could inflate. {} for L2P."""
    if not getattr(model, "task_prompts", None):
        return {}
    P_v, P_t = model.task_prompts[-1].raw()                       # (J, M, D_v), (J, M, D_t)
    out = {"P_v[0]": P_v[0].std().item(), "P_t[0]": P_t[0].std().item()}
    if P_v.shape[0] > 1:
        out.update({"P_v[1:]": P_v[1:].std().item(), "P_t[1:]": P_t[1:].std().item()})
    return {k: round(v, 6) for k, v in out.items()}


def grad_norms(losses: dict[str, torch.Tensor], weights: dict[str, float],
               params: list[torch.Tensor]) -> dict[str, float]:
    """|d term / d params| for every loss term (weighted as it enters the total), over the
    trained parameters: which term drives the step. Costs one backward pass per term."""
    out = {}
    for name in (k for k in losses if k != "total"):
        g = torch.autograd.grad(weights[name] * losses[name], params, retain_graph=True, allow_unused=True)
        out[name] = round(math.sqrt(sum(float((x.float() ** 2).sum()) for x in g if x is not None)), 8)
    return out


def train_task(model: LPI, t: int, data: ImageCaptionSet, run: "RunSettings",
               targets: torch.Tensor | None) -> dict[str, float]:
    """Train task t's parameters (only those) on its pairs: the chosen optimiser, cosine
    schedule (METHOD.md §7), the recipe switches above. targets: the task relations Y.
    With N processes each global batch is split among them in order, so they train as one
    process would with the global batch. Returns {"running": the loss terms' moving
    averages, "first_steps": the exact terms of the first 5 steps, "grad_norms": each
    term's gradient norm at those steps, "prompt_scale": {"start", "end"} of the task}."""
    from tqdm import tqdm

    params = [p for p in model.parameters() if p.requires_grad]
    if not params:
        return {"running": {}, "first_steps": []}
    opt = make_optimizer(params, run)
    n_pairs = sum(map(len, data.captions)) if run.per_caption else len(data)
    total = run.epochs * len(global_batches(n_pairs, run))
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda i: 0.5 * (1 + math.cos(math.pi * i / total)))
    scaler = torch.amp.GradScaler(run.device.type, enabled=run.precision == "fp16" and run.device.type == "cuda")
    g = torch.Generator().manual_seed(run.seed * 1000 + t)
    files = not isinstance(data.images, torch.Tensor)
    preprocess = train_transform(model.clip.visual.input_resolution) if run.augment and files else run.preprocess
    model.train()
    bar = tqdm(total=total, desc=f"task {t + 1} train", disable=not run.progress)
    running, first_steps, norms, step = {}, [], [], 0
    scale = {"start": prompt_scale(model)}
    for epoch in range(run.epochs):
        for caps, x, ok in epoch_batches(data, run, g, preprocess):
            step += 1
            losses = train_step(model, opt, scaler, x, ok, caps, t, targets, run,
                                where=f"task {t + 1}, step {step} of {total}", files=files,
                                log_grads=len(norms) < 5)
            if losses is not None:
                sched.step()
                values = {k: v.item() for k, v in losses.items() if k != "grad_norms"}
                running = {k: v if k not in running else 0.9 * running[k] + 0.1 * v for k, v in values.items()}
                first_steps += [values] if len(first_steps) < 5 else []
                norms += [losses["grad_norms"]] if "grad_norms" in losses else []
                bar.set_postfix({k: f"{v:.3f}" for k, v in running.items()})
            bar.update(1)
    bar.close()
    model.eval()
    scale["end"] = prompt_scale(model)
    return {"running": running, "first_steps": first_steps, "grad_norms": norms, "prompt_scale": scale}


def train_step(model: LPI, opt, scaler, x: torch.Tensor, ok: torch.Tensor, caps: list[str], t: int,
               targets, run: "RunSettings", where: str, files: bool, log_grads: bool = False) -> dict | None:
    """One optimiser step on this process's share of a global batch; None if skipped.

    With N processes the contrastive loss sees the global batch (gather_with_grad), and
    each process's gradient of it reaches only its own rows; averaging the gradients over
    processes would divide the sum of those shares by N, so the CLIP term enters the
    backward pass N times. The other terms depend on the prompts alone, are the same on
    every process, and their average is themselves."""
    keep = ok.nonzero().flatten()
    total = all_reduce_ints([len(keep)], run.dist)[0]
    fewest = -all_reduce_ints([-len(keep)], run.dist, op="max")[0]
    if total < 2 or fewest < 1:  # a contrastive loss needs a negative; every process needs a share
        return None
    x, caps = x[keep], [caps[i] for i in keep.tolist()]
    if run.augment and not files:
        x = augment_tensors(x)
    tokens = model.tokenize(caps).to(run.device)
    gather = (lambda f: gather_with_grad(f, run.dist)) if run.dist.world > 1 else None
    with autocast(run.device, run.precision):
        losses = model.losses(x.to(run.device), tokens, t, targets, gather=gather)
    check_finite({k: v for k, v in losses.items() if k != "total"}, where, "loss term")
    params = [p for p in model.parameters() if p.requires_grad]
    norms = grad_norms(losses, model.loss_weights(), params) if log_grads else None
    opt.zero_grad(set_to_none=True)
    scaler.scale(losses["total"] + (run.dist.world - 1) * losses["clip"]).backward()
    average_gradients(params, run.dist)
    if not scaler.is_enabled():  # with fp16 loss scaling, inf gradients are expected: the step is skipped
        check_finite({f"gradient of {n}": p.grad for n, p in model.named_parameters()
                      if p.requires_grad and p.grad is not None}, where, "value")
    scaler.step(opt)
    scaler.update()
    check_finite({n: p for n, p in model.named_parameters() if p.requires_grad}, where, "parameter")
    return losses if norms is None else dict(losses, grad_norms=norms)


@dataclass
class RunSettings:
    """What the loop needs besides the model (filled from the command line)."""
    device: torch.device
    preprocess: object
    batch_size: int
    epochs: int
    lr: float
    weight_decay: float
    seed: int
    optimizer: str = "sgd"        # of the per-task parameters: sgd (momentum 0.9) | adam
    workers: int = 0
    keys_k: int = 5
    routing: str = "kmeans"
    route_metric: str = "cosine"  # k-means and routing metric (see TaskRouter)
    augment: bool = False         # the authors' crop + flip of training images
    per_caption: bool = True      # an epoch visits every caption (else every image) once
    precision: str = "fp32"       # autocast dtype of the frozen encoders: fp32 | bf16 | fp16
    dist: Dist = field(default_factory=lambda: Dist())  # this process among torchrun's (1 of 1 without it)
    progress: bool = True
    joint: bool = False   # train once on all tasks' data (the joint upper bound)


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


def summarize(recall: dict, t: int) -> dict:
    """After step t (0-based): row t's averages over tasks 1..t+1 and the average
    forgetting of R@1 in each direction."""
    out = row_summary({d: {K: m[t][: t + 1] for K, m in recall[d].items()} for d in ("i2t", "t2i")})
    for d in ("i2t", "t2i"):
        out[f"{d}_forgetting_R@1"] = forgetting(recall[d]["R@1"], t)
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


def route(frozen: list[tuple], router: TaskRouter, run: RunSettings) -> list[tuple[Tensor, Tensor]]:
    """§6: the task of every test image and caption, from its frozen features (nearest
    k-means key), or its true task with --routing oracle."""
    if run.routing == "oracle":
        return [(torch.full((len(f[0]),), k), torch.full((len(f[1]),), k)) for k, f in enumerate(frozen)]
    return [(router.route_images(f[0]), router.route_texts(f[1])) for f in frozen]


def make_pool(encoded: list[tuple[Tensor, Tensor]], frozen: list[tuple], routes: list[tuple]) -> Pool:
    """Join the tasks' encoded test sets into one pool; an unreadable image leaves it
    together with its captions."""
    parts = defaultdict(list)
    offset = 0
    for k, ((e_img, e_cap), (_, _, c2i, ok), (r_img, r_cap)) in enumerate(zip(encoded, frozen, routes)):
        keep = ok[c2i]                                                   # captions of readable images
        parts["img"].append(e_img[ok]); parts["cap"].append(e_cap[keep])
        parts["cap2img"].append((torch.cumsum(ok.long(), 0) - 1)[c2i[keep]] + offset)
        parts["img_task"].append(torch.full((int(ok.sum()),), k)); parts["cap_task"].append(torch.full((int(keep.sum()),), k))
        parts["img_routed"].append(r_img[ok]); parts["cap_routed"].append(r_cap[keep])
        parts["img_index"].append(ok.nonzero().flatten())
        offset += int(ok.sum())
    joined = {name: torch.cat(v) for name, v in parts.items()}
    joined["img"], joined["cap"] = F.normalize(joined["img"], dim=-1), F.normalize(joined["cap"], dim=-1)
    return Pool(**joined)


@torch.no_grad()
def evaluate(model: LPI, tasks: list[Task], frozen: list[tuple], router: TaskRouter, run: RunSettings,
             ks=(1, 5, 10)) -> tuple[dict, dict, Pool]:
    """Retrieval over the union of the test items of `tasks` (all tasks seen so far): every
    image and caption is routed to a task and encoded with that task's prompts; recall of
    task k is measured over task k's queries against the whole pool.
    Returns ({"i2t": {"R@1": [per task]}, "t2i": ...}, {"image": acc, "text": acc}, pool)."""
    routes = route(frozen, router, run)
    encoded = [encode_set(model, task.test, run, r_img, r_cap, progress=f"eval {task.name}")[:2]
               if model.prompted else f[:2] for task, f, (r_img, r_cap) in zip(tasks, frozen, routes)]
    pool = make_pool(encoded, frozen, routes)
    sim = pool.img @ pool.cap.t()                                        # (N_img, N_cap)
    ranks = {"i2t": (i2t_ranks(sim, pool.cap2img), pool.img_task), "t2i": (t2i_ranks(sim, pool.cap2img), pool.cap_task)}
    recall = {d: {f"R@{K}": [] for K in ks} for d in ranks}
    for k in range(len(tasks)):
        for d, (r, task_of) in ranks.items():
            for name, v in recall_from_ranks(r[task_of == k], ks).items():
                recall[d][name].append(v)
    accuracy = lambda routed, true: 100.0 * float((routed == true).double().mean()) if len(true) else 0.0  # noqa: E731
    return recall, {"image": accuracy(pool.img_routed, pool.img_task), "text": accuracy(pool.cap_routed, pool.cap_task)}, pool


def record_task_relations(results: dict, S: torch.Tensor, theta: float, source: str,
                          verbose: bool = True) -> torch.Tensor:
    """Put the task similarity S and its targets Y in results, print how Y splits the
    pairs, and return Y."""
    Y = task_targets(S, theta)
    off = ~torch.eye(len(S), dtype=torch.bool)
    pos, neg = int(Y[off].sum()) // 2, int((1 - Y[off]).sum()) // 2
    results["task_similarity"] = [[round(float(v), 6) for v in row] for row in S]
    results["task_targets"] = Y.int().tolist()
    if len(S) > 1 and verbose:
        print(f"task similarity ({source}): {pos} related and {neg} unrelated pairs of tasks (θ = {theta})")
    return Y


# Settings that may differ between an interrupted run and its --resume.
_RESUME_FREE = {"resume", "out", "device", "workers", "progress", "precision"}


@dataclass
class Progress:
    """What the continual loop carries from task to task, and what a checkpoint holds."""
    results: dict
    router: TaskRouter
    cent_img: list = field(default_factory=list)   # per task: mean frozen image feature (E,)
    cent_txt: list = field(default_factory=list)   # per task: mean frozen caption feature (E,)
    done: int = 0                                   # tasks finished


def new_results(model: LPI, tasks: list[Task], config: dict) -> dict:
    T = len(tasks)
    empty = lambda: [[None] * T for _ in range(T)]  # noqa: E731
    return {"config": config, "tasks": [t.name for t in tasks],
            "recall": {d: {f"R@{K}": empty() for K in (1, 5, 10)} for d in ("i2t", "t2i")},
            "routing_accuracy": [], "trainable_params_per_task": model_parameters(model, T),
            "parameter_comparison": parameter_comparison(model.cfg, model.D_v, model.D_t),
            "skipped_images": 0, "wall_time_s": 0.0}


def resume_progress(model: LPI, out: Path, config: dict, progress: Progress) -> Progress:
    """Load the last checkpoint in `out` (made with the same settings) into the model and
    the router; the model gets one prompt set per finished task."""
    path = latest_checkpoint(out)
    ckpt = read_checkpoint(path)
    differ = sorted(k for k in set(config) | set(ckpt["config"])
                    if k not in _RESUME_FREE and config.get(k) != ckpt["config"].get(k))
    if differ:
        raise LPIError(f"--resume: {path} was made with other settings ({', '.join(differ)}); "
                       f"expected the same as the interrupted run")
    for _ in range(ckpt["done"]):
        model.add_task()
    model.load_state_dict(ckpt["learned"], strict=False)  # everything but the frozen CLIP
    progress.router.load_state_dict(ckpt["router"])
    return Progress(dict(ckpt["results"], config=config), progress.router, list(ckpt["centroids_img"]),
                    list(ckpt["centroids_txt"]), ckpt["done"])


def save_progress(model: LPI, out: Path, config: dict, p: Progress) -> None:
    learned = {k: v for k, v in model.state_dict().items() if not k.startswith("clip.")}
    state = {"config": config, "done": p.done, "learned": learned, "router": p.router.state_dict(),
             "centroids_img": torch.stack(p.cent_img), "centroids_txt": torch.stack(p.cent_txt), "results": p.results}
    _atomic_write(out / "checkpoints" / f"task_{p.done:02d}.pt", lambda f: torch.save(state, f))
    save_json(out / "results.json", p.results)


def fit_keys(model: LPI, task: Task, run: RunSettings, p: Progress) -> int:
    """§6 on task t's training set, through the frozen CLIP: its routing keys (k-means) and
    its centroids (for --task-similarity centroids). Returns the unreadable images skipped."""
    f_img, f_cap, _, ok = encode_set(model, task.train, run, progress=f"keys {task.name}")
    if run.routing == "kmeans":
        p.router.add_task(f_img[ok], f_cap, run.keys_k)
        broadcast_(p.router.image_keys, run.dist), broadcast_(p.router.text_keys, run.dist)
    p.cent_img.append(F.normalize(f_img[ok], dim=-1).mean(0))
    p.cent_txt.append(F.normalize(f_cap, dim=-1).mean(0))
    return int((~ok).sum())


def record_recall(p: Progress, t: int, recall: dict, routing: dict, skipped: int, seconds: float) -> None:
    for d in recall:
        for K, values in recall[d].items():
            p.results["recall"][d][K][t][: t + 1] = values
    p.results["routing_accuracy"].append(routing)
    p.results["skipped_images"] += skipped
    p.results["wall_time_s"] = seconds
    p.results["summary"] = summarize(p.results["recall"], t)


def start_progress(model: LPI, tasks: list[Task], run: RunSettings, out: Path, config: dict, resume: bool,
                   say: Callable) -> Progress:
    """A fresh start, or with --resume the state of the last checkpoint in `out`."""
    p = Progress(new_results(model, tasks, config), TaskRouter(seed=run.seed, metric=run.route_metric))
    if latest_checkpoint(out) is None:
        return p
    if not resume:
        raise LPIError(f"{out} already holds a run ({latest_checkpoint(out).name}); pass --resume to continue "
                       f"it, or choose another --out")
    p = resume_progress(model, out, config, p)
    say(f"resuming after task {p.done} of {len(tasks)} from {latest_checkpoint(out)}")
    return p


def encode_frozen(model: LPI, tasks: list[Task], frozen: list, run: RunSettings) -> int:
    """Frozen-CLIP features of the test set of each of `tasks` not encoded yet (routing
    reads them); returns how many images of the last task were unreadable, if it was new."""
    new = [k for k in range(len(tasks)) if frozen[k] is None]
    for k in new:
        frozen[k] = encode_set(model, tasks[k].test, run)  # no task ids: plain CLIP
    last = len(tasks) - 1
    return int((~frozen[last][3]).sum()) if last in new else 0


def task_line(p: Progress, t: int, recall: dict, routing: dict) -> str:
    """The line printed after task t: average R@1 over the seen tasks (and routing)."""
    line = f"task {t + 1}/{len(p.results['tasks'])} {p.results['tasks'][t]}: " + ", ".join(
        f"{d} R@1 {sum(recall[d]['R@1']) / (t + 1):.1f}" for d in recall) + " (avg over seen tasks)"
    if p.results["config"].get("method", "lpi") in PER_TASK_METHODS:
        line += f"; routing image {routing['image']:.1f}% text {routing['text']:.1f}%"
    return line


def run_continual(model: LPI, tasks: list[Task], run: RunSettings, out: Path, config: dict,
                  resume: bool = False) -> dict:
    """The continual protocol (METHOD.md §6-7). For t = 1..T: open task t's prompts, fit its
    routing keys and centroid on frozen features, train, evaluate on all seen tasks, and
    checkpoint. --resume restarts after the last finished task; per-task seeds make the
    result identical to an uninterrupted run."""
    import time

    T, main = len(tasks), run.dist.main
    say = print if main else (lambda *a, **k: None)    # with torchrun, process 0 speaks and writes
    p = start_progress(model, tasks, run, out, config, resume, say)
    theta, by_names = model.cfg.theta, model.cfg.task_similarity == "names"
    if by_names:  # §5: the relations of all T tasks are known from their names before training
        S = broadcast_(name_similarity(model.clip, [tk.readable for tk in tasks]), run.dist)
        Y = record_task_relations(p.results, S, theta, "names", verbose=main)
    t0 = time.time() - p.results["wall_time_s"]
    frozen: list[tuple | None] = [None] * T            # frozen CLIP features of each test set
    pool = None
    for t in range(p.done, T):
        torch.manual_seed(run.seed * 1000 + t)
        idx = model.add_task()
        skipped = fit_keys(model, tasks[t], run, p)
        if not by_names:  # online: the seen tasks' centroids, targets renewed as tasks arrive
            S = centroid_similarity(torch.stack(p.cent_img), torch.stack(p.cent_txt))
            Y = record_task_relations(p.results, S, theta, "centroids", verbose=main)
        if run.joint and t < T - 1:  # the upper bound trains once, on every task's data, at the end
            p.results["routing_accuracy"].append(None)
            continue
        data = union([tk.train for tk in tasks]) if run.joint else tasks[t].train
        log = train_task(model, idx, data, run, None if run.joint else Y)
        for key in ("first_steps", "grad_norms", "prompt_scale"):
            p.results.setdefault(key, {})[tasks[t].name] = log.get(key, [])
        skipped += encode_frozen(model, tasks[: t + 1], frozen, run)  # counted once, also across --resume
        recall, routing, pool = evaluate(model, tasks[: t + 1], frozen[: t + 1], p.router, run)
        record_recall(p, t, recall, routing, skipped, time.time() - t0)
        p.done = t + 1
        if main:
            save_progress(model, out, config, p)
        say(task_line(p, t, recall, routing))
    return finish(model, tasks, run, out, p, frozen, pool, time.time() - t0)


def finish(model: LPI, tasks: list[Task], run: RunSettings, out: Path, p: Progress, frozen: list, pool, seconds: float):
    """Zero-shot CLIP on the same final pool (the frozen features are there already), the
    final summary, results.json and, on built-in data, the retrieval picture."""
    encode_frozen(model, tasks, frozen, run)
    zs, _, zs_pool = evaluate(LPI(model.clip, LPIConfig(J=0)), tasks, frozen, p.router, run)
    p.results.update(zeroshot={"recall": zs, "summary": row_summary(zs)}, wall_time_s=seconds,
                     summary=summarize(p.results["recall"], len(tasks) - 1))
    if run.dist.main:
        save_json(out / "results.json", p.results)
        if pool is not None and model.prompted and all(isinstance(tk.test.images, torch.Tensor) for tk in tasks):
            method = p.results["config"].get("method", "method")
            plot_retrievals(tasks, {"zero-shot CLIP": zs_pool, method: pool}, out / "retrievals.png")
    return p.results


# ========================================================================================
# §7, support: several processes, mixed precision, checkpoint files and the run lock
# ========================================================================================

# ---------------------------------------------------------------------------------------
# Several processes (torchrun): what each one does, and the few collectives they share
#
# `torchrun --nproc_per_node N lpi.py ...` starts N copies; each trains on its share of every
# global batch, encodes its shard of every set, and gets the others' results back. Only the
# current task's prompts train, so gradients are small: they are averaged with one
# all-reduce per step (no DistributedDataParallel wrapper needed). Only process 0 prints
# and writes files.
# ---------------------------------------------------------------------------------------

@dataclass
class Dist:
    """This process's place among the processes of a run (1 process: rank 0 of 1)."""
    rank: int = 0
    world: int = 1

    @property
    def main(self) -> bool:
        return self.rank == 0


def init_distributed(device: torch.device) -> tuple[Dist, torch.device]:
    """Join the process group torchrun set up (NCCL on CUDA, gloo on the CPU); one GPU per
    process. Without torchrun (WORLD_SIZE unset or 1): a single process, nothing to join."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world == 1:
        return Dist(), device
    import torch.distributed as dist

    if device.type == "cuda":
        device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
        torch.cuda.set_device(device)
    if not dist.is_initialized():
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    return Dist(dist.get_rank(), dist.get_world_size()), device


def shard(items: range | list, d: Dist) -> range | list:
    """This process's contiguous share of `items` (sizes differ by at most one)."""
    n, r, w = len(items), d.rank, d.world
    return items[r * n // w:(r + 1) * n // w]


def _comm_device() -> torch.device:
    """Where collectives run: NCCL moves CUDA tensors only, gloo CPU ones."""
    import torch.distributed as dist

    return torch.device("cuda", torch.cuda.current_device()) if dist.get_backend() == "nccl" else torch.device("cpu")


def _gather(x: torch.Tensor, d: Dist) -> list[torch.Tensor]:
    """Every process's x (rows may differ in number), in rank order; no gradient."""
    import torch.distributed as dist

    dev = _comm_device()
    sizes = [torch.zeros(1, dtype=torch.long, device=dev) for _ in range(d.world)]
    dist.all_gather(sizes, torch.tensor([len(x)], device=dev))
    most = int(max(sizes))
    padded = torch.cat([x.detach().to(dev), x.new_zeros(most - len(x), *x.shape[1:], device=dev)])
    parts = [torch.empty_like(padded) for _ in range(d.world)]
    dist.all_gather(parts, padded.contiguous())
    return [part[: int(n)].to(x.device) for part, n in zip(parts, sizes)]


def gather_rows(x: torch.Tensor, d: Dist) -> torch.Tensor:
    """Every process's rows (shards of different lengths), concatenated in rank order."""
    return x if d.world == 1 else torch.cat(_gather(x, d))


def gather_with_grad(x: torch.Tensor, d: Dist) -> torch.Tensor:
    """gather_rows, with this process's own rows still attached to its graph: the global
    contrastive loss then sends each process the gradient of its own rows."""
    if d.world == 1:
        return x
    parts = _gather(x, d)
    parts[d.rank] = x
    return torch.cat(parts)


def all_reduce_ints(values: list[int], d: Dist, op: str = "sum") -> list[int]:
    """Sum (or max) of each value over the processes (the values themselves with one process)."""
    if d.world == 1:
        return values
    import torch.distributed as dist

    t = torch.tensor(values, dtype=torch.long, device=_comm_device())
    dist.all_reduce(t, op=dist.ReduceOp.SUM if op == "sum" else dist.ReduceOp.MAX)
    return t.tolist()


def average_gradients(params: list[torch.Tensor], d: Dist) -> None:
    """All processes end the step with the mean of their gradients (one flat all-reduce)."""
    if d.world == 1:
        return
    import torch.distributed as dist

    grads = [p.grad if p.grad is not None else torch.zeros_like(p) for p in params]
    flat = torch.cat([g.reshape(-1) for g in grads]).to(_comm_device())
    dist.all_reduce(flat)
    flat /= d.world
    for p, part in zip(params, flat.split([g.numel() for g in grads])):
        p.grad = part.view_as(p).to(p.device, copy=True)


def broadcast_(x: torch.Tensor, d: Dist) -> torch.Tensor:
    """Process 0's tensor, in place on every process (computed once, the same everywhere)."""
    if d.world > 1:
        import torch.distributed as dist

        y = x.to(_comm_device())
        dist.broadcast(y, 0)
        x.copy_(y)
    return x


# ---------------------------------------------------------------------------------------
# Mixed precision (--precision): the frozen encoders in bf16 / fp16, prompts and losses in fp32
# ---------------------------------------------------------------------------------------

PRECISIONS = {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}


def default_precision(device: torch.device) -> str:
    """--precision auto: bf16 on a CUDA device that supports it, fp32 elsewhere (CPU bf16
    matmuls are slower than fp32 on most CPUs)."""
    return "bf16" if device.type == "cuda" and torch.cuda.is_bf16_supported() else "fp32"


def autocast(device: torch.device, precision: str = "fp32"):
    """Mixed precision for the frozen encoders' matmuls. The learned prompts stay fp32
    (master weights: the optimiser never sees a half-precision copy) and every loss casts
    its inputs to fp32 before the softmax."""
    dtype = PRECISIONS[precision]
    return torch.autocast(device.type, dtype=dtype, enabled=dtype is not None)


# ---------------------------------------------------------------------------------------
# Files: atomic writes, checkpoints read with weights_only=True, one run per output folder
# ---------------------------------------------------------------------------------------

def _atomic_write(path: Path, write) -> None:
    """Write through a temporary file and rename: an interrupted run never leaves a half file."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    write(tmp)
    os.replace(tmp, path)


def save_json(path: Path, obj) -> None:
    _atomic_write(path, lambda p: p.write_text(json.dumps(obj, indent=2)))


def latest_checkpoint(out: Path) -> Path | None:
    found = sorted((out / "checkpoints").glob("task_*.pt"))
    return found[-1] if found else None


CHECKPOINT_KEYS = {"config", "done", "learned", "router", "centroids_img", "centroids_txt", "results"}


def read_checkpoint(path: Path) -> dict:
    """A run's checkpoint, read with weights_only=True: tensors and plain containers only
    (configs and results are dicts of numbers and strings), so a checkpoint someone hands
    you cannot run code on your machine. Anything else is refused with one message."""
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise LPIError(f"{path} was refused: it holds objects other than tensors and plain data, which could run "
                       f"code when unpickled (checkpoints are read with weights_only=True). Detail: {first}") from None
    except Exception as e:  # noqa: BLE001 - truncated or not a torch file: one clear message
        raise LPIError(f"{path} is not a readable checkpoint ({type(e).__name__}): corrupt or truncated? "
                       f"Delete it to redo that task with --resume, or choose another --out") from None
    if not isinstance(ckpt, dict) or not CHECKPOINT_KEYS <= set(ckpt):
        raise LPIError(f"{path} is not a checkpoint of lpi.py (expected a dict with {', '.join(sorted(CHECKPOINT_KEYS))})")
    return ckpt


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # exists, owned by someone else
        return True
    return True


@contextmanager
def run_lock(out: Path):
    """One run per output folder: <out>/.lock holds "pid host" while a run writes there and
    is removed on exit. A lock left by a killed run (its process gone) is stale and taken
    over; a lock of a live process, or of another host, is refused with a message."""
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise LPIError(f"--out {out} cannot be created: {e.strerror or e}") from None
    lock, me = out / ".lock", f"{os.getpid()} {socket.gethostname()}"
    for _ in range(2):
        try:
            fd = os.open(lock, os.O_CREAT | os.O_EXCL | os.O_WRONLY)
            break
        except FileExistsError:
            pid, _, host = lock.read_text().partition(" ")
            if host.strip() != socket.gethostname() or not pid.isdigit() or _pid_alive(int(pid)):
                raise LPIError(f"{out} is in use by another run (process {pid} on {host.strip() or '?'}; lock file "
                               f"{lock}). Wait for it, or delete the lock file if no such run is alive") from None
            print(f"note: removing the stale lock of a run that is gone (process {pid})")
            lock.unlink(missing_ok=True)
        except OSError as e:
            raise LPIError(f"--out {out} is not writable: {e.strerror or e}") from None
    else:
        raise LPIError(f"{out}: could not take the lock {lock}")
    os.write(fd, me.encode())
    os.close(fd)
    for tmp in list(out.glob(".*.tmp*")) + list((out / "checkpoints").glob(".*.tmp*")):
        tmp.unlink(missing_ok=True)  # half-written files of an interrupted run (never read)
    try:
        yield
    finally:
        if lock.is_file() and lock.read_text() == me:
            lock.unlink()


# ========================================================================================
# Reporting: the table on stdout and the heat-map of the R@1 matrix
# ========================================================================================

def format_table(results: dict) -> str:
    """Final recall per task (the method and zero-shot CLIP on the same pool) and the averages."""
    names, rec, zs = results["tasks"], results["recall"], results.get("zeroshot")
    method = results["config"].get("method", "lpi")
    cols = [(d, K) for d in ("i2t", "t2i") for K in ("R@1", "R@5", "R@10")]
    row = lambda name, who, vals: f"{name:<22}{who:<10}" + "".join(f"{v:>10.1f}" for v in vals)  # noqa: E731
    lines = [f"{'task':<22}{'method':<10}" + "".join(f"{d} {K:<6}" for d, K in cols)]
    for k, name in enumerate(names):
        lines.append(row(name, method, [rec[d][K][-1][k] for d, K in cols]))
        lines += [row("", "zeroshot", [zs["recall"][d][K][k] for d, K in cols])] if zs else []
    s = results["summary"]
    lines.append("-" * len(lines[0]))
    lines.append(row("average", method, [s[f"{d}_{K}"] for d, K in cols]))
    lines += [row("", "zeroshot", [zs["summary"][f"{d}_{K}"] for d, K in cols])] if zs else []
    lines.append(f"mean recall {s['mean_recall']:.1f}" + (f" (zero-shot {zs['summary']['mean_recall']:.1f})" if zs else "")
                 + f"; average forgetting of R@1: i2t {s['i2t_forgetting_R@1']:.1f}, t2i {s['t2i_forgetting_R@1']:.1f}")
    if results["routing_accuracy"] and method in PER_TASK_METHODS:
        r = results["routing_accuracy"][-1]
        lines.append(f"routing accuracy after the last task: images {r['image']:.1f}%, captions {r['text']:.1f}%")
    if results.get("skipped_images"):
        lines.append(f"skipped {results['skipped_images']} unreadable image(s) (missing or corrupt files)")
    p = results["trainable_params_per_task"]
    keys = f", keys {p['keys']:,}" if p.get("keys") else ""
    lines.append(f"trainable parameters per task: {p['total']:,} (prompts {p['prompts']:,}, "
                 f"interaction {p['interaction']:,}{keys}); wall time {results['wall_time_s']:.0f} s")
    if method == "lpi" and "parameter_comparison" in results:
        lines.append(format_parameter_comparison(results["parameter_comparison"]))
    return "\n".join(lines)


def plot_recall(results: dict, path: Path) -> None:
    """Heat-maps of the R@1 matrices: row t = after training task t, column k = task k."""
    from matplotlib.figure import Figure  # no pyplot: never switches the caller's backend (notebooks)

    names = results["tasks"]
    T = len(names)
    fig = Figure(figsize=(4 + 1.6 * T, 1.5 + 0.7 * T))
    axes = fig.subplots(1, 2, squeeze=False)
    mats = {d: torch.tensor([[float("nan") if v is None else v for v in row] for row in results["recall"][d]["R@1"]])
            for d in ("i2t", "t2i")}
    top = max(1.0, max(float(m.nan_to_num(0).max()) for m in mats.values()))  # one colour scale for both
    for col, (ax, d) in enumerate(zip(axes[0], ("i2t", "t2i"))):
        m = mats[d]
        im = ax.imshow(m.numpy(), vmin=0, vmax=top, cmap="viridis")
        for i in range(T):
            for k in range(T):
                if not math.isnan(m[i, k]):
                    ax.text(k, i, f"{m[i, k]:.0f}", ha="center", va="center",
                            color="white" if m[i, k] < 0.6 * top else "black", fontsize=8)
        ax.set_xticks(range(T), names, rotation=45, ha="right")
        ax.set_yticks(range(T), [f"after {n}" for n in names] if col == 0 else [""] * T)
        ax.set_title(f"{d} R@1 (%)")
    fig.colorbar(im, ax=axes[0].tolist(), shrink=0.8)
    _atomic_write(path, lambda p: fig.savefig(p, dpi=110, bbox_inches="tight", format="png"))


def plot_retrievals(tasks: list[Task], pools: dict[str, Pool], path: Path, n_queries: int = 4, top: int = 5) -> None:
    """For caption queries from tasks spread over the sequence: the top images under each
    pool's encoders (zero-shot CLIP, and the method after the last task), the correct image
    framed in green, the task each caption was routed to named. Tensor images only."""
    from matplotlib.figure import Figure

    first = next(iter(pools.values()))
    T = int(first.cap_task.max()) + 1
    picks = sorted({round(i * (T - 1) / max(1, n_queries - 1)) for i in range(n_queries)})
    queries = [int((first.cap_task == k).nonzero()[0]) for k in picks]      # each task's first caption
    rows = len(queries) * len(pools)
    fig = Figure(figsize=(1.1 * top + 1.6, 1.25 * rows + 0.3))
    axes = fig.subplots(rows, top, squeeze=False)
    fig.subplots_adjust(left=1.5 / (1.1 * top + 1.6), right=0.98, top=1 - 0.3 / (1.25 * rows + 0.3), bottom=0.01,
                        wspace=0.08, hspace=0.45)
    for qi, q in enumerate(queries):
        k = int(first.cap_task[q])
        for pi, (label, pool) in enumerate(pools.items()):
            row = axes[qi * len(pools) + pi]
            best = (pool.cap[q] @ pool.img.t()).topk(top).indices                 # (top,) pool images
            for ax, i in zip(row, best.tolist()):
                task, idx = tasks[int(pool.img_task[i])], int(pool.img_index[i])
                ax.imshow(task.test.images[idx].permute(1, 2, 0).numpy(), interpolation="nearest")
                ax.set_xticks([]), ax.set_yticks([])
                hit = i == int(pool.cap2img[q])
                for side in ax.spines.values():
                    side.set_color("limegreen" if hit else "lightgrey"), side.set_linewidth(5 if hit else 1)
            routed = f"\nrouted to {tasks[int(pool.cap_routed[q])].name}" if label != "zero-shot CLIP" else ""
            row[0].set_ylabel(label + routed, fontsize=7, rotation=0, ha="right", va="center")
        caption = tasks[k].test.captions[int(first.img_index[first.cap2img[q]])][0]
        axes[qi * len(pools)][0].set_title(f'{tasks[k].name}: "{caption}"', fontsize=8, loc="left")
    _atomic_write(path, lambda p: fig.savefig(p, dpi=110, format="png"))


# ========================================================================================
# Data (1/2): the built-in tasks (builtin_world.py: the benchmark, not the method)
# ========================================================================================

def builtin_task(name: str, n_train: int | None = None, n_test: int | None = None, seed: int = 0) -> Task:
    """The built-in task `name` (a family of builtin_world.FAMILIES), with the readable
    name the tiny CLIP was taught ("sea animals"), from which task similarity is read."""
    sizes = dict(world.TASK_SIZES, **{k: v for k, v in (("n_train", n_train), ("n_test", n_test)) if v})
    (train_img, train_cap), (test_img, test_cap) = world.make_split(name, seed=seed, **sizes)
    return Task(name, ImageCaptionSet(train_img, train_cap), ImageCaptionSet(test_img, test_cap),
                label=world.FAMILIES[name].label)


BUILTIN_TASKS: dict[str, Callable[..., Task]] = {name: partial(builtin_task, name) for name in world.FAMILIES}


# ========================================================================================
# Data (2/2): COCO and Flickr30K (Karpathy splits), COCO by super-category
# ========================================================================================

# ----------------------------------------------------------------------------------------
# The layout under --data-root
#
# Captions and splits come from Karpathy's JSON files (dataset_coco.json,
# dataset_flickr30k.json), the de-facto standard of retrieval papers: COCO 113,287 train
# images (his "train" + "restval") and 5,000 test images; Flickr30K 29,000 / 1,000.
# Training uses "train" and "restval", evaluation "test"; "val" is not used.
# ----------------------------------------------------------------------------------------

COCO_KARPATHY_JSON = os.path.join("coco", "dataset_coco.json")
COCO_INSTANCE_JSONS = (os.path.join("coco", "annotations", "instances_train2014.json"),
                       os.path.join("coco", "annotations", "instances_val2014.json"))
FLICKR_KARPATHY_JSON = os.path.join("flickr30k", "dataset_flickr30k.json")
FLICKR_IMAGE_DIR = os.path.join("flickr30k", "flickr30k-images")

TRAIN_SPLITS = ("train", "restval")
TEST_SPLITS = ("test",)
KARPATHY_SPLITS = ("train", "restval", "val", "test")

# A few COCO images have 6 or 7 captions; the standard protocol (e.g. the 5K test set with
# 25,000 captions) uses the first 5 of each image, and so do we, in training too.
CAPTIONS_PER_IMAGE = 5

DATA_LAYOUT = """\
  DATA_ROOT/coco/dataset_coco.json                 Karpathy's COCO split (captions, train/test)
  DATA_ROOT/coco/train2014/*.jpg, val2014/*.jpg    COCO 2014 images
  DATA_ROOT/coco/annotations/instances_train2014.json, instances_val2014.json
                                                   COCO 2014 instances (only for coco:supercategory)
  DATA_ROOT/flickr30k/dataset_flickr30k.json       Karpathy's Flickr30K split
  DATA_ROOT/flickr30k/flickr30k-images/*.jpg       Flickr30K images"""


def read_json(path: str, missing_hint: str = "") -> object:
    """json.load with errors that name the file: missing, not UTF-8, or malformed (line/column)."""
    if not os.path.isfile(path):
        hint = missing_hint or f"Expected this layout under --data-root:\n{DATA_LAYOUT}"
        raise LPIError(f"file not found: {path}\n{hint}")
    try:
        with open(path, encoding="utf-8") as f:
            return json.load(f)
    except json.JSONDecodeError as e:
        raise LPIError(f"{path} is not valid JSON: {e.msg} at line {e.lineno}, column {e.colno}") from None
    except UnicodeDecodeError as e:
        raise LPIError(f"{path} is not UTF-8 text (byte {e.start}): is it really a JSON file?") from None


# ----------------------------------------------------------------------------------------
# Karpathy's split files
#
#   {"dataset": "coco", "images": [{"filepath": "val2014", "filename": "COCO_val2014_...jpg",
#     "split": "test", "cocoid": 391895, "sentences": [{"raw": "A man ...", "tokens": [...]}, ...]},
#     ...]}
# Flickr30K entries look the same without "filepath" and "cocoid".
# ----------------------------------------------------------------------------------------


@dataclass
class KarpathyImage:
    """One entry of a Karpathy file: where its image is, its captions, its split."""
    path: str
    captions: list[str]
    split: str
    cocoid: int | None  # COCO's image id (matches the instance files); None for Flickr30K


def _caption_text(sentence: dict) -> str:
    # "raw" keeps case and punctuation (CLIP's tokenizer lower-cases itself); older files
    # may only have the tokens.
    if "raw" in sentence:
        return sentence["raw"].strip()
    return " ".join(sentence["tokens"])


def read_karpathy(json_path: str, image_path_of: Callable[[dict], str],
                  max_captions: int = CAPTIONS_PER_IMAGE) -> list[KarpathyImage]:
    """All entries of a Karpathy split file, validated; image_path_of(entry) -> the image's path."""
    data = read_json(json_path)
    entries = data.get("images") if isinstance(data, dict) else None
    if not isinstance(entries, list):
        raise LPIError(f"{json_path} is not in Karpathy's split format: expected a JSON object with an "
                       f"'images' list (the dataset_coco.json / dataset_flickr30k.json of Karpathy & Fei-Fei)")
    images = []
    for i, entry in enumerate(entries):
        where = f"{json_path}: images[{i}]"
        if not isinstance(entry, dict):
            raise LPIError(f"{where} is a {type(entry).__name__}, not an object: not a Karpathy split file")
        missing = [key for key in ("filename", "split", "sentences") if key not in entry]
        if missing:
            raise LPIError(f"{where} has no {', '.join(map(repr, missing))}: not a Karpathy split file "
                           f"(each entry needs 'filename', 'split' and 'sentences' [{{'raw': ...}}, ...])")
        if entry["split"] not in KARPATHY_SPLITS:
            raise LPIError(f"{where} has split {entry['split']!r}; expected one of {', '.join(KARPATHY_SPLITS)}")
        try:
            captions = [_caption_text(s) for s in entry["sentences"]][:max_captions]
            path = image_path_of(entry)
        except (KeyError, TypeError, AttributeError) as e:
            raise LPIError(f"{where} is malformed ({type(e).__name__}: {e}); expected 'sentences' as a "
                           f"list of {{'raw': ...}} objects and the keys the image path needs") from None
        if not captions:
            raise LPIError(f"{where} ({entry['filename']}) has no sentences")
        images.append(KarpathyImage(path, captions, entry["split"], entry.get("cocoid")))
    return images


def make_set(images: list[KarpathyImage]) -> ImageCaptionSet:
    return ImageCaptionSet(images=[im.path for im in images], captions=[im.captions for im in images])


def split_train_test(images: list[KarpathyImage], source: str) -> tuple[ImageCaptionSet, ImageCaptionSet]:
    """Karpathy entries -> (train = "train" + "restval", test = "test"); both must be non-empty."""
    train = [im for im in images if im.split in TRAIN_SPLITS]
    test = [im for im in images if im.split in TEST_SPLITS]
    for role, items, splits in (("training", train, TRAIN_SPLITS), ("test", test, TEST_SPLITS)):
        if not items:
            raise LPIError(f"{source} has no {role} images (no entry with split "
                           f"{' or '.join(map(repr, splits))}): is it the full Karpathy file?")
    return make_set(train), make_set(test)


def load_karpathy(json_path: str, image_path_of: Callable[[dict], str]) -> tuple[ImageCaptionSet, ImageCaptionSet]:
    """A Karpathy split file -> (train, test) ImageCaptionSets with image file paths."""
    return split_train_test(read_karpathy(json_path, image_path_of), json_path)


def check_image_dirs(sets: list[ImageCaptionSet], task: str) -> None:
    """Fail early if an image folder is missing: otherwise every image would be skipped as
    unreadable and the run would train on nothing. Single missing files are tolerated
    (ImageFileDataset flags them)."""
    dirs = {os.path.dirname(p) for s in sets for p in s.images}
    missing = sorted(d for d in dirs if not os.path.isdir(d))
    if missing:
        raise LPIError(f"task {task!r}: image folder not found: {', '.join(missing)}\n"
                       f"Expected this layout under --data-root:\n{DATA_LAYOUT}")


# ----------------------------------------------------------------------------------------
# COCO and Flickr30K as single tasks (e.g. --tasks coco,flickr: COCO, then Flickr30K)
# ----------------------------------------------------------------------------------------


def coco_image_path(root: str) -> Callable[[dict], str]:
    return lambda entry: os.path.join(root, "coco", entry["filepath"], entry["filename"])


def flickr_image_path(root: str) -> Callable[[dict], str]:
    return lambda entry: os.path.join(root, FLICKR_IMAGE_DIR, entry["filename"])


def coco_task(root: str) -> Task:
    """COCO (Karpathy split) as one task named "coco"."""
    train, test = load_karpathy(os.path.join(root, COCO_KARPATHY_JSON), coco_image_path(root))
    check_image_dirs([train, test], "coco")
    return Task("coco", train, test, label="common objects in context")  # what "COCO" stands for


def flickr_task(root: str) -> Task:
    """Flickr30K (Karpathy split) as one task named "flickr"."""
    train, test = load_karpathy(os.path.join(root, FLICKR_KARPATHY_JSON), flickr_image_path(root))
    check_image_dirs([train, test], "flickr")
    return Task("flickr", train, test, label="people in everyday scenes")  # what Flickr30K pictures


# ----------------------------------------------------------------------------------------
# COCO split by super-category: the paper's 12 tasks
#
# COCO's 80 object categories fall into 12 super-categories. The authors number them
# from a preprocessed file we do not have; we number them 1..12 in the order they first
# appear in COCO's own category list (sorted by category id) [ours], which gives
#   1 person, 2 vehicle, 3 outdoor, 4 animal, 5 accessory, 6 sports, 7 kitchen, 8 food,
#   9 furniture, 10 electronic, 11 appliance, 12 indoor.
# An image belongs to the super-category that covers most of its annotated instance
# area [ours]:
#     s*(image) = argmax_s  Σ_{annotations a of the image, supercat(a) = s}  area(a)
# ties going to the lower number; images without any annotation are dropped. Crowd
# annotations count like the others: they are annotated area too.
# ----------------------------------------------------------------------------------------

# The authors' task order, as super-category numbers (METHOD.md §7): appliance, sports,
# outdoor, electronic, accessory, indoor, kitchen, furniture, vehicle, food, animal, person.
COCO_TASK_ORDER = (11, 6, 3, 10, 5, 12, 7, 9, 2, 8, 4, 1)


def number_supercategories(categories: list[dict]) -> tuple[list[str], dict[int, int]]:
    """COCO's "categories" -> (names, number_of_category): names[s - 1] is super-category s,
    numbered 1.. by first appearance in the list sorted by category id."""
    numbers: dict[str, int] = {}
    number_of_category = {}
    for cat in sorted(categories, key=lambda c: c["id"]):
        number_of_category[cat["id"]] = numbers.setdefault(cat["supercategory"], len(numbers) + 1)
    return list(numbers), number_of_category   # dicts keep insertion order = numbering


def dominant_supercategory(area: dict[int, float]) -> int:
    """The super-category number with the largest summed area; ties -> the lower number."""
    return max(area, key=lambda s: (area[s], -s))


def read_instance_areas(paths: list[str]) -> tuple[list[str], dict[int, dict[int, float]]]:
    """COCO instance files -> (super-category names, {image id: {super-category: summed area}}).

    The train2014 and val2014 files are merged: Karpathy's splits mix images of both.
    """
    hint = ("The COCO 2014 instance annotations are needed only for the coco:supercategory tasks "
            "(get annotations_trainval2014.zip from cocodataset.org). Expected:\n" + DATA_LAYOUT)
    categories: dict[int, dict] = {}
    annotations = []
    for path in paths:
        data = read_json(path, missing_hint=hint)
        if not isinstance(data, dict) or not {"categories", "annotations"} <= data.keys():
            raise LPIError(f"{path} is not a COCO instances file: expected a JSON object with "
                           f"'categories' and 'annotations' lists")
        try:
            for cat in data["categories"]:
                old = categories.setdefault(cat["id"], cat)
                if (old["name"], old["supercategory"]) != (cat["name"], cat["supercategory"]):
                    raise LPIError(f"{path}: category {cat['id']} is defined twice, differently: "
                                   f"{old['name']}/{old['supercategory']} vs {cat['name']}/{cat['supercategory']}")
            annotations += [(a["image_id"], a["category_id"], float(a["area"])) for a in data["annotations"]]
        except (KeyError, TypeError) as e:
            raise LPIError(f"{path} is malformed ({type(e).__name__}: {e}): each category needs "
                           f"'id', 'name', 'supercategory'; each annotation 'image_id', 'category_id', 'area'") from None
        del data  # the train2014 file is over 300 MB of JSON: free it before reading the next

    names, number_of_category = number_supercategories(list(categories.values()))
    area: dict[int, dict[int, float]] = defaultdict(lambda: defaultdict(float))
    for image_id, category_id, a in annotations:
        if category_id not in number_of_category:
            raise LPIError(f"an annotation of image {image_id} has category {category_id}, "
                           f"which is not in the instance files' 'categories'")
        area[image_id][number_of_category[category_id]] += a
    return names, {image_id: dict(by_super) for image_id, by_super in area.items()}


@dataclass
class SupercategorySplit:
    """The 12 COCO super-category tasks, and what the split did."""
    tasks: list[Task]            # in COCO_TASK_ORDER
    names: list[str]             # names[s - 1] = super-category number s
    dropped: dict[str, int]      # Karpathy images without annotated instances, per role ("train", "test")

    def summary(self) -> str:
        lines = [f"coco:supercategory: {len(self.tasks)} tasks; dropped images without annotated "
                 f"instances: {self.dropped['train']} train, {self.dropped['test']} test"]
        for k, (task, number) in enumerate(zip(self.tasks, COCO_TASK_ORDER), 1):
            lines.append(f"  task {k:2d}  {task.name:<17} (super-category {number:2d})  "
                         f"train {len(task.train):6d}  test {len(task.test):5d}")
        return "\n".join(lines)


def split_coco_by_supercategory(root: str) -> SupercategorySplit:
    """Karpathy's COCO split, each image given to its dominant super-category (see above)."""
    json_path = os.path.join(root, COCO_KARPATHY_JSON)
    images = read_karpathy(json_path, coco_image_path(root))
    names, area = read_instance_areas([os.path.join(root, p) for p in COCO_INSTANCE_JSONS])
    if len(names) != len(COCO_TASK_ORDER):
        raise LPIError(f"the COCO instance files list {len(names)} super-categories ({', '.join(names)}); "
                       f"the 12-task protocol expects COCO 2014's {len(COCO_TASK_ORDER)}")

    groups = {(s, role): [] for s in COCO_TASK_ORDER for role in ("train", "test")}
    dropped = Counter(train=0, test=0)
    for im in images:
        role = "train" if im.split in TRAIN_SPLITS else "test" if im.split in TEST_SPLITS else None
        if role is None:
            continue  # Karpathy's "val" split is not used
        if im.cocoid is None:
            raise LPIError(f"{json_path}: the entry of {im.path} has no 'cocoid', which links it to the "
                           f"COCO instance annotations: use Karpathy's dataset_coco.json")
        if im.cocoid not in area:  # no annotation at all (or an image absent from the instance files)
            dropped[role] += 1
            continue
        groups[dominant_supercategory(area[im.cocoid]), role].append(im)

    tasks = []
    for s in COCO_TASK_ORDER:
        name = f"coco:{names[s - 1]}"
        for role in ("train", "test"):
            if not groups[s, role]:
                raise LPIError(f"task {name} has no {role} images after the super-category split of {json_path}")
        tasks.append(Task(name, make_set(groups[s, "train"]), make_set(groups[s, "test"]), label=names[s - 1]))
    check_image_dirs([t.train for t in tasks] + [t.test for t in tasks], "coco:supercategory")
    return SupercategorySplit(tasks, names, dict(dropped))


def coco_supercategory_tasks(root: str, verbose: bool = True) -> list[Task]:
    """The paper's 12 COCO tasks, in the authors' order; prints the split's summary."""
    split = split_coco_by_supercategory(root)
    if verbose:
        print(split.summary())
    return split.tasks


# ----------------------------------------------------------------------------------------
# Subsampling (--max-train-per-task / --max-test-per-task)
# ----------------------------------------------------------------------------------------


def subsample(data: ImageCaptionSet, n: int | None, seed: int = 0) -> ImageCaptionSet:
    """n images drawn without replacement (all their captions kept), in their original order.

    Deterministic: depends only on (len(data), n, seed), never on the global RNG.
    n = None or n >= len(data) returns data unchanged.
    """
    if n is None or n >= len(data):
        return data
    keep = sorted(random.Random(seed).sample(range(len(data)), n))
    return ImageCaptionSet(images=[data.images[i] for i in keep], captions=[data.captions[i] for i in keep])


def subsample_task(task: Task, max_train: int | None, max_test: int | None, seed: int = 0) -> Task:
    return Task(task.name, subsample(task.train, max_train, seed), subsample(task.test, max_test, seed), task.label)


# ----------------------------------------------------------------------------------------
# Loading images from files
#
# A big image collection nearly always has a few unreadable files (a broken download, a
# truncated JPEG). One of them must not kill a run of hours, and must not pass silently
# either. So __getitem__ never raises on a bad image: it returns ok = False and a zero
# tensor of the right shape, and the *caller* drops those items and counts them. The
# count has to live in the caller: with DataLoader(num_workers > 0) every worker is a
# separate process holding its own copy of the dataset, so a counter kept in the dataset
# would never reach the main process.
# ----------------------------------------------------------------------------------------

# What a bad image file raises in PIL: OSError for missing / truncated / unidentified files
# (UnidentifiedImageError is an OSError), SyntaxError from some format plugins, and
# DecompressionBombError for absurdly large images. Errors inside `preprocess` are bugs,
# not bad files, and are not caught.
UNREADABLE_IMAGE_ERRORS = (OSError, SyntaxError, Image.DecompressionBombError)


class ImageFileDataset(Dataset):
    """The images of an ImageCaptionSet (file paths), read with PIL: item k is
    (preprocess(image k), k, ok). A missing or undecodable file gives a zero tensor of the
    same shape and ok = False; the default collate_fn batches ok into a bool tensor."""

    def __init__(self, data: ImageCaptionSet, preprocess: Callable):
        self.data, self.preprocess = data, preprocess
        self._blank = None  # zero tensor standing in for an unreadable image, made on first need

    def __len__(self) -> int:
        return len(self.data)

    def __getitem__(self, k: int) -> tuple[torch.Tensor, int, bool]:
        try:
            with Image.open(self.data.images[k]) as img:
                img = img.convert("RGB")  # forces the full decode, so truncated files fail here
        except UNREADABLE_IMAGE_ERRORS:
            if self._blank is None:
                # preprocess resizes and crops to a fixed size, so any blank image gives the shape
                self._blank = torch.zeros_like(self.preprocess(Image.new("RGB", (64, 64))))
            return self._blank, k, False
        return self.preprocess(img), k, True


# ----------------------------------------------------------------------------------------
# --tasks: a comma-separated list of task names, in training order
# ----------------------------------------------------------------------------------------

REAL_TASK_NAMES = ("coco", "flickr", "coco:supercategory")


def _require_data_root(data_root: str | None, task: str) -> str:
    if data_root is None:
        raise LPIError(f"task {task!r} reads real data: pass --data-root DIR, with this layout:\n{DATA_LAYOUT}")
    if not os.path.isdir(data_root):
        raise LPIError(f"--data-root {data_root} is not a directory (needed by task {task!r}); "
                       f"expected this layout:\n{DATA_LAYOUT}")
    return data_root


def parse_task_specs(spec: str, data_root: str | None,
                     builtin: dict[str, Callable[[], Task]]) -> list[Task]:
    """"coco,flickr" -> [Task("coco"), Task("flickr")]; "coco:supercategory" expands to the 12
    COCO tasks; a key of `builtin` is built by calling builtin[key](). All names are checked
    before anything is loaded."""
    names = [s.strip() for s in spec.split(",") if s.strip()]
    valid = list(REAL_TASK_NAMES) + [k for k in builtin if k not in REAL_TASK_NAMES]
    if not names:
        raise LPIError(f"--tasks is empty; valid task names: {', '.join(valid)}")
    for name in names:
        if name not in valid:
            raise LPIError(f"unknown task {name!r} in --tasks {spec!r}; valid task names: {', '.join(valid)}")

    tasks: list[Task] = []
    for name in names:
        if name == "coco":
            tasks.append(coco_task(_require_data_root(data_root, name)))
        elif name == "flickr":
            tasks.append(flickr_task(_require_data_root(data_root, name)))
        elif name == "coco:supercategory":
            tasks += coco_supercategory_tasks(_require_data_root(data_root, name))
        else:
            tasks.append(builtin[name]())
    seen = Counter(t.name for t in tasks)
    repeated = [n for n, count in seen.items() if count > 1]
    if repeated:
        raise LPIError(f"--tasks {spec!r} gives task(s) {', '.join(repeated)} more than once; "
                       f"each task must appear once (results are kept per task name)")
    return tasks


# ========================================================================================
# Command line
# ========================================================================================

# Defaults for the two scales. A released CLIP gets the paper's settings (METHOD.md §7); the
# tiny CLIP on the built-in data gets settings that fit in a few CPU minutes.
PAPER_DEFAULTS = dict(J=9, M=16, epochs=10, batch_size=64)
TINY_DEFAULTS = dict(J=4, M=4, epochs=8, batch_size=64)

# Each trained method's optimiser and learning rate, chosen by one tuning protocol for all
# (benchmarks/tune.py: the same grid, scored on a validation split held out from the first
# task's training data; the grid's scores are in benchmarks/results/tuning.md). "lr" holds
# the best lr of each optimiser, so that --optimizer alone picks that optimiser's best.
# The protocol ran on the built-in world; on real data run the grid again if you can.
TUNED = {
    "lpi": {"optimizer": "adam", "lr": {"sgd": 4.0, "adam": 0.3}},
    "seqft": {"optimizer": "adam", "lr": {"sgd": 4.0, "adam": 0.3}},      # on one task: LPI's runs
    "joint": {"optimizer": "adam", "lr": {"sgd": 4.0, "adam": 0.3}},      # on one task: LPI's runs
    "sprompts": {"optimizer": "adam", "lr": {"sgd": 1.0, "adam": 0.1}},
    "l2p": {"optimizer": "adam", "lr": {"sgd": 0.05, "adam": 0.03}},
    "zeroshot": {"optimizer": "sgd", "lr": {"sgd": 0.05, "adam": 0.01}},  # trains nothing
}


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="lpi.py", formatter_class=argparse.ArgumentDefaultsHelpFormatter,
        description="LPI (Low-rank Prompt Interaction) for continual image-text retrieval. With no "
                    "arguments: the whole method on the built-in tasks with a tiny CLIP, on the CPU.")
    data_arguments(p.add_argument_group("data and backbone"))
    method_arguments(p.add_argument_group("method (METHOD.md §1-6); each component has one switch"))
    run_arguments(p.add_argument_group("training and run"))
    return p


def data_arguments(g) -> None:
    g.add_argument("--tasks", default=",".join(BUILTIN_TASKS),
                   help="comma-separated tasks in training order: built-in names "
                        f"({', '.join(BUILTIN_TASKS)}), coco, flickr, coco:supercategory (the paper's 12 tasks)")
    g.add_argument("--data-root", default=None, help="folder with coco/ and flickr30k/ in the Karpathy layout")
    g.add_argument("--clip", default="tiny", help="tiny (the built-in world's, shipped), ViT-B/16, ViT-B/32, "
                   "ViT-L/14 (OpenAI's weights, downloaded once), the path of a CLIP checkpoint, or random:NAME "
                   "(NAME's architecture with random weights, for smoke tests and timings)")
    g.add_argument("--cache-dir", default=os.environ.get("LPI_CACHE", str(Path.home() / ".cache" / "lpi")),
                   help="where the tiny CLIP is cached (env LPI_CACHE)")
    g.add_argument("--pretrain-steps", type=int, default=world.PRETRAIN_DEFAULTS["steps"],
                   help="steps of contrastive pre-training of the tiny CLIP")
    g.add_argument("--export-tiny-clip", metavar="PATH", default=None,
                   help="pre-train the tiny CLIP with --pretrain-steps (or take it from the cache), write it "
                        "to PATH in the shipped format (tiny_clip.pt.xz), and exit")
    g.add_argument("--max-train-per-task", type=int, default=None,
                   help=f"subsample each task's training images (built-in: {world.TASK_SIZES['n_train']} generated)")
    g.add_argument("--max-test-per-task", type=int, default=None,
                   help=f"subsample each task's test images (built-in: {world.TASK_SIZES['n_test']} generated)")


def method_arguments(g) -> None:
    g.add_argument("--method", default="lpi", choices=list(METHODS), help="; ".join(f"{k}: {v}" for k, v in METHODS.items()))
    g.add_argument("--depth", "-J", dest="J", type=int, default=None,
                   help=f"prompt depth J (default {PAPER_DEFAULTS['J']}; {TINY_DEFAULTS['J']} with --clip tiny)")
    g.add_argument("--length", "-M", dest="M", type=int, default=None,
                   help=f"prompt length M (default {PAPER_DEFAULTS['M']}; {TINY_DEFAULTS['M']} with --clip tiny)")
    g.add_argument("--deep-prompts", default=LPIConfig.deep_prompts, choices=list(clip_model.Transformer.DEEP_MODES),
                   help="§1 layers j >= 1: add P[j] to the hidden states at the prompt positions (ours), or "
                        "replace them (VPT-deep / MaPLe)")
    g.add_argument("--rank", "-R", dest="R", type=int, default=LPIConfig.R, help="CP rank R of the prompts")
    g.add_argument("--full-rank", action="store_true", help="§2 off: full-rank (J, M, D) prompts per task")
    g.add_argument("--no-interaction", action="store_true", help="§3 off: no cross-modal correlation modules")
    g.add_argument("--alpha", type=float, default=LPIConfig.alpha, help="§3 mixing weight α")
    g.add_argument("--interaction-rank", type=int, default=LPIConfig.interaction_rank, help="§3 CP rank R' of the maps")
    g.add_argument("--no-interaction-ln", action="store_true", help="§3 without the LayerNorm")
    g.add_argument("--interaction-gain", type=float, default=None,
                   help="§3 the LayerNorms' gain at init (default: the raw prompts' std at init, ours; 1 is the "
                        "authors' LayerNorm)")
    g.add_argument("--no-hier-prompt", action="store_true", help="§4 off: prompt-level contrastive loss")
    g.add_argument("--hier-factor", action="store_true",
                   help="§4 add our factor-level contrastive loss (off: it did not help on the validation split)")
    g.add_argument("--tau-h", type=float, default=LPIConfig.tau_h, help="§4 temperature")
    g.add_argument("--hier-unscaled", action="store_true",
                   help="§4 weight λ_h as the authors, instead of λ_h·τ_h (ours: a gradient that does not grow as 1/τ_h)")
    g.add_argument("--lambda-h", type=float, default=LPIConfig.lambda_h, help="§4 loss weight")
    g.add_argument("--no-task-loss", action="store_true", help="§5 off: task contrastive constraint")
    g.add_argument("--task-similarity", default=LPIConfig.task_similarity, choices=["names", "centroids"],
                   help="§5 how related two tasks are: CLIP text embeddings of the task names (as the authors), "
                        "or frozen-CLIP centroids of each task's images and captions, computed online")
    g.add_argument("--theta", type=float, default=LPIConfig.theta,
                   help="§5 threshold θ on the range-normalised task similarity: above it, two tasks are related")
    g.add_argument("--tau-task", type=float, default=LPIConfig.tau_task, help="§5 temperature")
    g.add_argument("--lambda-task", type=float, default=LPIConfig.lambda_task, help="§5 loss weight")
    g.add_argument("--routing", default="kmeans", choices=["kmeans", "oracle"],
                   help="§6 task identity at test time: nearest k-means key, or the true task")
    g.add_argument("--keys", type=int, default=5, help="§6 k-means keys per task and modality")
    g.add_argument("--route-metric", default="cosine", choices=list(ROUTE_METRICS),
                   help="§6 cosine: spherical k-means, route by largest cosine (ours); l1: Euclidean k-means, "
                        "route by smallest L1 distance (the authors')")


def run_arguments(g) -> None:
    g.add_argument("--epochs", type=int, default=None,
                   help=f"epochs per task (default {PAPER_DEFAULTS['epochs']}; {TINY_DEFAULTS['epochs']} with --clip tiny)")
    g.add_argument("--batch-size", type=int, default=None,
                   help=f"default {PAPER_DEFAULTS['batch_size']}; {TINY_DEFAULTS['batch_size']} with --clip tiny")
    g.add_argument("--optimizer", default=None, choices=list(OPTIMIZERS),
                   help="of the per-task parameters: sgd (momentum 0.9, the authors') or adam; default: the "
                        "method's choice by the tuning protocol (TUNED in lpi.py)")
    g.add_argument("--lr", type=float, default=None,
                   help="learning rate; default: the method's best for the optimiser in the tuning protocol")
    g.add_argument("--weight-decay", type=float, default=2e-4, help="weight decay")
    g.add_argument("--augment", default="auto", choices=["auto", "on", "off"],
                   help="RandomResizedCrop + horizontal flip of training images, as the authors; auto: on for "
                        "real data, off for the built-in tasks (their captions name positions)")
    g.add_argument("--pairs", default="per-caption", choices=["per-caption", "per-image"],
                   help="an epoch visits every caption once (the authors'), or every image once with one "
                        "random caption (no two captions of an image in a batch)")
    g.add_argument("--seed", type=int, default=0, help="seed of initialisation, order and subsampling")
    g.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda", "mps"])
    g.add_argument("--precision", default="auto", choices=["auto", *PRECISIONS],
                   help="autocast dtype of the frozen encoders (prompts and losses stay fp32); auto: bf16 on a "
                        "CUDA device that supports it, else fp32")
    g.add_argument("--workers", type=int, default=2,
                   help="processes that load images of file data sets (or draw the tiny CLIP's pre-training batches)")
    g.add_argument("--out", default="runs/default",
                   help="output folder: results.json, recall_r1.png, retrievals.png (built-in tasks), checkpoints/")
    g.add_argument("--resume", action="store_true", help="continue the run in --out after its last finished task")
    g.add_argument("--no-progress", dest="progress", action="store_false", help="no progress bars")


def check_args(args: argparse.Namespace) -> None:
    """Out-of-range flags -> one clear message (argparse already rejects wrong types)."""
    rules = [("J", args.J is None or args.J >= 0, ">= 0"), ("M", args.M is None or args.M >= 0, ">= 0"),
             ("R", args.R >= 1, ">= 1"), ("alpha", 0 <= args.alpha <= 1, "in [0, 1]"),
             ("interaction_rank", args.interaction_rank >= 1, ">= 1"),
             ("tau_h", args.tau_h > 0, "> 0"), ("tau_task", args.tau_task > 0, "> 0"),
             ("lambda_h", args.lambda_h >= 0, ">= 0"), ("lambda_task", args.lambda_task >= 0, ">= 0"),
             ("theta", -1 <= args.theta <= 1, "in [-1, 1]"), ("keys", args.keys >= 1, ">= 1"),
             ("epochs", args.epochs is None or args.epochs >= 1, ">= 1"),
             ("batch_size", args.batch_size is None or args.batch_size >= 2, ">= 2 (a contrastive batch needs negatives)"),
             ("lr", args.lr is None or args.lr > 0, "> 0"), ("weight_decay", args.weight_decay >= 0, ">= 0"),
             ("workers", args.workers >= 0, ">= 0"), ("pretrain_steps", args.pretrain_steps >= 1, ">= 1"),
             ("max_train_per_task", args.max_train_per_task is None or args.max_train_per_task >= 2, ">= 2"),
             ("max_test_per_task", args.max_test_per_task is None or args.max_test_per_task >= 1, ">= 1")]
    for name, ok, expected in rules:
        if not ok:
            flag = "--" + {"J": "depth", "M": "length", "R": "rank"}.get(name, name.replace("_", "-"))
            raise LPIError(f"{flag}={getattr(args, name)} is out of range: expected {expected}")


def pick_device(name: str) -> torch.device:
    if name == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda")
        if getattr(torch.backends, "mps", None) and torch.backends.mps.is_available():
            return torch.device("mps")
        return torch.device("cpu")
    available = {"cpu": True, "cuda": torch.cuda.is_available(),
                 "mps": bool(getattr(torch.backends, "mps", None) and torch.backends.mps.is_available())}
    if not available[name]:
        raise LPIError(f"--device {name} is not available on this machine (expected one of: "
                       f"{', '.join(k for k, v in available.items() if v)}, or auto)")
    return torch.device(name)


def load_backbone(args: argparse.Namespace, device: torch.device):
    """-> (CLIP, preprocess, is_tiny). random:NAME is NAME's architecture with random weights
    (seeded by --seed): for smoke tests and timings where no checkpoint can be downloaded."""
    if args.clip.startswith("random:"):
        name = args.clip.partition(":")[2]
        if name not in clip_model.ARCHITECTURES:
            raise LPIError(f"--clip {args.clip}: unknown architecture; expected random: followed by one of "
                           f"{', '.join(clip_model.ARCHITECTURES)}")
        torch.manual_seed(args.seed)
        cfg = clip_model.ARCHITECTURES[name]
        model = clip_model.CLIP(cfg).requires_grad_(False).eval()
        return model.to(device), clip_model.preprocess_for(cfg.image_resolution), False
    if args.clip == "tiny":
        model = world.load_or_build_tiny_clip(args.cache_dir, steps=args.pretrain_steps, progress=args.progress,
                                              device=device, workers=args.workers)
        return model.to(device), clip_model.preprocess_for(model.visual.input_resolution), True
    model, preprocess = clip_model.load(args.clip, device=device)
    return model, preprocess, False


def export_tiny_clip(args: argparse.Namespace, device: torch.device) -> int:
    model = world.load_or_build_tiny_clip(args.cache_dir, steps=args.pretrain_steps, progress=args.progress,
                                          device=device, workers=args.workers)
    world.write_tiny_clip(model, world.settings_key(args.pretrain_steps)[1], Path(args.export_tiny_clip))
    print(f"wrote {args.export_tiny_clip} ({Path(args.export_tiny_clip).stat().st_size / 1e6:.1f} MB)")
    return 0


def fill_defaults(args: argparse.Namespace, tiny: bool) -> None:
    """Flags left unset take the scale's defaults and the method's tuned optimiser and lr."""
    for k, v in (TINY_DEFAULTS if tiny else PAPER_DEFAULTS).items():
        if getattr(args, k) is None:
            setattr(args, k, v)
    tuned = TUNED[args.method]
    args.optimizer = args.optimizer or tuned["optimizer"]
    args.lr = args.lr if args.lr is not None else tuned["lr"][args.optimizer]


def run_settings(args: argparse.Namespace, device: torch.device, preprocess, d: Dist, builtin: bool) -> RunSettings:
    return RunSettings(device=device, preprocess=preprocess, batch_size=args.batch_size, epochs=args.epochs,
                       lr=args.lr, weight_decay=args.weight_decay, seed=args.seed, optimizer=args.optimizer,
                       workers=args.workers,
                       keys_k=args.keys, routing=args.routing, route_metric=args.route_metric,
                       augment=args.augment == "on" or (args.augment == "auto" and not builtin),
                       per_caption=args.pairs == "per-caption", progress=args.progress and d.main, dist=d,
                       precision=default_precision(device) if args.precision == "auto" else args.precision,
                       joint=args.method == "joint")


def run(args: argparse.Namespace, d: Dist, device: torch.device) -> int:
    """Backbone, tasks, method, the continual loop, the report."""
    out = Path(args.out)
    if not args.resume and latest_checkpoint(out) is not None:  # before any expensive work
        raise LPIError(f"{out} already holds a run; pass --resume to continue it, or choose another --out")
    clip, preprocess, tiny = load_backbone(args, device)
    fill_defaults(args, tiny)
    sizes = dict(n_train=args.max_train_per_task, n_test=args.max_test_per_task)
    tasks = parse_task_specs(args.tasks, args.data_root, {n: partial(BUILTIN_TASKS[n], **sizes) for n in BUILTIN_TASKS})
    tasks = [subsample_task(t, args.max_train_per_task, args.max_test_per_task, args.seed) for t in tasks]
    builtin = all(isinstance(t.train.images, torch.Tensor) for t in tasks)
    config = dict(vars(args), processes=d.world)  # the global batch is processes x batch_size
    with run_lock(out) if d.main else nullcontext():
        results = run_continual(make_method(args, clip), tasks, run_settings(args, device, preprocess, d, builtin),
                                out, config, resume=args.resume)
        if not d.main:
            return 0
        plot_recall(results, out / "recall_r1.png")
    print(format_table(results))
    pictures = "recall_r1.png, " + ("retrievals.png, " if (out / "retrievals.png").is_file() else "")
    print(f"wrote results.json, {pictures}checkpoints/ to {out}")
    return 0


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        check_args(args)
        d, device = init_distributed(pick_device(args.device))
        return export_tiny_clip(args, device) if args.export_tiny_clip else run(args, d, device)
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
    finally:
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            torch.distributed.destroy_process_group()


if __name__ == "__main__":
    sys.exit(main())
