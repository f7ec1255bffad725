"""Cases, not files: slide results gathered by case (the `patient` column, or any other), each
case ranked by its best slide, as TCGA-style archives with several slides per patient are
judged."""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass

from histosearch.archive.catalog import SlideRecord
from histosearch.search.result import CaseMatch, SlideMatch

LEVELS = ("auto", "slide", "case")


@dataclass(frozen=True)
class Cases:
    """The case of every slide that can be returned: a slide without a value in the case
    column is a case of its own, shown by its name."""

    keys: dict[int, tuple[bool, str | int]]  # (True, value), or (False, slide id) alone
    names: dict[int, str]  # what each slide's case is shown as

    @classmethod
    def of(cls, records: Iterable[SlideRecord], get: Callable[[SlideRecord], str | None]) -> Cases:
        keys, names = {}, {}
        for record in records:
            value = get(record)
            keys[record.id] = (True, value) if value else (False, record.id)
            names[record.id] = value or record.name
        return cls(keys, names)

    def several(self) -> bool:
        """Whether some case has more than one slide."""
        return any(n > 1 for n in Counter(self.keys.values()).values())

    def slides_needed(self, k: int) -> int:
        """How many top slides surely hold the best slides of the top k cases: the sizes of
        the k largest cases, summed."""
        sizes = sorted(Counter(self.keys.values()).values(), reverse=True)
        return sum(sizes[:k])

    def rank(self, hits: Sequence[SlideMatch], k: int) -> list[CaseMatch]:
        """The top k cases of ranked slides (each at its best slide), with the number of its
        slides among `hits` and of its slides that could be returned."""
        sizes = Counter(self.keys.values())
        matched = Counter(self.keys[h.record.id] for h in hits)
        best: dict[tuple[bool, str | int], SlideMatch] = {}
        for hit in hits:  # best first
            best.setdefault(self.keys[hit.record.id], hit)
        return [
            CaseMatch(self.names[hit.record.id], hit, matched[key], sizes[key])
            for key, hit in best.items()
        ][:k]
