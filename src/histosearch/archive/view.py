"""`SearchView`: what a search reads from an archive, one consistent snapshot."""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from histosearch.archive.catalog import SlideRecord


@dataclass
class SearchView:
    """The stored slides in store order and the store rows they own (rows past
    `offsets[-1]` are not committed and never read), of one store generation."""

    records: list[SlideRecord]
    offsets: np.ndarray
    vectors: np.ndarray
    coords: np.ndarray
    generation: int
    row_slide: np.ndarray = field(init=False)

    def __post_init__(self) -> None:
        self.row_slide = np.repeat(np.arange(len(self.records)), np.diff(self.offsets))
