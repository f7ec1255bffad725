"""The encoder registry: a name gives a torch module, its preprocessing and its output size."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from histosearch.errors import HistosearchError


class EncoderError(HistosearchError):
    """An unknown encoder, missing or mismatched weights."""


@dataclass
class Encoder:
    """A frozen image encoder: RGB uint8 tiles in, one `dim`-vector per tile out."""

    name: str
    model: torch.nn.Module
    dim: int
    input_size: int
    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    device: str = "cpu"
    # Applied to each uint8 tile before batching (a trained encoder's stain normalisation).
    tile_transform: Callable[[np.ndarray], np.ndarray] | None = None
    # Cosine at or above which two images count as the same category (pair verification).
    threshold: float | None = None
    # Identity of the weights (sha256 prefix of the checkpoint; "builtin" without weights).
    fingerprint: str = "builtin"
    # Autocast dtype on a GPU, as the model card recommends ("float32": none).
    precision: str = "float32"

    def preprocess(self, tiles: torch.Tensor) -> torch.Tensor:
        """uint8 (B, H, W, 3) -> normalised float (B, 3, S, S), channels_last."""
        x = tiles.permute(0, 3, 1, 2).float().div_(255)
        if x.shape[-2:] != (self.input_size, self.input_size):
            x = F.interpolate(
                x, size=(self.input_size, self.input_size), mode="bilinear", antialias=True
            )
        mean = torch.tensor(self.mean, device=x.device).view(1, 3, 1, 1)
        std = torch.tensor(self.std, device=x.device).view(1, 3, 1, 1)
        return ((x - mean) / std).contiguous(memory_format=torch.channels_last)

    @torch.inference_mode()
    def __call__(self, tiles: np.ndarray | torch.Tensor) -> np.ndarray:
        """Embeddings (B, dim) float32 of uint8 tiles (B, H, W, 3)."""
        if self.tile_transform is not None:
            tiles = np.stack([self.tile_transform(np.asarray(tile)) for tile in tiles])
        batch = torch.as_tensor(tiles).to(self.device)
        if self.device.startswith("cuda") and self.precision != "float32":
            with torch.autocast("cuda", dtype=getattr(torch, self.precision)):
                return self.model(self.preprocess(batch)).float().cpu().numpy()
        return self.model(self.preprocess(batch)).float().cpu().numpy()

    def to(self, device: str) -> Encoder:
        self.model.to(device)
        self.device = device
        return self


EncoderFactory = Callable[[Path | None], Encoder]
_REGISTRY: dict[str, EncoderFactory] = {}


def register(name: str) -> Callable[[EncoderFactory], EncoderFactory]:
    """Register an encoder factory `f(weights_path_or_None) -> Encoder` under `name`."""

    def decorator(factory: EncoderFactory) -> EncoderFactory:
        if name in _REGISTRY:
            raise ValueError(f"encoder {name!r} is registered twice")
        _REGISTRY[name] = factory
        return factory

    return decorator


def _register_builtins() -> None:
    """Import the modules whose encoders register themselves (once)."""
    from histosearch.encoders import foundation, handcrafted, imagenet  # noqa: F401


def available_encoders() -> list[str]:
    """Registered encoder names (any `timm:<model>` with a checkpoint works as well)."""
    _register_builtins()
    return sorted(_REGISTRY)


def create_encoder(name: str, weights: str | Path | None = None) -> Encoder:
    """The encoder called `name`, in eval mode, frozen, on the CPU.

    `name` is a registered encoder or `timm:<model name>`; `weights` is a local checkpoint
    file, or a folder holding one (as `huggingface-cli download --local-dir` leaves it).
    """
    from histosearch.encoders.fingerprint import weights_fingerprint

    _register_builtins()
    path = None if weights is None else Path(weights)
    if path is not None and not path.exists():
        raise EncoderError(path, f"{name}: weights file not found")
    if name.endswith(".pt") and Path(name).is_file():
        from histosearch.train.checkpoint import encoder_from_checkpoint

        encoder = encoder_from_checkpoint(Path(name))
        encoder.fingerprint = weights_fingerprint([Path(name)])
    elif name.startswith("timm:"):
        from histosearch.encoders.timm_models import timm_encoder

        encoder = timm_encoder(name.removeprefix("timm:"), path)
    elif name in _REGISTRY:
        encoder = _REGISTRY[name](path)
    else:
        raise EncoderError(
            None,
            f"unknown encoder {name!r}; choose from {', '.join(available_encoders())} "
            "timm:<model> with --weights, or a checkpoint.pt from histosearch train",
        )
    encoder.model.eval().requires_grad_(False)
    encoder.model.to(memory_format=torch.channels_last)
    return encoder
