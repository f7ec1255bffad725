"""`--where` filters: which slides a search may return, from their built-in columns and
metadata. A small grammar of its own, not SQL; nothing in a clause or a value is evaluated.

    CLAUSE  := COLUMN OP VALUE | COLUMN in (VALUE, VALUE, ...)
    OP      := = | != | < | <= | > | >= | ~

Several clauses combine with AND. A VALUE may be quoted ('...' or "..."), which it must be to
hold a comma inside `in ( )`. `<`, `<=`, `>`, `>=` compare number and date columns (dates as
YYYY-MM-DD); `~` is a case-insensitive substring of a text column; `=`, `!=` and `in` compare
values exactly. A slide without a value in the column passes no clause on it.
"""

from __future__ import annotations

import operator
import re
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass

from histosearch.archive.catalog import SlideRecord
from histosearch.archive.metadata import PARSERS, Metadata
from histosearch.errors import HistosearchError

# The built-in columns a clause (or a vote, or a case) may name, and how a record gives them.
BUILTIN: dict[str, Callable[[SlideRecord], str | None]] = {
    "name": lambda r: r.name,
    "label": lambda r: r.label,
    "patient": lambda r: r.patient,
    "group": lambda r: r.group,
}
ORDERED = {"<": operator.lt, "<=": operator.le, ">": operator.gt, ">=": operator.ge}
_IN = re.compile(r"^\s*(?P<column>\S.*?)\s+in\s*\((?P<values>.*)\)\s*$", re.IGNORECASE | re.DOTALL)
_COMPARE = re.compile(
    r"^\s*(?P<column>[^=<>!~]*?)\s*(?P<op>!=|<=|>=|=|<|>|~)\s*(?P<value>.*?)\s*$", re.DOTALL
)
_VALUE = re.compile(r"""\s*(?:'(?P<single>[^']*)'|"(?P<double>[^"]*)"|(?P<bare>[^,'"]*))\s*""")


class FilterError(HistosearchError):
    """A `--where` clause (or a column named for a vote or a case) that cannot be used."""

    exit_code = 2


def _unquoted(text: str) -> str:
    text = text.strip()
    if len(text) >= 2 and text[0] == text[-1] and text[0] in "'\"":
        return text[1:-1]
    return text


def _values(text: str, clause: str) -> tuple[str, ...]:
    """The comma-separated values of `in ( )`, quotes removed."""
    values, position = [], 0
    while True:
        match = _VALUE.match(text, position)
        value = next(v for v in match.group("single", "double", "bare") if v is not None)
        values.append(value.strip())
        position = match.end()
        if position == len(text):
            break
        if text[position] != ",":
            raise FilterError(None, f"--where {clause!r}: cannot read the list ({text})")
        position += 1
    if all(not v for v in values):
        raise FilterError(None, f"--where {clause!r}: in ( ) of nothing; list some values")
    if any(not v for v in values):
        raise FilterError(None, f"--where {clause!r}: an empty value in the list")
    return tuple(values)


@dataclass(frozen=True)
class Clause:
    """One parsed clause: `column op values` (one value, or the list of `in`)."""

    text: str
    column: str
    op: str
    values: tuple[str, ...]

    @classmethod
    def parse(cls, text: str) -> Clause:
        """A clause from its text, or a FilterError naming it."""
        if match := _IN.match(text):
            column = _unquoted(match["column"])
            return cls(text, column, "in", _values(match["values"], text))
        match = _COMPARE.match(text)
        if match is None or not match["column"].strip():
            raise FilterError(
                None,
                f"--where {text!r}: not COLUMN OP VALUE (OP one of = != < <= > >= ~) "
                "nor COLUMN in (VALUE, ...)",
            )
        value = _unquoted(match["value"])
        if not value:
            raise FilterError(None, f"--where {text!r}: no value after {match['op']}")
        return cls(text, _unquoted(match["column"]), match["op"], (value,))


