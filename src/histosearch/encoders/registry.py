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
FileLoader = Callable[[Path], Encoder]
_REGISTRY: dict[str, EncoderFactory] = {}
# Encoders stored as files (a `histosearch train` checkpoint.pt), by suffix.
_FILE_LOADERS: dict[str, FileLoader] = {}
# Packages that register encoders or file loaders name a module in this entry-point group;
# it is imported on first need, so the registry depends on none of them (training included).
PLUGIN_GROUP = "histosearch.encoders"
_plugins_loaded = False


def _load_plugins() -> None:
    global _plugins_loaded
    if not _plugins_loaded:
        from importlib.metadata import entry_points

        _plugins_loaded = True
        for entry in entry_points(group=PLUGIN_GROUP):
            entry.load()


def register_file_loader(suffix: str, loader: FileLoader) -> FileLoader:
    """Load encoders given as files ending in `suffix` (e.g. ".pt") with `loader(path)`."""
    _FILE_LOADERS[suffix] = loader
    return loader


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
    _load_plugins()
    return sorted(_REGISTRY)


def _builder(name: str, path: Path | None) -> Callable[[], Encoder] | None:
    """How to build the encoder `name`, if it is known yet."""
    if Path(name).suffix in _FILE_LOADERS and Path(name).is_file():
        return lambda: _FILE_LOADERS[Path(name).suffix](Path(name))
    if name.startswith("timm:"):
        from histosearch.encoders.timm_models import timm_encoder

        return lambda: timm_encoder(name.removeprefix("timm:"), path)
    if name in _REGISTRY:
        return lambda: _REGISTRY[name](path)
    return None


def create_encoder(name: str, weights: str | Path | None = None) -> Encoder:
    """The encoder called `name`, in eval mode, frozen, on the CPU.

    `name` is a registered encoder or `timm:<model name>`; `weights` is a local checkpoint
    file, or a folder holding one (as `huggingface-cli download --local-dir` leaves it).
    """
    _register_builtins()
    path = None if weights is None else Path(weights)
    if path is not None and not path.exists():
        raise EncoderError(path, f"{name}: weights file not found")
    build = _builder(name, path)
    if build is None:  # perhaps a plugin's: import them and look again
        _load_plugins()
        build = _builder(name, path)
    if build is None:
        raise EncoderError(
            None,
            f"unknown encoder {name!r}; choose from {', '.join(available_encoders())} "
            "timm:<model> with --weights, or a checkpoint.pt from histosearch train",
        )
    encoder = build()
    encoder.model.eval().requires_grad_(False)
    encoder.model.to(memory_format=torch.channels_last)
    return encoder
