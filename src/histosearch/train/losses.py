"""The two self-supervised losses, as the papers write them."""

from __future__ import annotations

import torch
import torch.nn.functional as F


def contrastive_loss(
    f1: torch.Tensor, f2: torch.Tensor, dissimilar: torch.Tensor, margin: float = 1.0
) -> torch.Tensor:
    """Gildenblat & Klaiman eq. (1): (1 - y) d + y max(0, m - d), d the L2 distance of the
    two descriptors, y = 1 for a dissimilar pair; mean over the batch."""
    distance = torch.linalg.vector_norm(f1 - f2, dim=1)
    y = dissimilar.float()
    return ((1 - y) * distance + y * F.relu(margin - distance)).mean()


def byol_loss(prediction: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """BYOL's 2 - 2 cos(p, z), mean over the batch (the target carries no gradient)."""
    cosine = F.cosine_similarity(prediction, target.detach(), dim=1)
    return (2 - 2 * cosine).mean()


@torch.no_grad()
def ema_update(target: torch.nn.Module, online: torch.nn.Module, decay: float = 0.99) -> None:
    """target <- decay * target + (1 - decay) * online, parameter by parameter."""
    for t, o in zip(target.parameters(), online.parameters(), strict=True):
        t.mul_(decay).add_(o.detach(), alpha=1 - decay)
    for t, o in zip(target.buffers(), online.buffers(), strict=True):
        t.copy_(o)
