"""Batched embedding: tiles or images read by worker processes while the model runs."""

from __future__ import annotations

import signal
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import cv2
import numpy as np
import torch
from PIL import Image
from torch.utils.data import DataLoader, Dataset

from histosearch.encoders import Encoder
from histosearch.errors import HistosearchError, NoTissueError, SlideReadError
from histosearch.slide import IMAGE_SUFFIXES, Slide, open_slide, read_image
from histosearch.tiling import TileGrid
from histosearch.tissue import patch_reason


class TileDataset(Dataset):
    """The tiles of a grid; each worker opens its own handle on the slide."""

    def __init__(self, slide: Slide, grid: TileGrid, coords: np.ndarray) -> None:
        self.path, self.coords = slide.path, coords
        self.resolution = {"mpp": slide.mpp, "objective_power": slide.objective_power}
        self.size, self.downsample = (grid.tile_size, grid.tile_size), grid.downsample
        self._slide: Slide | None = None

    def __len__(self) -> int:
        return len(self.coords)

    def describe(self, index: int) -> str:
        """The file (and tile) that item `index` is read from."""
        x, y = self.coords[index]
        return f"{self.path} (tile at x={x}, y={y})"

    def __getitem__(self, index: int) -> np.ndarray:
        if self._slide is None:
            self._slide = open_slide(self.path, **self.resolution)
        x, y = self.coords[index]
        return self._slide.read_scaled((int(x), int(y)), self.size, self.downsample)


class ImageDataset(Dataset):
    """Whole images (patches), each resized to the encoder's input size; with `refuse_blank`
    (an archive's patches, queries), an image too small or of one flat colour to be searched
    by (`tissue.patch_reason`) is refused (evaluation sets keep their tiny edge patches)."""

    def __init__(self, paths: Sequence[str | Path], size: int, refuse_blank: bool = False) -> None:
        self.paths, self.size, self.refuse_blank = list(paths), size, refuse_blank

    def __len__(self) -> int:
        return len(self.paths)

    def describe(self, index: int) -> str:
        """The file item `index` is read from."""
        return str(self.paths[index])

    def __getitem__(self, index: int) -> np.ndarray:
        rgb = read_image(self.paths[index])
        if self.refuse_blank and (reason := patch_reason(rgb)):
            raise NoTissueError(self.paths[index], reason)
        if rgb.shape[:2] != (self.size, self.size):
            interpolation = cv2.INTER_AREA if rgb.shape[0] > self.size else cv2.INTER_LINEAR
            rgb = cv2.resize(rgb, (self.size, self.size), interpolation=interpolation)
        return rgb


def is_patch_file(path: Path, tile_size: int) -> bool:
    """An image file no larger than a tile (only its header is read): embedded whole."""
    if path.suffix.lower() not in IMAGE_SUFFIXES:
        return False
    try:
        with Image.open(path) as image:
            return max(image.size) <= tile_size
    except Exception:  # unreadable: opening it as a slide reports why
        return False


@dataclass
class _Unreadable:
    """What a worker hands back instead of an item it cannot read."""

    index: int
    path: str | None
    reason: str


class _Guarded(Dataset):
    """Items of `dataset` as (index, pixels), or (index, _Unreadable) for one that fails:
    a bad item is caught inside the worker that reads it, so the batch goes on."""

    def __init__(self, dataset: Dataset) -> None:
        self.dataset = dataset

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, index: int) -> tuple[int, np.ndarray | _Unreadable]:
        try:
            return index, self.dataset[index]
        except HistosearchError as error:
            return index, _Unreadable(index, error.path, error.reason)
        except Exception as error:  # a reader bug must not cost the other items either
            where = self.dataset.describe(index) if hasattr(self.dataset, "describe") else None
            reason = f"unexpected {type(error).__name__}: {error}"
            return index, _Unreadable(index, where, reason)


def _collate(
    items: list[tuple[int, np.ndarray | _Unreadable]],
) -> tuple[torch.Tensor | None, list[_Unreadable]]:
    good = [torch.from_numpy(np.asarray(x)) for _, x in items if not isinstance(x, _Unreadable)]
    bad = [x for _, x in items if isinstance(x, _Unreadable)]
    return (torch.stack(good) if good else None), bad


def _ignore_interrupts(_: int) -> None:
    """A reader process leaves Ctrl-C to the main process, which stops the run cleanly."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)


def embed_dataset(
    dataset: Dataset,
    encoder: Encoder,
    batch_size: int = 32,
    num_workers: int = 1,
    on_batch: Callable[[int], None] | None = None,
    failures: dict[int, str] | None = None,
) -> np.ndarray:
    """Embeddings (n, dim) float32 of every item, in order; `on_batch(n)` after each batch.

    With a `failures` dict, an item that cannot be read is skipped (the rows are the readable
    items, in order) and recorded as index -> "file: reason"; without one, the first such item
    raises a SlideReadError naming its file.
    """
    loader = DataLoader(
        _Guarded(dataset),
        batch_size=batch_size,
        num_workers=num_workers,
        collate_fn=_collate,
        worker_init_fn=_ignore_interrupts,
        pin_memory=torch.cuda.is_available(),
    )
    out = np.empty((len(dataset), encoder.dim), np.float32)
    start = 0
    for batch, bad in loader:
        for item in bad:
            if failures is None:
                raise SlideReadError(item.path, item.reason)
            failures[item.index] = f"{item.path}: {item.reason}" if item.path else item.reason
        if batch is not None:
            out[start : start + len(batch)] = encoder(batch)
            start += len(batch)
        if on_batch is not None:
            on_batch(len(bad) + (0 if batch is None else len(batch)))
    return out[:start]


def default_device() -> str:
    """CUDA when there is a GPU, else the CPU."""
    return "cuda" if torch.cuda.is_available() else "cpu"