def columns_line(metadata: Metadata) -> str:
    """The columns a filter, a vote or a case can name, with their kinds."""
    metadata_columns = [f"{c} ({metadata.kinds[c]})" for c in metadata.columns]
    return ", ".join([*(f"{c} (text)" for c in BUILTIN), *metadata_columns])


def value_getter(column: str, metadata: Metadata, what: str) -> Callable[[SlideRecord], str | None]:
    """How a record gives `column` (built-in or metadata), or a FilterError naming `what`
    asked for it and listing the archive's columns."""
    if column in BUILTIN:
        return BUILTIN[column]
    if column in metadata.kinds:
        return lambda r: metadata.values.get(r.id, {}).get(column)
    raise FilterError(
        None, f"{what}: no column {column!r}; the archive has {columns_line(metadata)}"
    )


def _test(clause: Clause, kind: str) -> Callable[[str], bool]:
    """The clause as a test of one slide's (text) value of a column of `kind`."""
    if clause.op == "~":
        if kind != "text":
            raise FilterError(
                None, f"--where {clause.text!r}: ~ matches text, {clause.column} is a {kind} column"
            )
        needle = clause.values[0].casefold()
        return lambda value: needle in value.casefold()
    if clause.op in ORDERED and kind == "text":
        raise FilterError(
            None,
            f"--where {clause.text!r}: {clause.column} is a text column; {clause.op} compares "
            "number and date columns",
        )
    parse = PARSERS[kind]
    try:
        wanted = [parse(v) for v in clause.values]
    except ValueError:
        shown = ", ".join(clause.values)
        raise FilterError(
            None,
            f"--where {clause.text!r}: {clause.column} is a {kind} column, and {shown} is not "
            + ("a number" if kind == "number" else "a date YYYY-MM-DD"),
        ) from None
    if clause.op == "in":
        allowed = set(wanted)
        return lambda value: parse(value) in allowed
    compare = ORDERED.get(clause.op) or (operator.eq if clause.op == "=" else operator.ne)
    return lambda value: compare(parse(value), wanted[0])


@dataclass(frozen=True)
class SlideFilter:
    """Clauses combined with AND."""

    clauses: tuple[Clause, ...]

    @classmethod
    def parse(cls, where: Iterable[str]) -> SlideFilter:
        """Each `--where` text as a clause; a FilterError names the first bad one."""
        return cls(tuple(Clause.parse(text) for text in where))

    def __bool__(self) -> bool:
        return bool(self.clauses)

    def allowed(self, records: Sequence[SlideRecord], metadata: Metadata) -> set[int]:
        """Ids of the records that pass every clause (all of them without clauses)."""
        tests = []
        for clause in self.clauses:
            get = value_getter(clause.column, metadata, f"--where {clause.text!r}")
            try:
                test = _test(clause, metadata.kinds.get(clause.column, "text"))
            except FilterError as error:
                raise FilterError(
                    None, f"{error.reason}; the archive has {columns_line(metadata)}"
                ) from None
            tests.append((get, test))
        passed = set()
        for record in records:
            values = [get(record) for get, _ in tests]
            if all(v is not None and test(v) for v, (_, test) in zip(values, tests, strict=True)):
                passed.add(record.id)
        return passed


def describe_columns(
    records: Sequence[SlideRecord], metadata: Metadata, max_values: int = 30
) -> list[dict[str, object]]:
    """The columns a filter can name, for controls built from the archive: each with its
    kind, whether it is built in, and its distinct values (text columns with at most
    `max_values`) or its smallest and largest value (numbers and dates)."""
    columns = []
    for name, get in BUILTIN.items():
        found = sorted({v for v in map(get, records) if v is not None})
        if found:
            values = found if len(found) <= max_values else None
            columns.append({"name": name, "kind": "text", "builtin": True, "values": values})
    for name in metadata.columns:
        kind = metadata.kinds[name]
        found = metadata.distinct(name)
        column: dict[str, object] = {"name": name, "kind": kind, "builtin": False}
        if kind == "text":
            column["values"] = found if len(found) <= max_values else None
        else:
            column |= {"min": found[0], "max": found[-1]}
        columns.append(column)
    return columns
