"""What every command shares: consoles, progress bars, batch failures, defaults."""

from __future__ import annotations

import logging
import math
import os
import signal
import sys
import time
from collections.abc import Callable, Iterable
from enum import StrEnum
from pathlib import Path
from typing import Annotated, Literal, TypeVar

import typer
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

from histosearch.errors import HistosearchError
from histosearch.train import METHODS

# `search` and `serve` on a sharded archive: where its shards are searched
SearchRayAddress = Annotated[
    str | None,
    typer.Option(
        "--ray-address",
        help="A sharded archive: search its shards as Ray actors on this cluster (local: "
        "a local Ray instance); else in threads.",
    ),
]

console = Console()
error_console = Console(stderr=True)


class _WarningLine(logging.Handler):
    """The package's warnings (a manifest read as cp1252, duplicates dropped, a reader's
    complaint about a file) as one yellow line each on stderr."""

    def emit(self, record: logging.LogRecord) -> None:
        error_console.print(
            f"[yellow]warning:[/yellow] {record.getMessage()}", highlight=False, soft_wrap=True
        )


logging.getLogger("histosearch").addHandler(_WarningLine(logging.WARNING))

T = TypeVar("T")
DEFAULT_ENCODER = "efficientnet-lite0-imagenet"


def shared_data_candidates() -> list[Path]:
    """Where the project's real data is looked for: $HISTOSEARCH_DATA alone when it is set,
    else ../shared/data beside the repository (of an editable install), then beside the
    current folder."""
    if os.environ.get("HISTOSEARCH_DATA"):
        return [Path(os.environ["HISTOSEARCH_DATA"])]
    repository = Path(__file__).resolve().parents[3]
    return [repository.parent / "shared" / "data", Path("..", "shared", "data")]


def _find_shared_data() -> Path:
    candidates = shared_data_candidates()
    return next((c for c in candidates if c.is_dir()), candidates[0])


SHARED_DATA = _find_shared_data()


def check_shared_data(data: Path) -> Path:
    """An option callback: `data` must be a folder, else say where the data was looked for."""
    if not data.is_dir():
        looked = ", ".join(str(c) for c in dict.fromkeys([data, *shared_data_candidates()]))
        raise typer.BadParameter(
            f"no data folder at {data} (looked in: {looked}); pass --data or set "
            "HISTOSEARCH_DATA to the shared data folder"
        )
    return data


class LogProgress:
    """Progress as plain lines on stderr ("slides 12/41 (29%) 0:01:10"), for logs: one line
    each PROGRESS_STEP of a task or PROGRESS_SECONDS, once the task has run QUIET_SECONDS,
    and a last line at the end. Takes the calls `progress()` callers make of rich's bar."""

    def __init__(self, clock: Callable[[], float] = time.monotonic) -> None:
        self.clock = clock
        self.tasks: dict[int, dict] = {}

    def __enter__(self) -> LogProgress:
        return self

    def __exit__(self, *exc: object) -> None:
        for task in self.tasks.values():
            if task["printed"] and task["printed"] != (task["done"], task["description"]):
                self._print(task)

    def add_task(self, description: str, total: float | None = None, **_: object) -> int:
        now = self.clock()
        key = len(self.tasks)
        self.tasks[key] = {
            "description": description,
            "total": total,
            "done": 0.0,
            "start": now,
            "last": now,
            "last_fraction": 0.0,
            "printed": None,
        }
        return key

    def advance(self, key: int, advance: float = 1) -> None:
        self.update(key, advance=advance)

    def update(
        self,
        key: int,
        *,
        advance: float | None = None,
        completed: float | None = None,
        total: float | None = None,
        description: str | None = None,
        **_: object,
    ) -> None:
        task = self.tasks[key]
        if total is not None:
            task["total"] = total
        if description is not None:
            task["description"] = description
        if completed is not None:
            task["done"] = completed
        if advance is not None:
            task["done"] += advance
        now = self.clock()
        if now - task["start"] < QUIET_SECONDS:
            return
        fraction = task["done"] / task["total"] if task["total"] else 0.0
        if (
            fraction >= 1
            or fraction - task["last_fraction"] >= PROGRESS_STEP
            or now - task["last"] >= PROGRESS_SECONDS
        ):
            self._print(task)

    def _print(self, task: dict) -> None:
        now = self.clock()
        elapsed = int(now - task["start"])
        clock = f"{elapsed // 3600}:{elapsed // 60 % 60:02d}:{elapsed % 60:02d}"
        done, total = task["done"], task["total"]
        count = f"{done:g}" if not total else f"{done:g}/{total:g} ({done / total:.0%})"
        print(f"{task['description']} {count} {clock}", file=sys.stderr, flush=True)
        task["last"], task["printed"] = now, (done, task["description"])
        task["last_fraction"] = done / total if total else 0.0


# Without a terminal (a batch job, CI, nohup), progress is printed as lines at most every
# PROGRESS_STEP of a task or every PROGRESS_SECONDS, and not at all for runs shorter than
# QUIET_SECONDS.
PROGRESS_STEP = 0.05
PROGRESS_SECONDS = 5.0
QUIET_SECONDS = 2.0


