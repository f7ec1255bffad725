"""Encoders without weights: the floor every learned encoder must beat."""

from __future__ import annotations

from pathlib import Path

import torch

from histosearch.encoders.registry import Encoder, EncoderError, register_encoder

HSV_BINS = (8, 8, 8)


def rgb_to_hsv(rgb: torch.Tensor) -> torch.Tensor:
    """(B, 3, H, W) RGB in [0, 1] -> HSV in [0, 1] (hue as a fraction of the circle)."""
    r, g, b = rgb.unbind(1)
    value, _ = rgb.max(dim=1)
    chroma = value - rgb.min(dim=1).values
    saturation = torch.where(value > 0, chroma / value.clamp_min(1e-8), torch.zeros_like(value))
    safe = chroma.clamp_min(1e-8)
    hue = torch.where(
        value == r,
        ((g - b) / safe) % 6,
        torch.where(value == g, (b - r) / safe + 2, (r - g) / safe + 4),
    )
    hue = torch.where(chroma > 0, hue / 6, torch.zeros_like(hue))
    return torch.stack([hue, saturation, value], dim=1)


class HSVHistogram(torch.nn.Module):
    """Joint HSV histogram (8 x 8 x 8 bins), square-rooted so that cosine similarity between
    two of them is the Bhattacharyya coefficient of the colour distributions."""

    def __init__(self, bins: tuple[int, int, int] = HSV_BINS) -> None:
        super().__init__()
        self.bins = bins
        self.register_buffer("scale", torch.tensor(bins, dtype=torch.float32).view(1, 3, 1, 1))
        self.dim = bins[0] * bins[1] * bins[2]

    def forward(self, rgb: torch.Tensor) -> torch.Tensor:
        hsv = rgb_to_hsv(rgb.clamp(0, 1))
        index = (hsv * self.scale).long().clamp_max(self.scale.long() - 1)  # (B, 3, H, W)
        flat = (index[:, 0] * self.bins[1] + index[:, 1]) * self.bins[2] + index[:, 2]
        flat = flat.flatten(1)
        counts = torch.zeros(flat.shape[0], self.dim, device=rgb.device)
        counts.scatter_add_(1, flat, torch.ones_like(flat, dtype=counts.dtype))
        return (counts / flat.shape[1]).sqrt()


@register_encoder("color-histogram")
def color_histogram(weights: Path | None) -> Encoder:
    """512-d joint HSV histogram: no learning, no weights."""
    if weights is not None:
        raise EncoderError(weights, "color-histogram has no weights")
    model = HSVHistogram()
    return Encoder("color-histogram", model, model.dim, 224, (0.0, 0.0, 0.0), (1.0, 1.0, 1.0))
