"""`histosearch bench tiling`: tiles per second of histosearch's tiling (tissue detection,
grid, reading) against raw OpenSlide `read_region` calls for the same tiles; and of the same
slide tiled from a file and from a DICOMweb server, side by side."""

from __future__ import annotations

import functools
import math
import tempfile
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import cv2
import numpy as np
import tifffile

from histosearch.bench.common import CMU_SLIDE, TCGA_POWER, TCGA_SLIDE, WSI_FIXTURES, best_rate
from histosearch.fileio import atomic_path
from histosearch.slide import OpenSlideSlide, Slide, open_slide
from histosearch.tiling import read_tiles, tile_slide

# The magnifications at which the large written pyramid is timed.
PYRAMID_MAGNIFICATIONS = (20.0, 5.0)


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


@dataclass(frozen=True)
class SourceRate:
    """Tiles per second of histosearch tiling + reading from one source, opening included."""

    source: str
    tiles: int
    tiles_per_s: float


def bench_sources(
    sources: Sequence[str | Path], magnification: float, tile_size: int = 224, repeats: int = 3
) -> list[SourceRate]:
    """`tile_slide` + `read_tiles` of each source (a slide file or a dicomweb:// URL), opened
    afresh each time, one after the other in one run so that the rates compare."""
    rates = []
    for source in sources:
        run = functools.partial(_tile_all, source, magnification, tile_size)
        tiles = run()  # also warms the caches (the file's, the server's)
        rates.append(SourceRate(str(source), tiles, best_rate(tiles, run, repeats)))
    return rates


def _tile_all(source: str | Path, magnification: float, tile_size: int) -> int:
    """Open `source`, tile it and read every tissue tile; how many there were."""
    with open_slide(source) as slide:
        grid = tile_slide(slide, magnification, tile_size)
        return sum(1 for _ in read_tiles(slide, grid))


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
        raw_tiles_per_s=best_rate(len(coords), raw, repeats),
        histosearch_tiles_per_s=best_rate(len(coords), ours, repeats),
    )


def bench_tiling_runs(
    slides: Sequence[Path],
    magnification: float,
    data: Path,
    pyramid_side: int = 16384,
    on_note: Callable[[str], None] = lambda _: None,
) -> Iterator[TilingBenchmark]:
    """`bench_tiling` of each of `slides` at `magnification`, each as it is measured. Without
    slides: the two fixture slides of `data`, then a `pyramid_side`-pixel pyramidal TIFF
    written from the CMU fixture's pixels, at `PYRAMID_MAGNIFICATIONS`."""
    fixtures = data / WSI_FIXTURES
    cmu = fixtures / CMU_SLIDE
    cases = (
        [(path, None, magnification) for path in slides]
        if slides
        else [(cmu, None, magnification), (fixtures / TCGA_SLIDE, TCGA_POWER, magnification)]
    )
    for path, power, mag in cases:
        with open_slide(path, objective_power=power) as slide:
            yield bench_tiling(slide, mag)
    if slides:
        return
    with tempfile.TemporaryDirectory() as tmp, open_slide(cmu) as source:
        side = f"{pyramid_side}x{pyramid_side}"
        on_note(f"writing a {side} JPEG pyramidal TIFF from {cmu.name} pixels ...")
        pixels = source.read_scaled((0, 0), source.dimensions, 1.0)
        big = write_pyramidal_tiff(Path(tmp) / f"mosaic-{pyramid_side}.tiff", pixels, pyramid_side)
        for mag in PYRAMID_MAGNIFICATIONS:
            with open_slide(big) as slide:
                yield bench_tiling(slide, mag)
