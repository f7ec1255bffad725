"""`histosearch bench extract`: images per second of the whole extraction pipeline (reader
process + model) against the encoder's own forward throughput on tiles in memory."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from histosearch.bench.common import TCGA_POWER, TCGA_SLIDE, WSI_FIXTURES, timed
from histosearch.slide import Slide
from histosearch.tiling import read_tiles, tile_slide

if TYPE_CHECKING:
    from histosearch.encoders.registry import Encoder

RANDOM_WEIGHTS = "random (real layout)"


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
    model_seconds = timed(lambda: [encoder(batch) for _ in range(batches)])
    pipeline_seconds = timed(
        lambda: embed_dataset(TileDataset(slide, grid, coords), encoder, batch_size)
    )
    return ExtractionBenchmark(
        encoder.name,
        len(coords),
        batches * batch_size / model_seconds,
        len(coords) / pipeline_seconds,
    )


def benchmark_encoder(
    name: str, weights: Path | None = None, random_weights: bool = False
) -> tuple[Encoder, str]:
    """The encoder to time and where its weights come from: a foundation model whose weights
    are not on this machine (or with `random_weights`) gets random weights in its real layout,
    the same computation and so the same speed. Raises EncoderError as `create_encoder`."""
    from histosearch.encoders import create_encoder
    from histosearch.encoders.catalog import CATALOG, locate_weights
    from histosearch.encoders.foundation import random_encoder

    model = CATALOG.get(name)
    if model is not None and (
        random_weights or (weights is None and locate_weights(model)[0] is None)
    ):
        return random_encoder(name), RANDOM_WEIGHTS
    encoder = create_encoder(name, weights)
    return encoder, encoder.fingerprint


def extraction_slide(data: Path, path: Path | None = None) -> tuple[Path, float | None]:
    """The slide to time and the objective power to assume for it: `path` as it is, or by
    default the TCGA fixture of `data` (which records none; 20x is assumed)."""
    if path is not None:
        return path, None
    return data / WSI_FIXTURES / TCGA_SLIDE, TCGA_POWER
