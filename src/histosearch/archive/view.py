"""`SearchView`: what a search reads from an archive, one consistent snapshot."""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from histosearch.archive.catalog import SlideRecord
from histosearch.archive.checksums import mismatch
from histosearch.archive.store import rows_checksum


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

    def verify(self, positions: Iterable[int]) -> None:
        """Refuse, naming the slide, when the store rows of a slide (by position) differ from
        the checksum recorded when they were written. A search calls it on every slide whose
        rows make its answer."""
        for position in positions:
            record = self.records[int(position)]
            if record.store_crc is None:  # stored before checksums were recorded
                continue
            start, stop = self.offsets[position], self.offsets[position + 1]
            if rows_checksum(self.vectors[start:stop], self.coords[start:stop]) != record.store_crc:
                store = getattr(self.vectors, "filename", None)  # a memory map names its file
                raise mismatch(
                    Path(store).parent if store else record.path,
                    f"the search store's rows (vectors and coordinates) of {record.name} "
                    f"(slide {record.id})",
                )
