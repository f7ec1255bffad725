"""Pictures people would rather see than read: search galleries."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt
import numpy as np

from histosearch.fileio import atomic_path


@dataclass(frozen=True)
class GalleryItem:
    """One picture of a gallery; `correct` colours its frame (None: no frame)."""

    image: np.ndarray
    title: str
    correct: bool | None = None


def save_gallery(
    query: GalleryItem, hits: list[GalleryItem], path: str | Path, title: str = ""
) -> None:
    """A row: the query, then the hits with their titles (label, similarity), as a PNG."""
    n = len(hits) + 1
    figure, axes = plt.subplots(1, n, figsize=(2.3 * n, 2.9), squeeze=False)
    for axis, item, is_query in zip(
        axes[0], [query, *hits], [True] + [False] * len(hits), strict=True
    ):
        axis.imshow(item.image)
        axis.set_xticks([])
        axis.set_yticks([])
        colour = (
            "black"
            if is_query
            else {True: "tab:green", False: "tab:red", None: "grey"}[item.correct]
        )
        for spine in axis.spines.values():
            spine.set_edgecolor(colour)
            spine.set_linewidth(4 if item.correct is not None or is_query else 1)
        axis.set_title(item.title, fontsize=8)
    if title:
        figure.suptitle(title, fontsize=10)
    figure.tight_layout()
    with atomic_path(path) as tmp:
        figure.savefig(tmp, format="png", dpi=110)
    plt.close(figure)
