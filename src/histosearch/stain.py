"""Stain normalisation as fit/transform objects: Reinhard (LAB statistics) and Macenko."""

from __future__ import annotations

import warnings
from collections.abc import Sequence
from typing import Self

import numpy as np
from skimage.color import lab2rgb, rgb2lab
from torchstain.numpy.normalizers import NumpyMacenkoNormalizer

from histosearch.errors import StainError

# Fewer stained pixels than this leave the stain vectors' SVD undetermined.
MIN_STAINED_PIXELS = 16


def _check_rgb(rgb: np.ndarray) -> np.ndarray:
    if rgb.ndim != 3 or rgb.shape[-1] != 3 or rgb.dtype != np.uint8:
        raise StainError(
            None, f"expected an RGB uint8 image (h, w, 3), got {rgb.dtype} {rgb.shape}"
        )
    return rgb


class ReinhardNormalizer:
    """Match the per-channel mean and standard deviation in LAB space to a target image
    (Reinhard et al. 2001; the normalisation Gildenblat & Klaiman use)."""

    def __init__(self) -> None:
        self.target_mean: np.ndarray | None = None
        self.target_std: np.ndarray | None = None

    @staticmethod
    def _lab_stats(rgb: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        lab = rgb2lab(_check_rgb(rgb))
        return lab, lab.mean(axis=(0, 1)), lab.std(axis=(0, 1))

    @classmethod
    def from_lab_stats(cls, mean: Sequence[float], std: Sequence[float]) -> Self:
        """A normaliser to saved target statistics (LAB mean and std per channel)."""
        normaliser = cls()
        normaliser.target_mean = np.asarray(mean, np.float64)
        normaliser.target_std = np.asarray(std, np.float64)
        return normaliser

    def fit(self, target: np.ndarray) -> Self:
        """Learn the LAB statistics of `target`."""
        _, self.target_mean, self.target_std = self._lab_stats(target)
        return self

    def transform(self, rgb: np.ndarray) -> np.ndarray:
        """`rgb` with its LAB statistics replaced by the target's."""
        if self.target_mean is None or self.target_std is None:
            raise StainError(None, "fit the normaliser on a target image first")
        lab, mean, std = self._lab_stats(rgb)
        scale = self.target_std / np.maximum(std, 1e-6)
        normalised = (lab - mean) * scale + self.target_mean
        with warnings.catch_warnings():  # out-of-gamut colours are clipped, as they must be
            warnings.simplefilter("ignore", UserWarning)
            rgb_out = lab2rgb(normalised)
        return np.round(rgb_out * 255).astype(np.uint8)


class MacenkoNormalizer:
    """Macenko et al. 2009: estimate the H&E stain vectors by SVD of optical densities and
    map the image's stain concentrations onto the target's (torchstain's implementation)."""

    def __init__(self, light_intensity: int = 240, alpha: float = 1.0, beta: float = 0.15) -> None:
        self.params = {"Io": light_intensity, "alpha": alpha, "beta": beta}
        self._normalizer = NumpyMacenkoNormalizer()
        self._fitted = False

    def _check_stained(self, rgb: np.ndarray, what: str) -> np.ndarray:
        """`rgb`, if it has enough stained pixels (optical density >= beta) to estimate stains."""
        optical_density = -np.log((_check_rgb(rgb).reshape(-1, 3) + 1.0) / self.params["Io"])
        if (optical_density >= self.params["beta"]).all(axis=1).sum() < MIN_STAINED_PIXELS:
            raise StainError(
                None, f"too little stained tissue in the {what} to estimate its stains"
            )
        return rgb

    def fit(self, target: np.ndarray) -> Self:
        """Learn the stain vectors and maximal concentrations of `target`."""
        self._normalizer.fit(self._check_stained(target, "target"), **self.params)
        self._fitted = True
        return self

    def transform(self, rgb: np.ndarray) -> np.ndarray:
        """`rgb` re-stained with the target's stain vectors."""
        if not self._fitted:
            raise StainError(None, "fit the normaliser on a target image first")
        stained = self._check_stained(rgb, "image")
        normalised, _, _ = self._normalizer.normalize(stained, stains=False, **self.params)
        return normalised
