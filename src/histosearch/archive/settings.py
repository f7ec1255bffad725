"""What an archive is built with, checked where it is defined; a query must match it."""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import TYPE_CHECKING

from histosearch.archive.reduce import REDUCERS
from histosearch.mosaic import parse_mosaic
from histosearch.tiling import EDGES, Tiling
from histosearch.tissue import DETECTORS

if TYPE_CHECKING:
    from histosearch.encoders import Encoder

# The patch index: inner product of L2-normalised vectors (cosine), or L2 distance of the
# reduced vectors as the LGFFEM paper indexes them.
INDEX_METRICS = ("cosine", "l2")
REDUCTIONS = (*REDUCERS, "none")
TISSUE_METHODS = tuple(DETECTORS)


@dataclass(frozen=True)
class ArchiveSettings:
    """What an archive is built with; a query must be embedded the same way."""

    encoder: str = "efficientnet-lite0-imagenet"
    magnification: float = 5.0
    tile_size: int = 224
    tissue: str = "otsu"
    reduction: str = "pca"
    n_features: int = 128
    index_metric: str = "cosine"
    # the partial last row and column of tiles: dropped (the papers' grid) or kept, padded
    edges: str = "drop"
    # the tissue tiles kept per slide (a Yottixel mosaic): "all", a number or a percentage
    mosaic: str = "all"

    def __post_init__(self) -> None:
        object.__setattr__(self, "mosaic", parse_mosaic(self.mosaic))
        for name, value, choices in (
            ("tissue", self.tissue, TISSUE_METHODS),
            ("reduction", self.reduction, REDUCTIONS),
            ("index_metric", self.index_metric, INDEX_METRICS),
            ("edges", self.edges, EDGES),
        ):
            if value not in choices:
                raise ValueError(f"{name} {value!r}: choose from {', '.join(choices)}")
        for name, number in (
            ("magnification", self.magnification),
            ("tile_size", self.tile_size),
            ("n_features", self.n_features),
        ):
            if not number > 0:
                raise ValueError(f"{name} must be positive, not {number}")

    @property
    def tiling(self) -> Tiling:
        return Tiling(self.magnification, self.tile_size, self.tissue, self.edges, self.mosaic)

    def as_catalog(self) -> dict[str, str]:
        return {k: f"{v:g}" if isinstance(v, float) else str(v) for k, v in asdict(self).items()}


# Settings a query or a later `add` must match; `dim` and `weights` are the encoder's own.
MATCHED_KEYS = (*ArchiveSettings.__dataclass_fields__, "dim", "weights")


def encoder_settings(encoder: Encoder) -> dict[str, str]:
    """What of the encoder an archive records: its output size and its weights' fingerprint."""
    return {"dim": str(encoder.dim), "weights": encoder.fingerprint}
