"""Tile grids: non-overlapping tiles at a magnification, each with its tissue fraction."""

from __future__ import annotations

import csv
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

from histosearch.fileio import atomic_path
from histosearch.slide import Slide
from histosearch.tissue import TissueDetector, make_detector

# Pixels per tile side in the thumbnail that tissue detection looks at, and the largest
# thumbnail side it may read (a 10x grid of a big slide would otherwise need a huge one).
DETECTION_PX = 32
MAX_DETECTION_SIDE = 8192


EDGES = ("drop", "keep")


@dataclass(frozen=True)
class Tiling:
    """How a slide is cut into the tiles that are embedded (an archive's own settings)."""

    magnification: float = 5.0
    tile_size: int = 224
    tissue: str = "otsu"
    # the partial last row and column of tiles: dropped (the papers' grid) or kept, padded
    edges: str = "drop"
    # the tissue tiles kept per slide: "all", a number ("16") or a share ("5%"): see mosaic.py
    mosaic: str = "all"

    @classmethod
    def of(cls, settings: Mapping[str, str]) -> Tiling:
        """The tiling recorded in an archive's settings."""
        return cls(
            float(settings["magnification"]),
            int(settings["tile_size"]),
            settings["tissue"],
            settings.get("edges", "drop"),
            settings.get("mosaic", "all"),
        )


@dataclass(frozen=True)
class TileGrid:
    """The grid of `tile_size` tiles of a slide at `magnification`: floor(h/s) x floor(w/s)
    (edges "drop", the papers' grid) or ceil(h/s) x ceil(w/s) with the partial last row and
    column padded with white glass (edges "keep").

    `coords` are level-0 (x, y) top-left corners in row-major order, as CLAM/TRIDENT store
    them; one tile covers `tile_size * downsample` level-0 pixels. `margins` are the right
    and bottom strips (pixels at `magnification`) that no tile covers, and
    `untiled_tissue` the share of the slide's tissue in them.
    """

    slide_path: str
    magnification: float
    tile_size: int
    downsample: float
    mpp: float | None
    rows: int
    cols: int
    coords: np.ndarray
    tissue_fraction: np.ndarray
    is_tissue: np.ndarray
    method: str
    edges: str = "drop"
    margins: tuple[int, int] = (0, 0)
    untiled_tissue: float = 0.0

    def __len__(self) -> int:
        return self.rows * self.cols

    def edge_note(self) -> str:
        """What the grid leaves out at the right and bottom edges, in words."""
        right, bottom = self.margins
        if self.edges == "keep":
            return "partial edge tiles kept, padded with white"
        if not right and not bottom:
            return "the grid covers the whole slide"
        return (
            f"right/bottom margins of {right} and {bottom} px not tiled "
            f"({self.untiled_tissue:.0%} of tissue; --edges keep tiles them)"
        )

    @property
    def n_tissue(self) -> int:
        return int(self.is_tissue.sum())

    @property
    def n_background(self) -> int:
        return len(self) - self.n_tissue

    @property
    def tissue_coords(self) -> np.ndarray:
        """(n_tissue, 2) level-0 coordinates of the tiles kept as tissue."""
        return self.coords[self.is_tissue]

    def to_csv(self, path: str | Path) -> None:
        """Write one row per grid tile (kept or not), atomically."""
        with atomic_path(path) as tmp, tmp.open("w", newline="") as file:
            writer = csv.writer(file)
            writer.writerow(
                [
                    "x",
                    "y",
                    "row",
                    "col",
                    "magnification",
                    "tile_size",
                    "tissue_fraction",
                    "is_tissue",
                ]
            )
            for index, ((x, y), fraction, keep) in enumerate(
                zip(
                    self.coords.tolist(),
                    self.tissue_fraction.tolist(),
                    self.is_tissue.tolist(),
                    strict=True,
                )
            ):
                row, col = divmod(index, self.cols)
                writer.writerow(
                    [
                        x,
                        y,
                        row,
                        col,
                        f"{self.magnification:g}",
                        self.tile_size,
                        f"{fraction:.4f}",
                        int(keep),
                    ]
                )


