"""Trained checkpoints as encoders, and the verification threshold saved with them."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import torch

from histosearch.encoders.registry import Encoder, register_file_loader
from histosearch.fileio import atomic_path
from histosearch.train.trainer import (
    TrainSettings,
    build_model,
    load_checkpoint,
    stain_normaliser,
)


def encoder_from_checkpoint(path: Path) -> Encoder:
    """The search embedding of a `histosearch train` checkpoint: the siamese net's 128-d
    output, or BYOL's online encoder; with its stain normalisation and threshold."""
    checkpoint = load_checkpoint(path)
    settings = TrainSettings(**checkpoint["settings"])
    model = build_model(settings)
    model.load_state_dict(checkpoint["model"])
    stain = stain_normaliser(settings)
    return Encoder(
        name=str(path),
        model=model.embedding(),
        dim=model.out_dim,
        input_size=settings.image_size,
        mean=tuple(settings.mean),
        std=tuple(settings.std),
        tile_transform=None if stain is None else stain.transform,
        threshold=checkpoint.get("threshold"),
        fingerprint=_fingerprint(checkpoint),
    )


def _fingerprint(checkpoint: dict) -> str:
    """What the checkpoint's embeddings depend on (weights and settings), not the file: the
    verification threshold that `eval --save-threshold` writes into it changes nothing."""
    digest = hashlib.sha256(json.dumps(checkpoint["settings"], sort_keys=True).encode())
    for key, tensor in sorted(checkpoint["model"].items()):
        digest.update(key.encode())
        digest.update(tensor.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy())
    return digest.hexdigest()[:16]


register_file_loader(".pt", encoder_from_checkpoint)


def save_threshold(path: Path, threshold: float) -> None:
    """Store the pair-verification threshold chosen by `eval` in the checkpoint, atomically."""
    checkpoint = load_checkpoint(path)
    checkpoint["threshold"] = float(threshold)
    with atomic_path(path) as tmp:
        torch.save(checkpoint, tmp)
