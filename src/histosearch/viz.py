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


def _save(figure: plt.Figure, path: str | Path, dpi: int) -> None:
    """Lay out, write as PNG atomically, and free the figure."""
    figure.tight_layout()
    with atomic_path(path) as tmp:
        figure.savefig(tmp, format="png", dpi=dpi)
    plt.close(figure)


def _draw_cell(
    axis: plt.Axes, item: GalleryItem, is_query: bool, fontsize: int, frame: int
) -> None:
    """One picture with its title, framed black (query), green/red (right/wrong) or grey."""
    axis.imshow(item.image)
    axis.set_xticks([])
    axis.set_yticks([])
    axis.set_title(item.title, fontsize=fontsize)
    colour = (
        "black" if is_query else {True: "tab:green", False: "tab:red", None: "grey"}[item.correct]
    )
    for spine in axis.spines.values():
        spine.set_edgecolor(colour)
        spine.set_linewidth(frame if item.correct is not None or is_query else 1)


def save_gallery(
    query: GalleryItem, hits: list[GalleryItem], path: str | Path, title: str = ""
) -> None:
    """A row: the query, then the hits with their titles (label, similarity), as a PNG."""
    n = len(hits) + 1
    figure, axes = plt.subplots(1, n, figsize=(2.3 * n, 2.9), squeeze=False)
    for axis, item, is_query in zip(
        axes[0], [query, *hits], [True] + [False] * len(hits), strict=True
    ):
        _draw_cell(axis, item, is_query, fontsize=8, frame=4)
    if title:
        figure.suptitle(title, fontsize=10)
    _save(figure, path, dpi=110)


def _colours(labels: list[str]) -> dict[str, tuple[float, ...]]:
    classes = sorted(set(labels))
    palette = plt.get_cmap("tab10" if len(classes) <= 10 else "tab20")
    return {cls: palette(i % palette.N) for i, cls in enumerate(classes)}


def save_embedding_plot(
    points: np.ndarray, labels: list[str], path: str | Path, title: str
) -> None:
    """A 2-D scatter of embeddings coloured by label."""
    colours = _colours(labels)
    figure, axis = plt.subplots(figsize=(6, 5.5))
    labels_arr = np.asarray(labels)
    for cls, colour in colours.items():
        members = labels_arr == cls
        axis.scatter(
            *points[members].T, s=4, alpha=0.6, color=colour, label=f"{cls} ({members.sum()})"
        )
    axis.set_title(title, fontsize=10)
    axis.set_xticks([])
    axis.set_yticks([])
    axis.legend(markerscale=4, fontsize=8, loc="best")
    _save(figure, path, dpi=110)


def save_rank_gallery(
    rows: list[tuple[GalleryItem, list[GalleryItem]]], path: str | Path, title: str
) -> None:
    """Queries down the side, each followed by its ranked results framed green/red."""
    depth = max(len(hits) for _, hits in rows) + 1
    figure, axes = plt.subplots(
        len(rows), depth, figsize=(1.25 * depth, 1.45 * len(rows)), squeeze=False
    )
    for axis_row, (query, hits) in zip(axes, rows, strict=True):
        for axis, item, is_query in zip(
            axis_row, [query, *hits], [True] + [False] * len(hits), strict=False
        ):
            _draw_cell(axis, item, is_query, fontsize=6, frame=3)
        for axis in axis_row[len(hits) + 1 :]:
            axis.axis("off")
    figure.suptitle(title, fontsize=9)
    _save(figure, path, dpi=100)


def save_confusion(truth: list[str], predicted: list[object], path: str | Path, title: str) -> None:
    """The confusion matrix of majority-vote predictions, counts and row fractions."""
    classes = sorted(set(truth))
    index = {cls: i for i, cls in enumerate(classes)}
    matrix = np.zeros((len(classes), len(classes)), int)
    for t, p in zip(truth, predicted, strict=True):
        if p in index:
            matrix[index[t], index[p]] += 1
    fractions = matrix / np.maximum(matrix.sum(axis=1, keepdims=True), 1)
    figure, axis = plt.subplots(figsize=(1.2 * len(classes) + 2.5, 1.2 * len(classes) + 1.8))
    axis.imshow(fractions, cmap="Blues", vmin=0, vmax=1)
    for i in range(len(classes)):
        for j in range(len(classes)):
            colour = "white" if fractions[i, j] > 0.6 else "black"
            axis.text(
                j,
                i,
                f"{matrix[i, j]}\n{fractions[i, j]:.0%}",
                ha="center",
                va="center",
                fontsize=8,
                color=colour,
            )
    axis.set_xticks(range(len(classes)), classes, rotation=30, ha="right", fontsize=8)
    axis.set_yticks(range(len(classes)), classes, fontsize=8)
    axis.set_xlabel("majority vote of the top k")
    axis.set_ylabel("true label")
    axis.set_title(title, fontsize=9)
    _save(figure, path, dpi=110)


def save_agreement_plot(
    edges: np.ndarray,
    agreement: np.ndarray,
    pairs: np.ndarray,
    chance: float,
    path: str | Path,
    title: str,
) -> None:
    """Label agreement of same-slide pairs against their distance (log axis), bins with
    pairs only, with the agreement of random pairs drawn for reference."""
    centres = np.sqrt(edges[:-1] * edges[1:])
    filled = pairs > 0
    figure, axis = plt.subplots(figsize=(6, 3.4))
    axis.semilogx(centres[filled], agreement[filled], "o-", color="tab:blue")
    for x, y, n in zip(centres[filled], agreement[filled], pairs[filled], strict=True):
        axis.annotate(f"{n:,}", (x, y), textcoords="offset points", xytext=(0, 6), fontsize=6)
    axis.axhline(chance, color="grey", linestyle="--", label="random pair of the set")
    axis.set_xlabel("distance between the two tiles (coordinate units)")
    axis.set_ylabel("pairs sharing a label")
    axis.set_ylim(0, 1.05)
    axis.legend(fontsize=7, loc="lower left")
    axis.set_title(title, fontsize=9)
    _save(figure, path, dpi=110)


def save_cam_figure(
    rows: list[tuple[str, np.ndarray, dict[str, np.ndarray]]], path: str | Path, title: str
) -> None:
    """For each (label, image, maps): the image, then each map overlaid on it (jet, 45%)."""
    columns = 1 + len(rows[0][2])
    figure, axes = plt.subplots(
        len(rows), columns, figsize=(2.2 * columns, 2.4 * len(rows)), squeeze=False
    )
    for axis_row, (label, image, maps) in zip(axes, rows, strict=True):
        axis_row[0].imshow(image)
        axis_row[0].set_title(label, fontsize=8)
        for axis, (name, cam) in zip(axis_row[1:], maps.items(), strict=True):
            axis.imshow(image)
            axis.imshow(cam, cmap="jet", alpha=0.45, vmin=0, vmax=1)
            axis.set_title(name, fontsize=8)
        for axis in axis_row:
            axis.set_xticks([])
            axis.set_yticks([])
    figure.suptitle(title, fontsize=9)
    _save(figure, path, dpi=100)
