"""`histosearch eval`: an encoder measured with the papers' protocols."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer
from rich.table import Table

from histosearch.cli.common import (
    DEFAULT_ENCODER,
    ENCODER_HELP,
    Metric,
    SlideReduction,
    console,
    error_console,
    progress,
    report_failures,
)
from histosearch.embed import default_device
from histosearch.errors import HistosearchError


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
    metric: Annotated[Metric, typer.Option("--metric")] = "cosine",
    ks: Annotated[list[int] | None, typer.Option("--k", help="Ranks (default 1 3 5).")] = None,
    slide_column: Annotated[
        str | None,
        typer.Option("--slide-column", help="Also run the slide protocol, patches grouped by it."),
    ] = None,
    reduction: Annotated[
        SlideReduction, typer.Option("--reduction", help="Slide protocol.")
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
    from histosearch.evaluation.cache import (
        EMBEDDINGS,
        cached_embeddings,
        embedding_key,
        save_embeddings,
    )
    from histosearch.evaluation.labelled import (
        archive_labelled_set,
        check_evaluable,
        group_features,
        read_labelled_manifest,
    )
    from histosearch.evaluation.protocols import evaluate_patches, evaluate_slides
    from histosearch.evaluation.report import save_figures, write_report

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
        key = embedding_key(encoder_name, weights)
        features = cached_embeddings(out, key, data.paths)
        if features is None:
            with progress() as bar:
                task = bar.add_task(f"embedding with {encoder_name}", total=len(data.paths))
                features = embed_dataset(
                    ImageDataset(data.paths, encoder.input_size),
                    encoder,
                    batch_size,
                    workers,
                    lambda n: bar.advance(task, n),
                )
            save_embeddings(out, key, data.paths, features)
        else:
            console.print(f"embeddings reused from {out / EMBEDDINGS}")
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
    from histosearch.evaluation.protocols import evaluate_slides
    from histosearch.evaluation.report import write_report

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
