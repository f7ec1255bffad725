"""Every call an `eval` run makes into `histosearch.embed`: the encoder on the default
device, patch images embedded whole in batches, a slide by its tissue tiles."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from histosearch.evaluation.settings import EvalSettings

if TYPE_CHECKING:
    from histosearch.encoders import Encoder

# on_progress(stage, done, total): a stage starts at done 0 and ends with done == total;
# total is None while a stage's length is unknown (it then ends with done == total == 1).
ProgressCallback = Callable[[str, int, int | None], None]


def no_progress(stage: str, done: int, total: int | None) -> None:
    """The default progress callback: nothing shown."""


def create_encoder(name: str, weights: Path | None) -> Encoder:
    """The encoder with its weights, on the GPU when there is one."""
    from histosearch.embed import default_device
    from histosearch.encoders import create_encoder as encoder_named

    return encoder_named(name, weights).to(default_device())


def embed_patches(
    paths: list[Path],
    encoder: Encoder,
    settings: EvalSettings,
    stage: str,
    on_progress: ProgressCallback,
) -> np.ndarray:
    """Each patch image embedded whole, in batches."""
    from histosearch.embed import ImageDataset, embed_dataset

    done, total = 0, len(paths)
    on_progress(stage, done, total)

    def advance(n: int) -> None:
        nonlocal done
        done += n
        on_progress(stage, done, total)

    dataset = ImageDataset(paths, encoder.input_size)
    return embed_dataset(dataset, encoder, settings.batch_size, settings.workers, advance)


def embed_slide(
    path: Path,
    encoder: Encoder,
    magnification: float,
    settings: EvalSettings,
    resolution: tuple[float | None, float | None] = (None, None),
) -> np.ndarray:
    """A slide's tissue tiles embedded at `magnification`; `resolution`, its manifest row's
    (mpp, magnification), stands before the run's --mpp/--objective-power for a file that
    records none."""
    from histosearch.embed.items import embed_file
    from histosearch.embed.options import EmbedOptions
    from histosearch.tiling import Tiling

    mpp, objective_power = resolution
    options = EmbedOptions(
        mpp=mpp or settings.mpp, objective_power=objective_power or settings.objective_power
    )
    return embed_file(path, encoder, Tiling(magnification, settings.tile_size), options).features
