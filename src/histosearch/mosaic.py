"""A slide's mosaic: a representative subset of its tissue tiles, chosen as Yottixel does
(k-means of the tiles' colour at low magnification, then spatially spread picks within each
colour cluster), so that only those are embedded and stored."""

from __future__ import annotations

import logging

import numpy as np
from sklearn.cluster import KMeans

from histosearch.slide import Slide
from histosearch.tiling import MAX_DETECTION_SIDE, TileGrid

log = logging.getLogger("histosearch")

FULL = "all"
# Yottixel's nine colour clusters; the colour of a tile is its RGB histogram, read at
# COLOUR_PX pixels per tile side, HIST_BINS bins per channel.
COLOUR_CLUSTERS = 9
COLOUR_PX = 16
HIST_BINS = 8
SEED = 0
# iterations of the spatial k-means: enough to spread the picks, cheap at 30,000 tiles
SPATIAL_ITERATIONS = 30


def parse_mosaic(text: str) -> str:
    """The canonical form of a mosaic setting: "all" (every tissue tile), a number of tiles
    ("16") or a percentage of a slide's tissue tiles ("5%"); anything else is refused."""
    value = str(text).strip().lower()
    if value == FULL:
        return FULL
    try:
        number = float(value[:-1]) if value.endswith("%") else int(value)
    except ValueError:
        number = None
    if value.endswith("%"):
        if number is None or not 0 < number <= 100:
            raise ValueError(f"mosaic {text!r}: a percentage must be in (0, 100], as in 5%")
        return f"{number:g}%"
    if number is None or number < 1:
        raise ValueError(
            f"mosaic {text!r}: give a number of tiles (at least 1), a percentage such as 5%, "
            f"or {FULL}"
        )
    return str(number)


def mosaic_size(mosaic: str, n_tiles: int) -> int:
    """How many of `n_tiles` tissue tiles the mosaic keeps (all of them when it asks more)."""
    if mosaic == FULL:
        return n_tiles
    if mosaic.endswith("%"):
        return min(n_tiles, max(1, round(n_tiles * float(mosaic[:-1]) / 100)))
    return min(n_tiles, int(mosaic))


def choose_mosaic(
    colours: np.ndarray, positions: np.ndarray, size: int, seed: int = SEED
) -> np.ndarray:
    """The sorted indices of `size` tiles: k-means of `colours` (n x c) into up to nine
    clusters, each given a share of `size` by its number of tiles (at least one), and within
    each cluster the tiles nearest the centres of a k-means of their `positions` (n x 2)."""
    n = len(colours)
    if size >= n:
        return np.arange(n)
    k = min(COLOUR_CLUSTERS, size, len(np.unique(colours, axis=0)))
    labels = _kmeans(colours, k, seed)
    members = [np.flatnonzero(labels == c) for c in range(k)]
    members = [m for m in members if len(m)]
    quotas = _shares(np.array([len(m) for m in members]), size)
    picks = [
        _spread(m, positions[m].astype(np.float64), q, seed)
        for m, q in zip(members, quotas, strict=True)
    ]
    return np.sort(np.concatenate(picks))


def _kmeans(points: np.ndarray, k: int, seed: int) -> np.ndarray:
    """Cluster labels of a deterministic k-means (k-means++ start, one run)."""
    if k <= 1:
        return np.zeros(len(points), np.int64)
    return KMeans(n_clusters=k, n_init=1, random_state=seed).fit_predict(points)


def _shares(sizes: np.ndarray, total: int) -> np.ndarray:
    """`total` (at least one per cluster, less than their sum) split over clusters of
    `sizes` tiles: one each, the rest by size (largest remainder), so never more than a
    cluster holds."""
    rest = total - len(sizes)
    spare = sizes - 1
    exact = rest * spare / max(1, spare.sum())
    shares = np.floor(exact).astype(np.int64)
    order = np.argsort(-(exact - shares), kind="stable")
    shares[order[: rest - shares.sum()]] += 1
    return 1 + shares


def _spread(members: np.ndarray, positions: np.ndarray, count: int, seed: int) -> np.ndarray:
    """`count` of `members` spread over their `positions`: for each cluster of a spatial
    k-means, the tile nearest its centre (topped up farthest-first should one end empty)."""
    if count >= len(members):
        return members
    fit = KMeans(n_clusters=count, n_init=1, max_iter=SPATIAL_ITERATIONS, random_state=seed)
    labels = fit.fit_predict(positions)
    distance = np.linalg.norm(positions - fit.cluster_centers_[labels], axis=1)
    order = np.lexsort((distance, labels))
    first = order[np.r_[True, labels[order][1:] != labels[order][:-1]]]
    taken = list(first)
    while len(taken) < count:
        gap = np.linalg.norm(positions[:, None] - positions[taken][None], axis=2).min(axis=1)
        taken.append(int(np.argmax(gap)))
    return members[np.array(taken)]


def tile_colours(slide: Slide, grid: TileGrid) -> np.ndarray:
    """The RGB histogram (HIST_BINS per channel, shares of the tile's pixels) of each tissue
    tile of `grid`, read from one low-magnification overview of the slide."""
    px = max(2, min(COLOUR_PX, grid.tile_size, MAX_DETECTION_SIDE // max(grid.rows, grid.cols)))
    span = grid.tile_size * grid.downsample
    thumb = slide.read_overview((grid.cols * px, grid.rows * px), span / px)
    tiles = thumb[: grid.rows * px, : grid.cols * px, :3].reshape(grid.rows, px, grid.cols, px, 3)
    tiles = tiles.transpose(0, 2, 1, 3, 4).reshape(grid.rows * grid.cols, px * px, 3)
    return rgb_histograms(tiles[grid.is_tissue])


def rgb_histograms(tiles: np.ndarray) -> np.ndarray:
    """The RGB histogram of each of `tiles` (n x pixels x 3, uint8): HIST_BINS bins per
    channel, as shares of the tile's pixels (n x 3 * HIST_BINS)."""
    bins = tiles.reshape(len(tiles), -1, 3).astype(np.int64) * HIST_BINS // 256
    n, pixels = bins.shape[:2]
    # one bincount over every (tile, channel, bin) at once
    cells = (np.arange(n)[:, None, None] * 3 + np.arange(3)) * HIST_BINS + bins
    hist = np.bincount(cells.ravel(), minlength=n * 3 * HIST_BINS)
    return hist.reshape(n, 3 * HIST_BINS).astype(np.float32) / pixels


def mosaic_tiles(slide: Slide, grid: TileGrid, mosaic: str) -> np.ndarray:
    """The indices (into `grid.tissue_coords`) of the tiles the mosaic keeps; a mosaic asking
    for more tiles than the slide has keeps them all, saying so."""
    n = grid.n_tissue
    size = mosaic_size(mosaic, n)
    if mosaic == FULL:
        return np.arange(n)
    if size == n:
        if not mosaic.endswith("%") and int(mosaic) > n:
            log.warning(
                "%s: mosaic of %s tiles asks for more than its %d tissue tiles: keeping them all",
                slide.path,
                mosaic,
                n,
            )
        return np.arange(n)
    return choose_mosaic(tile_colours(slide, grid), grid.tissue_coords, size)
