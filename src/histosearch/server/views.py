"""A `SearchResult` as the page draws it: catalog ids, rows of patches, tile boxes."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from histosearch.server.models import (
    PatchHitView,
    QueryView,
    SearchView,
    SlideHitView,
    TileBox,
    TilePair,
)


def _box(tile: Any) -> TileBox:
    return TileBox(x=int(tile.x), y=int(tile.y), size=int(tile.size))


def search_view(state: Any, result: Any, name: str, region: Any) -> SearchView:
    """The ids and boxes of `result` the page needs, for a query called `name`."""
    query = result.query
    return SearchView(
        query=QueryView(
            name=name,
            slide=query.slide,
            region=region,
            n_patches=query.n_patches,
            tiles=[_box(t) for t in query.tiles],
        ),
        slides=[
            SlideHitView(
                slide=hit.record.id,
                name=hit.record.name,
                label=hit.record.label,
                viewable=state.viewable[hit.record.id],
                similarity=round(float(hit.similarity), 4),
                percentile=round(float(hit.percentile), 2),
                matches=[
                    TilePair(
                        query=_box(m.query),
                        reference=_box(m.reference),
                        reference_row=getattr(m.reference, "row", None),
                        cosine=round(float(m.cosine), 4),
                    )
                    for m in hit.matches
                ],
            )
            for hit in result.slides
        ],
        patches=[
            PatchHitView(
                slide=hit.record.id,
                name=hit.record.name,
                label=hit.record.label,
                row=getattr(hit.tile, "row", None),
                tile=_box(hit.tile),
                patch=Path(hit.path).name if hit.path else None,
                similarity=round(float(hit.similarity), 4),
                percentile=round(float(hit.percentile), 2),
            )
            for hit in result.patches
        ],
    )
