"""`histosearch bench api`: start-up time of the command line (`--help` of each command, in
fresh processes) and a warm `Searcher`'s patch- and slide-query latency."""

from __future__ import annotations

import subprocess
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from histosearch.archive.archive import Archive
from histosearch.bench.common import timed
from histosearch.search.searcher import Searcher

# The commands whose `--help` is timed (the bare `histosearch --help` first).
HELP_COMMANDS = (
    (),
    ("index",),
    ("search",),
    ("eval",),
    ("tile",),
    ("check",),
    ("bench",),
)


@dataclass(frozen=True)
class ApiBenchmark:
    """Start-up of the command line and a warm Searcher's latency, in seconds."""

    help_seconds: dict[str, float]
    # `python -c "import typer, rich"`, the floor of any typer command line, timed alike
    baseline_seconds: float
    open_seconds: float
    patch_query_p50: float
    patch_query_p95: float
    slide_query_p50: float
    slide_query_p95: float
    queries: int

    @property
    def help_ratio(self) -> float:
        """`histosearch --help` over the baseline, both in this run (the goal: under 3)."""
        return self.help_seconds["histosearch --help"] / self.baseline_seconds


def best_seconds(run: Sequence[str], repeats: int = 3) -> float:
    """Best wall time of the command `run` over `repeats` fresh processes."""
    return min(
        timed(lambda: subprocess.run(run, check=True, capture_output=True)) for _ in range(repeats)
    )


def help_seconds_of(command: Sequence[str], repeats: int = 3) -> float:
    """Best wall time of `histosearch COMMAND --help` over `repeats` fresh processes."""
    return best_seconds(
        [str(Path(sys.executable).with_name("histosearch")), *command, "--help"], repeats
    )


# What any typer command line must import: `histosearch --help` is measured against it.
BASELINE = (sys.executable, "-c", "import typer, rich")


def bench_api(
    archive_dir: Path,
    commands: Sequence[Sequence[str]] = HELP_COMMANDS,
    queries: int = 50,
) -> ApiBenchmark:
    """`histosearch ... --help` wall times and the `BASELINE`'s (best of 3, fresh processes;
    the bare `histosearch --help` among `commands`), then a Searcher on
    `archive_dir` answering `queries` patch queries (an image file, embedded) and slide
    queries (an archived slide); the first query, which loads the encoder, is left out."""
    help_seconds = {
        " ".join(["histosearch", *command, "--help"]): help_seconds_of(command)
        for command in commands
    }
    baseline_seconds = best_seconds(BASELINE)
    start = time.perf_counter()
    archive = Archive.open(archive_dir)
    searcher = Searcher(archive)
    open_seconds = time.perf_counter() - start
    records = archive.slides()
    patches = [p for r in records for p in (searcher.paths(r) or [])][:queries]
    if not patches:
        raise ValueError(f"{archive_dir}: the API benchmark needs an archive with patch images")
    times: dict[str, list[float]] = {"patches": [], "slides": []}
    for i in range(queries):
        for mode, query in (
            ("patches", patches[i % len(patches)]),
            ("slides", records[i % len(records)].id),
        ):
            start = time.perf_counter()
            searcher.search(query, k=5, mode=mode, exclude=())
            times[mode].append(time.perf_counter() - start)
    archive.close()
    p = {mode: np.percentile(spent[1:], [50, 95]) for mode, spent in times.items()}
    return ApiBenchmark(
        help_seconds, baseline_seconds, open_seconds, *p["patches"], *p["slides"], queries
    )
