"""`histosearch eval`: a labelled set in, the papers' protocols run, a report out.

A labelled set is a manifest CSV (`path,label` and optionally `group`, `patient`, `slide`,
`x`, `y`; paths relative to the CSV) of patches or slides, or an archive whose slides carry
labels. The report is a folder with `metrics.json` (every number and the settings), a
Markdown `report.md`, and figures (UMAP and PCA of the embeddings, a rank-10 gallery, the
confusion matrix of the majority votes).
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from histosearch.errors import HistosearchError
from histosearch.evaluate import (
    DistanceAgreement,
    addr,
    agreement_by_distance,
    label_agreement,
    label_pairs,
    linear_probe,
    majority_vote,
    pair_verification,
    rank_neighbours,
    retrieval_metrics,
    spatial_pairs,
)
from histosearch.fileio import atomic_path
from histosearch.inputs import read_manifest_rows
from histosearch.reduce import make_reducer
from histosearch.similarity import l2_normalize, similarity_matrix

MANIFEST_COLUMNS = ("path", "label", "group", "patient", "slide", "x", "y")
RANK_GALLERY_DEPTH = 10


class LabelledSetError(HistosearchError):
    """A labelled set that cannot be evaluated as asked."""


@dataclass
class LabelledSet:
    """Items (patch files, or rows of an archive) with their labels and optional metadata."""

    source: str
    paths: list[Path]
    labels: list[str]
    columns: dict[str, list[str]] = field(default_factory=dict)
    xy: np.ndarray | None = None
    missing: list[str] = field(default_factory=list)

    def column(self, name: str) -> list[str] | None:
        return self.columns.get(name)


def read_labelled_manifest(path: Path, skip_missing: bool = False) -> LabelledSet:
    """Check a manifest before any heavy work: columns, files, classes."""
    rows, header, missing = read_manifest_rows(path)
    unknown = [c for c in header if c not in MANIFEST_COLUMNS]
    if unknown or "label" not in header:
        raise LabelledSetError(
            path,
            f"columns must be path,label[,{','.join(MANIFEST_COLUMNS[2:])}]; "
            + (f"unknown: {', '.join(unknown)}" if unknown else f"got {', '.join(header)}"),
        )
    if missing and not skip_missing:
        listed = "\n  ".join(missing[:20]) + ("\n  ..." if len(missing) > 20 else "")
        raise LabelledSetError(
            path,
            f"{len(missing)} of {len(rows)} listed files are missing (--skip-missing evaluates "
            f"the rest):\n  {listed}",
        )
    absent = set(missing)
    rows = [r for r in rows if r["path"] not in absent]
    xy = None
    if "x" in header and "y" in header:
        xy = np.array([[float(r["x"]), float(r["y"])] for r in rows])
    return LabelledSet(
        source=str(path),
        paths=[path.parent / r["path"] for r in rows],
        labels=[r["label"] for r in rows],
        columns={c: [r[c] for r in rows] for c in ("group", "patient", "slide") if c in header},
        xy=xy,
        missing=missing,
    )


def check_evaluable(data: LabelledSet, ks: Sequence[int], exclude: str | None) -> None:
    """Refuse a set with one class, or too few items for the largest k."""
    classes = sorted(set(data.labels))
    if len(classes) < 2:
        raise LabelledSetError(data.source, f"needs at least two labels, found {classes}")
    if exclude is not None and data.column(exclude) is None:
        raise LabelledSetError(data.source, f"--exclude {exclude}: no such column")
    if len(data.labels) <= max(ks):
        raise LabelledSetError(
            data.source, f"{len(data.labels)} items cannot give top-{max(ks)} neighbours"
        )


@dataclass
class PatchEvaluation:
    """The patch protocol's results and what produced them."""

    metrics: dict[str, object]
    per_class: dict[str, dict[str, float]]
    neighbours: np.ndarray
    votes: list[object]
    # label agreement of same-slide pairs by distance, when the set has slides and x, y
    spatial_agreement: DistanceAgreement | None = None


EMBEDDINGS = "embeddings.npz"


