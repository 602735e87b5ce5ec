"""Baselines of lpi.py that are not settings of the LPI model: L2P and its prompt pool.

Zero-shot CLIP, seqft, S-Prompts and the joint upper bound are settings of lpi.LPI (see
lpi.method_config). L2P picks its prompts per input from a pool, so it is its own model, with
the interface the continual loop uses: add_task(), encode_image / encode_text(x, task_ids)
(task_ids None = frozen CLIP), losses(...)["total"], loss_weights(), tokenize(), prompted, cfg.

L2P (Wang et al., "Learning to Prompt for Continual Learning", CVPR 2022), on a dual encoder.
No task identity anywhere: each image picks its prompts from a shared pool by matching its
frozen CLIP feature (the query) against learnable keys.

  pool      P_1..P_N, each (J, M_p, D_v);  keys k_1..k_N in CLIP's embedding space (E)
  query     q(x) = frozen, un-prompted CLIP image feature (an extra frozen forward)
  select    K(x) = top-k_{i} γ(q(x), k_i),    γ = cosine similarity
  prompt    P(x) = [P_{s_1}; ...; P_{s_k}] concatenated along the token axis: (J, k·M_p, D_v)
  loss      L = L_clip(f(x; P(x)), g(c; P_t)) + λ · (1/B) Σ_b Σ_{i ∈ K(x_b)} (1 − γ(q(x_b), k_i))

Choices [ours], each a constant of L2PConfig:
- N = 10, k = 5, λ = 0.1: L2P's settings (pool size, top-k, pull_constraint_coeff of the
  authors' PyTorch port). Its key loss is −λ·Σ γ / B: the same gradient as ours.
- M_p = max(1, M // k): an image then gets k·M_p ≈ M prompt tokens per layer, as many as an
  LPI image; the pool spans the same J layers as the other methods (L2P itself prompts the
  input layer only).
- Selection is per image, at training and at test time. The port's "batch-wise" majority
  vote lets the other images of a test batch choose one's prompts: left out.
- No frequency penalty (diversified selection) on the pool: L2P's paper treats it as an
  optional extra, and it would add a switch that none of the other methods has.
- Keys ~ N(0, 1): directions uniform on the sphere (the port's U(0, 1) puts every key in one
  orthant, where cosines against any query are nearly equal). Prompts start at
  cfg.full_rank_std, the scale of full-rank prompts, so that L2P, S-Prompts and LPI start
  with prompts alike.
- Text: L2P has no text side. Captions get one shared full-rank (J, M, D_t) prompt set
  trained through all tasks, as in seqft. The whole pool, its keys and the text prompts stay
  trainable at every task, as in L2P: forgetting is left to the selection.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch
import torch.nn.functional as F
from torch import nn

import clip_model
from run_support import LPIError


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


class L2P(clip_model.FrozenCLIP):
    """A frozen CLIP, a visual prompt pool chosen per image, one shared textual prompt set.
    cfg: lpi.LPIConfig (J, M, deep_prompts and full_rank_std are read)."""
    prompted = True  # always: L2P without prompts is zero-shot CLIP

    def __init__(self, clip: clip_model.CLIP, cfg, l2p: L2PConfig | None = None):
        super().__init__(clip)
        self.cfg, self.l2p = cfg, l2p or L2PConfig()
        self.shared = True  # one set of parameters for all tasks: no routing
        depth = self.depth
        if not (1 <= cfg.J <= depth and cfg.M >= 1):
            raise LPIError(f"--method l2p needs prompts: 1 <= J <= {depth} (--depth, got {cfg.J}) and M >= 1 "
                           f"(--length, got {cfg.M})")
        if not 1 <= self.l2p.top_k <= self.l2p.pool_size:
            raise LPIError(f"L2P: top-k {self.l2p.top_k} must be in 1..{self.l2p.pool_size} (the pool size)")
        std = cfg.full_rank_std
        self.M_p = max(1, cfg.M // self.l2p.top_k)
        self.pool = PromptPool(self.l2p.pool_size, self.l2p.top_k, cfg.J, self.M_p, self.D_v,
                               clip.cfg.embed_dim, std)
        self.P_t = nn.Parameter(std * torch.randn(cfg.J, cfg.M, self.D_t))  # (J, M, D_t) shared text prompts

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
        out = {"clip": clip_model.clip_loss(gather(img), gather(self.encode_text(tokens, t)), self.clip.logit_scale),
               "key": key_matching_loss(cos)}
        out["total"] = out["clip"] + self.l2p.lambda_key * out["key"]
        return out

    def loss_weights(self) -> dict[str, float]:
        return {"clip": 1.0, "key": self.l2p.lambda_key}
