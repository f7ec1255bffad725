"""`histosearch eval`: an encoder measured with the papers' protocols."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Annotated

import typer
from rich.table import Table

from histosearch.cli.common import (
    COLUMN_HELP,
    DEFAULT_ENCODER,
    ENCODER_HELP,
    Metric,
    SlideReduction,
    console,
    error_console,
    progress,
    report_failures,
)

if TYPE_CHECKING:
    from histosearch.evaluation.compare import EncoderResult
    from histosearch.evaluation.runner import EncoderReport


def eval_command(
    manifest: Annotated[
        Path | None,
        typer.Argument(
            help="Manifest CSV (path,label[,group,patient,slide,x,y]), or a folder of class "
            "sub-folders."
        ),
    ] = None,
    archive_dir: Annotated[
        Path | None, typer.Option("--archive", help="Evaluate an archive's labelled slides.")
    ] = None,
    column: Annotated[list[str] | None, typer.Option("--column", help=COLUMN_HELP)] = None,
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
    from histosearch.evaluation.runner import Evaluation, PatchRun
    from histosearch.evaluation.settings import EvalSettings, EvalSettingsError, encoder_choices
    from histosearch.inputs import column_mapping

    try:
        settings = EvalSettings(
            manifest=manifest,
            archive=archive_dir,
            columns=column_mapping(column or []),
            encoders=tuple(encoder_choices(encoder_names or [DEFAULT_ENCODER], weights)),
            out=out,
            exclude=exclude,
            metric=metric,
            **({"ks": tuple(ks)} if ks else {}),
            slide_column=slide_column,
            reduction=reduction,
            n_features=n_features,
            pairs=pairs,
            near=near,
            far=far,
            skip_missing=skip_missing,
            **({"mags": tuple(mags)} if mags else {}),
            mpp=mpp,
            objective_power=objective_power,
            tile_size=tile_size,
            save_threshold=save_threshold,
            queries_per_class=queries_per_class,
            seed=seed,
            batch_size=batch_size,
            workers=workers,
        )
        evaluation = Evaluation.load(settings)
        for path in evaluation.data.missing:
            error_console.print(f"[yellow]skipped missing[/yellow] {path}", highlight=False)
        if evaluation.data.unlabelled:
            names = evaluation.data.unlabelled
            error_console.print(
                f"[yellow]left out[/yellow] {len(names)} unlabelled slides: "
                + ", ".join(names[:5])
                + (" ..." if len(names) > 5 else ""),
                highlight=False,
            )
        with _Bars() as bars:
            result = evaluation.run(bars, lambda report: _print_encoder(report, out))
    except EvalSettingsError as error:
        raise typer.BadParameter(error.reason, param_hint=_OPTIONS.get(error.setting)) from None
    if not isinstance(result, PatchRun):
        _print_metrics(result.encoder, {}, result.slides)
        console.print(f"report: {', '.join(map(str, result.files))}")
        report_failures(result.failures, result.attempts)
        return
    if result.threshold is not None:
        console.print(f"threshold {result.threshold:.4f} saved in {result.threshold_checkpoint}")
    if result.comparison:
        _print_comparison([report.result for report in result.encoders], max(settings.ks))
        console.print(f"comparison: {', '.join(map(str, result.comparison))}")


# The option of each setting, named in the message that refuses it.
_OPTIONS = {
    "weights": "--weights",
    "encoders": "--encoder",
    "exclude": "--exclude",
    "metric": "--metric",
    "ks": "--k",
    "slide_column": "--slide-column",
    "reduction": "--reduction",
    "n_features": "--n-features",
    "pairs": "--pairs",
    "near_far": "--near/--far",
    "mags": "--mag",
    "mpp": "--mpp",
    "objective_power": "--objective-power",
    "tile_size": "--tile-size",
    "queries_per_class": "--gallery-queries",
    "batch_size": "--batch-size",
    "workers": "--workers",
}


class _Bars:
    """The runner's `on_progress(stage, done, total)` as the project's progress bars: one
    bar a stage, gone when the stage is done (or the run ends); without a terminal, a line
    as each stage starts (the stages after embedding take minutes without a count)."""

    def __init__(self) -> None:
        self._stage: str | None = None
        self._bar = None
        self._task = 0

    def __enter__(self) -> _Bars:
        return self

    def __exit__(self, *exc: object) -> None:
        self._close()

    def __call__(self, stage: str, done: int, total: int | None) -> None:
        if stage != self._stage:
            self._close()
            if not error_console.is_terminal:
                error_console.print(f"{stage} ...", highlight=False, markup=False)
            self._bar = progress()
            self._bar.__enter__()
            self._task = self._bar.add_task(stage, total=total)
            self._stage = stage
        self._bar.update(self._task, completed=done, total=total)
        if total is not None and done >= total:
            self._close()

    def _close(self) -> None:
        if self._bar is not None:
            self._bar.__exit__(None, None, None)
        self._bar, self._stage = None, None


def _print_encoder(report: EncoderReport, out: Path) -> None:
    """One encoder's tables and report, as soon as they are written."""
    name = report.result.encoder
    if report.reused_embeddings:
        console.print(f"{name}: embeddings reused from {out}")
    _print_metrics(name, report.patch.metrics, report.slides)
    console.print(f"report: {', '.join(map(str, report.files))}")


def _print_comparison(results: list[EncoderResult], k: int) -> None:
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


def _print_metrics(encoder_name: str, metrics: dict, slides: dict | None) -> None:
    """The patch metrics and each slide protocol's variants, as tables."""
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
