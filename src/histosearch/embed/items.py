"""Embedding one file or item exactly as an archive embeds its slides: a slide by its tissue
tiles, an image no larger than a tile (or a group of patch images) whole."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np

from histosearch.embed.batches import ImageDataset, TileDataset, embed_dataset, is_patch_file
from histosearch.embed.options import DEFAULT_OPTIONS, EmbedOptions
from histosearch.encoders import Encoder
from histosearch.errors import NoTissueError
from histosearch.inputs import Item
from histosearch.mosaic import mosaic_tiles
from histosearch.slide import IMAGE_SUFFIXES, open_slide, read_image
from histosearch.tiling import Tiling, tile_slide
from histosearch.tissue import blank_reason


@dataclass(frozen=True)
class EmbeddedFile:
    """A file's tile embeddings, their level-0 positions, its resolution and the side of one
    tile at level 0 (None for an image embedded whole)."""

    features: np.ndarray
    coords: np.ndarray
    mpp: float | None
    tile_l0: float | None


def embed_file(
    path: str | Path,
    encoder: Encoder,
    tiling: Tiling,
    options: EmbedOptions = DEFAULT_OPTIONS,
    on_batch: Callable[[int], None] | None = None,
) -> EmbeddedFile:
    """A slide's tissue tiles (or the tiling's mosaic of them) embedded at the tiling's
    magnification; a plain image no larger than a tile is one patch, embedded whole, at
    coordinate (0, 0). A slide smaller than one tile at the magnification is refused, saying
    so."""
    size = tiling.tile_size
    plain = Path(path).suffix.lower() in IMAGE_SUFFIXES and not is_patch_file(Path(path), size)
    # a plain image larger than a tile: a blank one is refused before its scale is asked for
    if plain and (reason := blank_reason(read_image(path))):
        raise NoTissueError(path, reason)
    with open_slide(path, mpp=options.mpp, objective_power=options.objective_power) as slide:
        if slide.backend == "pillow" and max(slide.dimensions) <= size:
            dataset = ImageDataset([path], encoder.input_size, refuse_blank=True)
            features = embed_dataset(dataset, encoder, 1, 0)
            return EmbeddedFile(features, np.zeros((1, 2), np.int64), slide.mpp, None)
        grid = tile_slide(slide, tiling.magnification, size, tiling.tissue, tiling.edges)
        if len(grid) == 0:
            w, h = slide.size_at(tiling.magnification)
            raise NoTissueError(
                path,
                f"the slide is {w}x{h} px at {tiling.magnification:g}x, smaller than one tile "
                f"of {size} px: index it at a higher magnification or with smaller tiles",
            )
        if grid.n_tissue == 0:
            raise NoTissueError(
                path,
                f"no tissue in the {len(grid)} tiles of {size} px at {tiling.magnification:g}x",
            )
        coords = grid.tissue_coords[mosaic_tiles(slide, grid, tiling.mosaic)]
        dataset = TileDataset(slide, grid, coords)
        features = embed_dataset(
            dataset, encoder, options.batch_size, options.num_workers, on_batch
        )
        tile_l0 = size * slide.downsample_for(tiling.magnification)
        return EmbeddedFile(features, coords, slide.mpp, tile_l0)


def is_patch_item(item: Item, tile_size: int) -> bool:
    """A patch group, or an image no larger than a tile: embedded whole, image by image."""
    return item.is_group or is_patch_file(item.paths[0], tile_size)


def embed_item(
    item: Item,
    encoder: Encoder,
    tiling: Tiling,
    options: EmbedOptions = DEFAULT_OPTIONS,
    on_batch: Callable[[int], None] | None = None,
) -> EmbeddedFile:
    """One item embedded as an archive stores it: a patch group's images whole, a slide by
    its tissue tiles."""
    if is_patch_item(item, tiling.tile_size):
        dataset = ImageDataset(item.paths, encoder.input_size, refuse_blank=True)
        features = embed_dataset(
            dataset, encoder, options.batch_size, options.num_workers, on_batch
        )
        return EmbeddedFile(features, np.zeros((len(features), 2), np.int64), None, None)
    if item.mpp is not None or item.objective_power is not None:  # the manifest row's own
        options = replace(
            options,
            mpp=item.mpp or options.mpp,
            objective_power=item.objective_power or options.objective_power,
        )
    return embed_file(item.paths[0], encoder, tiling, options, on_batch)
