"""Networks trained here: a siamese embedding net and BYOL's online/target pair."""

from __future__ import annotations

import copy

import timm
import torch
import torch.nn.functional as F
from torch import nn

# A backbone named like this starts from the offline ImageNet EfficientNet-Lite0 weights.
IMAGENET_LITE0 = "efficientnet-lite0-imagenet"


def make_backbone(name: str) -> nn.Module:
    """A timm backbone giving pooled features (`num_features` wide), randomly initialised,
    or the offline ImageNet EfficientNet-Lite0 for `efficientnet-lite0-imagenet`."""
    if name == IMAGENET_LITE0:
        from histosearch.encoders import create_encoder

        model = create_encoder(IMAGENET_LITE0).model
        model.requires_grad_(True)
        return model
    return timm.create_model(name, pretrained=False, num_classes=0)


def _mlp(n_in: int, hidden: int, n_out: int) -> nn.Module:
    return nn.Sequential(
        nn.Linear(n_in, hidden),
        nn.BatchNorm1d(hidden),
        nn.ReLU(inplace=True),
        nn.Linear(hidden, n_out),
    )


class SiameseNet(nn.Module):
    """Backbone + a fully connected layer to `out_dim` (128 in the paper), L2-normalised."""

    def __init__(self, backbone: str, out_dim: int = 128) -> None:
        super().__init__()
        self.backbone = make_backbone(backbone)
        self.head = nn.Linear(self.backbone.num_features, out_dim)
        self.out_dim = out_dim

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.normalize(self.head(self.backbone(x)), dim=1)

    def embedding(self) -> nn.Module:
        """The module that embeds images for search: the whole net."""
        return self


class BYOLNet(nn.Module):
    """Online encoder + projector + predictor; the target (encoder + projector) follows the
    online one as an exponential moving average. Search uses the online encoder's pooling."""

    def __init__(self, backbone: str, projection: int = 512, hidden: int = 2048) -> None:
        super().__init__()
        self.backbone = make_backbone(backbone)
        self.projector = _mlp(self.backbone.num_features, hidden, projection)
        self.predictor = _mlp(projection, hidden, projection)
        self.target_backbone = copy.deepcopy(self.backbone).requires_grad_(False)
        self.target_projector = copy.deepcopy(self.projector).requires_grad_(False)
        self.out_dim = self.backbone.num_features

    def online(self, x: torch.Tensor) -> torch.Tensor:
        return self.predictor(self.projector(self.backbone(x)))

    @torch.no_grad()
    def target(self, x: torch.Tensor) -> torch.Tensor:
        return self.target_projector(self.target_backbone(x))

    def embedding(self) -> nn.Module:
        return self.backbone
