"""`histosearch eval`: an encoder measured with the papers' protocols."""

from __future__ import annotations

from dataclasses import dataclass
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
from histosearch.errors import HistosearchError


def eval_command(
    manifest: Annotated[
        Path | None, typer.Argument(help="Manifest CSV: path,label[,group,patient,slide,x,y].")
    ] = None,
    archive_dir: Annotated[
        Path | None, typer.Option("--archive", help="Evaluate an archive's labelled slides.")
    ] = None,
    encoder_names: Annotated[
        list[str] | None,
        typer.Option(
            "--encoder",
            help=ENCODER_HELP + " Repeat to compare encoders; NAME=WEIGHTS gives each its own.",
        ),
    ] = None,
    weights: Annotated[
        Path | None, typer.Option("--weights", help="Local checkpoint (file or folder).")
    ] = None,
    out: Annotated[
        Path,
        typer.Option("--out", help="Output folder: each run writes a new numbered subfolder."),
    ] = Path("eval-output"),
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
    mpp: Annotated[
        float | None, typer.Option("--mpp", help="Slides without resolution: microns/pixel.")
    ] = None,
    objective_power: Annotated[
        float | None,
        typer.Option("--objective-power", help="Slides without resolution: objective power."),
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
    """Measure encoders on a labelled set with the four papers' protocols and metrics; with
    several --encoder, one comparison table and chart as well."""
    from histosearch.embed import default_device, is_patch_file
    from histosearch.evaluation.compare import next_run_folder, write_comparison
    from histosearch.evaluation.labelled import (
        archive_labelled_set,
        check_evaluable,
        read_labelled_manifest,
    )

    ks = sorted(set(ks or [1, 3, 5]))
    if (manifest is None) == (archive_dir is None):
        raise typer.BadParameter("give a manifest or --archive, not both")
    if metric not in ("cosine", "l2"):
        raise typer.BadParameter("choose cosine or l2", param_hint="--metric")
    if (near is None) != (far is None):
        raise typer.BadParameter("give both --near and --far", param_hint="--near/--far")
    choices = _encoder_choices(encoder_names or [DEFAULT_ENCODER], weights)
    if manifest is not None:
        data = read_labelled_manifest(manifest, skip_missing)
        for path in data.missing:
            error_console.print(f"[yellow]skipped missing[/yellow] {path}", highlight=False)
    else:
        data, stored, archive_encoder = archive_labelled_set(archive_dir)
        choices = [(archive_encoder, None)]
    if exclude == "auto":
        exclude = next((c for c in ("group", "patient", "slide") if data.column(c)), "none")
    exclude_column = None if exclude == "none" else exclude
    check_evaluable(data, ks, exclude_column)
    if save_threshold and len(choices) > 1:
        raise typer.BadParameter("--save-threshold takes one encoder", param_hint="--encoder")
    slides = manifest is not None and not is_patch_file(data.paths[0], tile_size)
    if slides and len(choices) > 1:
        raise typer.BadParameter(
            "compare encoders on a manifest of patches", param_hint="--encoder"
        )
    run = next_run_folder(out, "+".join(Path(name).name for name, _ in choices))
    if slides:
        from histosearch.encoders import create_encoder

        _check_resolution(data, mpp, objective_power)
        encoder = create_encoder(*choices[0]).to(default_device())
        _eval_slide_manifest(
            data,
            encoder,
            run,
            ks,
            exclude_column,
            mags or [5.0],
            tile_size,
            (mpp, objective_power),
            (reduction, n_features),
        )
        return
    protocol = _PatchProtocol(
        ks=ks,
        exclude=exclude,
        exclude_column=exclude_column,
        metric=metric,
        pairs=pairs,
        near_far=None if near is None else (near, far),
        slide_column=slide_column,
        reduction=(reduction, n_features),
        queries_per_class=queries_per_class,
        seed=seed,
    )
    results = []
    for name, encoder_weights in choices:
        folder = run if len(choices) == 1 else run / name.strip("/").replace("/", "-")
        if manifest is None:
            features, fingerprint, dim = stored, "archive", stored.shape[1]
        else:
            features, fingerprint, dim = _embed_manifest(
                data, name, encoder_weights, out, batch_size, workers
            )
        results.append(protocol.run(data, features, name, fingerprint, dim, folder, run))
    if save_threshold:
        from histosearch.train.checkpoint import save_threshold as store

        name = choices[0][0]
        if not (name.endswith(".pt") and Path(name).is_file()):
            raise typer.BadParameter("only a trained checkpoint.pt stores a threshold")
        threshold = float(results[0].metrics["verification threshold"])
        store(Path(name), threshold)
        console.print(f"threshold {threshold:.4f} saved in {name}")
    if len(results) > 1:
        settings = {
            "source": data.source,
            "items": len(data.labels),
            "classes": sorted(set(data.labels)),
            "exclude": exclude,
            "metric": metric,
            "seed": seed,
        }
        files = write_comparison(run, settings, results, max(ks))
        _print_comparison(results, max(ks))
        console.print(f"comparison: {', '.join(str(run / f) for f in files)}")


def _encoder_choices(names: list[str], weights: Path | None) -> list[tuple[str, Path | None]]:
    """(encoder, weights) pairs from --encoder NAME[=WEIGHTS] and --weights (one encoder)."""
    choices = []
    for name in names:
        encoder, _, path = name.partition("=")
        choices.append((encoder, Path(path) if path else None))
    if weights is not None:
        if len(choices) > 1:
            raise typer.BadParameter(
                "with several encoders give each its weights as --encoder NAME=WEIGHTS",
                param_hint="--weights",
            )
        choices = [(choices[0][0], weights)]
    if len({name for name, _ in choices}) < len(choices):
        raise typer.BadParameter("an encoder is named twice", param_hint="--encoder")
    return choices


def _embed_manifest(
    data, name: str, weights: Path | None, out: Path, batch_size: int, workers: int
) -> tuple[object, str, int]:
    """(features, weights fingerprint, dim) of a patch set, from the cache in `out` when the
    encoder, its weights and every image are unchanged."""
    from histosearch.embed import ImageDataset, default_device, embed_dataset
    from histosearch.encoders import create_encoder
    from histosearch.evaluation.cache import cached_embeddings, embedding_key, save_embeddings

    encoder = create_encoder(name, weights).to(default_device())
    key = embedding_key(name, encoder.fingerprint)
    features = cached_embeddings(out, key, data.paths)
    if features is not None:
        console.print(f"{name}: embeddings reused from {out}")
        return features, encoder.fingerprint, encoder.dim
    with progress() as bar:
        task = bar.add_task(f"embedding with {name}", total=len(data.paths))
        features = embed_dataset(
            ImageDataset(data.paths, encoder.input_size),
            encoder,
            batch_size,
            workers,
            lambda n: bar.advance(task, n),
        )
    save_embeddings(out, key, data.paths, features)
    return features, encoder.fingerprint, encoder.dim


@dataclass(frozen=True)
class _PatchProtocol:
    """The patch protocol with one run's settings, applied to each encoder's features."""

    ks: list[int]
    exclude: str
    exclude_column: str | None
    metric: str
    pairs: int
    near_far: tuple[float, float] | None
    slide_column: str | None
    reduction: tuple[str, int]
    queries_per_class: int
    seed: int

    def run(self, data, features, name: str, fingerprint: str, dim: int, folder: Path, run: Path):
        """Evaluate one encoder's features; its report goes to `folder`."""
        from histosearch.evaluation.compare import EncoderResult
        from histosearch.evaluation.labelled import group_features
        from histosearch.evaluation.protocols import evaluate_patches, evaluate_slides
        from histosearch.evaluation.report import save_figures, write_report

        ks = self.ks
        patch = evaluate_patches(
            features,
            data,
            ks,
            self.exclude_column,
            self.metric,
            self.pairs,
            self.near_far,
            self.seed,
        )
        slides = None
        if self.slide_column is not None:
            column = self.slide_column
            slide_features, slide_labels, names = group_features(features, data, column)
            patients = data.column("patient")
            keys = None
            if self.exclude_column == "patient" and patients is not None and column != "patient":
                by_slide = dict(zip(data.column(column), patients, strict=True))
                keys = [by_slide[n] for n in names]
            slides = {
                f"slides = {column}": evaluate_slides(
                    slide_features, slide_labels, ks, [self.reduction], keys
                )
            }
        settings = {
            "source": data.source,
            "encoder": name,
            "weights fingerprint": fingerprint,
            "items": len(data.labels),
            "classes": sorted(set(data.labels)),
            "exclude": self.exclude,
            "metric": self.metric,
            "k": ks,
            "pairs": self.pairs,
            "near_far": None if self.near_far is None else list(self.near_far),
            "slide_column": self.slide_column,
            "reduction": f"{self.reduction[0]} {self.reduction[1]}",
            "seed": self.seed,
            "missing_skipped": len(data.missing),
        }
        folder.mkdir(parents=True, exist_ok=True)
        with progress() as bar:
            bar.add_task(f"figures for {name}", total=None)
            figures = save_figures(
                folder, features, data, patch, max(ks), self.queries_per_class, self.seed, name
            )
        write_report(folder, settings, patch, slides, figures)
        _print_metrics(name, patch.metrics, slides)
        console.print(f"report: {folder}/report.md, {folder}/metrics.json")
        return EncoderResult(
            name, fingerprint, dim, patch.metrics, str(folder.relative_to(run)) or "."
        )


def _check_resolution(data, mpp: float | None, objective_power: float | None) -> None:
    """Refuse, in one message, a slide manifest none of whose files records a resolution."""
    from histosearch.slide import open_slide

    if mpp is not None or objective_power is not None:
        return
    for path in data.paths:
        try:
            with open_slide(path) as slide:
                if slide.mpp is not None or slide.objective_power is not None:
                    return
        except HistosearchError:
            continue  # an unreadable file is reported with the others later
    raise HistosearchError(
        data.source,
        f"none of the {len(data.paths)} files records its resolution (microns per pixel or "
        "objective power): give --mpp or --objective-power",
    )


def _print_comparison(results, k: int) -> None:
    from histosearch.evaluation.compare import compared_metrics

    columns = compared_metrics(k)
    table = Table(title="Encoders compared")
    for column in ("encoder", "weights", "dim", *columns):
        table.add_column(column, justify="left" if column == "encoder" else "right")
    for r in results:
        table.add_row(
            r.encoder,
            r.fingerprint,
            str(r.dim),
            *[f"{float(r.metrics[c]):.4f}" for c in columns],
        )
    console.print(table)


def _eval_slide_manifest(
    data,
    encoder,
    out: Path,
    ks: list[int],
    exclude_column: str | None,
    mags: list[float],
    tile_size: int,
    resolution: tuple[float | None, float | None],
    reduction: tuple[str, int],
) -> None:
    """The slide protocol on a manifest of whole slides, at each magnification."""
    from histosearch.embed.items import embed_file
    from histosearch.embed.options import EmbedOptions
    from histosearch.evaluation.protocols import evaluate_slides
    from histosearch.evaluation.report import write_report
    from histosearch.tiling import Tiling

    options = EmbedOptions(mpp=resolution[0], objective_power=resolution[1])

    keys_column = data.column(exclude_column) if exclude_column else None
    results, failures = {}, []
    for mag in mags:
        features, labels, keys = [], [], []
        with progress() as bar:
            task = bar.add_task(f"slides at {mag:g}x", total=len(data.paths))
            for index, path in enumerate(data.paths):
                try:
                    tiles = embed_file(path, encoder, Tiling(mag, tile_size), options).features
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
