"""`histosearch tile`: slides into tissue tiles."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Annotated

import typer
from rich.table import Table

from histosearch.cli.common import (
    Edges,
    Tissue,
    console,
    report_failures,
    run_batch,
)

if TYPE_CHECKING:
    from histosearch.tiling import TileGrid


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


def tile(
    slides: Annotated[list[Path], typer.Argument(help="Slide or image files.")],
    mag: Annotated[
        float, typer.Option("--mag", help="Magnification of the tiles, e.g. 5 or 2.5.")
    ] = 5.0,
    tile_size: Annotated[
        int, typer.Option("--tile-size", min=8, help="Tile side in pixels.")
    ] = 224,
    tissue: Annotated[Tissue, typer.Option("--tissue", help="Tissue detection.")] = "otsu",
    edges: Annotated[
        Edges,
        typer.Option(
            "--edges", help="Partial last row/column: drop (the papers' grid) or keep (padded)."
        ),
    ] = "drop",
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
    geojson: Annotated[
        bool, typer.Option("--geojson", help="Also OUT/<slide>.tiles.geojson for QuPath.")
    ] = False,
) -> None:
    """Grid slides into tiles at a magnification and find the tissue tiles.

    Writes OUT/<slide>.tiles.csv (level-0 x, y of every tile, its tissue fraction and
    decision) and OUT/<slide>.tiles.png (a thumbnail with the kept tiles outlined); with
    --geojson, OUT/<slide>.tiles.geojson (the tissue tiles as QuPath annotations).
    """
    from histosearch.errors import NoTissueError
    from histosearch.slide import open_slide
    from histosearch.tiling import save_overlay, tile_slide
    from histosearch.tissue import make_detector

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
            grid = tile_slide(slide, mag, tile_size, detector, edges)
            size = slide.size_at(mag)
            table.add_row(*_tile_row(grid, size))
            notes.append(f"{path.name}: {grid.edge_note()}")
            if len(grid) == 0:
                raise NoTissueError(
                    path,
                    f"no {tile_size} px tile fits: the slide is {size[0]}x{size[1]} px at {mag:g}x",
                )
            grid.to_csv(out / f"{path.name}.tiles.csv")
            save_overlay(slide, grid, out / f"{path.name}.tiles.png")
            if geojson:
                from histosearch.search.qupath import tissue_collection, write_geojson

                write_geojson(tissue_collection(grid), out / f"{path.name}.tiles.geojson")
            if grid.n_tissue == 0:
                raise NoTissueError(path, f"no tissue in any of the {len(grid)} tiles at {mag:g}x")

    notes: list[str] = []
    failures = run_batch(slides, work, "tiling")
    console.print(table)
    for note in notes:
        console.print(note, highlight=False)
    console.print(f"coordinates and thumbnails in {out}/")
    report_failures(failures, len(slides))
