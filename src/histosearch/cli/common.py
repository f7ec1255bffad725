"""What every command shares: consoles, progress bars, batch failures, defaults."""

from __future__ import annotations

import os
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import TypeVar

import typer
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

from histosearch.errors import HistosearchError

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


ENCODER_HELP = (
    "Encoder: efficientnet-lite0-imagenet (offline default), resnet50-imagenet, a foundation "
    "model (uni, virchow2, ...: `histosearch encoders`), timm:<model>."
)
