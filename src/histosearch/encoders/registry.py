"""The encoder registry: a name gives a torch module, its preprocessing and its output size.

A leaf, as timm's `_registry`: the modules that define encoders import it and register
themselves (`@register_encoder(name)`, `@register_prefix("timm")`, `register_file_loader`);
it imports none of them, and finds them through the `histosearch.encoders` entry points.
"""

from __future__ import annotations

import fnmatch
import threading
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import torch
import torch.nn.functional as F

from histosearch.encoders.names import EncoderError, unknown_encoder

if TYPE_CHECKING:
    from importlib.metadata import EntryPoint


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
# `timm:<model>` style names: the resolver gets what follows the prefix and the weights path.
PrefixResolver = Callable[[str, Path | None], Encoder]
FileLoader = Callable[[Path], Encoder]

_REGISTRY: dict[str, EncoderFactory] = {}
_PREFIXES: dict[str, PrefixResolver] = {}
# Encoders stored as files (a `histosearch train` checkpoint.pt), by suffix.
_FILE_LOADERS: dict[str, FileLoader] = {}

# Every module that registers encoders, prefixes or file loaders, this package's own included,
# names itself in this entry-point group; the registry imports none of them, it loads the
# entry points on first need, one at a time until a name resolves (this package's first, the
# one named as the encoder or its prefix before all), so that `create_encoder("uni")` never
# imports training and `timm:<model>` imports only the timm module.
PLUGIN_GROUP = "histosearch.encoders"
_OWN_MODULES = __name__.rpartition(".")[0] + "."
_pending: list[EntryPoint] | None = None
_loading = threading.RLock()


def _unloaded() -> list[EntryPoint]:
    global _pending
    if _pending is None:
        from importlib.metadata import entry_points

        found = {(e.name, e.value): e for e in entry_points(group=PLUGIN_GROUP)}.values()
        _pending = sorted(found, key=lambda e: (not e.value.startswith(_OWN_MODULES), e.name))
    return _pending


def _load_plugins(until: Callable[[], bool] | None = None, first: tuple[str, ...] = ()) -> None:
    """Import the plugin modules (entry points named in `first` before the rest), stopping as
    soon as `until()` holds; without `until`, all of them."""
    with _loading:
        pending = _unloaded()
        pending.sort(key=lambda e: e.name not in first)  # stable: the order is otherwise kept
        while pending and not (until is not None and until()):
            pending.pop(0).load()


def register_encoder(name: str) -> Callable[[EncoderFactory], EncoderFactory]:
    """Register an encoder factory `f(weights_path_or_None) -> Encoder` under `name`."""

    def decorator(factory: EncoderFactory) -> EncoderFactory:
        if name in _REGISTRY:
            raise ValueError(f"encoder {name!r} is registered twice")
        _REGISTRY[name] = factory
        return factory

    return decorator


register = register_encoder  # the name it had first


def register_prefix(prefix: str) -> Callable[[PrefixResolver], PrefixResolver]:
    """Resolve every name `<prefix>:<rest>` with `resolver(rest, weights_path_or_None)`."""

    def decorator(resolver: PrefixResolver) -> PrefixResolver:
        if prefix in _PREFIXES:
            raise ValueError(f"encoder prefix {prefix!r} is registered twice")
        _PREFIXES[prefix] = resolver
        return resolver

    return decorator


def register_file_loader(suffix: str, loader: FileLoader) -> FileLoader:
    """Load encoders given as files ending in `suffix` (e.g. ".pt") with `loader(path)`."""
    _FILE_LOADERS[suffix] = loader
    return loader


def list_encoders(pattern: str = "*") -> list[str]:
    """Registered encoder names matching the shell-style `pattern`, sorted (any
    `timm:<model>` with a checkpoint works as well)."""
    _load_plugins()
    return sorted(fnmatch.filter(_REGISTRY, pattern))


available_encoders = list_encoders  # the name it had first


def list_prefixes() -> list[str]:
    """The registered name prefixes (`timm` for `timm:<model>`)."""
    _load_plugins()
    return sorted(_PREFIXES)


def _lookup(name: str) -> EncoderFactory | None:
    """The factory of `name` among what is registered so far."""
    path = Path(name)
    if path.suffix in _FILE_LOADERS and path.is_file():
        loader = _FILE_LOADERS[path.suffix]
        return lambda weights: loader(path)
    prefix, colon, rest = name.partition(":")
    if colon and prefix in _PREFIXES:
        resolver = _PREFIXES[prefix]
        return lambda weights: resolver(rest, weights)
    return _REGISTRY.get(name)


def _resolve(name: str) -> EncoderFactory | None:
    """The factory of `name`, importing plugin modules until one registers it."""
    factory = _lookup(name)
    if factory is None:
        _load_plugins(until=lambda: _lookup(name) is not None, first=(name, name.split(":")[0]))
        factory = _lookup(name)
    return factory


def is_encoder(name: str) -> bool:
    """Whether `create_encoder(name, ...)` knows `name`: a registered encoder, a registered
    prefix's name (`timm:<model>`) or an existing file of a registered suffix."""
    return _resolve(name) is not None


def get_encoder_factory(name: str) -> EncoderFactory:
    """The factory `f(weights_path_or_None) -> Encoder` behind `name` (as `is_encoder`)."""
    factory = _resolve(name)
    if factory is None:
        raise unknown_encoder(name, list_encoders())
    return factory


def create_encoder(name: str, weights: str | Path | None = None) -> Encoder:
    """The encoder called `name`, in eval mode, frozen, on the CPU.

    `name` is a registered encoder or `timm:<model name>`; `weights` is a local checkpoint
    file, or a folder holding one (as `huggingface-cli download --local-dir` leaves it).
    """
    path = None if weights is None else Path(weights)
    if path is not None and not path.exists():
        raise EncoderError(path, f"{name}: weights file not found")
    encoder = get_encoder_factory(name)(path)
    encoder.model.eval().requires_grad_(False)
    encoder.model.to(memory_format=torch.channels_last)
    return encoder
