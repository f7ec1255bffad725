"""The report of an `eval`: metrics.json, report.md and the figures."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path

import numpy as np

from histosearch.evaluation.labelled import LabelledSet
from histosearch.evaluation.protocols import RANK_GALLERY_DEPTH, PatchEvaluation
from histosearch.fileio import atomic_path
from histosearch.search.similarity import l2_normalize


def write_report(
    out: Path,
    settings: dict[str, object],
    patch: PatchEvaluation | None,
    slides: dict[str, dict[str, dict[str, object]]] | None,
    figures: list[str],
) -> None:
    """metrics.json and report.md, atomically."""
    payload = {
        "settings": settings,
        "patch": None
        if patch is None
        else {
            "metrics": patch.metrics,
            "per_class": patch.per_class,
            "spatial_agreement": None
            if patch.spatial_agreement is None
            else patch.spatial_agreement.as_dict(),
        },
        "slide": slides,
        "figures": figures,
    }
    with atomic_path(out / "metrics.json") as tmp:
        tmp.write_text(json.dumps(payload, indent=2, default=_jsonable))
    lines = [f"# Evaluation of `{settings['encoder']}` on `{settings['source']}`", ""]
    lines += [f"- {k}: `{v}`" for k, v in settings.items()]
    if patch is not None:
        lines += ["", "## Patch retrieval (leave-one-out)", "", "| metric | value |", "|---|---|"]
        lines += [f"| {k} | {_fmt(v)} |" for k, v in patch.metrics.items()]
        columns = list(next(iter(patch.per_class.values())))
        lines += ["", "### Per class", "", "| class | " + " | ".join(columns) + " |"]
        lines += ["|---" * (len(columns) + 1) + "|"]
        for cls, values in patch.per_class.items():
            lines += [f"| {cls} | " + " | ".join(_fmt(values[c]) for c in columns) + " |"]
        if patch.spatial_agreement is not None:
            found = patch.spatial_agreement
            lines += ["", "### Label agreement of same-slide pairs by distance", ""]
            lines += ["| distance from | to | pairs | sharing a label |", "|---|---|---|---|"]
            lines += [
                f"| {low:.4g} | {high:.4g} | {n} | {_fmt(float(a)) if n else '-'} |"
                for low, high, n, a in zip(
                    found.edges[:-1], found.edges[1:], found.pairs, found.agreement, strict=True
                )
            ]
    if slides:
        lines += ["", "## Slide retrieval (leave-one-out, WSI measure)"]
        for magnification, variants in slides.items():
            names = list(variants)
            metrics = list(next(iter(variants.values())))
            lines += ["", f"### {magnification}", "", "| metric | " + " | ".join(names) + " |"]
            lines += ["|---" * (len(names) + 1) + "|"]
            lines += [
                f"| {m} | " + " | ".join(_fmt(variants[n][m]) for n in names) + " |"
                for m in metrics
            ]
    if figures:
        lines += ["", "## Figures", ""] + [f"![{f}]({f})" for f in figures]
    with atomic_path(out / "report.md") as tmp:
        tmp.write_text("\n".join(lines) + "\n")


def _fmt(value: object) -> str:
    if value is None:
        return "-"
    return f"{value:.4f}" if isinstance(value, float) else str(value)


def _jsonable(value: object) -> object:
    if isinstance(value, np.generic):
        return value.item()
    raise TypeError(f"not JSON serialisable: {type(value)}")


def save_figures(
    out: Path,
    features: np.ndarray,
    data: LabelledSet,
    patch: PatchEvaluation,
    k: int,
    queries_per_class: int,
    seed: int,
    encoder_name: str,
    on_figure: Callable[[str], None] = lambda _: None,
) -> list[str]:
    """UMAP and PCA of the embeddings, the rank-10 gallery and the confusion matrix;
    `on_figure` is told the name of each figure before it is made (UMAP takes the longest)."""
    import umap
    from PIL import Image

    from histosearch.viz import (
        GalleryItem,
        save_agreement_plot,
        save_confusion,
        save_embedding_plot,
        save_rank_gallery,
    )

    figures = []
    on_figure("PCA")
    unit = l2_normalize(features)
    centred = unit - unit.mean(axis=0)
    _, _, vt = np.linalg.svd(centred, full_matrices=False)
    save_embedding_plot(
        centred @ vt[:2].T, data.labels, out / "pca.png", f"PCA of {encoder_name} embeddings"
    )
    figures.append("pca.png")
    on_figure("UMAP")
    points = umap.UMAP(
        n_neighbors=15, min_dist=0.1, metric="cosine", random_state=seed, n_jobs=1
    ).fit_transform(unit)
    save_embedding_plot(points, data.labels, out / "umap.png", f"UMAP of {encoder_name} embeddings")
    figures.append("umap.png")
    on_figure("confusion matrix")
    save_confusion(data.labels, patch.votes, out / "confusion.png", f"{encoder_name}: MV@{k}")
    figures.append("confusion.png")
    if patch.spatial_agreement is not None:
        on_figure("spatial agreement")
        found = patch.spatial_agreement
        shares = np.unique(np.asarray(data.labels), return_counts=True)[1] / len(data.labels)
        save_agreement_plot(
            found.edges,
            found.agreement,
            found.pairs,
            float((shares**2).sum()),
            out / "spatial-agreement.png",
            "Labels of tiles on the same slide, by distance (what near/far pairs can teach)",
        )
        figures.append("spatial-agreement.png")
    if all(p.is_file() for p in data.paths):
        on_figure("rank gallery")
        rng = np.random.default_rng(seed)
        labels = np.asarray(data.labels)

        def item(index: int, title: str, correct: bool | None) -> GalleryItem:
            with Image.open(data.paths[index]) as image:
                return GalleryItem(np.asarray(image.convert("RGB")), title, correct)

        rows = []
        for cls in sorted(set(data.labels)):
            members = np.flatnonzero(labels == cls)
            for query in rng.choice(members, min(queries_per_class, len(members)), replace=False):
                hits = [
                    item(j, f"{rank + 1}. {labels[j]}", labels[j] == cls)
                    for rank, j in enumerate(patch.neighbours[query][:RANK_GALLERY_DEPTH])
                    if j >= 0
                ]
                rows.append((item(query, f"query: {cls}", None), hits))
        save_rank_gallery(rows, out / "gallery.png", f"{encoder_name}: rank-10 retrieval")
        figures.append("gallery.png")
    return figures