def tile_slide(
    slide: Slide,
    magnification: float,
    tile_size: int = 224,
    tissue: str | TissueDetector = "otsu",
    edges: str = "drop",
) -> TileGrid:
    """Grid `slide` into `tile_size` tiles at `magnification` and find the tissue tiles;
    `edges` "keep" adds the partial last row and column (padded with white)."""
    if tile_size <= 0:
        raise ValueError(f"tile size must be positive, got {tile_size}")
    if edges not in EDGES:
        raise ValueError(f"edges must be one of {', '.join(EDGES)}, got {edges!r}")
    detector = make_detector(tissue) if isinstance(tissue, str) else tissue
    downsample = slide.downsample_for(magnification)
    width, height = slide.size_at(magnification)
    full_rows, full_cols = -(-height // tile_size), -(-width // tile_size)
    rows, cols = (
        (full_rows, full_cols) if edges == "keep" else (height // tile_size, width // tile_size)
    )
    span = tile_size * downsample  # level-0 pixels per tile
    row_index, col_index = np.divmod(np.arange(rows * cols), max(cols, 1))
    coords = np.stack([np.round(col_index * span), np.round(row_index * span)], axis=1).astype(
        np.int64
    )
    fraction, keep = _detect(slide, detector, rows, cols, tile_size, span)
    margins = (width - cols * tile_size, height - rows * tile_size)
    untiled = 0.0
    if edges == "drop" and any(margins):
        # The tissue in the margins, from a detection on the grid that covers them as well.
        full, _ = _detect(slide, detector, full_rows, full_cols, tile_size, span)
        full = full.reshape(full_rows, full_cols).astype(np.float64)
        total = full.sum()
        untiled = float((total - full[:rows, :cols].sum()) / total) if total > 0 else 0.0
    return TileGrid(
        slide_path=str(slide.path),
        magnification=float(magnification),
        tile_size=tile_size,
        downsample=downsample,
        mpp=slide.mpp_at(magnification),
        rows=rows,
        cols=cols,
        coords=coords.reshape(-1, 2),
        tissue_fraction=fraction.reshape(-1).astype(np.float32),
        is_tissue=keep.reshape(-1),
        method=detector.name,
        edges=edges,
        margins=(max(0, margins[0]), max(0, margins[1])),
        untiled_tissue=untiled,
    )


def _detect(
    slide: Slide, detector: TissueDetector, rows: int, cols: int, tile_size: int, span: float
) -> tuple[np.ndarray, np.ndarray]:
    """Tissue fraction and decision of each tile of a rows x cols grid, from an overview."""
    if not (rows and cols):
        return np.zeros((0,), np.float32), np.zeros((0,), bool)
    px = max(2, min(DETECTION_PX, tile_size, MAX_DETECTION_SIDE // max(rows, cols)))
    thumb = slide.read_overview((cols * px, rows * px), span / px)
    return detector.detect(thumb, (px, px))


def read_tiles(
    slide: Slide, grid: TileGrid, coords: np.ndarray | None = None
) -> Iterator[np.ndarray]:
    """Yield the RGB tiles at `coords` (default: the grid's tissue tiles), in order."""
    size = (grid.tile_size, grid.tile_size)
    for x, y in (grid.tissue_coords if coords is None else coords).tolist():
        yield slide.read_scaled((x, y), size, grid.downsample)


def grid_overlay(slide: Slide, grid: TileGrid, max_size: int = 1600) -> Image.Image:
    """A thumbnail of `slide`: kept tiles outlined in green, dropped grid cells in light grey."""
    thumb = Image.fromarray(slide.thumbnail(max_size))
    scale = thumb.width / slide.dimensions[0]
    draw = ImageDraw.Draw(thumb)
    span = grid.tile_size * grid.downsample * scale
    width = max(1, round(span / 40))
    for (x, y), keep in zip(grid.coords.tolist(), grid.is_tissue.tolist(), strict=True):
        if not keep:
            x0, y0 = x * scale, y * scale
            draw.rectangle([x0, y0, x0 + span - 1, y0 + span - 1], outline=(200, 200, 200), width=1)
    for x, y in grid.tissue_coords.tolist():
        x0, y0 = x * scale, y * scale
        draw.rectangle([x0, y0, x0 + span - 1, y0 + span - 1], outline=(0, 170, 0), width=width)
    return thumb


def save_overlay(slide: Slide, grid: TileGrid, path: str | Path, max_size: int = 1600) -> None:
    """Write `grid_overlay` as a PNG, atomically."""
    with atomic_path(path) as tmp:
        grid_overlay(slide, grid, max_size).save(tmp, format="PNG")