def progress() -> Progress | LogProgress:
    """A progress bar in the project's style on a terminal, plain lines otherwise."""
    if not error_console.is_terminal:
        return LogProgress()
    return Progress(
        TextColumn("[progress.description]{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeElapsedColumn(),
        console=error_console,
        transient=True,
    )


# The exit status of a run stopped by Ctrl-C (128 + SIGINT), as a shell reports it.
INTERRUPTED = 130


class FirstInterrupt:
    """Within `with`, a Ctrl-C raises KeyboardInterrupt where the work is, as Python does, and
    is remembered: should something swallow it (one raised inside a finaliser is only
    printed, and the work went on), `check()` raises it again at the next batch."""

    def __init__(self) -> None:
        self.asked = False
        self._previous: object = None
        self._hook = sys.unraisablehook

    def __enter__(self) -> FirstInterrupt:
        try:
            self._previous = signal.signal(signal.SIGINT, self._ask)
        except ValueError:  # not the main thread: Ctrl-C is not ours to handle
            self._previous = None
            return self
        self._hook = sys.unraisablehook
        sys.unraisablehook = self._unraisable
        return self

    def _unraisable(self, unraisable: sys.UnraisableHookArgs) -> None:
        # the swallowed Ctrl-C is not printed ("Exception ignored in ..."): check() raises it
        if not isinstance(unraisable.exc_value, KeyboardInterrupt):
            self._hook(unraisable)

    def _ask(self, *_: object) -> None:
        self.asked = True
        raise KeyboardInterrupt

    def check(self) -> None:
        """Raise KeyboardInterrupt if a Ctrl-C came (at a point where it is not swallowed)."""
        if self.asked:
            raise KeyboardInterrupt

    def __exit__(self, *exc: object) -> None:
        if self._previous is not None:
            signal.signal(signal.SIGINT, self._previous)
            sys.unraisablehook = self._hook


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


def report_failures(failures: list[tuple[T, str]], total: int | None, what: str = "failed") -> None:
    """Print the failures and exit non-zero if there were any."""
    if not failures:
        return
    count = f"{len(failures)}" if total is None else f"{len(failures)} of {total}"
    error_console.print(f"[red]{count} {what}:[/red]")
    for _, message in failures:
        error_console.print(f"  [red]x[/red] {message}", highlight=False, soft_wrap=True)
    raise typer.Exit(1)


# Choices checked before a command runs; a wrong value is named with the valid ones. The
# values of modules that import FAISS or torch are spelled out (a test keeps them equal) so
# that `histosearch --help` does not load those.
Tissue = Literal["otsu", "histogram"]  # tissue.DETECTORS
SlideReduction = Literal["cov", "pca"]  # archive.reduce.REDUCERS
Reduction = Literal["cov", "pca", "none"]
IndexMetric = Literal["cosine", "l2"]  # archive.INDEX_METRICS
Metric = Literal["cosine", "l2"]
Mode = Literal["auto", "slides", "patches"]
Level = Literal["auto", "slide", "case"]  # search.cases.LEVELS
Edges = Literal["drop", "keep"]  # tiling.EDGES
Method = Literal[METHODS]
# A StrEnum, not a Literal: typer takes lists of enums only; its members compare as strings.
Exclude = StrEnum("Exclude", {v: v for v in ("slide", "patient", "group")})  # ranking's


COLUMN_HELP = (
    "NAME=COLUMN: read the manifest's COLUMN as histosearch's NAME (label=diagnosis, "
    "patient=patient_or_slide_id); repeat for several."
)

ENCODER_HELP = (
    "Encoder: efficientnet-lite0-imagenet (offline default), resnet50-imagenet, a foundation "
    "model (uni, virchow2, ...: `histosearch encoders`), timm:<model>."
)


def write_lc25000_subset(
    lc: Path, manifest: Path, groups_per_class: int
) -> tuple[list[dict[str, str]], dict[str, list[str]]]:
    """Write a manifest (absolute paths) of the first `groups_per_class` LC25000 source tiles
    of each class, by name; return the set's rows and every class's groups, sorted."""
    import csv

    with (lc / "manifest.csv").open(newline="") as file:
        rows = list(csv.DictReader(file))
    groups: dict[str, list[str]] = {}
    for row in rows:
        groups.setdefault(row["label"], [])
        if row["group"] not in groups[row["label"]]:
            groups[row["label"]].append(row["group"])
    groups = {label: sorted(members) for label, members in groups.items()}
    chosen = {g for members in groups.values() for g in members[:groups_per_class]}
    manifest.parent.mkdir(parents=True, exist_ok=True)
    with manifest.open("w", newline="") as file:
        writer = csv.writer(file)
        writer.writerow(["path", "label", "group"])
        for row in rows:
            if row["group"] in chosen:
                writer.writerow([(lc / row["path"]).resolve(), row["label"], row["group"]])
    return rows, groups


def ordinal(n: int) -> str:
    """1st, 2nd, 3rd, 4th, ... 11th, 12th, 13th, ... 21st, 22nd."""
    suffix = "th" if 10 <= n % 100 <= 20 else {1: "st", 2: "nd", 3: "rd"}.get(n % 10, "th")
    return f"{n}{suffix}"


def percentile_ordinal(value: float) -> str:
    """A percentile as the tables, the galleries and the page write it ("53rd"): its value to
    one decimal, as the JSON gives it, rounded half up, as the page's Math.round (Python's
    round would write 52.5 as the 52nd where the page writes the 53rd)."""
    return ordinal(math.floor(round(value, 1) + 0.5))
