"""`histosearch bench tissue`: accuracy of the tissue detectors on the labelled fixture tiles."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from histosearch.slide import open_slide
from histosearch.tissue import DETECTORS, TissueDetector, is_tissue, make_detector

# histolab's labelled tiles in the shared data folder; `no-tissue*`/`almost-white*` are background.
LABELLED_TILES = Path("fixtures") / "wsi-fixtures" / "histolab-tiles" / "tiles"


@dataclass(frozen=True)
class TissueBenchmark:
    """One detector, with its default settings, on the labelled tiles."""

    method: str
    settings: dict[str, object]
    accuracy: float
    wrong: list[str]


def tissue_accuracy(tiles_dir: str | Path, detector: TissueDetector) -> tuple[float, list[str]]:
    """Accuracy of `detector` on labelled tiles (`no-tissue*`/`almost-white*` are background),
    and the names of the tiles it gets wrong."""
    wrong = []
    paths = sorted(Path(tiles_dir).glob("*.png"))
    for path in paths:
        truth = not path.name.startswith(("no-tissue", "almost-white"))
        with open_slide(path) as tile:
            rgb = tile.read_scaled((0, 0), tile.dimensions, 1.0)
        if is_tissue(rgb, detector) != truth:
            wrong.append(path.name)
    return 1 - len(wrong) / len(paths), wrong


def bench_tissue(tiles_dir: Path) -> list[TissueBenchmark]:
    """Every detector of `DETECTORS`, default settings, on the tiles of `tiles_dir`."""
    results = []
    for name in DETECTORS:
        detector = make_detector(name)
        accuracy, wrong = tissue_accuracy(tiles_dir, detector)
        results.append(TissueBenchmark(name, dict(vars(detector)), accuracy, wrong))
    return results
