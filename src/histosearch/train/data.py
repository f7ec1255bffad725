"""Training data held in memory: images resized once, augmented per sample."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from torch.utils.data import Dataset
from torchvision.transforms import v2

from histosearch.embed import ImageDataset
from histosearch.errors import HistosearchError
from histosearch.stain import ReinhardNormalizer


def load_images(
    paths: list[Path],
    size: int,
    stain: ReinhardNormalizer | None = None,
    failures: dict[int, str] | None = None,
) -> np.ndarray:
    """(n, size, size, 3) uint8, each image resized (and stain-normalised if asked).

    With a `failures` dict, an unreadable image is skipped (the rows are the readable images,
    in order) and recorded as index -> "file: reason"; without one, the first raises."""
    images = ImageDataset(paths, size)  # read and resized exactly as the encoder will see them
    out = np.empty((len(paths), size, size, 3), np.uint8)
    kept = 0
    for index in range(len(paths)):
        try:
            image = images[index]
        except HistosearchError as error:
            if failures is None:
                raise
            failures[index] = str(error)
            continue
        out[kept] = image if stain is None else stain.transform(image)
        kept += 1
    return out[:kept]


def spatial_augment(size: int) -> v2.Transform:
    """Gildenblat & Klaiman: flips, rotation up to 20 degrees, colour jitter 0.075."""
    return v2.Compose(
        [
            v2.RandomHorizontalFlip(),
            v2.RandomVerticalFlip(),
            v2.RandomRotation(20, fill=255),
            v2.ColorJitter(brightness=0.075, saturation=0.075, hue=0.075),
        ]
    )


def byol_augment(size: int) -> v2.Transform:
    """Huang & Chen / BYOL: resized crop, flip, colour jitter, grayscale, blur, solarisation."""
    return v2.Compose(
        [
            v2.RandomResizedCrop(size, scale=(0.3, 1.0), antialias=True),
            v2.RandomHorizontalFlip(),
            v2.RandomApply([v2.ColorJitter(0.4, 0.4, 0.2, 0.1)], p=0.8),
            v2.RandomGrayscale(p=0.2),
            v2.RandomApply([v2.GaussianBlur(kernel_size=max(3, size // 10 * 2 + 1))], p=0.5),
            v2.RandomSolarize(threshold=128, p=0.2),
        ]
    )


class PairDataset(Dataset):
    """(view of tile a, view of tile b, label) for spatial pairs."""

    def __init__(
        self, images: np.ndarray, pairs: np.ndarray, labels: np.ndarray, augment: v2.Transform
    ) -> None:
        self.images = torch.from_numpy(images).permute(0, 3, 1, 2)  # uint8 (n, 3, s, s)
        self.pairs, self.labels, self.augment = pairs, labels, augment

    def __len__(self) -> int:
        return len(self.pairs)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, torch.Tensor, int]:
        a, b = self.pairs[index]
        return self.augment(self.images[a]), self.augment(self.images[b]), int(self.labels[index])


class TwoViewDataset(Dataset):
    """Two augmented views of each image, for BYOL."""

    def __init__(self, images: np.ndarray, augment: v2.Transform) -> None:
        self.images = torch.from_numpy(images).permute(0, 3, 1, 2)
        self.augment = augment

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, torch.Tensor]:
        image = self.images[index]
        return self.augment(image), self.augment(image)


class LabelledDataset(Dataset):
    """(augmented image, class index), for supervised metric learning."""

    def __init__(self, images: np.ndarray, classes: np.ndarray, augment: v2.Transform) -> None:
        self.images = torch.from_numpy(images).permute(0, 3, 1, 2)
        self.classes, self.augment = classes, augment

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int]:
        return self.augment(self.images[index]), int(self.classes[index])
