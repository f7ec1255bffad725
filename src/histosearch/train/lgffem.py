"""LGFFEM (Nunez-Fernandez et al.): a multi-scale backbone, the Local-Global Feature Fusion
Neck (BiFPN-style nodes with fast normalised fusion of Global and Local Feature Aggregators)
and a head of four GeM mini-heads whose L2-normalised vectors are concatenated.

Levels P1..P4 are the backbone's four stages, P1 the most detailed (stride 4), P4 the
coarsest (stride 32). Node names follow the paper: P3_1 and P2_1 are the top-down inner
nodes, P1_2..P4_2 the outer (terminal) nodes.
"""

from __future__ import annotations

import timm
import torch
import torch.nn.functional as F
from torch import nn

from histosearch.errors import HistosearchError

LEVELS = 4
GEM_P_INIT = 4.6
GEM_EPS = 1e-6


class LGFFEMError(HistosearchError):
    """A backbone or setting the model cannot be built with."""


class GRN(nn.Module):
    """Global Response Normalisation (ConvNeXt V2): per-channel spatial L2 norm, divided by
    its mean over channels, gating the input (gamma, beta start at 0: the identity)."""

    def __init__(self, channels: int, eps: float = 1e-6) -> None:
        super().__init__()
        self.gamma = nn.Parameter(torch.zeros(1, channels, 1, 1))
        self.beta = nn.Parameter(torch.zeros(1, channels, 1, 1))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        gx = torch.linalg.vector_norm(x, dim=(2, 3), keepdim=True)
        nx = gx / (gx.mean(dim=1, keepdim=True) + self.eps)
        return self.gamma * (x * nx) + self.beta + x


class _Aggregator(nn.Module):
    """alpha * X + (1 - alpha) * X * sigmoid(op(X)), alpha trainable."""

    def __init__(self, op: nn.Module) -> None:
        super().__init__()
        self.op = op
        self.alpha = nn.Parameter(torch.tensor(0.5))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.alpha * x + (1 - self.alpha) * x * torch.sigmoid(self.op(x))


