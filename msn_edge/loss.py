"""Sub-cluster AdaCos (spec §3), the classification loss MSN learns its embedding with, and
AdaProj, its subspace variant.

Each class owns `sub_clusters` unit weight vectors; a clip's class probability is the sum
of the softmax outputs of that class's sub-clusters, and the loss is the cross-entropy
against soft targets (mixup, label smoothing). The logit scale is not learnt: it starts
at sqrt(2)·ln(C·K − 1) and is re-set on every training batch by the AdaCos rule

    s = ln(B_avg) / cos(min(π/4, median θ_target)),

computed without gradient. Our reading for soft targets (the spec leaves it open):
- B_avg: per clip, the sum of exp(s·cos θ_j) over all sub-clusters j, each weighted by
  1 − (target probability of j's class); averaged over the batch. With one-hot targets
  this is exactly AdaCos' non-target sum; with smoothed or mixed targets a class counts
  as non-target to the degree the target does not claim it.
- θ_target: per clip, the target-weighted angle to each class's nearest sub-cluster
  (that sub-cluster dominates the class probability). The median is over the batch.
Under DistributedDataParallel every rank's new scale is averaged, so all ranks agree.

With a single class the class probability is identically 1: the loss is 0 and its
gradient is 0 whatever the network does. That is why training adds auxiliary classes
when a data set has fewer than two (msn_edge.auxiliary).

AdaProj (Wilkinghoff, "AdaProj: adaptively scaled angular margin subspace projections for
anomalous sound detection with auxiliary classification tasks", 2024) gives each class a
K-dimensional subspace instead of K points: a clip's similarity to a class is the cosine
between its embedding and the embedding's projection onto that subspace. Clips of a class
may then spread inside the subspace at no cost, so the embedding keeps within-class
detail that the scoring needs instead of collapsing each class to a point (issue 9;
benchmarks/results-ablation.md). Same softmax, soft targets and AdaCos scale rule.
"""

from __future__ import annotations

import math

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

MAX_TARGET_ANGLE = math.pi / 4  # AdaCos caps the median angle so the scale stays finite
MIN_SCALE_LOGITS = 2.0  # guards ln(C·K − 1) for C·K ≤ 2 (one logit: no softmax to scale)
_COS_EPS = 1e-6  # keeps acos away from ±1, where its gradient is infinite


def initial_scale(n_classes: int, sub_clusters: int) -> float:
    """sqrt(2)·ln(C·K − 1), the AdaCos fixed point for uniformly spread weights."""
    return math.sqrt(2.0) * math.log(max(n_classes * sub_clusters - 1, MIN_SCALE_LOGITS))


class SubClusterAdaCos(nn.Module):
    """Cosine classifier with K sub-clusters per class and the adaptive AdaCos scale."""

    def __init__(self, embedding_dim: int, n_classes: int, sub_clusters: int):
        super().__init__()
        if n_classes < 1 or sub_clusters < 1:
            raise ValueError(
                f"need at least one class and sub-cluster, got {n_classes}, {sub_clusters}"
            )
        self.n_classes = n_classes
        self.sub_clusters = sub_clusters
        self.per_class = sub_clusters  # similarities per class that `cosines` returns
        self.weight = nn.Parameter(torch.empty(n_classes * sub_clusters, embedding_dim))
        nn.init.xavier_uniform_(self.weight)
        # A buffer: saved in the state dict, broadcast by DDP, never touched by Adam.
        self.register_buffer("scale", torch.tensor(initial_scale(n_classes, sub_clusters)))

    def cosines(self, emb: torch.Tensor) -> torch.Tensor:
        """cos θ between each embedding and each sub-cluster: (B, C·K), class-major."""
        return F.normalize(emb.float(), dim=1) @ F.normalize(self.weight, dim=1).T

    def log_probs(self, cos: torch.Tensor) -> torch.Tensor:
        """log P(class) = log of the summed softmax outputs of its sub-clusters: (B, C)."""
        logits = self.scale * cos
        per_class = logits.view(-1, self.n_classes, self.per_class).logsumexp(dim=2)
        return per_class - logits.logsumexp(dim=1, keepdim=True)

    def forward(self, emb: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        """Mean cross-entropy of raw embeddings (B, D) against soft targets (B, C)."""
        cos = self.cosines(emb)
        if self.training:
            self.update_scale(cos.detach(), target)
        return -(target * self.log_probs(cos)).sum(dim=1).mean()

    @torch.no_grad()
    def update_scale(self, cos: torch.Tensor, target: torch.Tensor) -> None:
        """The AdaCos rule on this batch (see the module docstring for soft targets)."""
        k = self.per_class
        non_target = (1.0 - target).clamp_min(0).repeat_interleave(k, dim=1)  # (B, C·K)
        # ln B_i = logsumexp_j(s·cos_ij + ln w_ij): exact for any s, no overflow.
        log_b = (self.scale * cos + non_target.log()).logsumexp(dim=1)  # (B,)
        log_b_avg = log_b.logsumexp(dim=0) - math.log(len(log_b))
        theta = cos.clamp(-1 + _COS_EPS, 1 - _COS_EPS).acos().view(-1, self.n_classes, k)
        theta_target = (target * theta.amin(dim=2)).sum(dim=1)  # (B,)
        theta_med = theta_target.median().clamp(max=MAX_TARGET_ANGLE)
        new = log_b_avg / theta_med.cos()
        if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
            dist.all_reduce(new)
            new /= dist.get_world_size()
        # ln B_avg ≤ 0 when no class is left to push away (one class): keep the scale.
        if torch.isfinite(new) and new > 0:
            self.scale.copy_(new)


class AdaProj(SubClusterAdaCos):
    """Cosine classifier with a `subspace_dim`-dimensional subspace per class (AdaProj).

    The weight holds each class's spanning vectors, orthonormalised on every call (QR), so
    Adam moves them freely. `cosines` returns one similarity per class: (B, C).
    """

    def __init__(self, embedding_dim: int, n_classes: int, subspace_dim: int):
        if subspace_dim > embedding_dim:
            raise ValueError(
                f"a class subspace of {subspace_dim} dimensions does not fit a "
                f"{embedding_dim}-d embedding"
            )
        super().__init__(embedding_dim, n_classes, subspace_dim)
        self.per_class = 1
        self.scale.fill_(initial_scale(n_classes, 1))

    def cosines(self, emb: torch.Tensor) -> torch.Tensor:
        x = F.normalize(emb.float(), dim=1)
        spans = self.weight.view(self.n_classes, self.sub_clusters, -1).transpose(1, 2)
        basis, _ = torch.linalg.qr(spans)  # (C, D, K), orthonormal columns
        coords = torch.einsum("bd,cdk->bck", x, basis)
        # |projection| of a unit vector; the epsilon keeps the gradient finite at 0.
        return (coords.square().sum(dim=2) + _COS_EPS**2).sqrt().clamp(max=1.0)


def loss_head(name: str, embedding_dim: int, n_classes: int, k: int) -> SubClusterAdaCos:
    """The classification head `TrainConfig.loss` names; k: sub-clusters or subspace size."""
    heads = {"sub-cluster-adacos": SubClusterAdaCos, "adaproj": AdaProj}  # config.LOSSES
    if name not in heads:
        raise ValueError(f"unknown loss {name!r}; choose one of {', '.join(heads)}")
    return heads[name](embedding_dim, n_classes, k)
