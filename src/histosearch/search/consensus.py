"""Diagnosis by search: the majority of a result's top k, as Yottixel, SISH and RetCCL report
it and as `eval` scores it (MV@k): each value's votes, the majority (a tie goes to the tied
value ranked highest) and the share of the top k that agrees with it."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass


def majority_vote(values: Sequence[object]) -> object | None:
    """The most frequent value (None values aside); a tie goes to the tied value that appears
    first (ranked highest). None when there is no value."""
    present = [value for value in values if value is not None]
    if not present:
        return None
    counts: dict[object, int] = {}
    for value in present:
        counts[value] = counts.get(value, 0) + 1
    best = max(counts.values())
    return next(value for value in present if counts[value] == best)


@dataclass(frozen=True)
class Consensus:
    """The vote of the top `k` results on `column`: votes per value (in rank order of first
    appearance), the majority and the share of the k that agrees with it."""

    column: str
    k: int
    votes: dict[str, int]
    majority: str | None
    agreement: float

    @classmethod
    def of(cls, column: str, values: Sequence[str | None]) -> Consensus:
        """The consensus of the ranked results' values of `column` (None: no value)."""
        votes: dict[str, int] = {}
        for value in values:
            if value is not None:
                votes[value] = votes.get(value, 0) + 1
        majority = majority_vote(values)
        agreement = votes[majority] / len(values) if majority is not None else 0.0
        return cls(column, len(values), votes, majority, agreement)

    def to_dict(self) -> dict[str, object]:
        return {
            "column": self.column,
            "k": self.k,
            "votes": self.votes,
            "majority": self.majority,
            "agreement": round(self.agreement, 4),
        }

    def line(self) -> str:
        """One line: `label: lung_aca 4 of 5 (80%); lung_scc 1`."""
        if self.majority is None:
            return f"{self.column}: no result has a value"
        others = [f"{v} {n}" for v, n in self.votes.items() if v != self.majority]
        return (
            f"{self.column}: {self.majority} {self.votes[self.majority]} of {self.k} "
            f"({self.agreement:.0%})" + "".join(f"; {o}" for o in others)
        )