def embedding_key(encoder_name: str, weights: Path | None) -> str:
    """What a set's embeddings depend on: the encoder, and the size and time of the files
    its weights come from (a retrained checkpoint gets a new key)."""
    parts = [encoder_name, str(weights)]
    for candidate in (Path(encoder_name), weights):
        if candidate is not None and candidate.is_file():
            stat = candidate.stat()
            parts.append(f"{candidate.resolve()}:{stat.st_size}:{stat.st_mtime_ns}")
    return "|".join(parts)


def cached_embeddings(out: Path, key: str, paths: Sequence[Path]) -> np.ndarray | None:
    """The embeddings an earlier `eval` into `out` saved for the same encoder and files."""
    path = out / EMBEDDINGS
    if not path.is_file():
        return None
    try:
        with np.load(path) as stored:
            if str(stored["key"]) == key and stored["paths"].tolist() == [str(p) for p in paths]:
                return stored["features"]
    except Exception:  # an unreadable cache is only a cache: embed again
        return None
    return None


def save_embeddings(out: Path, key: str, paths: Sequence[Path], features: np.ndarray) -> None:
    """Keep a set's embeddings beside its report, for the next `eval` into `out`."""
    out.mkdir(parents=True, exist_ok=True)
    with atomic_path(out / EMBEDDINGS) as tmp, tmp.open("wb") as file:
        names = np.array([str(p) for p in paths])
        np.savez(file, key=np.array(key), paths=names, features=features)


def evaluate_patches(
    features: np.ndarray,
    data: LabelledSet,
    ks: Sequence[int],
    exclude: str | None,
    metric: str,
    n_pairs: int,
    near_far: tuple[float, float] | None,
    seed: int,
) -> PatchEvaluation:
    """Leave-one-out kNN retrieval, ADDR and pair verification on patch embeddings."""
    keys = data.column(exclude) if exclude else None
    neighbours, _ = rank_neighbours(features, max(*ks, RANK_GALLERY_DEPTH), keys, metric)
    result = retrieval_metrics(data.labels, neighbours, ks, keys)
    metrics: dict[str, object] = dict(result.as_dict())
    similar, dissimilar = label_pairs(data.labels, n_pairs, keys, seed)
    unit = l2_normalize(features)  # so that ADDR compares encoders of any scale alike
    metrics["ADDR (label pairs)"] = addr(unit, similar, dissimilar)
    verification = pair_verification(features, similar, dissimilar, seed)
    metrics |= {
        "verification threshold": verification.threshold,
        "verification accuracy": verification.test_accuracy,
        "verification ROC AUC": verification.roc_auc,
        "verification pairs": verification.n_pairs,
        "linear probe balanced accuracy": linear_probe(features, data.labels, keys),
    }
    slides = data.column("slide") or data.column("patient")
    spatial = None
    if data.xy is not None and slides is not None:
        spatial = agreement_by_distance(data.labels, slides, data.xy, seed=seed)
    if near_far is not None and data.xy is not None and slides is not None:
        near, far = spatial_pairs(slides, data.xy, near_far[0], near_far[1], n_pairs, seed)
        if len(near) and len(far):
            metrics["ADDR (near/far pairs)"] = addr(unit, near, far)
            metrics["near/far pairs"] = [len(near), len(far)]
            metrics["label agreement (near/far pairs)"] = [
                round(label_agreement(data.labels, pairs), 4) for pairs in (near, far)
            ]
    return PatchEvaluation(metrics, result.per_class, neighbours, result.votes[max(ks)], spatial)


