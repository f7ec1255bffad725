"""Grad-CAM for LGFFEM embeddings: where each outer fusion node P1_2..P4_2 looks.

The score explained is the cosine similarity of the image's embedding to a retrieved
image's (why do these two match?) or, alone, the cosine distance of the image's embedding
from that of blank glass (what sets this descriptor apart from background?). The distance
from glass has a non-zero gradient wherever the image holds anything but glass; the image's
similarity to its own (detached) embedding, used before, has a zero gradient at its maximum
and gave noise. Each node's map weights its channels by their mean gradient (Selvaraju et
al.), keeps the positive part and is resized to the image.
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F

from histosearch.encoders import Encoder
from histosearch.errors import HistosearchError
from histosearch.train.lgffem import LGFFEM

NODE_NAMES = ("P1_2", "P2_2", "P3_2", "P4_2")


def _lgffem(encoder: Encoder) -> LGFFEM:
    if not isinstance(encoder.model, LGFFEM):
        raise HistosearchError(
            None, f"{encoder.name} is not an LGFFEM checkpoint; explain needs one"
        )
    return encoder.model


def _input(encoder: Encoder, rgb: np.ndarray) -> torch.Tensor:
    tile = rgb if encoder.tile_transform is None else encoder.tile_transform(rgb)
    return encoder.preprocess(torch.from_numpy(np.array(tile))[None].to(encoder.device))


def embed_for_cam(encoder: Encoder, rgb: np.ndarray) -> torch.Tensor:
    """The embedding of one RGB image, as `explain` compares it."""
    with torch.no_grad():
        return _lgffem(encoder)(_input(encoder, rgb))


def gradcam(
    encoder: Encoder, rgb: np.ndarray, reference: torch.Tensor | None = None
) -> dict[str, np.ndarray]:
    """Maps in [0, 1] of the image's size for each outer node and their mean ("combined"):
    of the similarity to `reference`, or without one of the distance from blank glass."""
    model = _lgffem(encoder)
    glass = embed_for_cam(encoder, np.full_like(rgb, 255)) if reference is None else None
    x = _input(encoder, rgb)
    # Encoders are frozen; gradients must reach the nodes for this one backward pass.
    model.neck.requires_grad_(True)
    model.heads.requires_grad_(True)
    try:
        with torch.enable_grad():
            nodes = model.nodes(x)
            for node in nodes:
                node.retain_grad()
            embedding = torch.cat([h(p) for h, p in zip(model.heads, nodes, strict=True)], 1)
            if glass is None:
                score = F.cosine_similarity(embedding, reference.to(embedding.device))
            else:
                score = 1 - F.cosine_similarity(embedding, glass.to(embedding.device))
            score.sum().backward()
    finally:
        model.requires_grad_(False)
        model.zero_grad(set_to_none=True)
    size = rgb.shape[:2]
    maps = {}
    for name, node in zip(NODE_NAMES, nodes, strict=True):
        weights = node.grad.mean(dim=(2, 3), keepdim=True)
        cam = F.relu((weights * node.detach()).sum(dim=1, keepdim=True))
        cam = F.interpolate(cam, size=size, mode="bilinear", align_corners=False)[0, 0]
        cam = cam - cam.min()
        maps[name] = (cam / cam.max().clamp_min(1e-12)).cpu().numpy()
    maps["combined"] = np.mean([maps[n] for n in NODE_NAMES], axis=0)
    return maps
