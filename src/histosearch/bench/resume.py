"""`histosearch bench resume`: kill -9 during `histosearch index` at random moments and resume;
is every resumed archive equal to an uninterrupted one?"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from histosearch.archive.archive import Archive, ArchiveError
from histosearch.bench.common import CMU_SLIDE, TCGA_SLIDE, WSI_FIXTURES
from histosearch.search.searcher import Searcher

CLI = [sys.executable, "-m", "histosearch.cli"]


def resume_index_args(manifest: Path, data: Path) -> list[str]:
    """What `bench resume` indexes: the patches of `manifest` (grouped by their source tile)
    and the two fixture slides of `data`, at 20x."""
    fixtures = data / WSI_FIXTURES
    return [
        str(manifest),
        str(fixtures / CMU_SLIDE),
        str(fixtures / TCGA_SLIDE),
        "--group-by",
        "group",
        "--objective-power",
        "20",
    ]


@dataclass
class ArchiveSnapshot:
    """What two archives must share to be equal: catalog rows, full features, results."""

    rows: list[tuple]
    features: dict[str, np.ndarray]
    results: dict[tuple[str, str], list[tuple[str, float]]]

    def difference(self, other: ArchiveSnapshot) -> str | None:
        """None when equal (features within float16 rounding, similarities within 1e-3)."""
        if self.rows != other.rows:
            return f"catalogs differ: {len(self.rows)} vs {len(other.rows)} rows"
        for name, features in self.features.items():
            if np.abs(features - other.features[name]).max() > 1e-2:
                return f"features of {name} differ"
        for key, hits in self.results.items():
            theirs = other.results[key]
            if [h[0] for h in hits] != [h[0] for h in theirs] or any(
                abs(a[1] - b[1]) > 1e-3 for a, b in zip(hits, theirs, strict=True)
            ):
                return f"results of {key} differ: {hits} vs {theirs}"
        return None


def snapshot(archive_dir: Path) -> ArchiveSnapshot:
    """Catalog, features and every slide's top-5 slides and patches of an archive."""
    with Archive.open(archive_dir) as archive:
        records = archive.slides()
        rows = [(r.name, r.path, r.label, r.group, r.n_patches, r.row_start) for r in records]
        features = {r.path: archive.read(r).features for r in records}
        searcher = Searcher(archive)
        results = {}
        for record in records:
            for mode in ("slides", "patches"):
                hits = searcher.search(record.id, k=5, mode=mode)
                results[record.name, mode] = [
                    (
                        h.record.name if mode == "slides" else f"{h.record.name}:{h.row}",
                        h.similarity,
                    )
                    for h in (hits.slides or hits.patches)
                ]
    return ArchiveSnapshot(rows, features, results)


@dataclass
class ResumeTrial:
    """One kill -9 and resume: when it was killed, what the archive held then, and whether
    the resumed archive equals the uninterrupted one."""

    kill_after_s: float
    rows_at_kill: int
    searchable_at_kill: int
    temporary_files_at_kill: int
    resumed_exit: int
    difference: str | None
    temporary_files_left: int


@dataclass
class ResumeBenchmark:
    reference_seconds: float
    rows: int
    trials: list[ResumeTrial] = field(default_factory=list)

    @property
    def equal(self) -> int:
        return sum(t.resumed_exit == 0 and t.difference is None for t in self.trials)


def _count_rows(archive_dir: Path) -> tuple[int, int]:
    """Catalog rows of a (killed) archive, and of those how many are in the search store;
    none when the kill left no readable archive."""
    try:
        with Archive.open(archive_dir) as archive:
            total = len(archive.slides())
            return total, total - archive.catalog.pending()
    except ArchiveError:
        return 0, 0


def bench_resume(
    index_args: list[str],
    work: Path,
    trials: int = 20,
    seed: int = 0,
    on_trial: Callable[[ResumeTrial], None] | None = None,
) -> ResumeBenchmark:
    """Run `histosearch index INDEX_ARGS --archive DIR` once uninterrupted, then `trials`
    times killed with SIGKILL at a random moment (half of them in the last fifth of the run,
    where the last catalog rows, the store and the index are written) and resumed; compare
    each resumed archive with the uninterrupted one."""
    rng = np.random.default_rng(seed)
    reference = work / "reference"
    shutil.rmtree(reference, ignore_errors=True)
    start = time.perf_counter()
    subprocess.run(
        [*CLI, "index", *index_args, "--archive", str(reference)], check=True, capture_output=True
    )
    seconds = time.perf_counter() - start
    expected = snapshot(reference)
    result = ResumeBenchmark(seconds, len(expected.rows))
    for trial in range(trials):
        late = trial % 2 == 1
        kill_after = seconds * (rng.uniform(0.8, 1.0) if late else rng.uniform(0.05, 0.8))
        target = work / f"trial-{trial}"
        shutil.rmtree(target, ignore_errors=True)
        command = [*CLI, "index", *index_args, "--archive", str(target)]
        process = subprocess.Popen(
            command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True
        )
        time.sleep(kill_after)
        if process.poll() is None:
            os.killpg(process.pid, signal.SIGKILL)
        process.wait()
        rows, stored = _count_rows(target)
        tmp_at_kill = len(list(target.rglob("*.tmp")))
        resumed = subprocess.run(command, capture_output=True, text=True)
        difference = None
        if resumed.returncode == 0:
            difference = expected.difference(snapshot(target))
        outcome = ResumeTrial(
            kill_after,
            rows,
            stored,
            tmp_at_kill,
            resumed.returncode,
            difference,
            len(list(target.rglob("*.tmp"))),
        )
        result.trials.append(outcome)
        if on_trial is not None:
            on_trial(outcome)
        shutil.rmtree(target, ignore_errors=True)
    return result
