"""What a search returns: ranked slides with their matched tiles, ranked cases (by their best
slide), or ranked patches, each with a similarity in [0, 1], a percentile among the archive's
own similarities and the slide's metadata; and the consensus of the top k."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from histosearch.archive.catalog import SlideRecord
from histosearch.search.consensus import Consensus


@dataclass(frozen=True)
class Tile:
    """A tile's top-left corner and side in level-0 pixels of its slide (`size` None for a
    patch image, embedded whole)."""

    x: int
    y: int
    size: float | None

    def to_dict(self) -> dict[str, object]:
        return {"x": self.x, "y": self.y, "size": self.size}


@dataclass(frozen=True)
class TileMatch:
    """A query tile, its best tile in a retrieved slide (and that tile's row there), and
    their cosine."""

    query: Tile
    reference: Tile
    reference_row: int
    cosine: float


@dataclass(frozen=True)
class SlideMatch:
    """A retrieved slide, its WSI similarity and percentile, and for every query tile its best
    tile there; `tile_scores` holds, for every tile of the slide, its best cosine to the query."""

    record: SlideRecord
    similarity: float
    percentile: float | None
    matches: list[TileMatch]
    tiles: list[Tile]
    tile_scores: np.ndarray

    @classmethod
    def of(
        cls,
        record: SlideRecord,
        similarity: float,
        percentile: float | None,
        query_tiles: list[Tile],
        rows: np.ndarray,
        cosines: np.ndarray,
        tile_scores: np.ndarray,
        coords: np.ndarray,
    ) -> SlideMatch:
        """The match of a measured slide: for each query tile its best row of the slide
        (`rows`) and their cosine, each row's best cosine to the query, the rows' corners."""
        tiles = [Tile(int(x), int(y), record.tile_l0) for x, y in coords]
        matches = [
            TileMatch(q, tiles[r], int(r), float(np.clip(c, 0, 1)))
            for q, r, c in zip(query_tiles, rows, cosines, strict=True)
        ]
        return cls(record, similarity, percentile, matches, tiles, np.clip(tile_scores, 0, 1))

    def heatmap(self) -> list[tuple[Tile, float]]:
        """Every tile of the retrieved slide with its best cosine to any query tile."""
        return list(zip(self.tiles, self.tile_scores.tolist(), strict=True))

    def best_match(self) -> TileMatch:
        """The matched pair with the highest cosine."""
        return max(self.matches, key=lambda m: m.cosine)


@dataclass(frozen=True)
class PatchMatch:
    """A retrieved patch: its slide, its row there, where it lies, its image file (patches
    stored from images), its similarity and percentile."""

    record: SlideRecord
    row: int
    tile: Tile
    path: str | None
    similarity: float
    percentile: float | None

    @property
    def name(self) -> str:
        """The patch's file name, or its position on the slide."""
        return Path(self.path).name if self.path else f"x={self.tile.x} y={self.tile.y}"


@dataclass(frozen=True)
class CaseMatch:
    """A retrieved case (a patient, or the value of another case column): its best slide,
    how many of its slides the ranking reached and how many it has that could be returned."""

    case: str
    best: SlideMatch
    matched: int
    slides: int


@dataclass(frozen=True)
class QueryInfo:
    """What was searched for: a name, its catalog id when archived, its tiles."""

    name: str
    slide_id: int | None
    tiles: list[Tile]
    region: tuple[int, int, int, int] | None = None
    label: str | None = None


@dataclass
class SearchResult:
    """Ranked slides (mode "slides"; at level "case", `cases` ranked by their best slide, and
    `slides` their best slides) or patches (mode "patches"), the `where` clauses that
    restricted them, the consensus of the top k and the metadata of the slides returned;
    `note` says why mode "auto" ranked patches for a slide or region query."""

    query: QueryInfo
    mode: str
    slides: list[SlideMatch] = field(default_factory=list)
    patches: list[PatchMatch] = field(default_factory=list)
    level: str = "slide"
    cases: list[CaseMatch] = field(default_factory=list)
    where: list[str] = field(default_factory=list)
    consensus: Consensus | None = None
    metadata: dict[int, dict[str, str]] = field(default_factory=dict)
    # shards of a sharded archive that did not answer (name: why): their slides are not ranked
    missing_shards: dict[str, str] = field(default_factory=dict)
    note: str | None = None

    @property
    def hits(self) -> list[SlideMatch] | list[PatchMatch]:
        """The ranked slides (a case's best slide, at level case) or patches."""
        return self.slides if self.mode == "slides" else self.patches

    def to_dict(self, heatmaps: bool = False) -> dict[str, object]:
        """The JSON the CLI prints and the server returns (with `heatmaps`, every tile of each
        retrieved slide with its best cosine to the query)."""
        results = []
        for rank, hit in enumerate(self.hits):
            row = {
                "rank": rank + 1,
                "slide_id": hit.record.id,
                "slide": hit.record.name,
                "label": hit.record.label,
                "patient": hit.record.patient,
                "group": hit.record.group,
                "metadata": self.metadata.get(hit.record.id, {}),
            }
            if self.level == "case":
                case = self.cases[rank]
                row |= {"case": case.case, "case_matched": case.matched, "case_slides": case.slides}
            if isinstance(hit, SlideMatch):
                row["patches"] = hit.record.n_patches
                row["matches"] = [
                    {
                        "query": m.query.to_dict(),
                        "match": m.reference.to_dict(),
                        "row": m.reference_row,
                        "cosine": round(m.cosine, 4),
                    }
                    for m in hit.matches
                ]
                if heatmaps:
                    row["heatmap"] = [
                        {**tile.to_dict(), "cosine": round(score, 4)}
                        for tile, score in hit.heatmap()
                    ]
            else:
                row |= {"patch": hit.name, "row": hit.row, "tile": hit.tile.to_dict()}
                row["path"] = hit.path
            row["similarity"] = round(hit.similarity, 4)
            row["percentile"] = None if hit.percentile is None else round(hit.percentile, 1)
            results.append(row)
        return {
            "query": {
                "name": self.query.name,
                "slide_id": self.query.slide_id,
                "label": self.query.label,
                "patches": len(self.query.tiles),
                "region": None if self.query.region is None else list(self.query.region),
            },
            "mode": self.mode,
            "level": self.level,
            "where": self.where,
            "note": self.note,
            "consensus": None if self.consensus is None else self.consensus.to_dict(),
            "results": results,
            "missing_shards": self.missing_shards,
        }
