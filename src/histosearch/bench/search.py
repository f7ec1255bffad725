"""Benchmarks behind `histosearch bench`: numbers for the README, never timed tests."""

from __future__ import annotations

import math
import time
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import cv2
import numpy as np
import tifffile

from histosearch.fileio import atomic_path
from histosearch.slide import OpenSlideSlide, Slide, open_slide
from histosearch.tiling import read_tiles, tile_slide
from histosearch.tissue import TissueDetector, is_tissue

if TYPE_CHECKING:
    from histosearch.encoders.registry import Encoder


@dataclass(frozen=True)
class TilingBenchmark:
    """Tiles per second of raw OpenSlide `read_region` and of histosearch tiling + reading."""

    slide: str
    magnification: float
    tiles: int
    raw_tiles_per_s: float
    histosearch_tiles_per_s: float

    @property
    def ratio(self) -> float:
        return self.histosearch_tiles_per_s / self.raw_tiles_per_s


def write_pyramidal_tiff(
    path: str | Path, source: np.ndarray, side: int, mpp: float = 0.5, smallest: int = 1024
) -> Path:
    """Write a `side` x `side` JPEG-compressed tiled pyramidal TIFF at `mpp`, tiled from the real
    pixels of `source` (mirrored so that neighbouring copies meet without seams), halving
    down to a level of at most `smallest` pixels, as scanners do."""
    mirrored = np.concatenate([source, source[:, ::-1]], axis=1)
    mirrored = np.concatenate([mirrored, mirrored[::-1]], axis=0)
    reps = (-(-side // mirrored.shape[0]), -(-side // mirrored.shape[1]), 1)
    level = np.tile(mirrored, reps)[:side, :side]
    with atomic_path(path) as tmp, tifffile.TiffWriter(tmp, bigtiff=True) as tiff:
        for index in range(max(1, math.ceil(math.log2(side / smallest)) + 1)):
            scale = 2**index
            resolution = 1e4 / (mpp * scale)  # pixels per centimetre
            tiff.write(
                level,
                tile=(256, 256),
                compression="jpeg",
                photometric="rgb",
                subfiletype=1 if index else 0,
                resolution=(resolution, resolution),
                resolutionunit="CENTIMETER",
            )
            level = cv2.resize(
                level, (level.shape[1] // 2, level.shape[0] // 2), interpolation=cv2.INTER_AREA
            )
    return Path(path)


def _best_rate(n: int, run, repeats: int) -> float:
    best = min(_timed(run) for _ in range(repeats))
    return n / best


def _timed(run) -> float:
    start = time.perf_counter()
    run()
    return time.perf_counter() - start


def bench_tiling(
    slide: Slide, magnification: float, tile_size: int = 224, repeats: int = 3
) -> TilingBenchmark:
    """Compare raw OpenSlide reads of the tissue tiles with `tile_slide` + `read_tiles`.

    Both read the same tiles from the same pyramid level; histosearch's time includes
    reading the detection thumbnail and deciding which tiles hold tissue.
    """
    if not isinstance(slide, OpenSlideSlide):
        raise ValueError(f"{slide.path}: the raw baseline needs an OpenSlide-readable slide")
    grid = tile_slide(slide, magnification, tile_size)
    coords = grid.tissue_coords.tolist()
    level = slide.best_level(grid.downsample)
    level_size = round(tile_size * grid.downsample / slide.level_downsamples[level])
    handle = slide.handle

    def raw() -> None:
        for x, y in coords:
            np.asarray(handle.read_region((x, y), level, (level_size, level_size)).convert("RGB"))

    def ours() -> None:
        tiled = tile_slide(slide, magnification, tile_size)
        for _ in read_tiles(slide, tiled):
            pass

    raw()  # warm the file cache for both
    return TilingBenchmark(
        slide=Path(slide.path).name,
        magnification=magnification,
        tiles=len(coords),
        raw_tiles_per_s=_best_rate(len(coords), raw, repeats),
        histosearch_tiles_per_s=_best_rate(len(coords), ours, repeats),
    )


def tissue_accuracy(tiles_dir: str | Path, detector: TissueDetector) -> tuple[float, list[str]]:
    """Accuracy of `detector` on labelled tiles (`no-tissue*`/`almost-white*` are background),
    and the names of the tiles it gets wrong."""
    wrong = []
    paths = sorted(Path(tiles_dir).glob("*.png"))
    for path in paths:
        truth = not path.name.startswith(("no-tissue", "almost-white"))
        with open_slide(path) as tile:
            rgb = tile.read_scaled((0, 0), tile.dimensions, 1.0)
        if is_tissue(rgb, detector) != truth:
            wrong.append(path.name)
    return 1 - len(wrong) / len(paths), wrong


# Table I of Afshari & Tizhoosh: 88 TCGA slides, patches per magnification, 35 h on CPU at 10x.
PAPER_PATCHES = {1.0: 4_668, 2.5: 22_989, 5.0: 84_596, 10.0: 319_563}
PAPER_SLIDES = 88


def synthetic_archive(
    n_patches: int, dim: int, n_slides: int = PAPER_SLIDES, seed: int = 0
) -> tuple[np.ndarray, np.ndarray]:
    """Non-negative (ReLU-like) float32 embeddings split into `n_slides` slides of uneven
    size (log-normal, as real slides vary), with their row offsets."""
    rng = np.random.default_rng(seed)
    weights = rng.lognormal(0.0, 0.6, n_slides)
    sizes = np.maximum(1, np.floor(weights / weights.sum() * n_patches)).astype(np.int64)
    sizes[-1] += n_patches - sizes.sum()
    offsets = np.concatenate([[0], np.cumsum(sizes)])
    features = rng.standard_normal((n_patches, dim), dtype=np.float32)
    return np.abs(features, out=features), offsets


# The paper's CPU runtimes of Table I (10-core Intel 9900X), in seconds.
PAPER_CPU_SECONDS = {
    (1.0, 2048): 60,
    (2.5, 2048): 180,
    (5.0, 2048): 600,
    (10.0, 2048): 35 * 3600,
    (1.0, 128): 60,
    (2.5, 128): 120,
    (5.0, 128): 480,
    (10.0, 128): 30 * 3600,
}


@dataclass(frozen=True)
class SearchBenchmark:
    """Leave-one-out slide search over a synthetic archive of the paper's shape."""

    magnification: float
    dim: int
    patches: int
    dtype: str
    seconds: float
    peak_rss_gb: float

    @property
    def paper_seconds(self) -> float:
        return PAPER_CPU_SECONDS[(self.magnification, self.dim)]


def _peak_rss_gb() -> float:
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20


def bench_search(magnification: float, dim: int, dtype: str = "float32") -> SearchBenchmark:
    """Time the full leave-one-out search (every slide against every other) at the paper's
    scale for one magnification and embedding size."""
    import torch

    from histosearch.search.similarity import similarity_matrix

    features, offsets = synthetic_archive(PAPER_PATCHES[magnification], dim)
    start = time.perf_counter()
    matrix = similarity_matrix(features, offsets, getattr(torch, dtype))
    np.argsort(-matrix, axis=1)  # the rankings the search returns
    seconds = time.perf_counter() - start
    return SearchBenchmark(magnification, dim, len(features), dtype, seconds, _peak_rss_gb())


def search_agreement(dtype: str = "float32") -> tuple[float, bool]:
    """On a small case, the largest difference between the blocked search and the measure
    computed pair by pair, and whether every top-5 ranking is identical."""
    import torch

    from histosearch.search.similarity import pairwise_similarity_matrix, similarity_matrix

    features, offsets = synthetic_archive(3000, 128, n_slides=24, seed=1)
    blocked = similarity_matrix(features, offsets, getattr(torch, dtype))
    plain = pairwise_similarity_matrix(features, offsets)
    same = bool((np.argsort(-blocked, 1)[:, :6] == np.argsort(-plain, 1)[:, :6]).all())
    return float(np.abs(blocked - plain).max()), same


@dataclass(frozen=True)
class ExtractionBenchmark:
    """Images per second of the encoder alone and of the whole extraction pipeline."""

    encoder: str
    tiles: int
    model_per_s: float
    pipeline_per_s: float

    @property
    def ratio(self) -> float:
        return self.pipeline_per_s / self.model_per_s


def bench_extraction(
    slide: Slide,
    magnification: float,
    encoder: Encoder,
    batch_size: int = 32,
    max_tiles: int = 256,
) -> ExtractionBenchmark:
    """Compare the encoder's forward throughput on tiles already in memory with reading and
    embedding the same number of tissue tiles through `embed_dataset` (reader process + model)."""
    from histosearch.embed import TileDataset, embed_dataset

    grid = tile_slide(slide, magnification, encoder.input_size)
    coords = grid.tissue_coords[:max_tiles]
    batch_size = min(batch_size, len(coords))
    batch = np.stack(list(read_tiles(slide, grid, coords[:batch_size])))
    encoder(batch)  # warm-up
    batches = -(-len(coords) // batch_size)
    model_seconds = _timed(lambda: [encoder(batch) for _ in range(batches)])
    pipeline_seconds = _timed(
        lambda: embed_dataset(TileDataset(slide, grid, coords), encoder, batch_size)
    )
    return ExtractionBenchmark(
        encoder.name,
        len(coords),
        batches * batch_size / model_seconds,
        len(coords) / pipeline_seconds,
    )
