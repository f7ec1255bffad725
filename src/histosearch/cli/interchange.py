"""`histosearch index --features` and `histosearch export`: features in from TRIDENT and CLAM
folders, and out in TRIDENT's layout (`histosearch.archive.interchange`)."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Annotated

import typer

from histosearch.cli.common import console, error_console, progress, report_failures

if TYPE_CHECKING:
    from histosearch.archive.settings import ArchiveSettings


def import_folder(
    features: Path,
    archive_dir: Path,
    settings: ArchiveSettings,
    *,
    weights: Path | None = None,
    slides: Path | None = None,
) -> None:
    """`index --features`: import a TRIDENT or CLAM folder, print a summary, exit 1 on any
    refused file."""
    from histosearch.archive.archive import Archive
    from histosearch.archive.interchange import import_features
    from histosearch.encoders import create_encoder

    encoder = create_encoder(settings.encoder, weights)
    with progress() as bar:
        task = bar.add_task("slides", total=None)
        report = import_features(
            archive_dir,
            features,
            encoder,
            slides=slides,
            settings=settings,
            on_progress=lambda _, done, total: bar.update(task, completed=done, total=total),
        )
    description = "nothing imported"
    if report.added or report.skipped:
        with Archive.open(archive_dir) as archive:
            description = archive.describe()
    console.print(
        f"imported {report.added} slides ({report.patches} patches), {report.skipped} already "
        f"there; archive: {description}",
        highlight=False,
    )
    report_failures(report.failures, report.total)


def export(
    archive_dir: Annotated[Path, typer.Option("--archive", help="The archive folder.")],
    trident: Annotated[Path, typer.Option("--trident", help="The TRIDENT job folder to write.")],
) -> None:
    """Write the archive's features in TRIDENT's layout (one h5 per slide, with its
    attributes) and a slides.csv that `index --features` reads back."""
    from histosearch.archive.archive import Archive
    from histosearch.archive.interchange import export_trident

    with Archive.open(archive_dir) as archive:
        report = export_trident(archive, trident)
    for name, reason in report.skipped:
        error_console.print(f"  left out {name}: {reason}", highlight=False)
    console.print(
        f"exported {report.written} slides to {report.folder}, the list to "
        f"{trident / 'slides.csv'}",
        highlight=False,
    )