def evaluate_slides(
    slide_features: list[np.ndarray],
    slide_labels: list[str],
    ks: Sequence[int],
    reductions: Sequence[tuple[str, int]],
    exclude_keys: list[str] | None = None,
) -> dict[str, dict[str, object]]:
    """Leave-one-out slide search with the WSI measure, for the full features and each
    reduction (kind, n_features) fit on all patches."""
    offsets = np.concatenate([[0], np.cumsum([len(f) for f in slide_features])])
    stacked = np.concatenate(slide_features)
    variants = {f"full ({stacked.shape[1]}-d)": stacked}
    for kind, n_features in reductions:
        if n_features < stacked.shape[1]:
            reducer = make_reducer(kind, n_features).fit(stacked)
            variants[f"{kind} {n_features}-d"] = reducer.transform(stacked)
    results = {}
    keys = np.arange(len(slide_labels)) if exclude_keys is None else np.asarray(exclude_keys)
    for name, features in variants.items():
        matrix = similarity_matrix(features, offsets, torch.float32)
        matrix[keys[:, None] == keys[None, :]] = -np.inf  # itself and same-key slides
        order = np.argsort(-matrix, axis=1, kind="stable")[:, : max(ks)]
        neighbours = np.where(np.isfinite(np.take_along_axis(matrix, order, 1)), order, -1)
        metrics = retrieval_metrics(slide_labels, neighbours, ks, exclude_keys)
        results[name] = {**metrics.as_dict(), "slides": len(slide_labels)}
    return results


def group_features(
    features: np.ndarray, data: LabelledSet, column: str
) -> tuple[list[np.ndarray], list[str], list[str]]:
    """Patches gathered into slides by `column`: features, majority labels, slide names."""
    values = data.column(column)
    if values is None:
        raise LabelledSetError(data.source, f"--slide-column {column}: no such column")
    order: dict[str, list[int]] = {}
    for index, value in enumerate(values):
        order.setdefault(value, []).append(index)
    names = list(order)
    slides = [features[order[name]] for name in names]
    labels = [str(majority_vote([data.labels[i] for i in order[name]])) for name in names]
    return slides, labels, names


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


def archive_labelled_set(archive_dir: Path) -> tuple[LabelledSet, np.ndarray, str]:
    """The patches of an archive as a labelled set (each patch carries its slide's label),
    their stored features, and the encoder that made them."""
    from histosearch.archive import Archive

    with Archive(archive_dir) as archive:
        features, offsets, records = archive.all_features()
        encoder = archive.settings["encoder"]
        counts = np.diff(offsets)
        paths: list[Path] = []
        for record in records:
            stored = archive.read(record, with_features=False).paths
            paths += [Path(p) for p in stored] if stored else [Path(record.path)] * record.n_patches
    unlabelled = [r.name for r in records if r.label is None]
    if unlabelled:
        raise LabelledSetError(
            archive_dir, f"{len(unlabelled)} slides have no label, e.g. {unlabelled[0]}"
        )

    def per_patch(values: list[str | None]) -> list[str]:
        return [str(v) for v, n in zip(values, counts, strict=True) for _ in range(n)]

    columns = {"slide": per_patch([r.name for r in records])}
    for name, values in (
        ("patient", [r.patient for r in records]),
        ("group", [r.group for r in records]),
    ):
        if all(v is not None for v in values):
            columns[name] = per_patch(values)
    data = LabelledSet(str(archive_dir), paths, per_patch([r.label for r in records]), columns)
    return data, features, encoder


def save_figures(
    out: Path,
    features: np.ndarray,
    data: LabelledSet,
    patch: PatchEvaluation,
    k: int,
    queries_per_class: int,
    seed: int,
    encoder_name: str,
) -> list[str]:
    """UMAP and PCA of the embeddings, the rank-10 gallery and the confusion matrix."""
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
    unit = l2_normalize(features)
    centred = unit - unit.mean(axis=0)
    _, _, vt = np.linalg.svd(centred, full_matrices=False)
    save_embedding_plot(
        centred @ vt[:2].T, data.labels, out / "pca.png", f"PCA of {encoder_name} embeddings"
    )
    figures.append("pca.png")
    points = umap.UMAP(
        n_neighbors=15, min_dist=0.1, metric="cosine", random_state=seed, n_jobs=1
    ).fit_transform(unit)
    save_embedding_plot(points, data.labels, out / "umap.png", f"UMAP of {encoder_name} embeddings")
    figures.append("umap.png")
    save_confusion(data.labels, patch.votes, out / "confusion.png", f"{encoder_name}: MV@{k}")
    figures.append("confusion.png")
    if patch.spatial_agreement is not None:
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