def global_aggregator(channels: int, reduction: int = 4) -> nn.Module:
    """GA: DW-Conv 3x3 -> PW-Conv -> activation -> GRN -> PW-Conv, as a sigmoid gate."""
    hidden = max(1, channels // reduction)
    return _Aggregator(
        nn.Sequential(
            nn.Conv2d(channels, channels, 3, padding=1, groups=channels),
            nn.Conv2d(channels, hidden, 1),
            nn.GELU(),
            GRN(hidden),
            nn.Conv2d(hidden, channels, 1),
        )
    )


def local_aggregator(channels: int, reduction: int = 4) -> nn.Module:
    """LA: PW-Conv -> activation -> PW-Conv, as a sigmoid gate."""
    hidden = max(1, channels // reduction)
    return _Aggregator(
        nn.Sequential(nn.Conv2d(channels, hidden, 1), nn.GELU(), nn.Conv2d(hidden, channels, 1))
    )


class FusionNode(nn.Module):
    """sum_j w_j * op_j(input_j) / (sum_j w_j + eps), w_j = relu(trainable) (fast normalised
    fusion of BiFPN); inputs are resized to the node's own resolution first."""

    def __init__(self, ops: list[nn.Module], eps: float = 1e-4) -> None:
        super().__init__()
        self.ops = nn.ModuleList(ops)
        self.weights = nn.Parameter(torch.ones(len(ops)))
        self.eps = eps

    def normalised_weights(self) -> torch.Tensor:
        w = F.relu(self.weights)
        return w / (w.sum() + self.eps)

    def forward(self, inputs: list[torch.Tensor], size: tuple[int, int]) -> torch.Tensor:
        w = self.normalised_weights()
        out = 0
        for weight, op, x in zip(w, self.ops, inputs, strict=True):
            if x.shape[-2:] != size:
                x = F.interpolate(x, size=size, mode="bilinear", align_corners=False)
            out = out + weight * op(x)
        return out


class NeckLayer(nn.Module):
    """One LGFFN layer: P3_1, P2_1 top-down, then P1_2, P2_2, P3_2, P4_2."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        ga, la = global_aggregator, local_aggregator
        c = channels
        self.p3_1 = FusionNode([ga(c), la(c)])
        self.p2_1 = FusionNode([ga(c), la(c)])
        self.p1_2 = FusionNode([ga(c), la(c)])
        self.p2_2 = FusionNode([la(c), la(c), ga(c)])
        self.p3_2 = FusionNode([la(c), la(c), ga(c)])
        self.p4_2 = FusionNode([la(c), ga(c)])

    def forward(self, p: list[torch.Tensor]) -> list[torch.Tensor]:
        p1, p2, p3, p4 = p
        size = [x.shape[-2:] for x in p]
        p3_1 = self.p3_1([p3, p4], size[2])
        p2_1 = self.p2_1([p2, p3_1], size[1])
        p1_2 = self.p1_2([p1, p2_1], size[0])
        p2_2 = self.p2_2([p2, p2_1, p1_2], size[1])
        p3_2 = self.p3_2([p3, p3_1, p2_2], size[2])
        p4_2 = self.p4_2([p4, p3_2], size[3])
        return [p1_2, p2_2, p3_2, p4_2]


class GeM(nn.Module):
    """Generalised mean pooling, (mean(clamp(x, eps)^p))^(1/p), with a learnable p."""

    def __init__(self, p: float = GEM_P_INIT, eps: float = GEM_EPS) -> None:
        super().__init__()
        self.p = nn.Parameter(torch.tensor(float(p)))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x.clamp(min=self.eps).pow(self.p).mean(dim=(2, 3)).pow(1 / self.p)


class MiniHead(nn.Module):
    """f = FC(L2(FC(GeM(P))))."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.gem = GeM()
        self.fc1 = nn.Linear(channels, channels)
        self.fc2 = nn.Linear(channels, channels)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(F.normalize(self.fc1(self.gem(x)), dim=1))


def multiscale_backbone(name: str, weights: str | None = None) -> nn.Module:
    """A timm backbone giving four feature levels; `efficientnet-lite0-imagenet` loads the
    offline ImageNet weights, `weights` a local checkpoint (e.g. ConvNeXt V2's)."""
    arch = "tf_efficientnet_lite0" if name == "efficientnet-lite0-imagenet" else name
    try:
        model = timm.create_model(arch, pretrained=False, features_only=True)
    except Exception as error:
        raise LGFFEMError(
            None, f"timm cannot build {arch!r} with features_only: {error}"
        ) from error
    levels = len(model.feature_info)
    if levels < LEVELS:
        raise LGFFEMError(None, f"backbone {arch} gives {levels} feature levels; LGFFEM needs 4")
    model = timm.create_model(
        arch,
        pretrained=False,
        features_only=True,
        out_indices=tuple(range(levels - LEVELS, levels)),
    )
    if name == "efficientnet-lite0-imagenet":
        from histosearch.encoders import create_encoder

        state = create_encoder(name).model.state_dict()
        missing = set(model.state_dict()) - set(state)
        if missing:
            raise LGFFEMError(None, f"ImageNet Lite0 weights lack {sorted(missing)[:3]}")
        model.load_state_dict({k: v for k, v in state.items() if k in model.state_dict()})
    elif weights is not None:
        from pathlib import Path

        from histosearch.encoders.timm_models import load_into, load_state_dict

        load_into(model, load_state_dict(Path(weights)), Path(weights))
    return model


class LGFFEM(nn.Module):
    """Backbone (frozen unless `fine_tune`) -> lateral 1x1 convs to `channels` -> `layers`
    neck layers -> four GeM mini-heads, concatenated (4 x channels)."""

    def __init__(
        self,
        backbone: str,
        channels: int = 512,
        layers: int = 3,
        fine_tune: bool = False,
        weights: str | None = None,
    ) -> None:
        super().__init__()
        self.backbone = multiscale_backbone(backbone, weights)
        self.backbone.requires_grad_(fine_tune)
        widths = self.backbone.feature_info.channels()
        self.lateral = nn.ModuleList(nn.Conv2d(w, channels, 1) for w in widths)
        self.neck = nn.ModuleList(NeckLayer(channels) for _ in range(layers))
        self.heads = nn.ModuleList(MiniHead(channels) for _ in range(LEVELS))
        self.out_dim = LEVELS * channels

    def nodes(self, x: torch.Tensor) -> list[torch.Tensor]:
        """The outer nodes P1_2..P4_2 of the last neck layer."""
        p = [conv(f) for conv, f in zip(self.lateral, self.backbone(x), strict=True)]
        for layer in self.neck:
            p = layer(p)
        return p

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.cat([head(p) for head, p in zip(self.heads, self.nodes(x), strict=True)], 1)

    def embedding(self) -> nn.Module:
        return self
